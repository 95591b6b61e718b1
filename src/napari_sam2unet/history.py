"""One undo/redo history of label edits, free of Qt and napari (any object with ``.data`` works).

A step remembers, for each slice it touched, the slice before and after it. Undo puts back
only the voxels the step changed, so the user's own painting elsewhere on the slice stays.
A step may carry the state of the object it changed (opaque here) so undo restores that too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def slice_index(axis: int, k: int, ndim: int = 3) -> tuple:
    index: list = [slice(None)] * ndim
    index[axis] = k
    return tuple(index)


@dataclass
class Step:
    """One operation: what it was, the label slices it changed and the object states around it."""

    kind: str
    layer: Any
    axis: int
    before: dict[int, np.ndarray] = field(default_factory=dict)
    after: dict[int, np.ndarray] = field(default_factory=dict)
    obj: Any = None
    state_before: Any = None
    state_after: Any = None
    record: dict | None = None

    def remember(self, k: int) -> None:
        """Keep slice k as it is now, the first time the step touches it."""
        if k not in self.before:
            self.before[k] = np.array(self.layer.data[slice_index(self.axis, k)], copy=True)

    def write(self, k: int, values: np.ndarray) -> None:
        """Set slice k (remembering it first); the caller refreshes the display."""
        self.remember(k)
        self.layer.data[slice_index(self.axis, k)] = values

    def close(self) -> Step:
        """Record the slices after the step; drop the ones it left unchanged."""
        for k in list(self.before):
            now = np.array(self.layer.data[slice_index(self.axis, k)], copy=True)
            if np.array_equal(now, self.before[k]):
                del self.before[k]
            else:
                self.after[k] = now
        return self

    def voxels(self, label: int) -> int:
        """Voxels this step set to the label."""
        return int(sum(((self.after[k] == label) & (self.before[k] != label)).sum() for k in self.after))

    def undo(self) -> None:
        self._swap(self.after, self.before)
        if self.obj is not None:
            self.obj.restore(self.state_before)

    def redo(self) -> None:
        self._swap(self.before, self.after)
        if self.obj is not None:
            self.obj.restore(self.state_after)

    def _swap(self, old: dict, new: dict) -> None:
        for k in old:
            index = slice_index(self.axis, k)
            current = np.array(self.layer.data[index])
            changed = old[k] != new[k]
            current[changed] = new[k][changed]
            self.layer.data[index] = current


class History:
    """Undo and redo stacks of steps; a new step clears the redo stack."""

    def __init__(self) -> None:
        self.done: list[Step] = []
        self.undone: list[Step] = []

    def push(self, step: Step) -> None:
        self.done.append(step)
        self.undone.clear()

    def undo(self) -> Step | None:
        if not self.done:
            return None
        step = self.done.pop()
        step.undo()
        self.undone.append(step)
        return step

    def redo(self) -> Step | None:
        if not self.undone:
            return None
        step = self.undone.pop()
        step.redo()
        self.done.append(step)
        return step

    def records(self, layer_id) -> list[dict]:
        """Provenance records of the steps in effect on one layer, in order."""
        return [s.record for s in self.done if s.record is not None and layer_key(s.layer) == layer_id]


def layer_key(layer) -> Any:
    """A layer's identity that survives napari's proxies (which are new objects on each access)."""
    return getattr(layer, "unique_id", None) or id(layer)
