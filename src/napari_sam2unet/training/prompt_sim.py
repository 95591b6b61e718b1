"""Simulated users for the prompted model: clicks where a mask is wrong, imperfect prior masks.

Everything works on one crop in the model input's frame (SxS arrays): the training crops
(data.py) and the training loop's rounds of clicks on the model's own errors (train.py) use it,
and `sam2unet eval` clicks with `error_click` too, as its protocols promise. numpy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel farthest from the region's edge: where a person clicks 'the middle'."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(r), float(c)


def largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float, bool] | None:
    """One corrective click: the middle of the largest error region, positive on a miss and
    negative on a leak (the protocol of interactive-segmentation benchmarks); None if perfect."""
    return deepest_error(target & ~prediction, prediction & ~target)


def deepest_error(missed: np.ndarray, leaked: np.ndarray) -> tuple[float, float, bool] | None:
    """The click on the deepest error pixel, of misses (positive) or leaks (negative)."""
    # The deepest point, not the largest area: a thin rim of error is not where a user clicks.
    best = None
    for error, positive in ((missed, True), (leaked, False)):
        if not error.any():
            continue
        depth, (r0, c0) = _depth_in_bbox(error)
        r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if best is None or depth[r, c] > best[0]:
            best = (float(depth[r, c]), float(r + r0), float(c + c0), positive)
    return None if best is None else (best[1], best[2], best[3])


def _depth_in_bbox(region: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Distance to the region's edge over its bounding box, and the box's corner. The same
    numbers as over the whole crop (a ring of background around the box is nearer than anything
    beyond it), at a fraction of the cost: training clicks on every crop of a batch."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    r0, c0 = rows[0], cols[0]
    box = region[r0 : rows[-1] + 1, c0 : cols[-1] + 1]
    return ndimage.distance_transform_edt(np.pad(box, 1))[1:-1, 1:-1], (int(r0), int(c0))


def interior_click(rng, mask: np.ndarray) -> tuple[float, float]:
    """A click inside a region, drawn towards its middle (weight: distance to the edge squared)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].ravel() ** 2
    index = int(rng.choice(depth.size, p=depth / depth.sum()))
    r, c = divmod(index, mask.shape[1])
    return float(r), float(c)


def outside_click(rng, mask: np.ndarray, near: int) -> tuple[float, float] | None:
    """A click outside a region but within `near` pixels of it (a neighbouring structure)."""
    ring = ndimage.binary_dilation(mask, _EIGHT, iterations=max(2, near)) & ~ndimage.binary_dilation(mask, _EIGHT, 2)
    candidates = np.flatnonzero(ring)
    if candidates.size == 0:
        return None
    r, c = divmod(int(candidates[rng.integers(candidates.size)]), mask.shape[1])
    return float(r), float(c)


def perturb(rng, mask: np.ndarray, max_shift: float = 2.0, max_grow: int = 2) -> np.ndarray:
    """The neighbouring slice's mask as it may come out of the model: shifted, grown or shrunk."""
    out = mask
    shift = np.round(rng.normal(0, max_shift / 2, 2)).astype(int)
    if shift.any():
        out = ndimage.shift(out.astype(np.uint8), shift, order=0, mode="constant") > 0
    grow = int(rng.integers(-max_grow, max_grow + 1))
    if grow > 0:
        out = ndimage.binary_dilation(out, iterations=grow)
    elif grow < 0:
        shrunk = ndimage.binary_erosion(out, iterations=-grow)
        out = shrunk if shrunk.sum() >= 4 else out
    return out


def corrupt(rng, target: np.ndarray, hole_share: float = 0.0) -> np.ndarray:
    """An imperfect mask of the target in its crop: what a model or a first try leaves to correct.
    A ring's is its disc, or with `hole_share` what it encloses."""
    side = target.shape[0]
    u = rng.random()
    if not target.any():
        return target.copy()
    filled = ndimage.binary_fill_holes(target)
    hole = filled & ~target
    if hole.sum() >= 4 and rng.random() < 0.5:
        # A ring taken for a disc (its hole filled in), or for what it encloses (the blood pool
        # for the myocardium), as a model that has not learned rings draws them.
        return hole if hole_share and rng.random() < hole_share else filled
    if u < 0.2:  # under-segmented
        radius = int(rng.integers(2, max(3, side // 12)))
        out = ndimage.binary_erosion(target, iterations=radius)
    elif u < 0.4:  # over-segmented
        radius = int(rng.integers(2, max(3, side // 12)))
        out = ndimage.binary_dilation(target, iterations=radius)
    elif u < 0.6:  # a part cut off by a random line through the region
        r, c = np.nonzero(target)
        centre = np.array([r.mean(), c.mean()]) + rng.normal(0, 0.15 * side, 2)
        angle = rng.uniform(0, 2 * np.pi)
        rows, cols = np.mgrid[:side, : target.shape[1]]
        out = target & ((rows - centre[0]) * np.cos(angle) + (cols - centre[1]) * np.sin(angle) < 0)
    elif u < 0.8:  # a leak into a neighbour: an ellipse attached to the edge
        out = target | _blob_at_edge(rng, target)
    else:  # a smooth wrong outline: the target blurred and cut at another level
        blurred = ndimage.gaussian_filter(target.astype(np.float32), rng.uniform(2, max(3, side / 16)))
        out = blurred > rng.uniform(0.2, 0.8)
    return out


def _blob_at_edge(rng, target: np.ndarray) -> np.ndarray:
    edge = target & ~ndimage.binary_erosion(target)
    r, c = np.nonzero(edge)
    pick = int(rng.integers(r.size))
    extent = max(3.0, np.sqrt(target.sum()) * rng.uniform(0.3, 0.9))
    rows, cols = np.mgrid[: target.shape[0], : target.shape[1]]
    a, b = extent * rng.uniform(0.5, 1.0), extent * rng.uniform(0.5, 1.0)
    return ((rows - r[pick]) / a) ** 2 + ((cols - c[pick]) / b) ** 2 <= 1


def clicks_on_errors(prior: np.ndarray, target: np.ndarray, count: int) -> list[tuple[float, float, bool]]:
    """Up to `count` clicks on a fixed prior's errors, deepest first, one per error region: what
    a user clicks on each wrong part in turn."""
    clicks = []
    missed, leaked = target & ~prior, prior & ~target
    for _ in range(count):
        click = deepest_error(missed, leaked)
        if click is None:
            break
        clicks.append(click)
        r, c, positive = int(click[0]), int(click[1]), click[2]
        error = missed if positive else leaked
        region = ndimage.label(error, structure=_EIGHT)[0]
        error &= region != region[r, c]
    return clicks
