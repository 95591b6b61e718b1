"""Walks from a neighbour's mask: propagation outwards and its stop rule, and the chained walk
between boxed slices. They drive the engine through its public calls.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .geometry import mask_bbox
from .prompts import Prompts, interpolate_boxes
from .slice_tasks import SegmentationResult, SliceResult, WalkSteps

# Propagation stops when a slice's mask has fewer pixels than this.
MIN_PROPAGATE_PIXELS = 4
# The next slice's box: the previous mask's box grown by this share of its sides and a voxel, as
# a user would draw it (the crop adds the model card's margin around the box on top of this).
# A correction's crop and a click's second look frame the mask the same way. Chosen again for
# the prompted model on validation (81 structures, docs/performance.md), propagated / one click
# propagated: -0.05 0.514 / 0.464, 0 0.557 / 0.491, 0.025 0.555 / 0.489, 0.05 (before) 0.547 /
# 0.483, 0.15 0.510 / 0.444 (a grown box lets the mask creep outwards); corrections and one click
# per slice did not move (0.785 / 0.607 at 0, 0.785 / 0.606 at 0.05).
# Propagation also stops when less than PROPAGATE_MIN_OVERLAP of the smaller of a slice's mask and
# its neighbour's lies in the other (it jumped to another structure; a structure that shrinks
# towards its end still lies inside its neighbour), or when the mask grew by more than
# PROPAGATE_MAX_GROWTH times its neighbour's area (it leaked). Chosen on held-out validation
# structures (docs/performance.md): IoU 0.7 without a growth limit scored 0.424, this 0.466.
PROPAGATE_GROWTH = 0.0
PROPAGATE_MIN_OVERLAP = 0.8
PROPAGATE_MAX_GROWTH = 1.3
# A prompted model propagating from its neighbour's mask can copy that mask past the structure's
# end. The same crop without the prior shows what the image alone supports: propagation stops
# when less than this share of the mask is in that look (0 switches the check off). Chosen on the
# validation split (102 structures, 35 scans; docs/performance.md): 0.5 scored 0.487 / 0.421
# (propagated / one click propagated), 0.6 0.517 / 0.449, 0.7 0.540 / 0.459, 0.8 0.473 / 0.406.
PROPAGATE_CHECK = 0.7
# True: a prompted model fills the slices between boxed slices from each neighbour's mask (the
# prior) in the interpolated box. False (shipped): every slice gets its interpolated box alone, as
# other models do. On six validation scans the bundled prompted model scored 0.544 chained and
# 0.562 with boxes alone (docs/performance.md), as the previous model had with its own chaining.
CHAIN_BETWEEN = False

def propagate(engine, prompts: Prompts, threshold: float, result: SegmentationResult,
              seeding: WalkSteps) -> WalkSteps:
    """After `seeding` segments the prompted slices, from each of them outwards, each slice cropped
    around its neighbour's mask until the stop rule says the structure ended (result.stops says why)."""
    depth = engine.shape[engine.axis]
    done = 0
    for done, _ in seeding:
        yield done, depth
    for k in sorted(result.slices):
        for step in (-1, 1):
            previous, current = result.slices[k].mask, k + step
            while True:
                if stop := _stop_before(engine, result, current):
                    result.stops[step] = stop
                    break
                task, mask, stop = _look(engine, prompts, threshold, current, previous)
                if stop:
                    result.stops[step] = f"{stop} at slice {current}"
                    break
                result.slices[current] = SliceResult([task], mask)
                done += 1
                yield done, depth
                previous, current = mask, current + step


def _stop_before(engine, result: SegmentationResult, k: int) -> str | None:
    """Why propagation cannot reach slice k at all, or None."""
    if not 0 <= k < engine.shape[engine.axis]:
        return "edge of the volume"
    if k in result.slices:
        return f"met slice {k}, segmented from another prompt"
    return None


def _look(engine, prompts: Prompts, threshold: float, k: int, previous: np.ndarray):
    """Slice k seen from its neighbour's mask: (task, mask, None), or why propagation stops there.
    A prompted model's mask is checked against the same crop seen without the prior."""
    task = engine.propagation_task(k, previous)
    if task is None:
        return None, None, "vanished"
    check = replace(task, prior=None) if task.prior is not None and engine.propagate_check else None
    engine.run_tasks([task] + ([check] if check else []))
    mask = engine.postprocess(k, [task], prompts, threshold)
    stop = propagation_stop(mask, previous, engine.propagate_min_overlap)
    if check and not stop:
        stop = image_disagrees(mask, engine.postprocess(k, [check], prompts, threshold), engine.propagate_check)
    return task, mask, stop


def fill_between(engine, prompts: Prompts, threshold: float, result: SegmentationResult,
                 seeding: WalkSteps) -> WalkSteps:
    """After `seeding` segments the boxed slices (a prompted model), each slice between two of them
    from its neighbour's mask (the prior) in its interpolated box, walking in from both ends so
    that neither end's errors carry across the whole gap."""
    boxes = interpolate_boxes(prompts.boxes)
    steps = list(seeding)
    done = steps[-1][0] if steps else 0
    order = []  # (slice, the neighbour it follows)
    keys = sorted(k for k in boxes if k in result.slices)
    for a, b in zip(keys, keys[1:]):
        if any(k not in boxes for k in range(a + 1, b)):
            continue  # a slice with several boxes between: nothing was interpolated there
        low, high = a + 1, b - 1
        while low <= high:
            order.append((low, low - 1))
            if high != low:
                order.append((high, high + 1))
            low, high = low + 1, high - 1
    total = done + len(order)
    yield done, total
    for k, follows in order:
        task = engine.propagation_task(k, result.slices[follows].mask, boxes[k].rect)
        engine.run_tasks([task])
        result.slices[k] = SliceResult([task], engine.postprocess(k, [task], prompts, threshold))
        done += 1
        yield done, total


def propagation_continues(mask: np.ndarray, previous: np.ndarray, min_overlap: float | None = None) -> bool:
    """Whether a propagated slice's mask is still the structure: not vanished, not jumped away."""
    return propagation_stop(mask, previous, min_overlap) is None


def propagation_stop(mask: np.ndarray, previous: np.ndarray, min_overlap: float | None = None,
                     max_growth: float | None = None) -> str | None:
    """Why propagation stops at this mask ('vanished', 'jumped ...', 'grew ...'), or None.

    Unset limits are the module's at call time, so a benchmark that changes them reaches every caller."""
    min_overlap = PROPAGATE_MIN_OVERLAP if min_overlap is None else min_overlap
    max_growth = PROPAGATE_MAX_GROWTH if max_growth is None else max_growth
    area, before = int(mask.sum()), int(previous.sum())
    if area < MIN_PROPAGATE_PIXELS:
        return "vanished"
    # The share of the smaller mask inside the larger: 1 while the structure only shrinks or grows.
    overlap = int(np.logical_and(mask, previous).sum()) / max(1, min(area, before))
    if overlap < min_overlap:
        return f"jumped to another structure (overlap {overlap:.2f} < {min_overlap:.2f})"
    if area > max_growth * before:
        return f"grew {area / max(1, before):.1f}x in one slice (leaking into a neighbour?)"
    return None


def image_disagrees(mask: np.ndarray, without_prior: np.ndarray, min_share: float) -> str | None:
    """Why propagation stops when the image alone no longer shows the mask, or None."""
    share = int(np.logical_and(mask, without_prior).sum()) / max(1, int(mask.sum()))
    if share < min_share:
        return f"the image alone shows {share:.0%} of the mask (< {min_share:.0%}): the structure ended?"
    return None


def neighbour_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The box the next slice gets from this mask: its box grown by PROPAGATE_GROWTH (at call time)."""
    return mask_box(mask, PROPAGATE_GROWTH)


def mask_box(mask: np.ndarray, margin: float) -> tuple[float, float, float, float] | None:
    """The mask's bounding box grown by the margin (and a voxel), to box the next slice."""
    bbox = mask_bbox(mask)
    if bbox is None:
        return None
    (r0, r1), (c0, c1) = bbox
    grow_r, grow_c = (r1 - r0) * margin + 1, (c1 - c0) * margin + 1
    return (max(0.0, r0 - grow_r), max(0.0, c0 - grow_c),
            min(mask.shape[0], r1 + grow_r), min(mask.shape[1], c1 + grow_c))
