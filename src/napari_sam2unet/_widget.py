"""The napari dock widget: its controls, their wiring and what it tells the user.

Runs (a Job, the worker, its messages) are in _run, prompt layers in _prompt_layers, edits as the
user prompts in _edits, objects and undo in _object_controls, the view in _view_keeper, the model
and backend in _model_picker, saving in _save_labels; the rules of edits on the Session are in the
Qt-free editing module, every segmentation decision is the engine's. No ``from __future__ import
annotations``: napari reads the ``Viewer`` annotation at runtime."""

import logging
from pathlib import Path

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning

from ._adapt import ADAPT_STEPS, AdaptController
from ._dock import fold_into, scroll_into
from ._edits import PromptEdits
from ._model_picker import ModelPicker
from ._object_controls import ObjectControls
from ._prompt_layers import PromptLayers
from ._run import SCOPE_TEXTS, RunController, read_job
from ._save_labels import save_labels
from ._view_keeper import ViewKeeper
from ._volume_picker import VolumePicker
from .editing import Editor
from .engine import PROPAGATE_MIN_OVERLAP, Engine
from .errors import Cancelled, Sam2UnetError
from .history import layer_key
from .layer_prompts import SIGN_COLOURS
from .objects import SegObject
from .preprocess import WINDOW_CHOICES
from .provenance import META_KEY
from .session import session_for
from .views import DISPLAY_WINDOWS, PLANES

log = logging.getLogger(__name__)

OWN_LAYER = "the image's labels layer"
SAVE_TIP = "The object's labels layer beside the image: NIfTI with label files, DICOM-SEG or .seg.nrrd"
RUN_KEYS = "Shift+S: this slice; Shift+P: propagate from this slice"
ADAPT_TIP = ("Fine-tune the object's model on the slices you prompted or corrected, then run its prompts "
             "again with it; the model is kept for this image only")
SAVE_MODEL_TIP = "Keep the model adapted to this image by name: it joins the model list for every image"


def run_label(scope: str) -> str:
    """The Run button says what it will segment."""
    return f"Run: {scope}"


class SegmentWidget(Container):
    """Segment the chosen image with SAM2-UNet, one object at a time, steered by point and box layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.session = session_for(viewer)
        self.editor = Editor(self.session, alive=lambda layer: not self.layer_gone(layer))
        self.engine: Engine | None = None  # the last run's engine (for messages and tests)
        self.closed = False
        self.views = ViewKeeper(self)
        self.prompt_layers = PromptLayers(self)
        self.edits = PromptEdits(self)
        self.runs = RunController(self)
        self.volumes = VolumePicker(self)
        self.adapt = AdaptController(self)
        self.object_controls = controls = ObjectControls(self)
        # The widget's own verbs (buttons, keys, tests), done by its parts.
        self.show_object, self.select_object = controls.show, controls.select
        self.commit, self.clear_prompts = controls.commit, controls.clear_prompts
        self.show_plane = self.views.show_plane

        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.view_buttons = [PushButton(text=plane) for plane in PLANES]
        self.display = ComboBox(label="Display", choices=list(DISPLAY_WINDOWS), value="as opened",
                                tooltip="CT window for the display only (the model's input is set by Window)")
        self.add_prompts_button = PushButton(text="Add prompt layers (points, boxes)")
        self.point_sign = ComboBox(label="New points", choices=list(SIGN_COLOURS),
                                   tooltip="Press n on the points layer to switch")
        self.auto_run = CheckBox(text="Segment as you prompt", value=True,
                                 tooltip="A new box or point segments its slice at once")
        self.object_list = ComboBox(label="Object", choices=self._object_choices,
                                    tooltip="Selecting an object brings back its prompts: edits reach it")
        self.label_value = SpinBox(label="Label value", min=1, max=65535, value=1)
        self.label_name = LineEdit(label="Label name", value="")
        # Keys in the tooltips: the buttons' row fits a laptop dock.
        self.commit_button = PushButton(text="Commit, next object", tooltip="Shift+C: keep this object, start the next")
        self.clear_button = PushButton(text="Clear prompts", tooltip="Shift+X: empty this object's prompt layers")
        self.models = models = ModelPicker(self)
        self.model, self.model_file = models.model, models.model_file
        self.backend, self.backend_info = models.backend, models.backend_info
        self.window = ComboBox(label="Window", choices=list(WINDOW_CHOICES), value="auto",
                               tooltip="The model's input: auto = MR percentiles, or CT soft tissue for CT-like values")
        self.scope = ComboBox(label="Scope", choices=[(text, text) for text, _ in SCOPE_TEXTS], value="this slice")
        self.threshold = FloatSlider(label="Threshold", min=0.01, max=0.99, step=0.01, value=0.5,
                                     tooltip="Re-applied from cached probabilities: no model call")
        self.min_overlap = FloatSpinBox(label="Propagation stops below overlap", min=0.0, max=0.99, step=0.05,
                                        value=PROPAGATE_MIN_OVERLAP,
                                        tooltip="Share of the smaller of two neighbouring masks inside the other "
                                                "under which propagation jumped away")
        self.target = ComboBox(label="Write into", choices=self._target_choices)
        self.run_button = PushButton(text=run_label(self.scope.value), tooltip=RUN_KEYS)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", visible=False)
        self.undo_button = PushButton(text="Undo", enabled=False)
        self.redo_button = PushButton(text="Redo", enabled=False)
        self.save_button = PushButton(text="Save labels...", tooltip=SAVE_TIP)
        self.adapt_button = PushButton(text="Adapt to this scan", tooltip=ADAPT_TIP)
        self.save_model_button = PushButton(text="Save model...", enabled=False, tooltip=SAVE_MODEL_TIP)
        self.adapt_steps = SpinBox(label="Adapt steps", min=1, max=5000, value=ADAPT_STEPS,
                                   tooltip="Training steps of Adapt to this scan (more: slower, often better)")
        self.status = Label(label="Status", value="ready")
        self.cursor = Label(label="Cursor", value="")
        for label in (self.status, self.cursor, self.backend_info):
            label.native.setWordWrap(True)  # a long status wraps instead of widening the dock
        self._lay_out()
        self._connect()
        if self.session.objects.current is None:
            self.session.objects.new(label=1)
        self.show_object()
        models.on_choice()
        if self.image.value is not None:
            self.views.radiological(self.image.value)
        self.volumes.update()
        for layer in viewer.layers:
            self.object_controls.adopt_labels(layer)
        self.update_history_buttons()
        self.views.fit()

    def _lay_out(self):
        """The controls scroll; the options most users leave alone fold away (a laptop screen)."""

        def row(*widgets):
            return Container(widgets=list(widgets), layout="horizontal", labels=False)

        run_row = row(self.run_button, self.cancel_button)
        self.body = Container(widgets=[
            self.image, self.volumes.control, row(*self.view_buttons), self.display,
            self.add_prompts_button, self.point_sign, self.auto_run,
            self.object_list, self.label_value, self.label_name, row(self.commit_button, self.clear_button),
            self.model, self.scope, self.threshold,
            run_row, self.progress, row(self.undo_button, self.redo_button),
            row(self.adapt_button, self.save_model_button), self.save_button,
            self.status, self.cursor,
        ])
        self.advanced = Container(widgets=[self.model_file, self.backend, self.backend_info, self.window,
                                           self.min_overlap, self.target, self.adapt_steps])
        self.advanced_section = fold_into(self.body, "Advanced options", self.advanced, before=run_row)
        self.scroll = scroll_into(self, self.body)

    def reset_choices(self, _event=None):
        if not hasattr(self, "advanced"):
            return  # napari may ask while the controls are being made
        self.body.reset_choices()
        self.advanced.reset_choices()

    def _connect(self):
        viewer = self.viewer
        for button, plane in zip(self.view_buttons, PLANES):
            button.changed.connect(lambda _v=None, p=plane: self.show_plane(p))
        self.display.changed.connect(self.views.on_display)
        self.add_prompts_button.changed.connect(self.add_prompt_layers)
        self.point_sign.changed.connect(self.prompt_layers.set_sign)
        self.image.changed.connect(lambda _v=None: (self.target.reset_choices(), self.volumes.update(),
                                                    self.model.reset_choices(), self.adapt.update_buttons()))
        self.object_list.changed.connect(lambda index: index is not None and self.select_object(index))
        self.label_value.changed.connect(self.object_controls.on_label_value)
        self.label_name.changed.connect(self.object_controls.on_label_name)
        self.commit_button.changed.connect(self.commit)
        self.clear_button.changed.connect(self.clear_prompts)
        self.threshold.changed.connect(self.edits.on_threshold)
        self.run_button.changed.connect(self.run)
        self.scope.changed.connect(lambda value: setattr(self.run_button, "text", run_label(value)))
        self.cancel_button.changed.connect(self.cancel)
        self.undo_button.changed.connect(self.undo)
        self.redo_button.changed.connect(self.redo)
        self.save_button.changed.connect(lambda _v=None: self.save_labels())
        self.adapt_button.changed.connect(self.adapt_to_scan)
        self.save_model_button.changed.connect(lambda _v=None: self.adapt.save())
        # Viewer events, disconnected when the dock closes (the session lives on).
        self._viewer_events = [(event, self._refresh_choices) for event in (
            viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered)]
        self._viewer_events += [(viewer.layers.events.inserted, self._on_layer_inserted),
                                (viewer.cursor.events.position, self.views.on_cursor),
                                (viewer.canvas.events.size, self.views.on_canvas_size)]
        for event, handler in self._viewer_events:
            event.connect(handler)
        keys = {"Shift-S": lambda: self.run(scope="this slice"),
                "Shift-P": lambda: self.run(scope="propagate from this slice"),
                "Shift-C": self.commit, "Shift-X": self.clear_prompts, "Shift-Z": self.undo, "Shift-Y": self.redo}
        for key, action in keys.items():
            viewer.bind_key(key, lambda _v=None, act=action: act(), overwrite=True)
        self.native.destroyed.connect(self._on_destroyed)

    # --- choices -------------------------------------------------------------------------------

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _object_choices(self, _widget=None):
        return self.object_controls.choices() if hasattr(self, "object_controls") else []

    def _target_choices(self, _widget=None):
        image = self.image.value if hasattr(self, "image") else None
        shape = tuple(image.data.shape) if image is not None else None
        layers = [(layer.name, layer) for layer in self.viewer.layers
                  if isinstance(layer, Labels) and tuple(layer.data.shape) == shape]
        return [(OWN_LAYER, None), *layers]

    def _refresh_choices(self, _event=None):
        self.image.reset_choices()
        self.target.reset_choices()
        self.volumes.update()

    def _on_layer_inserted(self, event):
        layer = event.value
        if isinstance(layer, Image) and META_KEY in layer.metadata:
            self.views.radiological(layer)
        self.object_controls.adopt_labels(layer)

    # --- objects (in _object_controls) ------------------------------------------------------

    @property
    def objects(self):
        return self.session.objects

    @property
    def current(self) -> SegObject:
        return self.session.objects.current

    @property
    def busy(self) -> bool:
        return self.session.busy

    # --- prompt layers and runs ----------------------------------------------------------------

    def add_prompt_layers(self, _value=None):
        """Add (or select) the points and boxes layers for the chosen image."""
        try:
            image = self.prompt_layers.require_image()
        except Sam2UnetError as error:
            self.tell("error", str(error))
            return None, None
        return self.prompt_layers.add(image, self.point_sign.value)

    def run(self, _value=None, scope: str | None = None):
        """Segment the current object in a thread worker; returns the worker (None when inputs are unusable)."""
        if self.busy:
            self.tell("info", "a run is in progress: wait for it or press Cancel")
            return None
        self.edits.close()
        try:
            job = read_job(self, scope)
        except Sam2UnetError as error:
            self.say(str(error), error)
            return None
        return self.runs.start(job)

    def adapt_to_scan(self, _value=None):
        """Fine-tune the object's model on the slices the user taught, then run its prompts again."""
        return self.adapt.start()

    def cancel(self, _value=None):
        """Stop the run at the next batch; what it wrote so far is taken back."""
        self.runs.cancel()

    def layer_gone(self, layer) -> bool:
        return layer is None or layer_key(layer) not in {layer_key(other) for other in self.viewer.layers}

    def source_name(self, image) -> str:
        return (image.metadata.get(META_KEY) or {}).get("path") or image.name

    # --- saving and history --------------------------------------------------------------------

    def save_labels(self, path: str | Path | None = None) -> list[str]:
        """Write the labels layer with its geometry, label files and provenance; asks where when no path."""
        return save_labels(self, path)

    def undo(self, _value=None):
        """Take back the last operation (run, edit or commit)."""
        self.object_controls.travel("undo")

    def redo(self, _value=None):
        self.object_controls.travel("redo")

    def update_history_buttons(self):
        self.object_controls.update_history_buttons()

    # --- messages ------------------------------------------------------------------------------

    def _on_destroyed(self, _obj=None):
        """The widget was closed: its run goes on into the session's history (a new widget finds it)."""
        self.closed = True
        for event, handler in self._viewer_events:
            event.disconnect(handler)

    def _set(self, widget, attribute, value):
        if self.closed:
            return
        try:
            setattr(widget, attribute, value)
        except RuntimeError:  # the Qt side is gone (widget closed): nothing to show
            self.closed = True

    def set_enabled(self, button, enabled: bool):
        self._set(button, "enabled", enabled)

    def set_visible(self, control, visible: bool):
        self._set(control, "visible", visible)

    def set_text(self, label, text: str, tooltip: str | None = None):
        self._set(label, "value", text)
        if tooltip is not None:
            self._set(label, "tooltip", tooltip)

    def set_status(self, text: str):
        self._set(self.status, "value", text)

    def tell(self, kind: str, text: str):
        """A napari notification: "info", "warning" or "error"."""
        {"info": show_info, "warning": show_warning, "error": show_error}[kind](text)

    def say(self, message: str, error: BaseException | None = None):
        """An error in the status line and a notification; a bug of ours also in the log."""
        self.set_status(message if len(message) < 80 else message[:77] + "...")
        if isinstance(error, Cancelled):
            self.tell("info", message)
        elif error is None or isinstance(error, Sam2UnetError):
            self.tell("error", message)
        else:
            log.error("SAM2-UNet run failed", exc_info=(type(error), error, error.__traceback__))
            self.tell("error", f"SAM2-UNet failed unexpectedly ({type(error).__name__}: {error}); "
                               f"the labels are unchanged; please report this with the log")
