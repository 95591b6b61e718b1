"""The objects a user segments, one at a time: prompts, label value, name, colour, cached result.

Qt-free. An object writes only voxels that are free or its own, so objects never overwrite
each other or the user's painting on other labels, and it remembers what each slice held
before it first wrote there, so a threshold or point edit can shrink it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .prompts import Prompts

# Colours for label values (cycled): distinct on grey images, also for colour-blind users.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)


def label_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(label - 1) % len(PALETTE)]


@dataclass(frozen=True)
class ObjectState:
    """What undo restores of an object: its prompts and its result's slices and threshold."""

    prompts: Prompts
    slices: dict
    threshold: float | None
    result: Any


@dataclass
class SegObject:
    """One structure: its prompts (voxel indices on its axis), label, name, colour and result."""

    label: int
    name: str = ""
    colour: tuple[int, int, int] = (255, 0, 0)
    prompts: Prompts = field(default_factory=Prompts)
    result: Any = None  # SegmentationResult, carrying the key of its volume, axis and model
    engine: Any = None  # the engine whose cache holds the result's probabilities
    image: Any = None  # the image layer it was segmented on
    layer: Any = None  # the labels layer it writes into
    axis: int | None = None
    base: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    last_run: Any = None  # the widget's last run of it (Adapt to this scan runs it again)

    @property
    def title(self) -> str:
        return f"{self.label}: {self.name or 'object ' + str(self.label)}"

    def state(self) -> ObjectState:
        result = self.result
        slices = dict(result.slices) if result is not None else {}
        threshold = result.threshold if result is not None else None
        return ObjectState(Prompts(list(self.prompts.boxes), list(self.prompts.points)), slices, threshold, result)

    def restore(self, state: ObjectState) -> None:
        self.prompts = Prompts(list(state.prompts.boxes), list(state.prompts.points))
        self.result = state.result
        if state.result is not None:
            state.result.slices = dict(state.slices)
            state.result.threshold = state.threshold

    def add_result(self, result) -> None:
        """A run's result: more slices of the same result (same volume, views, axis and model), or,
        on anything else, the result from now on (earlier slices stay as labels)."""
        if self.result is not None and self.result.key == result.key:
            self.result.slices.update(result.slices)
            self.result.threshold = result.threshold
            self.result.stops = result.stops
        else:
            self.result = result

    def covers(self, point) -> bool:
        """Whether a point lies in a crop the model saw on its slice (else it needs the model)."""
        return any(t.crop.r0 <= point.i < t.crop.r1 and t.crop.c0 <= point.j < t.crop.c1
                   for t in self.result.slices[point.slice].tasks)

    def new_slice_values(self, k: int, current: np.ndarray, mask: np.ndarray, axis: int = 2) -> np.ndarray:
        """Slice k with this object's mask written: it grows over free voxels, shrinks back to free."""
        base = self.base.setdefault((axis, k), np.array(current, copy=True))
        label = self.label
        new = np.array(current, copy=True)
        free_before = (base == 0) | (base == label)
        grow = mask & ((current == 0) | (current == label)) & free_before
        shrink = (current == label) & ~mask & (base == 0)
        new[grow] = label
        new[shrink] = 0
        return new


class ObjectList:
    """The session's objects and which one is current."""

    def __init__(self) -> None:
        self.objects: list[SegObject] = []
        self.index = -1

    @property
    def current(self) -> SegObject | None:
        return self.objects[self.index] if 0 <= self.index < len(self.objects) else None

    def next_label(self, used: set[int] = frozenset()) -> int:
        """The lowest label above every label in use (in the layer or by an object)."""
        taken = set(used) | {o.label for o in self.objects}
        return max(taken, default=0) + 1

    def new(self, label: int | None = None, name: str = "", used: set[int] = frozenset()) -> SegObject:
        label = self.next_label(used) if label is None else label
        obj = SegObject(label, name, label_colour(label))
        self.objects.append(obj)
        self.index = len(self.objects) - 1
        return obj

    def select(self, index: int) -> SegObject:
        if not 0 <= index < len(self.objects):
            raise IndexError(f"no object {index}")
        self.index = index
        return self.objects[index]
