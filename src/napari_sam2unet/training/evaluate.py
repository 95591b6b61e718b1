"""`sam2unet eval`: 3D Dice per structure on held-out scans as users prompt, against baselines.

Every slice a structure touches gets a box from its reference outline, enlarged by 10% (the
"tight" protocol) or moved and resized at random as people draw them (the "jittered" protocol,
fixed seed). "interpolated" boxes only the first, middle and last slice and lets the engine
interpolate the boxes between them (`--scope between`); "propagated" boxes only the structure's
largest slice and propagates from there (`--scope propagate`). "corrected" boxes every slice
as "tight" does, then clicks three rounds, one click per slice a round at the middle of the
slice's largest error (positive on a miss, negative on a leak), as interactive-segmentation
benchmarks simulate users. "clicks" gives one click per slice at the middle of the structure's
largest part there, no box; "click_propagated" that click on the largest slice, propagated.
Each model segments through the engine, exactly as the CLI and the widget would; the classical
baseline (Otsu inside the box, the region under the box centre, holes filled) sees the same boxes,
the same intensity window and the same propagation rule.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..geometry import BOX_GROWTH, dice, enlarged_box, mask_bbox
from ..honoured_clicks import otsu_split
from ..preprocess import axis_plane, plan_views
from ..prompts import Box, Point, Prompts
from .datasets import SPLITS, add_data_root_argument
from .prompt_sim import deepest_point, error_click, largest_region

MIN_VOXELS = 50  # structures smaller than this in the whole volume are not scored
SMALL_VOXELS = 500  # structures below this are reported as "small" too
BOX_PROTOCOLS = ("tight", "jittered", "interpolated", "propagated")
CLICK_PROTOCOLS = ("corrected", "clicks", "click_propagated")
PROTOCOLS = BOX_PROTOCOLS + CLICK_PROTOCOLS
CORRECTION_ROUNDS = 3


@dataclass
class Case:
    """One structure of one scan: what a user would box slice by slice."""

    scan: str
    label: int | str
    mask: np.ndarray  # bool, the reference
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # protocol -> boxes
    points: dict[str, list[Point]] = field(default_factory=dict)  # protocol -> clicks

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def jittered_box(rng, rows, cols, shape) -> tuple[float, ...]:
    """A box as drawn by hand: each side off by up to ~15% of the extent, mostly outwards."""
    (r0, r1), (c0, c1) = rows, cols
    h, w = r1 - r0, c1 - c0
    out = rng.uniform(-0.05, 0.15, 4)
    box = (r0 - out[0] * h, c0 - out[1] * w, r1 + out[2] * h, c1 + out[3] * w)
    i0, j0 = max(0.0, box[0]), max(0.0, box[1])
    i1, j1 = min(shape[0], max(box[2], i0 + 1)), min(shape[1], max(box[3], j0 + 1))
    return i0, j0, i1, j1


def make_cases(scan: str, labels: np.ndarray, axis: int, seed: int, min_voxels: int = MIN_VOXELS,
               names: dict[int, str] | None = None) -> list[Case]:
    """A case per label with at least min_voxels voxels; boxes on every slice it touches.

    names: what to call a label in the report instead of its value (a union layer's one label).
    """
    rng = np.random.default_rng(seed)
    cases = []
    ids, counts = np.unique(labels, return_counts=True)
    for label, count in zip(ids.tolist(), counts.tolist()):
        if label == 0 or count < min_voxels:
            continue
        mask = labels == label
        name = (names or {}).get(int(label), int(label))
        case = Case(scan, name, mask, {p: [] for p in BOX_PROTOCOLS}, {"clicks": [], "click_propagated": []})
        largest = int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis))))
        for k in range(mask.shape[axis]):
            plane = axis_plane(mask, k, axis)
            if not plane.any():
                continue
            rows, cols = mask_bbox(plane)
            case.boxes["tight"].append(Box(k, *enlarged_box(rows, cols, plane.shape, BOX_GROWTH)))
            case.boxes["jittered"].append(Box(k, *jittered_box(rng, rows, cols, plane.shape)))
            middle = Point(k, *(v + 0.5 for v in deepest_point(largest_region(plane))))
            case.points["clicks"].append(middle)
            if k == largest:
                case.boxes["propagated"].append(case.boxes["tight"][-1])
                case.points["click_propagated"].append(middle)
        tight = case.boxes["tight"]
        case.boxes["interpolated"] = [tight[0], tight[len(tight) // 2], tight[-1]] if len(tight) > 2 else list(tight)
        cases.append(case)
    return cases


def corrected_volume(engine, segment, case: Case, rounds: int = CORRECTION_ROUNDS) -> np.ndarray:
    """A box on every slice, then rounds of one corrective click per slice at the middle of its
    largest error, each answered by the engine as the widget answers a click."""
    prompts = Prompts(boxes=list(case.boxes["tight"]))
    result = segment(prompts, "slices")
    for _ in range(rounds):
        for box in case.boxes["tight"]:
            truth = axis_plane(case.mask, box.slice, engine.axis)
            click = error_click(result.slices[box.slice].mask, truth)
            if click is not None:
                prompts.points.append(Point(box.slice, click[0] + 0.5, click[1] + 0.5, click[2]))
                engine.correct(result, box.slice, prompts)
    return result.mask


def model_volume(engine, segment, case: Case, protocol: str) -> np.ndarray:
    """A model's mask of a case under a protocol, as users drive it: `segment(prompts, scope)` is
    segment_volume on the case's volume with this engine (segment_case), returning its result."""
    if protocol == "corrected":
        return corrected_volume(engine, segment, case)
    if protocol in CLICK_PROTOCOLS:
        scope = "propagate" if protocol == "click_propagated" else "slices"
        return segment(Prompts(points=case.points[protocol]), scope).mask
    return segment(Prompts(boxes=case.boxes[protocol]), SCOPE_OF[protocol]).mask


# --- the classical baseline -----------------------------------------------------------------


def otsu_in_box(image: np.ndarray, box: tuple[float, ...]) -> np.ndarray:
    """Otsu inside the box; keep the class and connected region under the box centre; fill holes."""
    from ..postprocess import box_mask

    inside = box_mask(image.shape, box)
    mask = np.zeros(image.shape, dtype=bool)
    values = image[inside]
    if values.size < 2 or values.min() == values.max():
        return mask
    cut, _ = otsu_split(values, bins=256)
    centre = (min(int((box[0] + box[2]) / 2), image.shape[0] - 1), min(int((box[1] + box[3]) / 2), image.shape[1] - 1))
    bright = image > cut
    chosen = (bright if bright[centre] else ~bright) & inside
    regions, _ = ndimage.label(chosen, structure=np.ones((3, 3), bool))
    if regions[centre]:
        mask = ndimage.binary_fill_holes(regions == regions[centre])
    return mask


def baseline_volume(data: np.ndarray, boxes: list[Box], axis: int, view, protocol: str = "tight") -> np.ndarray:
    """Otsu in each box (on the window `view`); interpolated boxes between the given ones, or
    propagation outwards with the engine's rule, as the protocol says."""
    from ..prompts import interpolate_boxes
    from ..propagation import neighbour_box, propagation_continues

    propagate = protocol == "propagated"
    if protocol == "interpolated":
        boxes = list(interpolate_boxes(boxes).values())

    out = np.zeros(data.shape, dtype=bool)

    def plane(k):
        index = [slice(None)] * 3
        index[axis] = k
        return tuple(index)

    for box in boxes:
        first = otsu_in_box(view.apply(data[plane(box.slice)]), box.rect)
        out[plane(box.slice)] |= first
        for step in (-1, 1) if propagate else ():
            previous, k = first, box.slice + step
            while 0 <= k < data.shape[axis] and (rect := neighbour_box(previous)) is not None:
                mask = otsu_in_box(view.apply(data[plane(k)]), rect)
                if not propagation_continues(mask, previous):
                    break
                out[plane(k)] |= mask
                previous, k = mask, k + step
    return out


# --- running ------------------------------------------------------------------------------


SCOPE_OF = {"tight": "slices", "jittered": "slices", "interpolated": "between", "propagated": "propagate"}


def load_cases(specs, axis: int, seed: int, min_voxels: int) -> list[tuple]:
    """(volume, structures) per scan: every id of each label layer, and each union layer as one."""
    from ..io import read_volume
    from .sources import load_layer

    loaded = []
    for spec in specs:
        volume = read_volume(spec.image)
        cases = []
        for layer_spec in spec.labels:
            layer = load_layer(layer_spec, np.asarray(volume.data), spec.name)
            names = {1: layer_spec.name or "union"} if layer_spec.union else None
            cases += make_cases(spec.name, np.isin(layer.labels, layer.ids) * layer.labels, axis, seed,
                                min_voxels, names)
        loaded.append((volume, cases))
    return loaded


def evaluate(
    scans,
    models: list[str],
    axis: int = 2,
    window: str = "auto",
    seed: int = 0,
    min_voxels: int = MIN_VOXELS,
    threads: int | None = None,
    margin: float | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    baseline: bool = True,
    threshold: float | None = None,
) -> dict:
    """Dice per case for each method and protocol; returns a JSON-ready report.

    scans: TrainingCase objects (datasets.py) or (image, label map) path pairs. margin: evaluate
    with this crop margin instead of the card's (to measure how much framing matters).
    """
    from ..backends.pool import BackendPool
    from ..engine import Engine
    from ..segment_case import SegmentOptions
    from .datasets import LabelSpec, TrainingCase

    specs = [s if isinstance(s, TrainingCase)
             else TrainingCase(Path(s[0]).name, Path(s[0]), (LabelSpec(Path(s[1])),), "") for s in scans]
    report: dict = {"axis": axis, "window": window, "seed": seed, "enlarge": BOX_GROWTH, "margin": margin,
                    "threshold": threshold,
                    "protocols": list(protocols), "cases": [], "methods": {}}
    loaded = load_cases(specs, axis, seed, min_voxels)
    for _, cases in loaded:
        report["cases"] += [{"scan": c.scan, "label": c.label, "voxels": c.voxels} for c in cases]
    boxed = [p for p in protocols if p in BOX_PROTOCOLS]
    if baseline and boxed:  # Otsu has no clicks: it scores only the box protocols asked for
        method = report["methods"].setdefault("otsu-in-box", {p: [] for p in boxed})
        for volume, cases in loaded:
            view = plan_views(volume.data, window, "replicate")[0]  # the window the models get first
            for case in cases:
                for protocol in boxed:
                    pred = baseline_volume(volume.data, case.boxes[protocol], axis, view, protocol)
                    method[protocol].append(dice(pred, case.mask))
    with BackendPool() as pool:
        for model in models:
            options = SegmentOptions(axis=axis, window=window, threshold=threshold, model=model, backend="cpu",
                                     threads=threads)
            card, backend, _ = pool.get(model, "cpu", threads)
            engine = Engine(backend)
            if margin is not None:
                engine.card = replace(engine.card, input=replace(engine.card.input, margin=float(margin)))
            scores = {p: [] for p in protocols}
            began = time.perf_counter()
            for volume, cases in loaded:
                segment = _segmenter(volume, options, pool, engine)
                for case in cases:
                    for protocol in protocols:
                        scores[protocol].append(dice(model_volume(engine, segment, case, protocol), case.mask))
            name = card.name if card.name not in report["methods"] else f"{card.name} ({model})"
            report["methods"][name] = scores
            report.setdefault("seconds", {})[name] = round(time.perf_counter() - began, 1)
    report["summary"] = summarise(report)
    return report


def _segmenter(volume, options, pool, engine):
    """segment(prompts, scope) -> result: segment_volume on this volume with this engine (its cache kept)."""
    from ..segment_case import segment_volume

    def segment(prompts: Prompts, scope: str):
        return segment_volume(volume, prompts, replace(options, scope=scope), pool, engine=engine)[1]

    return segment


def summarise(report: dict) -> dict:
    """Mean Dice per method and protocol, over all cases and over the small ones."""
    small = np.array([c["voxels"] < SMALL_VOXELS for c in report["cases"]])
    out = {}
    for name, scores in report["methods"].items():
        out[name] = {}
        for protocol, values in scores.items():
            values = np.asarray(values)
            out[name][protocol] = {
                "mean": round(float(values.mean()), 4),
                "median": round(float(np.median(values)), 4),
                "small_mean": round(float(values[small].mean()), 4) if small.any() else None,
            }
    return out


def markdown_table(report: dict) -> str:
    """The summary and the per-case table, as Markdown for docs and model cards."""
    methods = list(report["methods"])
    protocols = report.get("protocols", PROTOCOLS)
    lines = [
        "| method | " + " | ".join(f"{p} mean Dice" for p in protocols) + " | "
        + " | ".join(f"{p} small (<{SMALL_VOXELS} vox)" for p in protocols) + " |",
        "|---" * (1 + 2 * len(protocols)) + "|",
    ]
    for name in methods:
        s = report["summary"][name]
        cells = [f"{s[p]['mean']:.3f}" if p in s else "-" for p in protocols] + [
            f"{s[p]['small_mean']:.3f}" if p in s and s[p]["small_mean"] is not None else "-" for p in protocols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = protocols[0]
    lines += ["", "| scan | label | voxels | " + " | ".join(f"{m} ({first})" for m in methods) + " |",
              "|---" * (3 + len(methods)) + "|"]
    for index, case in enumerate(report["cases"]):
        cells = [f"{report['methods'][m][first][index]:.3f}" if first in report["methods"][m] else "-"
                 for m in methods]
        lines.append(f"| {case['scan']} | {case['label']} | {case['voxels']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_eval_parser(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="3D Dice per structure on held-out scans as users prompt (boxes, corrective clicks, clicks alone), "
        "against an Otsu-in-box baseline",
        description="Boxes come from each structure's reference outline on every slice (enlarged by 10%, "
        "and a jittered variant); clicks go to the middle of the structure or of the largest error; every "
        "model segments through the engine, and the classical baseline segments the same boxes.",
    )
    p.add_argument("--model", action="append", default=None,
                   help="model name or .onnx/.yaml path; repeat to compare (default: the bundled model)")
    p.add_argument("--scan", action="append", default=None, metavar="IMAGE:LABELS",
                   help="image and label map to score (default: the test split of --data)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="cases to score: a manifest, case folders or an MSD dataset (default: the bundled "
                   "model's manifest)")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="which split of a manifest to score (folders count as this split)")
    add_data_root_argument(p)
    p.add_argument("--margin", type=float, default=None, help="crop margin instead of the card's")
    p.add_argument("--protocol", action="append", choices=PROTOCOLS, default=None,
                   help="score only these protocols (repeat; default: all): boxes on every slice (tight, "
                   "jittered), on three (interpolated), on one (propagated); boxes then 3 rounds of corrective "
                   "clicks (corrected); one click per slice (clicks) or on one slice, propagated (click_propagated)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    p.add_argument("--window", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the jittered boxes")
    p.add_argument("--min-voxels", type=int, default=MIN_VOXELS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    p.add_argument("--update-card", action="store_true",
                   help="write the summary into the first model's card (metrics: held_out_test)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..options import check_output_file

    for path, option in ((args.json, "--json"), (args.markdown, "--markdown")):
        if path is not None:  # a folder we cannot write is said now, not after the evaluation
            check_output_file(path, option)
    if args.scan:
        scans = []
        for text in args.scan:
            image, sep, labels = text.rpartition(":")
            if not sep:
                raise InputError(f"--scan {text!r}: give IMAGE:LABELS")
            scans.append((Path(image), Path(labels)))
    else:
        from .datasets import default_manifest, find_cases

        found = find_cases(args.data or [default_manifest()], args.split, args.data_root)
        scans = [c for c in found if c.split == args.split]
        if not scans:
            where = ", ".join(map(str, args.data or ["the bundled manifest"]))
            raise InputError(f"no cases in the {args.split} split of {where}")
    report = evaluate(scans, args.model or [None], args.axis, args.window, args.seed, args.min_voxels, args.threads,
                      args.margin, tuple(args.protocol or PROTOCOLS))
    table = markdown_table(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.update_card:
        update_card(args.model[0] if args.model else None, report, scans)
    return 0


def _scan_name(scan) -> str:
    return scan.name if hasattr(scan, "labels") else Path(scan[0]).name


def update_card(model: str | None, report: dict, scans) -> Path:
    """Record the evaluation in the model's card (the .onnx and its sha256 are untouched)."""
    from ..models import find_model, load_card, write_card

    card = find_model(model)
    if card.card_path is None:
        raise InputError(f"{card.file.name} has no model card to update; export it with a card first")
    data = dict(load_card(card.card_path).raw)
    names = list(report["methods"])
    own = next(n for n in names if n == card.name or n.startswith(card.name + " ("))
    data.setdefault("metrics", {})["held_out_test"] = {
        "what": "3D Dice per structure, mean over structures, by protocol: boxes from the reference outline "
                "(tight, jittered, interpolated, propagated), boxes then 3 rounds of corrective clicks (corrected), "
                "one click per slice (clicks) or on one slice, propagated (click_propagated)",
        "scans": [_scan_name(scan) for scan in scans],
        "cases": len(report["cases"]),
        "min_voxels": int(min(c["voxels"] for c in report["cases"])) if report["cases"] else None,
        "enlarge": BOX_GROWTH,
        "jitter_seed": report["seed"],
        "mean_dice": {name: report["summary"][name] for name in [own] + [n for n in names if n != own]},
    }
    return write_card(data, card.card_path)
