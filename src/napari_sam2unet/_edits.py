"""The segment widget's edits as the user prompts: threshold drags and point clicks re-applied
from the cache (or, for a model that sees clicks, one call per slice), and "segment as you
prompt". The rules of the steps are in the Qt-free editing module."""

import time

from qtpy.QtCore import QTimer

from .errors import Sam2UnetError
from .layer_prompts import current_slice, layer_prompts, slice_axis
from .objects import SegObject

# After the threshold moves, the current slice updates at once and the rest after this pause.
REFINE_ALL_DELAY_MS = 250


class PromptEdits:
    """Reacts to the threshold and the prompt layers for the widget's current object."""

    def __init__(self, widget) -> None:
        self.widget = widget
        self.rerun = False  # a prompt came during a run: segment again when it ends
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFINE_ALL_DELAY_MS)
        self._timer.timeout.connect(lambda: self.refine(None))

    @property
    def editor(self):
        return self.widget.editor

    def editable(self) -> SegObject | None:
        """The current object, if it has a result whose image and layer still exist."""
        widget, obj = self.widget, self.widget.current
        if widget.busy or obj is None or obj.result is None or obj.engine is None:
            return None
        if widget.layer_gone(obj.layer) or obj.image is None or widget.layer_gone(obj.image):
            return None
        return obj

    def on_threshold(self, _value=None):
        obj = self.editable()
        if obj is None:
            return
        try:
            k = current_slice(self.widget.viewer, obj.image, obj.axis)
        except Sam2UnetError:
            return
        if k in obj.result.slices:
            self.refine([k], close=False)
        self._timer.start()

    def refine(self, slices, close: bool = True):
        """Re-apply threshold and points from the object's cache: no model call."""
        obj = self.editable()
        if obj is None:
            return
        widget = self.widget
        began = time.perf_counter()
        try:
            points, _ = widget.prompt_layers.find(obj.image)
            drawn = layer_prompts(obj.image, points, None, obj.axis).points
            todo = self.editor.refine(obj, drawn, float(widget.threshold.value), slices)
        except Sam2UnetError as error:
            widget.say(str(error), error)
            return
        if obj.layer is not None:
            obj.layer.refresh()
        widget.set_status(f"updated {len(todo)} slices in {(time.perf_counter() - began) * 1000:.0f} ms")
        if close:
            self.close()

    def close(self):
        """A finished edit (a threshold drag, a point) becomes one undo step."""
        self._timer.stop()
        if self.editor.close_edit() is not None:
            self.widget.update_history_buttons()

    def on_points_changed(self, event=None):
        """A point moved, appeared or vanished: re-select regions from the cache, or segment its slice."""
        widget = self.widget
        if widget.prompt_layers.quiet or (event is not None and getattr(event, "action", "changed") not in
                                          ("added", "removed", "changed")):
            return
        image = widget.image.value
        if image is None:
            return
        points, _ = widget.prompt_layers.find(image)
        obj = widget.current
        try:
            axis = slice_axis(widget.viewer, image)
            now = layer_prompts(image, points, None, axis).points
        except Sam2UnetError:
            return
        changed = set(now) ^ set(obj.prompts.points)
        touched = {p.slice for p in changed}
        editable = self.editable() is not None and obj.axis == axis
        segmented = set(obj.result.slices) if editable else set()
        here = current_slice(widget.viewer, image, axis)
        if editable and obj.engine.prompted:
            # A model that sees clicks: a segmented slice looks again with its mask as the prior
            # (one call); a slice without a mask yet is segmented from its prompts.
            if touched & segmented:
                self.correct(sorted(touched & segmented), now)
            if widget.auto_run.value and here in touched - segmented:
                self.auto_run()
            return
        added = [p for p in changed if p in set(now)]
        # From the cache when the model already saw every new point; else the model, if allowed.
        cached = editable and touched <= segmented and all(obj.covers(p) for p in added)
        if cached and touched:
            self.refine(sorted(touched))
        elif widget.auto_run.value and any(p.slice == here for p in changed):
            self.auto_run()
        elif touched & segmented:
            self.refine(sorted(touched & segmented))

    def correct(self, slices: list[int], drawn: list):
        """One undo step: each slice corrected by the object's engine from the points drawn now."""
        obj = self.editable()
        if obj is None:
            return
        widget = self.widget
        self._timer.stop()
        began = time.perf_counter()
        try:
            step = self.editor.correct(obj, slices, drawn, float(widget.threshold.value))
        except Sam2UnetError as error:
            widget.say(str(error), error)
            return
        step.layer.refresh()
        widget.update_history_buttons()
        ms = (time.perf_counter() - began) * 1000
        widget.set_status(f"corrected slice{'s' if len(slices) > 1 else ''} "
                          f"{', '.join(map(str, slices))} in {ms:.0f} ms (one model call each)")

    def on_boxes_changed(self, event=None):
        if self.widget.prompt_layers.quiet or not self.widget.auto_run.value:
            return
        if event is not None and getattr(event, "action", "added") not in ("added", "changed", "removed"):
            return
        self.auto_run()

    def auto_run(self):
        """Segment as you prompt: the current slice, now (or when the run in flight ends)."""
        if self.widget.busy:
            self.rerun = True
            return
        self.widget.run(scope="this slice")
