"""Edits on a Session's objects, free of Qt and napari: select, commit, run and edit steps, undo.

A labels layer here is anything with ``.data`` and ``.metadata``; whether it is still in the
viewer is the ``alive`` function's answer. So every rule of the widget's editing is tested
without a viewer (tests/test_editing.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .history import Step, layer_key, slice_index
from .objects import SegObject, label_colour
from .prompts import Prompts
from .provenance import RUNS_KEY, edit_record, prompts_record
from .session import Session


@dataclass(frozen=True)
class Outcome:
    """What an undo or redo did, in the words the status line shows."""

    step: Step | None
    text: str
    done: bool  # False: nothing changed (no step, or its layer is gone)


class Editor:
    """The current object's edits on one session; ``alive(layer)``: is the layer still shown."""

    def __init__(self, session: Session, alive: Callable[[Any], bool] = lambda layer: True) -> None:
        self.session = session
        self.alive = alive
        self.edit: Step | None = None  # a threshold drag or point edit, closed when it settles

    @property
    def current(self) -> SegObject | None:
        return self.session.objects.current

    def usable(self, layer) -> bool:
        return layer is not None and self.alive(layer)

    # --- objects -----------------------------------------------------------------------------

    def select(self, index: int) -> SegObject:
        self.close_edit()
        return self.session.objects.select(index)

    def commit(self, used: set[int] = frozenset()) -> SegObject:
        """Keep the current object; the next one writes into the same layer with the next free
        label (above ``used``, the labels in that layer). One undo step goes back to it."""
        self.close_edit()
        objects = self.session.objects
        previous, kept = objects.index, objects.current
        obj = objects.new(used=used)
        obj.layer = kept.layer
        index = objects.index

        def back(_state=None):
            objects.index = previous

        def forward(_state=None):
            objects.index = index

        step = Step("commit", kept.layer, kept.axis or 0, record=edit_record("commit", kept.label, name=kept.name))
        step.undo_hook, step.redo_hook = back, forward
        self.push(step)
        return obj

    def adopt_labels(self, layer, names: dict[int, str], colours: dict) -> None:
        """A reopened label map's named labels become objects again, so new runs for them write
        into it; the object in progress, if still empty, moves to the next free label."""
        objects, current = self.session.objects.objects, self.current
        fresh = current is not None and current.result is None and not current.prompts
        for label, name in sorted(names.items()):
            if self._rebind(label, layer, current):
                continue
            obj = SegObject(label, name, tuple(colours.get(label, label_colour(label))), layer=layer)
            objects.insert(objects.index(current) if fresh else len(objects), obj)
        if fresh:
            taken = {o.label for o in objects if o is not current}
            if current.label in taken:
                current.label = max(taken) + 1
            if not self.usable(current.layer):
                current.layer = layer
        self.session.objects.index = objects.index(current) if current is not None else len(objects) - 1

    def _rebind(self, label: int, layer, current) -> bool:
        """An object of this label already here: kept if on this layer, moved to it if its own
        layer is gone (its cached result belonged to that layer and is dropped)."""
        for obj in self.session.objects.objects:
            if obj is current or obj.label != label:
                continue
            if obj.layer is not None and layer_key(obj.layer) == layer_key(layer):
                return True
            if not self.usable(obj.layer):
                obj.layer, obj.result, obj.engine, obj.base = layer, None, None, {}
                return True
        return False

    # --- runs --------------------------------------------------------------------------------

    def begin_run(self, obj: SegObject, layer, axis: int) -> Step:
        """The step of a run writing the object into ``layer``."""
        if obj.layer is not None and layer_key(obj.layer) != layer_key(layer):
            obj.base = {}  # what the object remembered belongs to another layer
        obj.layer = layer
        return Step("run", layer, axis, obj=obj, state_before=obj.state())

    @staticmethod
    def write(obj: SegObject, step: Step, masks: dict) -> None:
        """Write an object's masks on some slices into the step's layer (free voxels or its own);
        the caller redraws the layer."""
        for k, mask in masks.items():
            current = np.asarray(step.layer.data[slice_index(step.axis, k)])
            step.write(k, obj.new_slice_values(k, current, mask, step.axis))

    def finish_run(self, step: Step, engine, result, image, drawn: Prompts, record: Callable[[int], dict]) -> int:
        """The run's result becomes the object's; its last slices are written and the step pushed
        with ``record(voxels_written)``. Returns the voxels written."""
        obj = step.obj
        obj.engine, obj.image, obj.axis = engine, image, step.axis
        obj.prompts = drawn
        obj.add_result(result)
        # Slices written while the run went need no second write: only the last batch's.
        self.write(obj, step, {k: s.mask for k, s in result.slices.items() if k not in step.before})
        step.close()
        step.state_after = obj.state()
        written = step.voxels(obj.label)
        step.record = record(written)
        self.push(step)
        return written

    @staticmethod
    def discard(step: Step) -> None:
        """Take back what a run wrote so far, and the object's state."""
        step.close()
        step.undo()

    # --- edits without a new run -------------------------------------------------------------

    def refine(self, obj: SegObject, points: list, threshold: float, slices: list[int] | None) -> list[int]:
        """Threshold and points re-applied from the object's cache (no model call), inside the open
        edit step; returns the slices written."""
        prompts = Prompts(list(obj.prompts.boxes), points)
        if self.edit is None:
            self.edit = Step("edit", obj.layer, obj.axis, obj=obj, state_before=obj.state())
        try:
            obj.engine.refine(obj.result, prompts, threshold, slices)
        except Exception:
            self.edit = None
            raise
        obj.prompts = prompts
        todo = list(obj.result.slices) if slices is None else [k for k in slices if k in obj.result.slices]
        self.write(obj, self.edit, {k: obj.result.slices[k].mask for k in todo})
        return todo

    def close_edit(self) -> Step | None:
        """A finished edit (a threshold drag, a point) becomes one undo step."""
        step, self.edit = self.edit, None
        if step is None:
            return None
        obj = step.obj
        step.close()
        step.state_after = obj.state()
        step.record = edit_record("refine", obj.label, threshold=obj.result.threshold,
                                  points=prompts_record(obj.prompts)["points"], voxels_written=step.voxels(obj.label))
        self.push(step)
        return step

    def correct(self, obj: SegObject, slices: list[int], points: list, threshold: float) -> Step:
        """One undo step: each slice looked at again by the object's engine with the points drawn now."""
        self.close_edit()  # a threshold drag in flight is its own step
        step = Step("correct", obj.layer, obj.axis, obj=obj, state_before=obj.state())
        prompts = Prompts(list(obj.prompts.boxes), list(points))
        try:
            for k in slices:
                obj.engine.correct(obj.result, k, prompts, threshold)
        except Exception:
            obj.restore(step.state_before)
            raise
        obj.prompts = prompts
        self.write(obj, step, {k: obj.result.slices[k].mask for k in slices})
        step.close()
        step.state_after = obj.state()
        card = obj.engine.card
        step.record = edit_record("correct", obj.label, threshold=obj.result.threshold, slices=slices,
                                  points=prompts_record(prompts)["points"],
                                  model={"name": card.name, "file": str(card.file), "sha256": card.sha256},
                                  voxels_written=step.voxels(obj.label))
        self.push(step)
        return step

    # --- history -----------------------------------------------------------------------------

    def push(self, step: Step) -> None:
        self.session.history.push(step)
        self.record(step.layer)

    def undo(self) -> Outcome:
        self.close_edit()
        return self._travel(self.session.history.done, "undo", "undone")

    def redo(self) -> Outcome:
        return self._travel(self.session.history.undone, "redo", "redone")

    def _travel(self, stack: list[Step], verb: str, past: str) -> Outcome:
        history = self.session.history
        if not stack:
            return Outcome(None, f"nothing to {verb}", False)
        step = stack[-1]
        if step.after and not self.usable(step.layer):
            # Its voxels went with the layer: nothing to put back, and it must not block the
            # steps behind it.
            stack.pop()
            name = getattr(step.layer, "name", "its labels layer")
            return Outcome(step, f"cannot {verb} the {step.kind}: its labels layer {name} was deleted", False)
        step = history.undo() if verb == "undo" else history.redo()
        hook = getattr(step, f"{verb}_hook", None)
        if hook is not None:
            hook()
        if self.usable(step.layer):
            self.record(step.layer)
        return Outcome(step, f"{step.kind} {past}", True)

    def record(self, layer) -> None:
        """Every operation in effect on this layer, for the writer's provenance sidecar."""
        if layer is not None:
            layer.metadata[RUNS_KEY] = self.session.history.records(layer_key(layer))
