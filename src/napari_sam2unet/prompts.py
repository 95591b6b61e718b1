"""Point and box prompts in voxel indices: slice k on the slice axis, (i, j) on the other two axes.

The other two axes keep their array order: for axis 2, i indexes axis 0 and j axis 1.
Boxes are half-open: rows [i0, i1), columns [j0, j1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import PromptError


@dataclass(frozen=True)
class Point:
    slice: int
    i: float
    j: float
    positive: bool = True


@dataclass(frozen=True)
class Box:
    slice: int
    i0: float
    j0: float
    i1: float
    j1: float

    def normalised(self) -> Box:
        """The same box with corners ordered (a box drawn right-to-left is still a box)."""
        i0, i1 = sorted((self.i0, self.i1))
        j0, j1 = sorted((self.j0, self.j1))
        return Box(self.slice, i0, j0, i1, j1)

    @property
    def rect(self) -> tuple[float, float, float, float]:
        return self.i0, self.j0, self.i1, self.j1


@dataclass
class Prompts:
    boxes: list[Box] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.boxes or self.points)

    def boxes_on(self, k: int) -> list[Box]:
        return [b for b in self.boxes if b.slice == k]

    def points_on(self, k: int) -> list[Point]:
        return [p for p in self.points if p.slice == k]

    def validate(self, shape: tuple[int, int, int], axis: int) -> Prompts:
        """Check every prompt against the volume; return them with boxes normalised."""
        depth = shape[axis]
        rows, cols = (n for a, n in enumerate(shape) if a != axis)
        boxes = []
        for box in self.boxes:
            if not all(math.isfinite(v) for v in box.rect):  # inf would be clipped to the edge, nan break later
                raise PromptError(f"the box on slice {box.slice} ({_box_text(box)}) has coordinates that are not "
                                  f"numbers: give voxel indices, not nan or inf")
            box = box.normalised()
            _check_slice(box.slice, depth, axis, "box")
            if box.i1 - box.i0 < 1 - 1e-6 or box.j1 - box.j0 < 1 - 1e-6:  # 1 voxel, to rounding
                raise PromptError(
                    f"the box on slice {box.slice} is empty ({_box_text(box)}); draw it at least 1 voxel wide"
                )
            if box.i0 >= rows or box.j0 >= cols or box.i1 <= 0 or box.j1 <= 0:
                raise PromptError(
                    f"the box on slice {box.slice} ({_box_text(box)}) lies outside the slice ({rows}x{cols} voxels)"
                )
            # A box partly outside is clipped to the slice: people drag past the edge.
            boxes.append(Box(box.slice, max(box.i0, 0), max(box.j0, 0), min(box.i1, rows), min(box.j1, cols)))
        for point in self.points:
            _check_slice(point.slice, depth, axis, "point")
            if not (math.isfinite(point.i) and math.isfinite(point.j)):
                raise PromptError(f"the point ({point.i:g}, {point.j:g}) on slice {point.slice} has coordinates "
                                  f"that are not numbers: give voxel indices, not nan or inf")
            if not (0 <= point.i < rows and 0 <= point.j < cols):
                raise PromptError(
                    f"the point ({point.i:g}, {point.j:g}) on slice {point.slice} lies outside the slice "
                    f"({rows}x{cols} voxels)"
                )
        return Prompts(boxes, list(self.points))


def _check_slice(k: int, depth: int, axis: int, what: str) -> None:
    if not 0 <= k < depth:
        raise PromptError(f"a {what} is on slice {k}, but axis {axis} has slices 0 to {depth - 1}")


def _box_text(box: Box) -> str:
    return f"{box.i0:g},{box.j0:g} to {box.i1:g},{box.j1:g}"


def interpolate_boxes(boxes: list[Box]) -> dict[int, Box]:
    """One box per slice from the first to the last boxed slice, corners linearly interpolated.

    Slices with several boxes are not interpolated (which box would pair with which?): they keep
    their own boxes and split the range.
    """
    by_slice: dict[int, list[Box]] = {}
    for box in boxes:
        by_slice.setdefault(box.slice, []).append(box.normalised())
    single = sorted(k for k, found in by_slice.items() if len(found) == 1)
    result: dict[int, Box] = {k: by_slice[k][0] for k in single}
    for a, b in zip(single, single[1:]):
        if any(a < k < b for k in by_slice):
            continue
        first, last = by_slice[a][0], by_slice[b][0]
        for k in range(a + 1, b):
            t = (k - a) / (b - a)
            result[k] = Box(k, *(u + t * (v - u) for u, v in zip(first.rect, last.rect)))
    return result


def parse_box(text: str) -> Box:
    """'K:I0,J0,I1,J1' -> Box."""
    try:
        k, rest = text.split(":")
        i0, j0, i1, j1 = (float(v) for v in rest.split(","))
        return Box(int(k), i0, j0, i1, j1)
    except ValueError:
        raise PromptError(
            f"box {text!r} should read K:I0,J0,I1,J1 (slice, then two corners), e.g. 10:40,52,80,96"
        ) from None


def parse_point(text: str) -> Point:
    """'K:I,J' or 'K:I,J:neg' -> Point."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("pos", "neg")):
            raise ValueError
        i, j = (float(v) for v in parts[1].split(","))
        return Point(int(parts[0]), i, j, positive=not (len(parts) == 3 and parts[2] == "neg"))
    except ValueError:
        raise PromptError(f"point {text!r} should read K:I,J or K:I,J:neg, e.g. 10:60,70 or 10:60,70:neg") from None
