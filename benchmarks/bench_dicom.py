"""Reading a 512x512x300 CT: DICOM series (one file a slice) beside the same volume as NIfTI.

Writes the series from a real CT (TotalSegmentator's example, tiled to 512x512x300 int16 HU + 1024,
slope 1, intercept -1024) and the same volume as .nii and .nii.gz, then reads each in a fresh
process: wall and CPU seconds, and the peak of Python/numpy allocations (tracemalloc) beside the
volume's own float32 size. Usage: python benchmarks/bench_dicom.py [FOLDER]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (512, 512, 300)
CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg" / "example_ct_sm.nii.gz"

_MEASURE = """
import json, sys, time, tracemalloc
from napari_sam2unet.io import read_volume
tracemalloc.start()
wall, cpu = time.perf_counter(), time.process_time()
volume = read_volume(sys.argv[1])
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_bytes": peak, "volume_bytes": volume.data.nbytes}))
"""


def make_block() -> np.ndarray:
    """Stored values (HU + 1024) of a real CT, tiled to SHAPE."""
    ct = np.asarray(nib.load(str(CT)).dataobj).astype(np.int16) + 1024
    reps = [int(np.ceil(s / n)) for s, n in zip(SHAPE, ct.shape)]
    return np.tile(ct, reps)[: SHAPE[0], : SHAPE[1], : SHAPE[2]]


def write_inputs(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_dicom import write_series

    block = make_block()
    series = folder / "series"
    if not series.is_dir():
        write_series(series, block, spacing=(0.7, 0.7), step=1.0)
    affine = np.diag([-0.7, 0.7, 1.0, 1.0])
    image = nib.Nifti1Image(block, affine)
    image.header.set_slope_inter(1.0, -1024.0)
    paths = {"dicom series": series}
    for suffix in (".nii", ".nii.gz"):
        path = folder / f"ct{suffix}"
        if not path.exists():
            nib.save(image, str(path))
        paths[f"NIfTI {suffix}"] = path
    return paths


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in write_inputs(folder).items():
        result = measure(path)
        ratio = result["peak_bytes"] / result["volume_bytes"]
        print(f"{name:14s} wall {result['wall_s']:6.2f} s  cpu {result['cpu_s']:6.2f} s  "
              f"peak {result['peak_bytes'] / 2**20:6.0f} MiB = {ratio:.2f} x the float32 volume")


if __name__ == "__main__":
    main()
