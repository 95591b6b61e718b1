"""Masks and boxes on a slice: a mask's bounding box, that box grown as users draw it, and Dice.

Shared by the engine's callers, `sam2unet batch`, `eval` and training, so that every place that
boxes a structure boxes it the same way.
"""

from __future__ import annotations

import numpy as np

# Boxes from a reference outline: the structure's box grown by 10% (the "tight" protocol of
# `sam2unet eval`, whose Dice the model cards report, and a manifest's boxes_from column).
BOX_GROWTH = 0.10


def mask_bbox(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The rows [r0, r1) and columns [c0, c1) a 2D mask covers, or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def enlarged_box(rows: tuple[int, int], cols: tuple[int, int], shape, grow: float) -> tuple[float, ...]:
    """The outline's box with each side moved out by grow/2 of its extent (so 10% larger)."""
    (r0, r1), (c0, c1) = rows, cols
    dr, dc = grow * (r1 - r0) / 2, grow * (c1 - c0) / 2
    return max(0.0, r0 - dr), max(0.0, c0 - dc), min(shape[0], r1 + dr), min(shape[1], c1 + dc)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
