"""Prompts (parsing, checks, interpolation) and the masks post-processing makes of them."""

import numpy as np
import pytest

from napari_sam2unet.errors import PromptError
from napari_sam2unet.postprocess import select_regions
from napari_sam2unet.prompts import Box, Point, Prompts, interpolate_boxes, parse_box, parse_point


def test_parse_box_and_point():
    assert parse_box("10:40,52,80,96") == Box(10, 40, 52, 80, 96)
    assert parse_point("3:5,6") == Point(3, 5, 6, True)
    assert parse_point("3:5,6:neg") == Point(3, 5, 6, False)
    for bad in ("10:40,52,80", "x:1,2,3,4", "40,52,80,96"):
        with pytest.raises(PromptError, match="K:I0,J0,I1,J1"):
            parse_box(bad)
    with pytest.raises(PromptError, match="K:I,J"):
        parse_point("3:5,6:maybe")


def test_validate_rejects_prompts_outside_the_volume_and_clips_boxes():
    shape = (50, 40, 10)
    with pytest.raises(PromptError, match="slices 0 to 9"):
        Prompts([Box(10, 0, 0, 5, 5)]).validate(shape, 2)
    with pytest.raises(PromptError, match="outside the slice"):
        Prompts(points=[Point(2, 60, 5)]).validate(shape, 2)
    with pytest.raises(PromptError, match="outside the slice"):
        Prompts([Box(2, 60, 0, 70, 5)]).validate(shape, 2)
    with pytest.raises(PromptError, match="empty"):
        Prompts([Box(2, 5, 5, 5, 9)]).validate(shape, 2)
    clipped = Prompts([Box(2, 45, 30, -5, 50)]).validate(shape, 2)
    assert clipped.boxes == [Box(2, 0, 30, 45, 40)]


def test_boxes_on_two_slices_interpolate_between_them():
    boxes = interpolate_boxes([Box(2, 0, 0, 10, 10), Box(6, 4, 8, 14, 30)])
    assert sorted(boxes) == [2, 3, 4, 5, 6]
    assert boxes[4] == Box(4, 2, 4, 12, 20)


def test_a_slice_with_two_boxes_is_not_interpolated_across():
    boxes = interpolate_boxes([Box(0, 0, 0, 4, 4), Box(2, 0, 0, 4, 4), Box(2, 5, 5, 9, 9), Box(4, 0, 0, 4, 4)])
    assert sorted(boxes) == [0, 4]


def _two_blobs():
    probability = np.zeros((40, 40), np.float32)
    probability[5:15, 5:15] = 0.9
    probability[25:35, 25:35] = 0.8
    return probability


def test_threshold_and_box_clip():
    probability = _two_blobs()
    assert select_regions(probability, 0.5).sum() == 200
    assert select_regions(probability, 0.85).sum() == 100
    assert select_regions(probability, 0.5, box=(0, 0, 10, 40)).sum() == 50


def test_positive_point_keeps_its_region_negative_point_removes_its():
    probability = _two_blobs()
    kept = select_regions(probability, 0.5, positive=[(30, 30)])
    assert kept.sum() == 100 and kept[30, 30] and not kept[10, 10]
    removed = select_regions(probability, 0.5, negative=[(10, 10)])
    assert removed.sum() == 100 and not removed[10, 10]


def test_positive_point_on_a_weak_region_grows_by_hysteresis():
    probability = _two_blobs()
    probability[20:24, 0:4] = 0.3
    grown = select_regions(probability, 0.5, positive=[(21, 1)])
    assert grown.sum() == 16
    assert select_regions(np.zeros((10, 10), np.float32), 0.5, positive=[(5, 5)]).sum() == 0


def test_negative_point_in_a_region_with_a_positive_point_trims_it():
    probability = np.zeros((20, 40), np.float32)
    probability[5:15, 2:38] = 0.9
    mask = select_regions(probability, 0.5, positive=[(10, 5)], negative=[(10, 35)])
    assert mask[10, 5] and not mask[10, 35] and 0 < mask.sum() < 360


def test_holes_are_filled():
    probability = np.zeros((20, 20), np.float32)
    probability[2:18, 2:18] = 0.9
    probability[8:12, 8:12] = 0.1
    assert select_regions(probability, 0.5).sum() == 256
    assert select_regions(probability, 0.5, fill_holes=False).sum() == 240


def test_a_box_can_keep_only_the_structure_it_is_about_not_a_neighbour_leaking_in():
    probability = np.zeros((40, 40), np.float32)
    probability[10:30, 10:30] = 0.9  # the structure, under the box centre
    probability[2:6, 2:38] = 0.9  # a neighbour's edge inside the box
    box = (1.0, 1.0, 31.0, 39.0)
    # by default (chosen on validation) every region in the box stays: lesions come in parts
    assert select_regions(probability, 0.5, box=box).sum() == 400 + 144
    mask = select_regions(probability, 0.5, box=box, regions="centre")
    assert mask[20, 20] and not mask[3, 20] and mask.sum() == 400
    # with nothing under the centre, the largest region is the structure
    probability[15:25, 15:25] = 0.0
    ring = select_regions(probability, 0.5, box=box, fill_holes=False, regions="centre")
    assert ring[12, 12] and not ring[3, 20]
    # a positive point still chooses any region it touches
    assert select_regions(probability, 0.5, box=box, positive=[(3, 20)], regions="centre")[3, 20]


def test_a_box_one_voxel_wide_up_to_rounding_is_a_box():
    # 7.96909 + 1 - 7.96909 is 0.9999999999999991 in floating point: eval's jittered boxes on
    # one-voxel structures were refused as empty.
    from napari_sam2unet.prompts import Box, Prompts

    box = Box(10, 7.96909, 26.0103, 7.96909 + 1, 27.0661)
    assert Prompts([box]).validate((40, 40, 20), 2).boxes == [box]


def test_hole_filling_can_keep_a_ring_open_and_still_fill_specks(monkeypatch):
    """A myocardium around its blood pool is a ring: only holes smaller than a tenth of the
    filled area are filled (specks); the pool stays open. HOLE_SHARE None fills every hole."""
    from napari_sam2unet import postprocess

    probability = np.zeros((40, 40), np.float32)
    probability[5:35, 5:35] = 0.9
    probability[15:25, 15:25] = 0.1  # the pool: 100 of 900 pixels
    probability[8, 8] = 0.1  # a speck
    ring = select_regions(probability, 0.5)
    assert ring.sum() == 800 and ring[8, 8] and not ring[20, 20]
    probability[14:26, 14:26] = 0.1  # a pool of 144 pixels: 16%
    assert select_regions(probability, 0.5)[20, 20] == 0
    probability[18:22, 18:22] = 0.9  # an island in the pool: still a ring around it
    assert select_regions(probability, 0.5)[15, 15] == 0
    monkeypatch.setattr(postprocess, "HOLE_SHARE", None)
    assert select_regions(probability, 0.5).sum() == 900


def test_a_hole_with_a_negative_point_in_it_stays_open_however_small():
    probability = np.zeros((20, 20), np.float32)
    probability[2:18, 2:18] = 0.9
    probability[9:11, 9:11] = 0.1  # a speck of a hole: filled, unless the user points at it
    assert select_regions(probability, 0.5).sum() == 256
    assert not select_regions(probability, 0.5, negative=[(9.5, 9.5)])[9, 9]
    assert not select_regions(probability, 0.5, open_at=[(9.5, 9.5)])[9, 9]
    assert select_regions(probability, 0.5, negative=[(9.5, 9.5)]).sum() == 252
