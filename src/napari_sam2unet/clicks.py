"""Clicks: the crops a slice's clicks are seen in, and which candidate crop around a click to keep.

A positive point without a box is seen in square crops of several sizes; the slice keeps the one
CLICK_CHOICE picks. A corrective click on a prompted model's mask is seen in a crop that frames the
mask and the clicks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from .errors import InputError
from .geometry import mask_bbox
from .postprocess import box_mask, select_regions
from .prompts import Box
from .propagation import neighbour_box
from .slice_tasks import SliceTask

# A positive point without a box: the model sees square crops of these sides (mm) around it and
# the slice keeps the one chosen by CLICK_CHOICE ("stability": the mask that changes least when
# the threshold moves by CLICK_STABILITY_DELTA, as SAM scores its masks; "border": the smallest
# crop whose mask does not touch its edge; "confidence": the highest mean probability). Chosen
# on validation structures (docs/performance.md).
CLICK_SIDES_MM = (16.0, 24.0, 36.0, 54.0, 81.0, 121.0)
CLICK_CHOICE = "border"
CLICK_STABILITY_DELTA = 0.15
# A prompted model's click mask averages its probabilities over the chosen crop and this many
# crop sizes on each side of it (each pixel over the crops that see it): the sizes disagree most
# where the choice is wrong (a structure larger than the crop drawn as a closed blob). Chosen on
# 81 validation structures (docs/performance.md): one click per slice 0.588 with the chosen crop
# alone, 0.606 with one size on each side, 0.560 with all six.
CLICK_FUSE_REACH = 1

Rect = tuple[float, float, float, float]
Pixel = tuple[float, float]


def model_clicks(points, prompted: bool) -> tuple[tuple[float, float, bool], ...]:
    """Points as a prompted model's clicks (other models steer by points after the model)."""
    return tuple((p.i, p.j, p.positive) for p in points) if prompted else ()


def point_pixels(points, prompted: bool) -> tuple[list[Pixel], list[Pixel]]:
    """Positive and negative points as pixels for post-processing; no negative ones after a
    prompted model (it saw them)."""
    positive = [(p.i, p.j) for p in points if p.positive]
    negative = [] if prompted else [(p.i, p.j) for p in points if not p.positive]
    return positive, negative


def click_boxes(k: int, points, slice_shape: tuple[int, int], slice_spacing: tuple[float, float],
                sides_mm: Sequence[float]) -> list[Box]:
    """Boxes of these sides (mm) around a slice's positive points, cut to the slice, smallest first."""
    positive = [p for p in points if p.positive]
    rows, cols = slice_shape
    i0, i1 = min(p.i for p in positive), max(p.i for p in positive)
    j0, j1 = min(p.j for p in positive), max(p.j for p in positive)
    spacing_i, spacing_j = slice_spacing
    boxes = []
    for side in sides_mm:
        half_i, half_j = side / spacing_i / 2, side / spacing_j / 2
        boxes.append(Box(k, max(0.0, i0 - half_i), max(0.0, j0 - half_j), min(rows, i1 + half_i),
                         min(cols, j1 + half_j)))
    return boxes


def single_box(tasks: list[SliceTask]) -> SliceTask | None:
    """A slice's one boxed task, whose box a correction keeps (several boxes: none)."""
    return tasks[0] if len(tasks) == 1 and tasks[0].clip is not None else None


def keeps_box(boxed: SliceTask | None, points) -> bool:
    """Whether a correction keeps a boxed slice's crop and clip: every positive click lies in the
    box (the box says where the object is)."""
    if boxed is None or boxed.clip is None:
        return False
    i0, j0, i1, j1 = boxed.clip
    return all(i0 <= p.i < i1 and j0 <= p.j < j1 for p in points if p.positive)


def correction_box(mask: np.ndarray, points, slice_shape: tuple[int, int]) -> Rect:
    """The box a correction's crop frames: the mask (grown as propagation grows it) and every
    positive click (a click outside must be in view to add); every click when there is neither."""
    box = neighbour_box(mask)
    positive = [(p.i, p.j) for p in points if p.positive]
    reach = positive or ([] if box else [(p.i, p.j) for p in points])
    if reach:
        pad = 2.0
        i0, j0 = min(i for i, _ in reach) - pad, min(j for _, j in reach) - pad
        i1, j1 = max(i for i, _ in reach) + pad, max(j for _, j in reach) + pad
        box = (i0, j0, i1, j1) if box is None else (min(box[0], i0), min(box[1], j0), max(box[2], i1),
                                                     max(box[3], j1))
    rows, cols = slice_shape
    return max(0.0, box[0]), max(0.0, box[1]), min(float(rows), box[2]), min(float(cols), box[3])


def choose_crop(tasks: list[SliceTask], probability: Callable[[SliceTask], np.ndarray], threshold: float,
                positive: list[Pixel], negative: list[Pixel], choice: str) -> tuple[SliceTask, np.ndarray]:
    """The best candidate crop around a click and its mask (see CLICK_CHOICE); the first crop and
    an empty mask when no crop finds anything. probability(task) is in the slice's frame."""
    best, best_score, best_task = None, -np.inf, tasks[0]
    for order, task in enumerate(tasks):
        chance = probability(task)
        mask = select_regions(chance, threshold, task.clip, positive, negative)
        best = np.zeros(mask.shape, dtype=bool) if best is None else best
        if not mask.any():
            continue
        score = _click_score(choice, mask, chance, task, threshold, positive, negative, order)
        if score > best_score:
            best, best_score, best_task = mask, score, task
    return best_task, best


def kept_crops(tasks: list[SliceTask], chosen: SliceTask, mask: np.ndarray, probability, threshold: float,
               positive: list[Pixel], negative: list[Pixel], reach: int,
               keep_clicked: bool) -> tuple[list[SliceTask], np.ndarray]:
    """What a click's slice keeps of its candidate crops (tasks smallest first) and its mask: the
    chosen crop and `reach` sizes on each side of it, averaged (fused_mask), when that finds
    anything; else the chosen crop alone."""
    if reach and mask.any():
        at = tasks.index(chosen)
        around = tasks[max(0, at - reach):at + reach + 1]
        fused = [replace(t, choose=False, keep_clicked=True, fused=True) for t in around]
        averaged = fused_mask(fused, probability, threshold, positive, negative)
        if averaged.any():
            return fused, averaged
    return [replace(chosen, choose=False, keep_clicked=keep_clicked)], mask


def fused_mask(tasks: list[SliceTask], probability: Callable[[SliceTask], np.ndarray], threshold: float,
               positive: list[Pixel], negative: list[Pixel]) -> np.ndarray:
    """A click's mask from the mean probability of several crops around it, each pixel averaged
    over the crops that see it, kept to the largest crop."""
    total, seen = None, None
    for task in tasks:
        chance = probability(task)
        inside = box_mask(chance.shape, task.clip)
        inside = np.ones(chance.shape, dtype=bool) if inside is None else inside
        total = np.where(inside, chance, 0).astype(np.float32) if total is None else total + np.where(inside, chance, 0)
        seen = inside.astype(np.float32) if seen is None else seen + inside
    mean = total / np.maximum(seen, 1)
    largest = max(tasks, key=lambda t: _area(t.clip))
    return select_regions(mean, threshold, largest.clip, positive, negative)


def _area(clip) -> float:
    return np.inf if clip is None else (clip[2] - clip[0]) * (clip[3] - clip[1])


def _click_score(choice, mask, probability, task, threshold, positive, negative, order) -> float:
    """How much a candidate crop's mask looks like the structure under the click (higher is better)."""
    if choice == "confidence":
        return float(probability[mask].mean())
    touches = _touches_edge(mask, task.clip)
    if choice == "border":
        return -order - (100 if touches else 0)  # the smallest crop that holds the whole mask
    if choice != "stability":
        raise InputError(f"unknown click choice {choice!r}; use stability, border or confidence")
    low = select_regions(probability, max(0.01, threshold - CLICK_STABILITY_DELTA), task.clip, positive, negative)
    high = select_regions(probability, min(0.99, threshold + CLICK_STABILITY_DELTA), task.clip, positive, negative)
    return float((low & high).sum() / max(1, (low | high).sum())) - (0.5 if touches else 0.0)


def _touches_edge(mask: np.ndarray, clip) -> bool:
    """Whether a mask reaches its crop's edge where the crop is inside the slice (it is cut off there)."""
    inside = box_mask(mask.shape, clip)
    (r0, r1), (c0, c1) = mask_bbox(inside)
    edge = np.zeros_like(inside)
    if r0 > 0:
        edge[r0, :] = True
    if r1 < mask.shape[0]:
        edge[r1 - 1, :] = True
    if c0 > 0:
        edge[:, c0] = True
    if c1 < mask.shape[1]:
        edge[:, c1 - 1] = True
    return bool((mask & edge & inside).any())
