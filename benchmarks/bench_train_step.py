"""Where a training run's time goes: crop workers alone, then training steps on one batch.

Prints crops per second of the crop workers, and milliseconds per training step without and
with the rounds of clicks on the model's own errors (prompted models), on this machine's GPU
if it has one. A GPU run is as fast as the slower of the two (docs/training.md, "On a GPU").
Run: python benchmarks/bench_train_step.py --data MANIFEST [--config medium] [--workers 14]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from napari_sam2unet.training import train
from napari_sam2unet.training.data import CropStream
from napari_sam2unet.training.train_settings import TrainSettings, input_spec, training_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", help="manifests or case folders (default: the bundled manifest)")
    parser.add_argument("--config", default="compact")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="batches timed from the workers")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per setting")
    args = parser.parse_args()
    settings = TrainSettings(channels="prompted", config=args.config, data=args.data, batch=args.batch)
    cases = training_cases(settings)["train"]
    started = time.perf_counter()
    stream = CropStream(0, input_spec(settings), (settings.size,) * 2, args.batch, cases, workers=args.workers)
    try:
        for _ in range(args.workers):  # every worker has made its first batch
            x, y = stream.get()
        ready = time.perf_counter()
        for _ in range(args.batches):
            stream.get()
        rate = args.batch * args.batches / (time.perf_counter() - ready)
    finally:
        stream.close()
    print(f"crop workers: {args.workers}, first batches after {ready - started:.1f} s, {rate:.0f} crops/s")

    device = train._device(torch, settings)
    with tempfile.TemporaryDirectory() as out:
        run = train._start_run(torch, settings, device, Path(out))
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    print(f"device: {device}, {args.config}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    for share in (0.0, 1.0):
        settings.click_share = share
        timings = []
        for _ in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train._step(torch, run, settings, x, y, None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
            run.step += 1
        mean = 1000 * sum(timings[2:]) / args.steps  # the first two warm up
        what = "with 1-2 rounds of clicks" if share else "without click rounds"
        print(f"training step {what}: {mean:.0f} ms ({args.batch / mean * 1000:.0f} crops/s)")


if __name__ == "__main__":
    main()
