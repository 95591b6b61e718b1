"""Windows, crops and their exact inverse."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from napari_sam2unet.errors import InputError
from napari_sam2unet.models import InputSpec
from napari_sam2unet.preprocess import (
    MIN_CROP_PIXELS,
    View,
    axis_plane,
    crop_for_box,
    crop_for_slice,
    guess_modality,
    paste_back,
    plan_views,
    sample_crop,
    to_model_input,
)

boxes = st.tuples(
    st.integers(0, 80), st.integers(0, 80), st.integers(1, 60), st.integers(1, 60)
).map(lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@settings(max_examples=60, deadline=None)
@given(box=boxes, mode=st.sampled_from(["square", "box_aspect"]), margin=st.floats(0, 0.5),
       spacing=st.sampled_from([(1.0, 1.0), (0.7, 2.1), (3.0, 1.0)]))
@example(box=(0, 0, 24, 1), mode="square", margin=0.0, spacing=(0.7, 2.1))  # once rounded inside the box
def test_crop_covers_the_box_and_paste_back_covers_exactly_the_crop(box, mode, margin, spacing):
    crop = crop_for_box(box, spacing, mode, margin)
    assert crop.r0 <= box[0] and crop.c0 <= box[1] and crop.r1 >= box[2] and crop.c1 >= box[3]
    shape = (150, 150)
    pasted = paste_back(np.ones((352, 352), np.float32), crop, shape)
    rows, cols = np.indices(shape) + 0.5
    inside = (rows >= crop.r0) & (rows < crop.r1) & (cols >= crop.c0) & (cols < crop.c1)
    np.testing.assert_allclose(pasted, inside.astype(np.float32), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(box=boxes)
def test_square_crop_is_physically_square(box):
    spacing = (0.5, 2.0)
    crop = crop_for_box(box, spacing, "square", 0.15)
    assert (crop.r1 - crop.r0) * spacing[0] == pytest.approx((crop.c1 - crop.c0) * spacing[1])


def test_tiny_boxes_are_enlarged_to_a_useful_crop():
    crop = crop_for_box((50, 50, 52, 51), (1.0, 1.0), "square", 0.15)
    assert crop.r1 - crop.r0 == pytest.approx(MIN_CROP_PIXELS)


def test_sampling_then_pasting_back_reproduces_a_smooth_image():
    rows, cols = np.indices((120, 100), dtype=np.float32)
    image = np.sin(rows / 9) + np.cos(cols / 7)
    crop = crop_for_box((20, 30, 80, 70), (1.0, 1.0), "square", 0.15)
    back = paste_back(sample_crop(image, crop, (352, 352)), crop, image.shape)
    np.testing.assert_allclose(back[25:75, 35:65], image[25:75, 35:65], atol=0.01)


def test_sample_crop_fills_outside_with_the_slice_minimum():
    image = np.full((40, 40), 7.0, np.float32)
    image[0, 0] = 3.0
    crop = crop_for_box((0, 0, 10, 10), (1.0, 1.0), "square", 0.5)
    sampled = sample_crop(image, crop, (64, 64))
    assert sampled[0, 0] == pytest.approx(3.0)


def test_whole_slice_crop_pads_anisotropic_slices_to_a_square():
    crop = crop_for_slice((100, 50), (1.0, 1.0), "square")
    assert (crop.r0, crop.r1) == (0, 100) and (crop.c0, crop.c1) == (-25, 75)
    assert crop_for_slice((100, 50), (1.0, 1.0), "box_aspect") == crop_for_slice((100, 50), (1.0, 1.0), "box_aspect")
    assert crop_for_slice((100, 50), (1.0, 2.0), "square").c1 - crop_for_slice((100, 50), (1.0, 2.0), "square").c0 == 50


def test_ct_and_mr_windows():
    ct = np.full((10, 10, 10), -1000.0, np.float32)
    ct[3:7, 3:7, 3:7] = 40.0
    assert guess_modality(ct) == "ct"
    soft = plan_views(ct)[0]
    assert (soft.low, soft.high) == (-160, 240)
    assert soft.apply(np.array([40.0]))[0] == pytest.approx(127.5)
    lung = plan_views(ct, "lung")[0]
    assert (lung.low, lung.high) == (-1350, 150)
    mr = np.random.default_rng(0).uniform(0, 1000, (20, 20, 20)).astype(np.float32)
    assert guess_modality(mr) == "mr"
    view = plan_views(mr)[0]
    assert view.low == pytest.approx(np.percentile(mr, 0.5)) and view.high == pytest.approx(np.percentile(mr, 99.5))


def test_multiview_gives_three_distinct_views_and_replicate_one():
    ct = np.linspace(-1000, 1000, 1000, dtype=np.float32).reshape(10, 10, 10)
    views = plan_views(ct, "soft_tissue", "multiview")
    assert len(set(views)) == 3 and views[0].label.startswith("CT soft_tissue")
    assert len(set(plan_views(ct, "soft_tissue", "replicate"))) == 1
    mr = np.linspace(0, 500, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert [v.gamma for v in plan_views(mr, "mr", "multiview")] == [1.0, 0.5, 2.0]


def test_custom_and_bad_windows():
    data = np.linspace(0, 10, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert plan_views(data, "2:8")[0] == View(2.0, 8.0, 1.0, "window 2:8")
    with pytest.raises(InputError, match="unknown window"):
        plan_views(data, "fancy")
    with pytest.raises(InputError, match="empty"):
        plan_views(data, "5:5")


def test_model_input_uses_the_cards_normalisation():
    raw = np.full((4, 4), 255.0, np.float32)
    spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    view = View(0, 255)
    tensor = to_model_input(raw, (view, view, view), spec)
    assert tensor.shape == (3, 4, 4) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[:, 0, 0], [1.0, 2.0, 1.0])


def test_modality_guess_survives_the_offsets_and_scalings_real_files_have(shared_data):
    import nibabel as nib

    ct = np.asarray(nib.load(str(shared_data / "totalseg" / "example_ct_sm.nii.gz")).dataobj).astype(np.float32)
    mr = np.asarray(nib.load(str(shared_data / "totalseg" / "example_mr_sm.nii.gz")).dataobj).astype(np.float32)
    brain = np.asarray(nib.load(str(shared_data / "colin27" / "ch2.nii.gz")).dataobj).astype(np.float32)
    assert guess_modality(ct) == guess_modality(ct + 1024) == "ct"
    for image in (mr, brain):
        # an MR stored with a negative offset has air-like lows, but no body of fat and soft tissue
        assert guess_modality(image) == guess_modality(image - 1000) == guess_modality(image * 0.01) == "mr"
    # a CT stored as HU + 1024 gets the same windows, moved with it: the same model input
    hu, stored = plan_views(ct, "auto", "multiview"), plan_views(ct + 1024, "auto", "multiview")
    for a, b in zip(hu, stored):
        assert (b.low, b.high) == (a.low + 1024, a.high + 1024)
    assert np.array_equal(hu[0].apply(ct[..., 10]), stored[0].apply(ct[..., 10] + 1024))
    # an MR shifted below zero keeps its percentile window (shifted), not a CT preset
    shifted = plan_views(mr - 1000)[0]
    assert shifted.low == pytest.approx(plan_views(mr)[0].low - 1000, abs=1e-3)


def test_a_float_ct_stored_as_hu_plus_1024_is_ct_and_the_hippocampus_mr_stays_mr(real_data):
    """A resampled CT (fractional values) stored as HU + 1024 was taken for MR: 3666 voxels
    against 797 in HU. The MSD hippocampus crop read as HU + 1024 has air and soft-tissue shares
    like CT, but its tissue fills the band between lung and fat (issue 25)."""
    import nibabel as nib

    ct = np.asarray(nib.load(str(real_data / "totalseg" / "example_ct_sm.nii.gz")).dataobj).astype(np.float32)
    resampled = 0.63 * ct[:-1] + 0.37 * ct[1:]  # linear interpolation: fractional HU
    assert not np.all(resampled == np.round(resampled))
    assert guess_modality(resampled) == guess_modality(resampled + 1024) == "ct"
    hu, stored = plan_views(resampled, "auto", "multiview"), plan_views(resampled + 1024, "auto", "multiview")
    for a, b in zip(hu, stored):
        assert (b.low, b.high) == (a.low + 1024, a.high + 1024)
    hippocampus = real_data / "cases" / "msd_hippo_hippocampus_366" / "image.nii.gz"
    mr = np.asarray(nib.load(str(hippocampus)).dataobj).astype(np.float32)
    assert not np.all(mr == np.round(mr))  # float, like the CT above
    assert guess_modality(mr) == guess_modality(mr + 0.5) == "mr"
    assert plan_views(mr)[0].label.startswith("MR")


def test_a_smaller_minimum_crop_can_be_asked_for():
    crop = crop_for_box((10, 10, 12, 12), (1.0, 1.0), "square", 0.0, min_pixels=12)
    assert crop.r1 - crop.r0 == pytest.approx(12)


def test_axis_plane_is_the_slice_without_copying_the_volume():
    """nibabel gives Fortran-ordered arrays, where np.take copies the whole volume per slice read
    (the engine, training crops, evaluation and fine-tuning all read slices this way)."""
    volume = np.asfortranarray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    for axis in range(3):
        for k in (0, volume.shape[axis] - 1):
            plane = axis_plane(volume, k, axis)
            np.testing.assert_array_equal(plane, np.take(volume, k, axis=axis))
            assert np.shares_memory(plane, volume)
