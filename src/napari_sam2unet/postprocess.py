"""From a probability map to a mask: threshold, clip to the box, keep or drop regions at points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

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
) -> np.ndarray:
    """The mask a user means: probability above threshold inside the box, steered by points.

    Positive points keep only the regions under them (a point on a weak region grows by
    hysteresis); negative points remove theirs. Where one region holds both, it is split
    between them by distance, so a negative click trims a leak rather than erasing the object.
    """
    inside = box_mask(probability.shape, box)
    mask = probability > threshold
    if inside is not None:
        mask &= inside
    if positive:
        mask = _keep_at_points(mask, probability, positive, inside)
    if negative:
        mask = _remove_at_points(mask, negative, positive)
    if fill_holes and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    return mask


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


def _remove_at_points(mask, negative, positive) -> np.ndarray:
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    result = mask.copy()
    positive_labels = {labels[_pixel(p, mask.shape)] for p in positive} - {0}
    for point in negative:
        r, c = _pixel(point, mask.shape)
        region = labels[r, c]
        if not region:
            continue
        component = labels == region
        if region not in positive_labels:
            result &= ~component
            continue
        # Split the shared region: pixels nearer this negative point than any positive point go.
        same_region = [p for p in positive if labels[_pixel(p, mask.shape)] == region]
        result &= ~(component & _nearer_to(mask.shape, (r, c), same_region))
    return result


def _nearer_to(shape, target, others) -> np.ndarray:
    rows, cols = np.indices(shape, dtype=np.float32)
    distance_target = (rows - target[0]) ** 2 + (cols - target[1]) ** 2
    distance_others = np.min([(rows - p[0]) ** 2 + (cols - p[1]) ** 2 for p in others], axis=0)
    return distance_target < distance_others
