"""Propagation stop rules, replayed on recorded walks (how propagation.PROPAGATE_CHECK was chosen).

Each structure of the validation split is propagated from its largest slice (a box, or one
click) to the volume's edge with no stop rule but "vanished", and every slice's features are
recorded: area, overlap with its neighbour, the share of the mask that the look without the
prior also shows. A stop rule only cuts the same walk short, so replaying rules on the record
gives exactly the Dice the engine would get with them.

    SAM2UNET_DATA=../shared/data python benchmarks/bench_propagation_stop.py [--model M] [--record F]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_sam2unet import propagation
from napari_sam2unet.backends import open_backend
from napari_sam2unet.engine import Engine
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Prompts
from napari_sam2unet.training import evaluate
from napari_sam2unet.training.datasets import default_manifest, find_cases


def record_walks(model: str) -> list[dict]:
    found = [c for c in find_cases([default_manifest()], "validation", None) if c.split == "validation"]
    hippocampus = [c for c in found if "hippo" in c.name]
    specs = hippocampus[::2] + [c for c in found if "hippo" not in c.name]
    backend, _ = open_backend(find_model(model), "cpu", threads=1)
    walks = []
    with backend:
        engine = Engine(backend)
        for volume, cases in evaluate.load_cases(specs, 2, 0, evaluate.MIN_VOXELS):
            engine.set_volume(volume.data, volume.spacing, 2, "auto")
            for case in cases:
                for protocol in ("propagated", "click_propagated"):
                    prompts = (Prompts(boxes=case.boxes[protocol]) if protocol == "propagated"
                               else Prompts(points=case.points[protocol]))
                    walks.append(_walk(engine, case, protocol, prompts))
    return walks


def _walk(engine: Engine, case, protocol: str, prompts: Prompts) -> dict:
    (start, seed), = engine.segment(prompts, scope="slices").slices.items()
    walk = {"scan": case.scan, "label": str(case.label), "protocol": protocol, "reference": int(case.mask.sum()),
            "seed": {"area": int(seed.mask.sum()), "hit": int((seed.mask & case.mask[:, :, start]).sum())},
            "directions": []}
    for step in (-1, 1):
        rows, previous, k = [], seed.mask, start + step
        while 0 <= k < engine.shape[2]:
            task = engine.propagation_task(k, previous)
            if task is None:
                break
            alone = replace(task, prior=None)
            engine.run_tasks([task, alone])
            mask = engine.postprocess(k, [task], prompts, 0.5)
            if mask.sum() < propagation.MIN_PROPAGATE_PIXELS:
                break
            seen_alone = engine.postprocess(k, [alone], prompts, 0.5)
            area, before = int(mask.sum()), int(previous.sum())
            rows.append({"area": area, "previous": before, "hit": int((mask & case.mask[:, :, k]).sum()),
                         "overlap": int((mask & previous).sum()) / max(1, min(area, before)),
                         "share_alone": int((mask & seen_alone).sum()) / area})
            previous, k = mask, k + step
        walk["directions"].append(rows)
    return walk


def replay(walk: dict, check: float) -> float:
    """The walk's Dice had propagation stopped by the engine's rules with this check."""
    hit, area = walk["seed"]["hit"], walk["seed"]["area"]
    for rows in walk["directions"]:
        for row in rows:
            jumped = row["overlap"] < propagation.PROPAGATE_MIN_OVERLAP
            grew = row["area"] > propagation.PROPAGATE_MAX_GROWTH * row["previous"]
            if jumped or grew or row["share_alone"] < check:
                break
            hit, area = hit + row["hit"], area + row["area"]
    return 2 * hit / (area + walk["reference"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2unet-compact")
    parser.add_argument("--record", type=Path, help="reuse (or write) the recorded walks here")
    args = parser.parse_args()
    if args.record and args.record.is_file():
        walks = json.loads(args.record.read_text())
    else:
        walks = record_walks(args.model)
        if args.record:
            args.record.write_text(json.dumps(walks))
    print(f"{len(walks) // 2} structures; mean Dice (propagated / one click propagated) by PROPAGATE_CHECK")
    for check in (0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8):
        means = [np.mean([replay(w, check) for w in walks if w["protocol"] == p])
                 for p in ("propagated", "click_propagated")]
        print(f"  {check:.2f}: {means[0]:.3f} / {means[1]:.3f}")


if __name__ == "__main__":
    main()
