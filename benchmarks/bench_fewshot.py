"""Few-shot fine-tuning: label k slices of a structure, fine-tune, segment the other slices.

On whole scans the bundled model never trained on (BraTS 2013 whole tumours, ITK-SNAP brain
structures, DeepLesion CT lesions), k = 1, 3, 5 labelled slices are spread over the structure;
the base and the fine-tuned model then segment every other slice of it, with a box on each slice
(eval's tight protocol) and propagated from the largest labelled slice. Dice is 3D over the
slices not labelled. Also: fine-tune on BraTS patients 1-3 (every slice), test on patient 4.

    nice -n 19 .venv/bin/python benchmarks/bench_fewshot.py --json fewshot.json --markdown fewshot.md

Seconds are wall time of the fine-tuning and the process CPU time it used (the machine may be
shared); torch runs on --threads threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_sam2unet.training.datasets import DATA_ENV

DATA = Path(os.environ.get(DATA_ENV, Path(__file__).resolve().parents[1].parent / "shared" / "data"))
# (scan, case folder, label ids; several ids = their union, one structure)
STRUCTURES = [
    *[(f"brats2013_pat000{p} flair, whole tumour", f"brats2013_pat000{p}_flair", (1, 2, 3, 4)) for p in (1, 2, 3, 4)],
    ("itksnap brain, lateral ventricles", "itksnap_mricrop_brain", (1,)),
    ("itksnap brain, right hippocampus", "itksnap_mricrop_brain", (4,)),
    ("itksnap brain, caudates", "itksnap_mricrop_brain", (7,)),
    *[(f"deeplesion {c.split('_')[2]}, lesion", c, (1,)) for c in (
        "deeplesion_ct_000001_02_01_008_023", "deeplesion_ct_000002_03_01_035_047",
        "deeplesion_ct_000009_03_01_036_048", "deeplesion_ct_000010_01_01_078_090")],
    # Added 2026-12-01 (stop 12) by one rule, before any of them was fine-tuned: every other
    # BraTS scan in shared/data that neither trained the base model nor tunes the recipe.
    *[(f"brats2013_pat000{p} t1c, whole tumour", f"brats2013_pat000{p}_t1c", (1, 2, 3, 4)) for p in (2, 3, 4)],
    ("brats2021_01646 flair, edema", "brats2021_01646_flair_edema", (1,)),
]
# The recipe (steps, learning rate) is chosen on these, never on the reported list above: other
# structures of the brain crop, another sequence of BraTS patient 1, another glioma scan.
TUNING = [
    ("itksnap brain, left hippocampus", "itksnap_mricrop_brain", (5,)),
    ("itksnap brain, corpus callosum", "itksnap_mricrop_brain", (8,)),
    ("brats2013_pat0001 t1c, whole tumour", "brats2013_pat0001_t1c", (1, 2, 3, 4)),
    ("tcia glioma flair (predicted labels), whole tumour", "bratstoolkit_otherexamplefromtcia_fla_pred", (1, 2, 4)),
    # a second scan the base already segments well (validation patient, not reported)
    ("tcia glioma t1c (predicted labels), whole tumour", "bratstoolkit_otherexamplefromtcia_t1c_pred", (1, 2, 3, 4)),
]


def ft_defaults():
    from napari_sam2unet.training.finetune import Settings

    return Settings()


def spread(slices: list[int], k: int) -> list[int]:
    """k slices spread evenly inside the structure (the middle one for k = 1), as a user picks them."""
    positions = [(i + 1) / (k + 1) for i in range(k)]
    return sorted({slices[min(len(slices) - 1, int(p * len(slices)))] for p in positions})


def segment(card_path, volume, mask, slices_scored, start_slice, threads):
    """3D Dice over slices_scored: a box on each, and propagated from start_slice."""
    from napari_sam2unet.backends import open_backend
    from napari_sam2unet.engine import Engine
    from napari_sam2unet.geometry import BOX_GROWTH, dice, enlarged_box, mask_bbox
    from napari_sam2unet.models import find_model
    from napari_sam2unet.prompts import Box, Prompts

    def box(k):
        plane = mask[:, :, k]
        return Box(k, *enlarged_box(*mask_bbox(plane), plane.shape, BOX_GROWTH))

    backend, _ = open_backend(find_model(card_path), "cpu", threads=threads)
    out = {}
    with backend:
        engine = Engine(backend)
        engine.set_volume(volume.data, volume.spacing, 2, "auto")
        scored = np.zeros(mask.shape[2], bool)
        scored[slices_scored] = True
        for protocol, prompts, scope in (("box", [box(k) for k in slices_scored], "slices"),
                                         ("propagated", [box(start_slice)], "propagate")):
            result = engine.segment(Prompts(boxes=prompts), scope=scope)
            out[protocol] = dice(result.mask[:, :, scored], mask[:, :, scored])
    return out


def finetune_volume(base_name, volume, labels, slices, settings, out):
    from napari_sam2unet.training import finetune as ft

    base = ft.load_base(base_name)
    data = ft.volume_data(volume.data, labels, volume.spacing, base.spec.channels, 2, slices)
    return _timed(lambda: ft.finetune(base, data, out, settings, overwrite=True))


def _timed(run):
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base model (default: the bundled one)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--set", choices=("report", "tuning"), default="report",
                        help="report: the structures reported; tuning: those the recipe is chosen on")
    parser.add_argument("--steps", type=int, default=ft_defaults().steps)
    parser.add_argument("--lr", type=float, default=ft_defaults().lr)
    parser.add_argument("--deform", type=float, default=ft_defaults().deform)
    parser.add_argument("--exact", type=float, default=ft_defaults().exact)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON of the base model's Dice per structure and k, reused across recipes")
    parser.add_argument("--trunk", nargs="+", default=["frozen"], help="frozen and/or trained (k = 3 only for "
                        "the second)")
    parser.add_argument("--only", nargs="+", default=None, help="substrings of the structures to run")
    parser.add_argument("--no-cohort", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from napari_sam2unet.io import read_volume
    from napari_sam2unet.models import find_model
    from napari_sam2unet.training import finetune as ft

    torch.set_num_threads(args.threads)
    base_card = find_model(args.base)
    report = {"base": base_card.name, "base_sha256": base_card.sha256, "set": args.set, "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "deform": args.deform, "exact": args.exact,
              "threads": args.threads, "rows": [], "cohort": None}
    tmp = Path(tempfile.mkdtemp(prefix="fewshot-"))
    structures = [s for s in (STRUCTURES if args.set == "report" else TUNING)
                  if not args.only or any(o in s[0] for o in args.only)]
    # k = 3 first (the goal's case), then the other k, then other trunk settings at k = 3:
    # a run stopped early has the most important rows.
    ks = sorted(args.k, key=lambda k: (k != 3, k))
    runs = [(args.trunk[0], k) for k in ks] + [(trunk, 3) for trunk in args.trunk[1:]]
    for trunk, k in runs:
        for scan, folder, ids in structures:
            volume = read_volume(DATA / "cases" / folder / "image.nii.gz")
            label_volume = read_volume(DATA / "cases" / folder / "label.nii.gz")
            mask = np.isin(np.asarray(label_volume.data).astype(np.int64), ids)
            slices = [s for s in range(mask.shape[2]) if mask[:, :, s].sum() >= ft.MIN_PIXELS]
            areas = mask.sum((0, 1))
            chosen = spread(slices, k)
            scored = [s for s in range(mask.shape[2]) if mask[:, :, s].any() and s not in chosen]
            start = max(chosen, key=lambda s: areas[s])
            # the base's Dice depends only on the base, the structure and k: compute it once
            key = f"{base_card.sha256}|{folder}|{ids}|{chosen}"
            cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
            before = cache.get(key) or segment(base_card.file, volume, mask, scored, start, args.threads)
            if args.cache:
                cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
                cache[key] = before
                args.cache.write_text(json.dumps(cache, indent=1))
            settings = ft.Settings(steps=args.steps, batch=args.batch, lr=args.lr, trunk=trunk, threads=args.threads,
                                   deform=args.deform, exact=args.exact)
            result, wall, cpu = finetune_volume(args.base, volume, mask.astype(np.uint8), chosen, settings,
                                                tmp / f"{folder}-{k}-{trunk}.onnx")
            after = segment(result.onnx, volume, mask, scored, start, args.threads)
            row = {"scan": scan, "folder": folder, "k": k, "trunk": trunk, "slices": chosen,
                   "scored_slices": len(scored),
                   "before": before, "after": after, "crop_dice": [result.dice_before, result.dice_after],
                   "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if not args.no_cohort:
        report["cohort"] = cohort(args, base_card, tmp)
        print(json.dumps(report["cohort"]), flush=True)
    report["summary"] = summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    table = markdown(report)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


def cohort(args, base_card, tmp):
    """Fine-tune on every slice of BraTS 2013 patients 1-3 (FLAIR whole tumour), score patient 4."""
    from napari_sam2unet.io import read_volume
    from napari_sam2unet.training import finetune as ft
    from napari_sam2unet.training.datasets import LabelSpec, TrainingCase

    def case(p, split):
        folder = DATA / "cases" / f"brats2013_pat000{p}_flair"
        return TrainingCase(f"brats2013_pat000{p}_flair", folder / "image.nii.gz",
                        (LabelSpec(folder / "label.nii.gz", union=True),), f"pat{p}", split)

    base = ft.load_base(args.base)
    data = ft.specs_data([case(1, "train"), case(2, "train"), case(3, "train"), case(4, "validation")],
                         base.spec.channels)
    settings = ft.Settings(steps=args.steps, batch=args.batch, lr=args.lr, trunk=args.trunk[0],
                           threads=args.threads, deform=args.deform, exact=args.exact)
    result, wall, cpu = _timed(lambda: ft.finetune(base, data, tmp / "cohort.onnx", settings, overwrite=True))
    volume = read_volume(DATA / "cases" / "brats2013_pat0004_flair" / "image.nii.gz")
    mask = np.asarray(read_volume(DATA / "cases" / "brats2013_pat0004_flair" / "label.nii.gz").data) > 0
    scored = [s for s in range(mask.shape[2]) if mask[:, :, s].any()]
    start = int(np.argmax(mask.sum((0, 1))))
    return {"train": "brats2013 pat0001-0003 flair, every labelled slice", "test": "brats2013_pat0004_flair",
            "before": segment(base_card.file, volume, mask, scored, start, args.threads),
            "after": segment(result.onnx, volume, mask, scored, start, args.threads),
            "crop_dice": [result.dice_before, result.dice_after], "seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1)}


def summary(report) -> dict:
    out = {}
    for row in report["rows"]:
        key = f"k={row['k']} trunk {row['trunk']}"
        entry = out.setdefault(key, {"n": 0, "box_before": [], "box_after": [], "prop_before": [], "prop_after": [],
                                     "seconds": [], "cpu_seconds": []})
        entry["n"] += 1
        for name, value in (("box_before", row["before"]["box"]), ("box_after", row["after"]["box"]),
                            ("prop_before", row["before"]["propagated"]), ("prop_after", row["after"]["propagated"]),
                            ("seconds", row["seconds"]), ("cpu_seconds", row["cpu_seconds"])):
            entry[name].append(value)
    means = {key: {name: (v if name == "n" else round(float(np.mean(v)), 3)) for name, v in entry.items()}
             for key, entry in out.items()}
    for key, entry in means.items():
        entry.update(per_scan([r for r in report["rows"] if f"k={r['k']} trunk {r['trunk']}" == key]))
    return means


def per_scan(rows) -> dict:
    """Gains averaged per scan (a scan's structures first averaged together), as the goal counts them."""
    scans = {}
    for r in rows:
        scans.setdefault(r.get("folder", r["scan"]), []).append(
            (r["after"]["box"] - r["before"]["box"], r["after"]["propagated"] - r["before"]["propagated"]))
    gains = np.array([np.mean(g, axis=0) for g in scans.values()])
    return {"scans": len(scans), "box_gain_per_scan": round(float(gains[:, 0].mean()), 3),
            "prop_gain_per_scan": round(float(gains[:, 1].mean()), 3)}


def markdown(report) -> str:
    lines = ["| k labelled slices | trunk | structures (scans) | box on each slice: Dice before -> after | "
             "propagated: before -> after | gain per scan, box / propagated | fine-tuning s (wall / CPU) |",
             "|---|---|---|---|---|---|---|"]
    for key, s in report["summary"].items():
        k, trunk = key.split(" trunk ")
        lines.append(f"| {k[2:]} | {trunk} | {s['n']} ({s['scans']}) | {s['box_before']:.3f} -> {s['box_after']:.3f} | "
                     f"{s['prop_before']:.3f} -> {s['prop_after']:.3f} | {s['box_gain_per_scan']:+.3f} / "
                     f"{s['prop_gain_per_scan']:+.3f} | {s['seconds']:.0f} / {s['cpu_seconds']:.0f} |")
    lines += ["", "| structure | k | trunk | box before -> after | propagated before -> after | s (wall / CPU) |",
              "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['scan']} | {r['k']} | {r['trunk']} | {r['before']['box']:.3f} -> {r['after']['box']:.3f} | "
                     f"{r['before']['propagated']:.3f} -> {r['after']['propagated']:.3f} | "
                     f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f} |")
    c = report.get("cohort")
    if c:
        lines += ["", f"Cohort: fine-tuned on {c['train']}, tested on {c['test']}: box on each slice "
                  f"{c['before']['box']:.3f} -> {c['after']['box']:.3f}, propagated {c['before']['propagated']:.3f} -> "
                  f"{c['after']['propagated']:.3f}; {c['seconds']:.0f} s wall, {c['cpu_seconds']:.0f} s CPU."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
