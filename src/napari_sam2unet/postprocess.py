"""From a probability map to a mask: threshold, clip to the box, keep or drop regions at points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .geometry import mask_bbox

# 8-connectivity: a diagonal touch joins two pixels of one structure.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)
# A positive point on a weak region grows over pixels at least this share of its own probability.
HYSTERESIS_RATIO = 0.5
# Below this probability a positive point has nothing to grow from.
MIN_POINT_PROBABILITY = 0.02


def box_mask(shape: tuple[int, int], box: tuple[float, float, float, float] | None) -> np.ndarray | None:
    """Pixels whose centre lies in the box (rows [i0, i1), columns [j0, j1))."""
    if box is None:
        return None
    i0, j0, i1, j1 = box
    inside = np.zeros(shape, dtype=bool)
    r0, r1 = max(0, int(np.ceil(i0 - 0.5))), min(shape[0], int(np.ceil(i1 - 0.5)))
    c0, c1 = max(0, int(np.ceil(j0 - 0.5))), min(shape[1], int(np.ceil(j1 - 0.5)))
    inside[r0:r1, c0:c1] = True
    return inside


def _pixel(point: tuple[float, float], shape: tuple[int, int]) -> tuple[int, int]:
    return min(max(int(point[0]), 0), shape[0] - 1), min(max(int(point[1]), 0), shape[1] - 1)


def select_regions(
    probability: np.ndarray,
    threshold: float = 0.5,
    box: tuple[float, float, float, float] | None = None,
    positive: Sequence[tuple[float, float]] = (),
    negative: Sequence[tuple[float, float]] = (),
    fill_holes: bool = True,
    regions: str | None = None,
    open_at: Sequence[tuple[float, float]] = (),
) -> np.ndarray:
    """The mask a user means: probability above threshold inside the box, steered by points.

    Positive points keep only the regions under them (a point on a weak region grows by
    hysteresis); negative points remove theirs. Where one region holds both, it is split
    between them by distance, so a negative click trims a leak rather than erasing the object.
    A hole with a negative point or a point of `open_at` in it stays open, however small.
    """
    inside = box_mask(probability.shape, box)
    mask = probability > threshold
    if inside is not None:
        mask &= inside
        if not positive:
            mask = box_region(mask, box, regions)
    if positive:
        mask = _keep_at_points(mask, probability, positive, inside)
    if negative:
        mask = _remove_at_points(mask, negative, positive, probability)
    if fill_holes and mask.any():
        mask = fill_small_holes(mask, HOLE_SHARE, [*negative, *open_at])
    return mask


# A hole in a mask is filled when it is smaller than this share of the area it would fill: specks
# inside an organ are noise, but a myocardium's blood pool or a tumour's necrosis is a real hole.
# None fills every hole. On 81 validation structures (docs/performance.md) 0.1 left the box, click
# and propagation protocols unchanged (+-0.0001) and raised box + 3 corrective rounds from 0.743
# to 0.747 (myocardium 0.045 -> 0.069, BraTS regions 0.592 -> 0.608): a negative click in a hole
# now opens it. A hole with a negative click in it stays open whatever its size (the model may open
# only the click's surroundings; filling that undid the user's click): corrected 0.747 -> 0.748.
HOLE_SHARE: float | None = 0.1


def fill_small_holes(mask: np.ndarray, share: float | None, open_at: Sequence[tuple[float, float]] = ()) -> np.ndarray:
    """The mask with its holes under `share` of the filled area filled (all of them when share is
    None), except a hole with a point of `open_at` in it: the user said it is not the object."""
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if count == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    fill = np.ones(count + 1, bool) if share is None else sizes < share * (mask.sum() + sizes[1:].sum())
    fill[0] = False  # label 0 is the mask and the outside, never a hole
    for i, j in open_at:
        r, c = int(i), int(j)
        if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]:
            fill[holes[r, c]] = False
    return mask | fill[holes]


# Which regions of a boxed mask to keep: "all", "centre" (the one under the box centre, else the
# largest) or "largest". A neighbour's edge inside a box is a leak, but lesions come in parts:
# on the validation patients "all" scored 0.562 / 0.424 (tight / propagated) and "centre" or
# "largest" 0.560 / 0.413 (docs/performance.md), so boxes keep every region by default.
BOX_REGIONS = "all"


def box_region(mask: np.ndarray, box: tuple[float, float, float, float], rule: str | None = None) -> np.ndarray:
    """The region of a boxed mask that the box is about (see BOX_REGIONS)."""
    rule = BOX_REGIONS if rule is None else rule
    if rule == "all" or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count == 1:
        return mask
    if rule == "centre":
        centre = _pixel(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), mask.shape)
        if labels[centre]:
            return labels == labels[centre]
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _keep_at_points(mask, probability, points, inside) -> np.ndarray:
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    keep = np.zeros_like(mask)
    chosen = set()
    for point in points:
        r, c = _pixel(point, mask.shape)
        if labels[r, c]:
            chosen.add(labels[r, c])
            continue
        weak = float(probability[r, c])
        if weak < MIN_POINT_PROBABILITY:
            continue
        grown = probability >= weak * HYSTERESIS_RATIO
        if inside is not None:
            grown &= inside
        grown_labels, _ = ndimage.label(grown, structure=_CONNECTIVITY)
        keep |= grown_labels == grown_labels[r, c]
    if chosen:
        keep |= np.isin(labels, list(chosen))
    return keep


# How a negative point splits the region it lies in from the rest of the structure:
# "probability" floods from both sides over 1 - probability (the cut follows low probability),
# "shape" over the inverted distance to the edge (the cut follows the neck), "both" over their
# mean, "nearest" by straight distance. Chosen on validation structures (docs/performance.md).
NEGATIVE_SPLIT = "nearest"
# Without a positive point in its region, a negative point is weighed against the deepest pixel
# of the region outside CORE_REACH times the point's own distance to the region's edge; with
# less than MIN_KEPT_SHARE of the region out there the point was on the structure itself (its
# middle, as the corners of a square lie 1.41 times the edge distance away), and the region goes.
CORE_REACH = 1.5
MIN_KEPT_SHARE = 0.1


def _remove_at_points(mask, negative, positive, probability=None, split: str | None = None) -> np.ndarray:
    """Trim the part of a region on the negative point's side; the whole region only when it is clicked in its core."""
    split = NEGATIVE_SPLIT if split is None else split
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    result = mask.copy()
    for point in negative:
        r, c = _pixel(point, mask.shape)
        region = labels[r, c]
        if not region:
            continue
        component = labels == region
        anchors = [_pixel(p, mask.shape) for p in positive if labels[_pixel(p, mask.shape)] == region]
        if not anchors:
            depth = ndimage.distance_transform_edt(component)
            rows, cols = np.indices(mask.shape)
            outside = component & (np.hypot(rows - r, cols - c) > CORE_REACH * depth[r, c] + 1)
            if outside.sum() < MIN_KEPT_SHARE * component.sum():
                result &= ~component  # clicked on the structure itself: not this one
                continue
            anchors = [np.unravel_index(int(np.argmax(np.where(outside, depth, -1))), depth.shape)]
        result &= ~(component & _negative_side(component, (r, c), anchors, probability, split))
    return result


def _negative_side(component, target, anchors, probability, split) -> np.ndarray:
    """The pixels of a region that belong with the negative point rather than with the anchors."""
    if split == "nearest":
        return _nearer_to(component.shape, target, anchors)
    (r0, r1), (c0, c1) = mask_bbox(component)
    window = (slice(r0, r1), slice(c0, c1))
    inside = component[window]
    depth = ndimage.distance_transform_edt(inside)
    shape_cost = 1.0 - depth / max(float(depth.max()), 1e-9)
    if split == "shape" or probability is None:
        cost = shape_cost
    else:
        probability_cost = 1.0 - np.asarray(probability, dtype=np.float64)[window]
        cost = probability_cost if split == "probability" else (probability_cost + shape_cost) / 2
    elevation = np.where(inside, np.round(cost * 60000), 65535).astype(np.uint16)
    markers = np.zeros(inside.shape, dtype=np.int16)
    for r, c in anchors:
        markers[r - r0, c - c0] = 1
    markers[target[0] - r0, target[1] - c0] = 2
    flooded = ndimage.watershed_ift(elevation, markers, structure=_CONNECTIVITY)
    side = np.zeros(component.shape, dtype=bool)
    side[window] = (flooded == 2) & inside
    return side


def _nearer_to(shape, target, others) -> np.ndarray:
    rows, cols = np.indices(shape, dtype=np.float32)
    distance_target = (rows - target[0]) ** 2 + (cols - target[1]) ** 2
    distance_others = np.min([(rows - p[0]) ** 2 + (cols - p[1]) ** 2 for p in others], axis=0)
    return distance_target < distance_others
