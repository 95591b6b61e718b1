"""One click against a box, and negative points on leaks, on VALIDATION structures only.

    nice -n 19 .venv/bin/python benchmarks/bench_clicks.py [--model NAME] [--slices 6]

Per structure: up to --slices slices (evenly spread over those where its largest connected
region has at least 30 pixels, axis 2); the target is that region. A click is its deepest pixel
(the middle a user clicks); a box is its bounding box. Click choices and negative-point splits
are switched through the engine's and postprocess's settings, on one cache; the best of the
shipped crops, chosen knowing the target, is the ceiling a choice rule can reach. A leak is the
largest region of the box mask outside the target that touches it (at least 10 pixels); the
negative point goes on its deepest pixel. Dice per slice, averaged per structure, then over
structures. The structures are the bundled manifest's validation split (training/bundled_data.yaml,
under $SAM2UNET_DATA): its test and training patients are never read here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_sam2unet import postprocess
from napari_sam2unet.backends import open_backend
from napari_sam2unet.engine import Engine
from napari_sam2unet.geometry import dice, mask_bbox
from napari_sam2unet.io import read_volume
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Point, Prompts
from napari_sam2unet.training.datasets import default_manifest, find_cases
from napari_sam2unet.training.sources import load_layer

CLICK_CHOICES = ("stability", "border", "confidence")
SIDE_SETS = {"x2 from 24 mm": (24.0, 48.0, 96.0, 192.0), "x1.5 from 16 mm": (16.0, 24.0, 36.0, 54.0, 81.0, 121.0)}
FIXED_SIDES = (16.0, 24.0, 32.0, 48.0, 96.0)
SPLITS = ("nearest", "shape", "probability")
MIN_PIXELS, MIN_LEAK = 30, 10


def largest(mask):
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if not count:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def deepest(mask) -> tuple[float, float]:
    depth = ndimage.distance_transform_edt(mask)
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return r + 0.5, c + 0.5


def validation_layers():
    """(case, name, label map, label values) for each label layer of the manifest's validation patients."""
    for spec in find_cases([default_manifest()], "validation"):
        if spec.split != "validation":
            continue
        image = np.asarray(read_volume(spec.image).data)
        for index, layer_spec in enumerate(spec.labels):
            layer = load_layer(layer_spec, image, spec.name)
            label = layer_spec.name or ("union" if layer_spec.union else f"layer {index}")
            name = spec.name if index == 0 else f"{spec.name} ({label})"
            yield spec, name, np.isin(layer.labels, layer.ids) * layer.labels, layer.ids


def cases_of(labels, value, slices):
    areas = [(k, largest(labels[:, :, k] == value)) for k in range(labels.shape[2])]
    areas = [(k, m) for k, m in areas if m.sum() >= MIN_PIXELS]
    if len(areas) > slices:
        areas = [areas[int(i)] for i in np.linspace(0, len(areas) - 1, slices)]
    return areas


def segment(engine, prompts, scope="slices"):
    result = engine.segment(prompts, scope)
    return {k: s.mask for k, s in result.slices.items()}


def measure(engine, target, k):
    """Dice of each method on one slice, and the negative-point figures where the box leaks."""
    row = {}
    (r0, r1), (c0, c1) = mask_bbox(target)
    box = Box(k, float(r0), float(c0), float(r1), float(c1))
    box_mask = segment(engine, Prompts([box]))[k]
    row["box"] = dice(box_mask, target)
    click = Point(k, *deepest(target))
    if LEAKS_ONLY:
        return row | leak_figures(engine, target, k, box, box_mask)
    chosen = (engine.click_choice, engine.click_sides_mm)
    for sides_name, sides in SIDE_SETS.items():
        engine.click_sides_mm = sides
        for choice in CLICK_CHOICES:
            engine.click_choice = choice
            row[f"click {choice}, {sides_name}"] = dice(segment(engine, Prompts(points=[click]))[k], target)
    for side in FIXED_SIDES:
        engine.click_sides_mm = (side,)
        row[f"click {side:g} mm only"] = dice(segment(engine, Prompts(points=[click]))[k], target)
    engine.click_choice, engine.click_sides_mm = chosen
    row["click (as shipped)"] = dice(segment(engine, Prompts(points=[click]))[k], target)
    row["click, best crop knowing the target (ceiling)"] = best_crop_dice(engine, click, target)
    whole = engine.whole_slice_task(k)
    engine.run_tasks([whole])
    row["click, whole slice (before)"] = dice(
        postprocess.select_regions(engine.probability(whole), engine.card.threshold, None, [(click.i, click.j)]),
        target)
    return row | leak_figures(engine, target, k, box, box_mask)


def best_crop_dice(engine, click, target) -> float:
    """Dice of the best of the shipped candidate crops around a click, chosen knowing the target:
    what a perfect choice among the crops would give (the shipped rule sees only the masks)."""
    tasks = engine.click_tasks(click.slice, [click])
    engine.run_tasks(tasks)
    at = [(click.i, click.j)]
    return max(dice(postprocess.select_regions(engine.probability(t), engine.card.threshold, t.clip, at), target)
               for t in tasks)


def leak_figures(engine, target, k, box, box_mask):
    row = {}
    # A leak: mask beyond 2 pixels of the target (not a rim along its edge) that touches it.
    near = ndimage.binary_dilation(target, iterations=2)
    regions, _ = ndimage.label(box_mask, structure=np.ones((3, 3)))
    touching = set(np.unique(regions[target & box_mask])) - {0}
    outside = box_mask & ~near & np.isin(regions, list(touching))
    if touching and outside.sum() >= MIN_LEAK:
        leak = largest(outside)
        if leak.sum() >= MIN_LEAK and (ndimage.binary_dilation(leak, iterations=3) & target).any():
            negative = Point(k, *deepest(leak), positive=False)
            row["leak before"] = dice(box_mask, target)
            for split in SPLITS:
                postprocess.NEGATIVE_SPLIT = split
                row[f"leak {split}"] = dice(segment(engine, Prompts([box], [negative]))[k], target)
            postprocess.NEGATIVE_SPLIT = "nearest"
    return row


LEAKS_ONLY = False


def main() -> None:
    global LEAKS_ONLY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--leaks-only", action="store_true", help="only the negative-point figures")
    args = parser.parse_args()
    LEAKS_ONLY = args.leaks_only
    card = find_model(args.model)
    backend, _ = open_backend(card, "cpu")
    per_structure = {}
    for spec, name, labels, values in validation_layers():
        volume = read_volume(spec.image)
        engine = Engine(backend)
        engine.set_volume(volume.data, volume.spacing, axis=2, window="auto")
        for value in values:
            rows = [measure(engine, target, k) for k, target in cases_of(labels, value, args.slices)]
            if not rows:
                continue
            keys = {key for row in rows for key in row}
            summary = {key: float(np.mean([r[key] for r in rows if key in r])) for key in keys}
            summary["slices"] = len(rows)
            summary["leaks"] = sum("leak before" in r for r in rows)
            summary["deleted"] = {
                s: sum(1 for r in rows if f"leak {s}" in r and r[f"leak {s}"] < 0.5 * r["leak before"]) for s in SPLITS
            }
            per_structure[f"{name} {value}"] = summary
            print(f"{name} {value}: box {summary['box']:.3f}, click {summary.get('click (as shipped)', 0):.3f}, "
                  f"leaks {summary['leaks']}", flush=True)
    methods = sorted({k for s in per_structure.values() for k in s if k not in ("slices", "leaks", "deleted")})
    print(f"\n{card.name}, {len(per_structure)} validation structures (mean over structures)")
    for method in methods:
        values = [s[method] for s in per_structure.values() if method in s]
        print(f"{method:32s} {np.mean(values):.3f}  (n={len(values)})")
    for split in SPLITS:
        deleted = sum(s["deleted"][split] for s in per_structure.values())
        print(f"leak {split}: slices where Dice fell below half: {deleted} of "
              f"{sum(s['leaks'] for s in per_structure.values())}")
    if args.json:
        args.json.write_text(json.dumps(per_structure, indent=1))


if __name__ == "__main__":
    main()
