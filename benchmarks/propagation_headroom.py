"""How much a better propagation stop rule could gain, on the VALIDATION split only.

    SAM2UNET_DATA=../shared/data python benchmarks/propagation_headroom.py

Runs the engine's propagation from each structure's largest slice (the eval's propagated
protocol) but past its stop rule (until the mask vanishes or grows 3x in a slice), logs each
slice, then scores stop rules offline: today's rule, the best possible cut (knowing the
reference), a cut where the reference ends, and confidence rules. Also: Dice on the slices
propagation reaches, against tight boxes on the same slices.
"""

from __future__ import annotations

import numpy as np

from napari_sam2unet.backends import open_backend
from napari_sam2unet.engine import Engine
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Prompts
from napari_sam2unet.propagation import MIN_PROPAGATE_PIXELS, neighbour_box, propagation_stop
from napari_sam2unet.training.datasets import default_manifest, find_cases
from napari_sam2unet.training.evaluate import dice, load_cases

THRESHOLD = 0.5


def walk(engine, case):
    """The seed slice's (tp, area) and per direction the slices propagation would segment."""
    prompts = Prompts(boxes=case.boxes["propagated"])
    ((k0, tasks),) = engine.plan(prompts, "slices").items()
    engine.run_tasks(tasks)
    seed = engine.slice_result(k0, tasks, prompts, THRESHOLD).mask
    ref = case.mask
    out = {"seed": (int((seed & ref[:, :, k0]).sum()), int(seed.sum())), "dirs": []}
    for step in (-1, 1):
        seq, previous, current = [], seed, k0 + step
        while 0 <= current < ref.shape[2] and (box := neighbour_box(previous)) is not None:
            task = engine.box_task(Box(current, *box))
            engine.run_tasks([task])
            mask = engine.postprocess(current, [task], prompts, THRESHOLD)
            if mask.sum() < MIN_PROPAGATE_PIXELS:
                break
            seq.append({"k": current, "area": int(mask.sum()), "tp": int((mask & ref[:, :, current]).sum()),
                        "ref": int(ref[:, :, current].sum()), "today": propagation_stop(mask, previous) is not None,
                        "meanp": float(engine.probability(task)[mask].mean())})
            if mask.sum() > 3 * previous.sum():
                break
            previous, current = mask, current + step
        out["dirs"].append(seq)
    return out


def score(walks, voxels, stop) -> float:
    scores = []
    for w, n in zip(walks, voxels):
        tp, area = w["seed"]
        for seq in w["dirs"]:
            for index, s in enumerate(seq):
                if stop(s, seq[:index]):
                    break
                tp, area = tp + s["tp"], area + s["area"]
        scores.append(2 * tp / (area + n))
    return float(np.mean(scores))


def best_cut(walks, voxels) -> float:
    scores = []
    for w, n in zip(walks, voxels):
        tp, area = w["seed"]
        sums = [np.cumsum([0] + [s["tp"] for s in seq]) for seq in w["dirs"]]
        areas = [np.cumsum([0] + [s["area"] for s in seq]) for seq in w["dirs"]]
        best = max(2 * (tp + t1 + t2) / (area + a1 + a2 + n)
                   for t1, a1 in zip(sums[0], areas[0]) for t2, a2 in zip(sums[1], areas[1]))
        scores.append(best)
    return float(np.mean(scores))


def main() -> None:
    specs = [c for c in find_cases([default_manifest()], "validation") if c.split == "validation"]
    backend, _ = open_backend(find_model(None), "cpu", threads=2)
    engine = Engine(backend)
    walks, voxels, reached, tight_reached = [], [], [], []
    for volume, cases in load_cases(specs, 2, 0, 50):
        engine.set_volume(volume.data, volume.spacing, 2, "auto")
        for case in cases:
            walks.append(walk(engine, case))
            voxels.append(case.voxels)
            prop = engine.segment(Prompts(boxes=case.boxes["propagated"]), scope="propagate").mask
            tight = engine.segment(Prompts(boxes=case.boxes["tight"]), scope="slices").mask
            on = np.zeros_like(case.mask)
            on[:, :, [k for k in range(prop.shape[2]) if prop[:, :, k].any()]] = True
            reached.append(dice(prop & on, case.mask & on))
            tight_reached.append(dice(tight & on, case.mask & on))
    print(f"{len(walks)} validation structures; propagated Dice on the slices it reaches "
          f"{np.mean(reached):.3f}, tight boxes there {np.mean(tight_reached):.3f}")
    rules = {
        "today's rule": lambda s, before: s["today"],
        "run on (3x growth or vanishing only)": lambda s, before: False,
        "stop where the reference ends": lambda s, before: s["ref"] == 0,
        "today's, or mean probability < 0.7": lambda s, before: s["today"] or s["meanp"] < 0.7,
        "today's, or < 0.9x the first slices' mean probability": lambda s, before: s["today"] or (
            bool(before) and s["meanp"] < 0.9 * np.mean([b["meanp"] for b in before[:3]])),
    }
    for name, rule in rules.items():
        print(f"{name:55s} {score(walks, voxels, rule):.3f}")
    print(f"{'the best possible cut (knowing the reference)':55s} {best_cut(walks, voxels):.3f}")


if __name__ == "__main__":
    main()
