"""Memory, measured by allocation (tracemalloc sees numpy's buffers), not by time (issue 25)."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np

from napari_sam2unet.io import read_volume


def _peak(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_volume_of_a_scaled_4d_file_is_read_without_the_others(tmp_path):
    """A 4D int16 file with scl_slope was read whole as float64 (128^3 x 200: 4 GB for one
    8 MiB volume). Only the volume used is read and scaled now."""
    data = np.arange(48 * 40 * 32 * 60, dtype=np.int16).reshape(48, 40, 32, 60) % 1000
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "series.nii"
    nib.save(image, str(path))
    one_volume = 48 * 40 * 32 * 4  # float32
    volume, peak = _peak(lambda: read_volume(path, volume_index=37))
    np.testing.assert_array_equal(volume.data, data[..., 37] * 0.5 + 10.0)
    assert peak < 6 * one_volume, f"{peak / 2**20:.1f} MiB for a {one_volume / 2**20:.1f} MiB volume"
    assert peak < data.size * 8 / 10  # the whole file as float64 is 60 volumes' worth
