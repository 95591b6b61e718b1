"""Memory, measured by allocation (tracemalloc sees numpy's buffers), not by time (issue 25)."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np

from napari_sam2unet.io import read_volume
from napari_sam2unet.preprocess import _sample, plan_views


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


def test_sampling_intensities_does_not_copy_a_fortran_ordered_volume():
    """nibabel gives Fortran-ordered arrays: reshape(-1) copied them whole (11 of 16 s on
    512x512x400). The sample is about 2 million voxels, whatever the order."""
    volume = np.asfortranarray(np.random.default_rng(0).integers(0, 4000, (256, 256, 160), dtype=np.int16))
    sample, peak = _peak(lambda: _sample(volume))
    assert 1_000_000 <= sample.size <= 2_100_000 and sample.dtype == np.float32
    assert peak < 1.5 * sample.nbytes < volume.nbytes
    # the same percentiles as from every voxel, within a grey level
    assert abs(np.percentile(sample, 99) - np.percentile(volume, 99)) <= 1
    strided = volume[:, ::2]  # neither C- nor Fortran-contiguous: sampled on a lattice, not copied
    sample, peak = _peak(lambda: _sample(strided))
    assert peak < strided.size * 4 / 2 and sample.size >= 500_000
    views, peak = _peak(lambda: plan_views(volume, "mr"))
    assert peak < volume.nbytes


def test_many_distinct_boxes_on_one_slice_are_prepared_a_few_at_a_time(brightness_card):
    """1000 distinct boxes on one slice were prepared as one input array (1.5 MiB a box) and
    peaked at 2.3 GB. Now at most MAX_PREPARED are (two arrays: one runs, one is prepared);
    the probabilities kept in the engine's cache are what remains. The bundled model's figures:
    benchmarks/bench_many_boxes.py."""
    from napari_sam2unet.backends.onnx import OnnxBackend
    from napari_sam2unet.engine import MAX_PREPARED, Engine
    from napari_sam2unet.prompts import Box, Prompts

    engine = Engine(OnnxBackend(brightness_card, threads=1))
    volume = np.zeros((200, 200, 3), np.float32)
    volume[50:150, 50:150] = 900
    engine.set_volume(volume, (1.0, 1.0, 1.0), 2, "auto")
    boxes = [Box(1, 20 + 2 * (i % 40), 20 + (i // 40), 170, 172) for i in range(1000)]  # the 1000
    result, peak = _peak(lambda: engine.segment(Prompts(boxes, []), "slices"))
    assert engine.cache_entries == 1000 and 1 in result.slices  # every box ran, none twice
    cached = engine.cache_bytes
    one_input = 3 * 352 * 352 * 4
    assert peak < cached + 2 * MAX_PREPARED * one_input + 16 * 2**20, f"{peak / 2**20:.0f} MiB"
