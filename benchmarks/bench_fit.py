"""Under- or over-fitting? Crop Dice of trained runs on training crops and on validation crops.

A model that scores lower on crops drawn like its training data than on the held-out
validation crops is not fitting what it was trained on: more data will not help it, a better
fit will. Each run folder is one `sam2unet train --out-dir`; its best.pt is scored.
Run: python benchmarks/bench_fit.py runs/compact runs/unet [--crops 160]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from napari_sam2unet.training import data as tdata
from napari_sam2unet.training import sources as tsources
from napari_sam2unet.training.train import EVAL_SIZE, dice_scores, input_spec, load_run_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--crops", type=int, default=160)
    parser.add_argument("--seed", type=int, default=77, help="of the training crops (not the training seed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (EVAL_SIZE, EVAL_SIZE)
    # The bundled manifest's patients: training crops from the train split, held-out crops from
    # the validation split, as `sam2unet train` draws them.
    from napari_sam2unet.training.datasets import default_manifest, find_cases
    from napari_sam2unet.training.sources import split_cases

    splits = split_cases(find_cases([default_manifest()], "train"))
    sources = tsources.load_sources(splits["train"])
    crops = {}  # per input spec: (training crops, validation crops), the same for every run
    print("| run | arch / config | parameters (M) | training-crop Dice | validation-crop Dice |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        model, saved = load_run_model(run / "best.pt", "cpu")
        spec = input_spec(argparse.Namespace(**saved))
        if spec not in crops:
            rng = np.random.default_rng(args.seed)
            crops[spec] = (tdata.batch(rng, sources, spec, size, args.crops),
                           tdata.validation_set(spec, size, splits["validation"], n=args.crops))
        (train_x, train_y), (val_x, val_y) = crops[spec]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        name = saved["config"] if saved["arch"] == "sam2unet" else "plain U-Net"
        print(f"| {run} | {name} | {params:.1f} | {dice_scores(model, train_x, train_y, 'cpu'):.3f} "
              f"| {dice_scores(model, val_x, val_y, 'cpu'):.3f} |", flush=True)

if __name__ == "__main__":
    main()
