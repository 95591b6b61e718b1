"""Memory for many distinct boxes on one slice, measured in a fresh process (issue 25).

1000 boxes on one 512x512 slice, each a different crop, segmented in one engine call (a script
through the API, or a cohort's boxes_from on a fragmented structure). The engine prepares at
most MAX_PREPARED crops as one input array; before issue 25 it prepared them all at once
(1.5 MiB a crop) and this call peaked at 2.3 GB. Printed: the peak of Python and numpy
allocations during the call (tracemalloc), the probability cache the engine keeps by design
(0.24 MiB a crop), and the process's peak resident memory (VmHWM) against its memory before
the call (onnxruntime's own buffers show only there).

Run: python benchmarks/bench_many_boxes.py [--model NAME|PATH] [--boxes 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.engine import MAX_PREPARED, Engine
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Prompts

MIB = 2**20


def status_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def distinct_boxes(count: int, size: int = 512, slice_index: int = 1) -> list[Box]:
    """`count` boxes on one slice, no two with the same corners: 40 across, as many rows as needed."""
    return [Box(slice_index, 40 + 2 * (i % 40), 40 + 2 * (i // 40), size - 60, size - 58) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled one)")
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    card = find_model(args.model)
    engine = Engine(OnnxBackend(card, threads=args.threads))
    volume = np.full((512, 512, 3), 100.0, np.float32)
    volume[150:350, 180:380] = 900.0  # something to find in every box
    engine.set_volume(volume, (0.8, 0.8, 3.0), 2, "auto")
    boxes = distinct_boxes(args.boxes)
    rss_before = status_mib("VmRSS")
    tracemalloc.start()
    began = time.perf_counter()
    result = engine.segment(Prompts(boxes, []), "slices")
    seconds = time.perf_counter() - began
    traced_peak = tracemalloc.get_traced_memory()[1] / MIB
    tracemalloc.stop()
    cached = engine.cache_bytes / MIB
    one_input = 3 * 352 * 352 * 4 / MIB
    print(json.dumps({
        "model": card.name, "boxes": len(boxes), "crops_cached": engine.cache_entries, "slices": list(result.slices),
        "seconds": round(seconds, 1), "max_prepared": MAX_PREPARED,
        "traced_peak_mib": round(traced_peak, 1), "cache_mib": round(cached, 1),
        "traced_peak_without_cache_mib": round(traced_peak - cached, 1),
        "all_at_once_input_mib": round(len(boxes) * one_input, 1),
        "rss_before_mib": round(rss_before, 1), "peak_rss_mib": round(status_mib("VmHWM"), 1),
        "peak_rss_increase_mib": round(status_mib("VmHWM") - rss_before, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
