"""The segment widget's object controls: the object list, label value and name, select, commit,
clear, undo and redo; the rules of each on the Session are in the Qt-free editing module."""

import numpy as np
from napari.layers import Labels

from .label_files import name_features
from .objects import SegObject
from .prompts import Prompts
from .provenance import COLOURS_KEY, NAMES_KEY


def object_title(obj: SegObject) -> str:
    """An object as the list shows it: its label, name and the model that made it."""
    model = getattr(getattr(obj.engine, "card", None), "name", None)
    return f"{obj.title} ({model})" if model else obj.title


class ObjectControls:
    def __init__(self, widget) -> None:
        self.widget = widget

    def choices(self, _widget=None):
        session = getattr(self.widget, "session", None)
        return [(object_title(obj), n) for n, obj in enumerate(session.objects.objects)] if session else []

    def show(self):
        """The controls show the current object (not a user's choice: no signals)."""
        widget = self.widget
        obj = widget.current
        with widget.object_list.changed.blocked():
            widget.object_list.reset_choices()
            widget.object_list.value = widget.objects.index
        with widget.label_value.changed.blocked():
            widget.label_value.value = obj.label
        with widget.label_name.changed.blocked():
            widget.label_name.value = obj.name
        if obj.result is not None:
            with widget.threshold.changed.blocked():
                widget.threshold.value = obj.result.threshold

    def select(self, index: int):
        """Make object `index` current: its prompts come back, threshold and points edit it."""
        widget = self.widget
        if widget.busy or index == widget.objects.index:
            return
        widget.edits.close()
        widget.prompt_layers.keep(widget.current)
        obj = widget.editor.select(index)
        if obj.image is not None and obj.image in widget.viewer.layers:
            with widget.image.changed.blocked():
                widget.image.value = obj.image
        widget.prompt_layers.fill(obj)
        self.show()
        widget.status.value = f"editing {obj.title}"

    def commit(self, _value=None):
        """Keep the current object and start the next one with the next free label."""
        widget = self.widget
        if widget.busy:
            widget.tell("info", "a run is in progress: wait for it or press Cancel")
            return
        widget.edits.close()
        widget.prompt_layers.keep(widget.current)
        layer = widget.current.layer
        used = {int(v) for v in np.unique(np.asarray(layer.data))} if not widget.layer_gone(layer) else set()
        obj = widget.editor.commit(used)
        widget.prompt_layers.fill(obj)
        self.show()
        widget.status.value = f"committed; now {obj.title}"
        widget.update_history_buttons()

    def clear_prompts(self, _value=None):
        """Empty the current object's prompt layers (its labels stay)."""
        widget = self.widget
        image = widget.image.value
        if image is None:
            return
        widget.prompt_layers.clear(image)
        widget.current.prompts = Prompts()
        widget.status.value = "prompts cleared"

    def on_label_value(self, value):
        widget, obj = self.widget, self.widget.current
        if obj.result is not None:
            with widget.label_value.changed.blocked():
                widget.label_value.value = obj.label
            widget.tell("info", f"{obj.title} already has labels: commit it and give the next object this value")
            return
        obj.label = int(value)
        self.show()

    def on_label_name(self, value):
        obj = self.widget.current
        obj.name = str(value).strip()
        if obj.layer is not None:
            names = obj.layer.metadata.setdefault(NAMES_KEY, {})
            names[obj.label] = obj.name
            obj.layer.features = name_features(names)
        self.show()

    def adopt_labels(self, layer):
        """A reopened label map's named labels become objects again."""
        names = {int(k): str(v) for k, v in (layer.metadata.get(NAMES_KEY) or {}).items()}
        if isinstance(layer, Labels) and names:
            self.widget.editor.adopt_labels(layer, names, layer.metadata.get(COLOURS_KEY) or {})
            self.show()

    def travel(self, verb: str):
        """Undo or redo the last operation (run, edit or commit); a step whose labels layer was
        deleted is said and dropped, not pretended."""
        widget = self.widget
        if widget.busy:
            return
        if verb == "undo":
            widget.edits.close()
        outcome = widget.editor.undo() if verb == "undo" else widget.editor.redo()
        step = outcome.step
        if step is None:
            return
        if not outcome.done:
            widget.tell("warning", outcome.text)
        elif not widget.layer_gone(step.layer):
            step.layer.refresh()
        if outcome.done and (step.obj is widget.current or hasattr(step, "undo_hook")):
            widget.prompt_layers.fill(widget.current)
        self.show()
        widget.set_status(outcome.text)
        self.update_history_buttons()

    def update_history_buttons(self):
        widget, history = self.widget, self.widget.session.history
        widget.set_enabled(widget.undo_button, bool(history.done) and not widget.busy)
        widget.set_enabled(widget.redo_button, bool(history.undone) and not widget.busy)
