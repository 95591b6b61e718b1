"""Soak: 1000 slices of segment + refine in one process, resident memory sampled as it goes.

Two paths, as users drive them:
  cli     each round is what `sam2unet segment` does: read the NIfTI, open a backend, segment
          boxed slices, refine twice, write labels + sidecar (replacing the previous round's).
  widget  one engine for the whole session (the widget keeps one per model), each round new
          boxes on the same volume, segment, refine twice; the probability cache grows by design,
          so the slope is reported with and without the cache's bytes.
Then the peak: a 512x512x400 float32 volume read, segmented and written in a fresh process;
its peak RSS (VmHWM) against the volume's size (the promise: at most 2.5x).

Run: python benchmarks/bench_soak.py [--model NAME|PATH] [--slices 1000] [--no-peak]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.engine import Engine
from napari_sam2unet.io import read_volume, write_labels
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Point, Prompts

# Rounds before this share of the run are warm-up (allocator pools, onnxruntime arenas).
WARMUP_SHARE = 0.2
PEAK_SHAPE = (512, 512, 400)
PEAK_LIMIT = 2.5


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def phantom(path: Path, shape=(96, 96, 50)) -> Path:
    """A bright ellipsoid in a noisy volume: something for the model to find on every slice."""
    grid = np.indices(shape, dtype=np.float32)
    centre = [n / 2 for n in shape]
    radii = (shape[0] / 3, shape[1] / 4, shape[2] * 0.6)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    data = np.where(inside, 900.0, 100.0) + np.random.default_rng(0).normal(0, 10, shape)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


def round_prompts(shape, round_index: int, per_round: int) -> Prompts:
    """Boxes on per_round slices around the middle, shifted a little each round (new crops)."""
    rows, cols, depth = shape
    shift = round_index % 5
    slices = [(depth // 2 - per_round // 2 + k) % depth for k in range(per_round)]
    boxes = [Box(k, rows // 4 + shift, cols // 4, 3 * rows // 4 + shift, 3 * cols // 4) for k in slices]
    return Prompts(boxes=boxes, points=[Point(slices[0], rows // 2, cols // 2)])


def slope_mb_per_100(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS against slices done, after warm-up, in MiB per 100 slices."""
    start = int(len(samples) * WARMUP_SHARE)
    done, rss = np.array(samples[start:], dtype=float).T
    return float(np.polyfit(done, rss, 1)[0] * 100) if len(done) >= 2 else 0.0


def soak_cli(image: Path, card, out_dir: Path, slices: int, per_round: int = 10) -> dict:
    """Rounds of read + backend + segment + refine + write, like consecutive CLI runs in one process."""
    samples, counts, done = [], [], 0
    out = out_dir / "soak_cli.nii.gz"
    for index in range((slices + per_round - 1) // per_round):
        volume = read_volume(image)
        with OnnxBackend(card, threads=1) as backend:
            engine = Engine(backend)
            engine.set_volume(volume.data, volume.spacing, axis=2)
            prompts = round_prompts(volume.data.shape, index, per_round)
            result = engine.segment(prompts, "slices")
            engine.refine(result, prompts, threshold=0.6)
            engine.refine(result, prompts, threshold=0.4)
        write_labels(out, result.labels(1), volume, sidecar={"round": index}, overwrite=True)
        done += len(result.slices)
        counts.append(int(result.mask.sum()))
        samples.append((done, rss_mb()))
    return {"slices": done, "samples": samples, "voxels": counts, "files": sorted(p.name for p in out_dir.iterdir())}


def soak_widget(image: Path, card, slices: int, per_round: int = 10) -> dict:
    """One engine for the session: segment + refine round after round, as the widget does."""
    volume = read_volume(image)
    samples, net, counts, done = [], [], [], 0
    with OnnxBackend(card, threads=1) as backend:
        engine = Engine(backend)
        for index in range((slices + per_round - 1) // per_round):
            engine.set_volume(volume.data, volume.spacing, axis=2)  # the same array: the cache stays
            prompts = round_prompts(volume.data.shape, index, per_round)
            steps = list(engine.iter_segment(prompts, "slices"))  # the widget's worker loop
            result = steps[-1][2]
            engine.refine(result, prompts, threshold=0.6)
            engine.refine(result, prompts, threshold=0.4)
            done += len(result.slices)
            counts.append(int(result.mask.sum()))
            cache = engine.cache_bytes / 2**20
            samples.append((done, rss_mb()))
            net.append((done, rss_mb() - cache))
        entries = engine.cache_entries
    return {"slices": done, "samples": samples, "net": net, "voxels": counts, "cache_entries": entries,
            "cache_mb": cache}


_PEAK_CHILD = """
import json, sys
from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.engine import Engine
from napari_sam2unet.io import read_volume, write_labels
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Prompts
sys.path.insert(0, sys.argv[4])
from bench_soak import rss_mb
card = find_model(sys.argv[3] or None)
backend = OnnxBackend(card, threads=1)
base = rss_mb()
volume = read_volume(sys.argv[1])
engine = Engine(backend)
engine.set_volume(volume.data, volume.spacing, axis=2)
result = engine.segment(Prompts(boxes=[Box(k, 150, 150, 350, 350) for k in range(195, 205)]), "slices")
write_labels(sys.argv[2], result.labels(1), volume, sidecar={"peak": True})
print(json.dumps({"base_mb": base, "peak_mb": rss_mb("VmHWM"), "volume_mb": volume.data.nbytes / 2**20}))
"""


def peak(model: str | None, work: Path) -> dict:
    """Peak RSS of a fresh process that reads, segments and writes a 512x512x400 float32 volume."""
    path = work / "big.nii"
    data = np.random.default_rng(1).normal(100, 20, PEAK_SHAPE).astype(np.float32)
    data[150:350, 150:350, 190:210] += 800
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    del data
    run = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), str(work / "big_labels.nii.gz"),
                          model or "", str(Path(__file__).parent)], capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    figures["ratio"] = figures["peak_mb"] / figures["volume_mb"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled model)")
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--no-peak", action="store_true", help="skip the 512x512x400 peak measurement")
    args = parser.parse_args()
    card = find_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        image = phantom(work / "phantom.nii.gz")
        outputs = work / "out"
        outputs.mkdir()
        began = time.perf_counter()
        cli = soak_cli(image, card, outputs, args.slices)
        widget = soak_widget(image, card, args.slices)
        seconds = time.perf_counter() - began
        print(f"model {card.name}; {cli['slices']} + {widget['slices']} slices in {seconds:.0f} s")
        print(f"cli path:    RSS {cli['samples'][0][1]:.0f} -> {cli['samples'][-1][1]:.0f} MiB, "
              f"slope {slope_mb_per_100(cli['samples']):+.2f} MiB/100 slices after warm-up; "
              f"masks identical each round: {len(set(cli['voxels'][5::5])) <= 1}; files left: {cli['files']}")
        print(f"widget path: RSS {widget['samples'][0][1]:.0f} -> {widget['samples'][-1][1]:.0f} MiB, "
              f"slope {slope_mb_per_100(widget['samples']):+.2f} MiB/100 slices, without the cache "
              f"{slope_mb_per_100(widget['net']):+.2f}; cache {widget['cache_entries']} crops, "
              f"{widget['cache_mb']:.1f} MiB")
        if not args.no_peak:
            figures = peak(args.model, work)
            verdict = "within" if figures["ratio"] <= PEAK_LIMIT else "OVER"
            print(f"peak: {'x'.join(map(str, PEAK_SHAPE))} float32 ({figures['volume_mb']:.0f} MiB): "
                  f"peak RSS {figures['peak_mb']:.0f} MiB = {figures['ratio']:.2f}x its size "
                  f"({verdict} the {PEAK_LIMIT}x promise; {figures['base_mb']:.0f} MiB before reading)")


if __name__ == "__main__":
    main()
