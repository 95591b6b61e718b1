"""Engine overhead: the share of a 30-slice run spent outside the backend, and the cost of edits.

Prints a table and, with --markdown, the same as Markdown for docs/performance.md.
Run: python benchmarks/bench_engine.py [--model NAME|PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from napari_sam2unet.backends import open_backend
from napari_sam2unet.engine import Engine
from napari_sam2unet.io import read_volume
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Point, Prompts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", type=Path, default=SHARED / "totalseg" / "example_ct_sm.nii.gz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    volume = read_volume(args.image)
    card = find_model(args.model)
    backend, why = open_backend(card, "cpu", threads=args.threads)
    print(f"model {card.name} on {backend.device}; image {args.image.name} {volume.data.shape}")
    depth = volume.data.shape[2]
    rows, cols = volume.data.shape[:2]
    box = (rows // 4, cols // 4, 3 * rows // 4, 3 * cols // 4)

    rows_out = []
    for scope, prompts in [
        ("volume (whole slices)", Prompts()),
        ("between (interpolated boxes)", Prompts([Box(0, *box), Box(depth - 1, *box)])),
    ]:
        totals, backends = [], []
        for _ in range(args.repeats):
            engine = Engine(backend)  # a fresh cache: every slice goes through the model
            engine.set_volume(volume.data, volume.spacing)
            result = engine.segment(prompts, "auto")
            totals.append(result.total_seconds)
            backends.append(result.backend_seconds)
        total, model = statistics.median(totals), statistics.median(backends)
        rows_out.append((scope, len(result.slices), total, model, 1 - model / total))

    # Edits on one slice from the cache: threshold, then a point.
    engine = Engine(backend)
    engine.set_volume(volume.data, volume.spacing)
    k = depth // 2
    prompts = Prompts([Box(k, *box)])
    result = engine.segment(prompts)
    calls = engine.backend_calls
    point = Prompts([Box(k, *box)], [Point(k, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2)])
    edits = {"threshold change": [], "point edit": []}
    for repeat in range(20):
        began = time.perf_counter()
        engine.refine(result, prompts, threshold=0.3 + 0.02 * repeat, slices=[k])
        edits["threshold change"].append(time.perf_counter() - began)
        began = time.perf_counter()
        engine.refine(result, point, slices=[k])
        edits["point edit"].append(time.perf_counter() - began)
    assert engine.backend_calls == calls, "an edit called the model"

    print("\n| run | slices | total s | in backend s | outside backend |")
    print("|---|---|---|---|---|")
    for scope, slices, total, model, share in rows_out:
        print(f"| {scope} | {slices} | {total:.2f} | {model:.2f} | {100 * share:.1f}% |")
    print("\n| edit on one slice (from cache) | median ms | max ms |")
    print("|---|---|---|")
    for name, times in edits.items():
        print(f"| {name} | {1000 * statistics.median(times):.1f} | {1000 * max(times):.1f} |")
    print(f"\nslice size {volume.data.shape[0]}x{volume.data.shape[1]}, model input {card.input.size}, "
          f"{np.prod(volume.data.shape[:2])} pixels per slice; backend choice: {why}")


if __name__ == "__main__":
    main()
