"""The napari dock widget: controls, the worker thread and messages around one Session.

Layers <-> prompts (layer_prompts), objects (objects), the undo history (history), provenance
(provenance) and views (views) live in Qt-free modules; every segmentation decision is the
engine's. No ``from __future__ import annotations`` here: napari reads the ``Viewer``
annotation at runtime.
"""

import logging
import time
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Points, Shapes
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog
from superqt.utils import create_worker

from . import _writer
from .backends import BACKEND_CHOICES
from .engine import PROPAGATE_MIN_OVERLAP, Engine
from .errors import Cancelled, InputError, PromptError, Sam2UnetError
from .history import Step, layer_key, slice_index
from .io import nifti_stem
from .label_files import name_features
from .layer_prompts import (
    SIGN_COLOURS,
    colour_points,
    current_slice,
    layer_prompts,
    only_slice,
    show_prompts,
    slice_axis,
)
from .models import DEFAULT_MODEL, find_model, list_models
from .objects import SegObject, label_colour
from .preprocess import WINDOW_CHOICES
from .prompts import Prompts
from .provenance import COLOURS_KEY, META_KEY, NAMES_KEY, RUNS_KEY, edit_record, prompts_record, run_record
from .session import session_for
from .views import DISPLAY_WINDOWS, PLANES, display_limits, ras_mm, show_plane

log = logging.getLogger(__name__)

OWN_LAYER = "the image's labels layer"
# Scope choices: (shown text, (engine scope, only the current slice's prompts?)).
SCOPES = (
    ("this slice", ("slices", True)),
    ("prompted slices", ("slices", False)),
    ("between prompted slices", ("between", False)),
    ("propagate from this slice", ("propagate", True)),
    ("whole volume", ("volume", False)),
)
# Save formats by file ending: (what the dialog calls it, the writer function in _writer.py).
# DICOM-SEG and .seg.nrrd join here once their writers land; the first entry is the default.
SAVE_FORMATS = {
    ".nii.gz": ("NIfTI labels + ITK-SNAP/Slicer label files", "write_labels_layer"),
    ".nii": ("NIfTI labels, uncompressed", "write_labels_layer"),
}
# Point markers on screen (pixels): visible at any zoom, small enough to leave a structure seen.
MARKER_PX = (7, 12)
# After the threshold moves, the current slice updates at once and the rest after this pause.
REFINE_ALL_DELAY_MS = 250
# During a run the labels layer is redrawn at most this often (a redraw costs more than a slice).
REFRESH_EVERY_S = 0.3
# Viewer shortcuts (documented in docs/user-guide.md).
KEYS = {
    "Shift-S": "segment this slice",
    "Shift-P": "propagate from this slice",
    "Shift-C": "commit the object, start the next",
    "Shift-X": "clear the object's prompts",
    "Shift-Z": "undo",
    "Shift-Y": "redo",
}


def _with_save_suffix(path: Path) -> Path:
    """A path ending in a format we write (typed without one: NIfTI)."""
    if any(path.name.lower().endswith(end) for end in SAVE_FORMATS):
        return path
    return path.with_name(path.name + next(iter(SAVE_FORMATS)))


def _object_title(obj: SegObject) -> str:
    """An object as the list shows it: its label, name and the model that made it."""
    model = getattr(getattr(obj.engine, "card", None), "name", None)
    return f"{obj.title} ({model})" if model else obj.title


class SegmentWidget(Container):
    """Segment the chosen image with SAM2-UNet, one object at a time, steered by point and box layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.session = session_for(viewer)
        self.engine: Engine | None = None  # the last run's engine (for messages and tests)
        self._step: Step | None = None  # the run in flight
        self._edit: Step | None = None  # a threshold drag, closed when it settles
        self._pbar = None
        self._signals: list = []
        self._handling = False
        self._quiet = False  # prompt layers being filled by us: not a user edit
        self._rerun = False  # a prompt came during a run: segment again when it ends
        self._last_refresh = 0.0
        self._closed = False

        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.view_buttons = [PushButton(text=plane) for plane in PLANES]
        self.display = ComboBox(label="Display", choices=list(DISPLAY_WINDOWS), value="as opened",
                                tooltip="CT window for the display only (the model's input is set by Window)")
        self.add_prompts_button = PushButton(text="Add prompt layers (points, boxes)")
        self.point_sign = ComboBox(label="New points", choices=["positive", "negative"],
                                   tooltip="Press n on the points layer to switch")
        self.auto_run = CheckBox(text="Segment as you prompt", value=True,
                                 tooltip="A new box or point segments its slice at once")
        self.object_list = ComboBox(label="Object", choices=self._object_choices,
                                    tooltip="Selecting an object brings back its prompts: edits reach it")
        self.label_value = SpinBox(label="Label value", min=1, max=65535, value=1)
        self.label_name = LineEdit(label="Label name", value="")
        self.commit_button = PushButton(text="Commit / next object (Shift+C)")
        self.clear_button = PushButton(text="Clear prompts (Shift+X)")
        self.model = ComboBox(label="Model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.model_file = FileEdit(label="or model file", filter="*.onnx *.yaml", value="",
                                   tooltip="A .onnx (or its .yaml card); wins over the model list")
        self.backend = ComboBox(label="Backend", choices=list(BACKEND_CHOICES), value="auto")
        self.backend_info = Label(label="Runs on", value="(chosen at the first run)")
        self.window = ComboBox(label="Window", choices=list(WINDOW_CHOICES), value="auto",
                               tooltip="The model's input: auto = MR percentiles, or CT soft tissue for CT-like values")
        self.scope = ComboBox(label="Scope", choices=[(text, text) for text, _ in SCOPES], value="this slice")
        self.threshold = FloatSlider(label="Threshold", min=0.01, max=0.99, step=0.01, value=0.5,
                                     tooltip="Re-applied from cached probabilities: no model call")
        self.min_overlap = FloatSpinBox(label="Propagation stops below overlap", min=0.0, max=0.99, step=0.05,
                                        value=PROPAGATE_MIN_OVERLAP,
                                        tooltip="Share of the smaller of two neighbouring masks inside the other "
                                                "under which propagation jumped away")
        self.target = ComboBox(label="Write into", choices=self._target_choices)
        self.run_button = PushButton(text="Run (Shift+S: this slice)")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.undo_button = PushButton(text="Undo", enabled=False)
        self.redo_button = PushButton(text="Redo", enabled=False)
        self.save_button = PushButton(text="Save labels...",
                                      tooltip="The object's labels layer as NIfTI with its label files, "
                                              "beside the image")
        self.status = Label(label="Status", value="ready")
        self.cursor = Label(label="Cursor", value="")
        for label in (self.status, self.cursor, self.backend_info):
            label.native.setWordWrap(True)  # a long status wraps instead of widening the dock

        def row(*widgets):
            return Container(widgets=list(widgets), layout="horizontal", labels=False)

        self.extend([
            self.image, row(*self.view_buttons), self.display,
            self.add_prompts_button, self.point_sign, self.auto_run,
            self.object_list, self.label_value, self.label_name, row(self.commit_button, self.clear_button),
            self.model, self.model_file, self.backend, self.backend_info, self.window, self.scope,
            self.threshold, self.min_overlap, self.target,
            row(self.run_button, self.cancel_button), row(self.undo_button, self.redo_button), self.save_button,
            self.status, self.cursor,
        ])

        for button, plane in zip(self.view_buttons, PLANES):
            button.changed.connect(lambda _v=None, p=plane: self.show_plane(p))
        self.display.changed.connect(self._on_display)
        self.add_prompts_button.changed.connect(self.add_prompt_layers)
        self.point_sign.changed.connect(self._on_sign_choice)
        self.image.changed.connect(self._on_image_choice)
        self.object_list.changed.connect(self._on_object_choice)
        self.label_value.changed.connect(self._on_label_value)
        self.label_name.changed.connect(self._on_label_name)
        self.commit_button.changed.connect(self.commit)
        self.clear_button.changed.connect(self.clear_prompts)
        self.model.changed.connect(self._on_model_choice)
        self.model_file.changed.connect(self._on_model_choice)
        self.threshold.changed.connect(self._on_threshold)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.undo_button.changed.connect(self.undo)
        self.redo_button.changed.connect(self.redo)
        self.save_button.changed.connect(lambda _v=None: self.save_labels())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            event.connect(self._refresh_choices)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.cursor.events.position.connect(self._on_cursor)
        self._bind_keys()
        self._refine_timer = QTimer()
        self._refine_timer.setSingleShot(True)
        self._refine_timer.setInterval(REFINE_ALL_DELAY_MS)
        self._refine_timer.timeout.connect(self._refine_all)
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._refresh_target)
        self.native.destroyed.connect(self._on_destroyed)
        if self.session.objects.current is None:
            self.session.objects.new(label=1)
        self._show_object()
        self._on_model_choice()
        image = self.image.value
        if image is not None:
            self._radiological(image)
        for layer in viewer.layers:
            if isinstance(layer, Labels):
                self._adopt_labels(layer)
        self._update_history_buttons()
        self._fitted = None
        self._fit_view()
        # Docking this widget narrows the canvas: a view the user has not moved stays fitted.
        viewer.canvas.events.size.connect(self._on_canvas_size)

    def _camera(self):
        scene = getattr(self.viewer, "scene", None)  # napari 0.9 moved the camera to the scene
        return scene.camera if scene is not None else self.viewer.camera

    def _fit_view(self):
        self.viewer.reset_view()
        camera = self._camera()
        self._fitted = (camera.zoom, tuple(camera.center))

    def _on_canvas_size(self, _event=None):
        camera = self._camera()
        if not self._closed and self._fitted == (camera.zoom, tuple(camera.center)):
            self._fit_view()

    # --- choices ---------------------------------------------------------------------------

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _model_choices(self, _widget=None):
        # The bundled model first: a fine-tuned model never becomes the default by its name.
        names = {card.name for card in list_models()} - {DEFAULT_MODEL}
        return [DEFAULT_MODEL, *sorted(names)]

    def _object_choices(self, _widget=None):
        if not hasattr(self, "session"):
            return []
        return [(_object_title(obj), n) for n, obj in enumerate(self.session.objects.objects)]

    def _target_choices(self, _widget=None):
        image = self.image.value if hasattr(self, "image") else None
        shape = tuple(image.data.shape) if image is not None else None
        layers = [(layer.name, layer) for layer in self.viewer.layers
                  if isinstance(layer, Labels) and tuple(layer.data.shape) == shape]
        return [(OWN_LAYER, None), *layers]

    def _refresh_choices(self, _event=None):
        self.image.reset_choices()
        self.target.reset_choices()

    def _model_spec(self) -> str:
        path = str(self.model_file.value or "").strip()
        return path if path not in ("", ".") else self.model.value

    def _on_model_choice(self, _value=None):
        try:
            card = find_model(self._model_spec(), verify=False)
        except Sam2UnetError:
            return  # said at Run time, where the user can act on it
        with self.threshold.changed.blocked():  # the card's threshold is for the next run only
            self.threshold.value = card.threshold

    # --- views -----------------------------------------------------------------------------

    def _on_layer_inserted(self, event):
        layer = event.value
        if isinstance(layer, Image) and META_KEY in layer.metadata:
            self._radiological(layer)
        elif isinstance(layer, Labels):
            self._adopt_labels(layer)

    def _adopt_labels(self, layer):
        """A reopened label map's named labels become objects again, so new runs for them write
        into it; the object in progress, if still empty, moves to the next free label."""
        names = {int(k): str(v) for k, v in (layer.metadata.get(NAMES_KEY) or {}).items()}
        if not names:
            return
        objects, current = self.objects.objects, self.current
        fresh = current is not None and current.result is None and not current.prompts
        colours = layer.metadata.get(COLOURS_KEY) or {}
        for label, name in sorted(names.items()):
            if self._rebind(label, layer, current):
                continue
            obj = SegObject(label, name, tuple(colours.get(label, label_colour(label))), layer=layer)
            objects.insert(objects.index(current) if fresh else len(objects), obj)
        if fresh:
            taken = {o.label for o in objects if o is not current}
            if current.label in taken:
                current.label = max(taken) + 1
            if current.layer is None or self._layer_gone(current.layer):
                current.layer = layer
        self.objects.index = objects.index(current) if current is not None else len(objects) - 1
        self._show_object()

    def _rebind(self, label: int, layer, current) -> bool:
        """An object of this label already here: kept if on this layer, moved to it if its own
        layer is gone (its cached result belonged to that layer and is dropped)."""
        for obj in self.objects.objects:
            if obj is current or obj.label != label:
                continue
            if obj.layer is not None and layer_key(obj.layer) == layer_key(layer):
                return True
            if obj.layer is None or self._layer_gone(obj.layer):
                obj.layer, obj.result, obj.engine, obj.base = layer, None, None, {}
                return True
        return False

    def _radiological(self, image):
        """Open a volume once in the radiological axial view of its affine."""
        key = layer_key(image)
        if key in self.session.viewed:
            return
        self.session.viewed.add(key)
        self.show_plane("axial", image)

    def show_plane(self, plane: str, image=None):
        """Axial, coronal or sagittal, radiological, from the image's affine (its file's, or its layer's)."""
        show_plane(self.viewer, image if image is not None else self.image.value, plane)
        self._fit_view()

    def _on_display(self, value):
        image = self.image.value
        if image is None:
            return
        if value == "as opened":
            opened = (image.metadata.get(META_KEY) or {}).get("display")
            if opened is None:
                image.reset_contrast_limits()
            else:
                image.contrast_limits = opened
        else:
            image.contrast_limits = display_limits(value)

    def _on_cursor(self, _event=None):
        if self._closed:
            return
        image = self.image.value
        if image is None or image.ndim != 3:
            return
        try:
            voxel = np.round(image.world_to_data(self.viewer.cursor.position[-3:])).astype(int)
        except Exception:  # a cursor outside any transform napari can invert: show nothing
            return
        if np.any(voxel < 0) or np.any(voxel >= np.array(image.data.shape)):
            self.cursor.value = ""
            return
        affine = (image.metadata.get(META_KEY) or {}).get("affine")
        ras = ras_mm(affine, voxel) if affine is not None else np.asarray(image.data_to_world(voxel))
        self.cursor.value = "voxel {} {} {} | RAS {:.1f} {:.1f} {:.1f} mm".format(*voxel, *ras)

    # --- keys ------------------------------------------------------------------------------

    def _bind_keys(self):
        actions = {
            "Shift-S": lambda _v=None: self.run(scope="this slice"),
            "Shift-P": lambda _v=None: self.run(scope="propagate from this slice"),
            "Shift-C": lambda _v=None: self.commit(),
            "Shift-X": lambda _v=None: self.clear_prompts(),
            "Shift-Z": lambda _v=None: self.undo(),
            "Shift-Y": lambda _v=None: self.redo(),
        }
        for key, action in actions.items():
            self.viewer.bind_key(key, action, overwrite=True)

    # --- objects ---------------------------------------------------------------------------

    @property
    def objects(self):
        return self.session.objects

    @property
    def current(self) -> SegObject:
        return self.session.objects.current

    def _show_object(self):
        """The controls and prompt layers show the current object."""
        obj = self.current
        self._list_objects()
        with self.label_value.changed.blocked():
            self.label_value.value = obj.label
        with self.label_name.changed.blocked():
            self.label_name.value = obj.name
        if obj.result is not None:
            with self.threshold.changed.blocked():
                self.threshold.value = obj.result.threshold

    def _save_prompts(self):
        """The prompt layers hold the current object's prompts: keep them with the object."""
        image = self.image.value
        obj = self.current
        if image is None or obj is None:
            return
        points, shapes = self._prompt_layers(image)
        try:
            obj.prompts = layer_prompts(image, points, shapes, obj.axis if obj.axis is not None else self._axis())
        except Sam2UnetError:
            pass

    def _fill_prompt_layers(self, obj: SegObject):
        image = obj.image if obj.image is not None and obj.image in self.viewer.layers else self.image.value
        if image is None:
            return
        points, shapes = self._prompt_layers(image)
        self._quiet = True
        try:
            show_prompts(obj.prompts, image, points, shapes, obj.axis if obj.axis is not None else self._axis())
        finally:
            self._quiet = False
        self._keep_sign(points)

    def select_object(self, index: int):
        """Make object `index` current: its prompts come back, threshold and points edit it."""
        if self.busy or index == self.objects.index:
            return
        self._close_edit()
        self._save_prompts()
        obj = self.objects.select(index)
        if obj.image is not None and obj.image in self.viewer.layers:
            with self.image.changed.blocked():
                self.image.value = obj.image
        self._fill_prompt_layers(obj)
        self._show_object()
        self.status.value = f"editing {obj.title}"

    def _on_object_choice(self, index):
        if index is not None:
            self.select_object(index)

    def commit(self, _value=None):
        """Keep the current object and start the next one with the next free label."""
        if self.busy:
            show_info("a run is in progress: wait for it or press Cancel")
            return
        self._close_edit()
        self._save_prompts()
        previous = self.objects.index
        used = set()
        layer = self.current.layer
        if layer is not None and layer in self.viewer.layers:
            used = {int(v) for v in np.unique(np.asarray(layer.data))}
        obj = self.objects.new(used=used)
        obj.layer = layer
        index = self.objects.index

        def back(_state=None):
            self.objects.index = previous

        def forward(_state=None):
            self.objects.index = index

        step = Step("commit", layer, self.current.axis or 0,
                    record=edit_record("commit", self.objects.objects[previous].label,
                                       name=self.objects.objects[previous].name))
        step.undo_hook, step.redo_hook = back, forward
        self.session.history.push(step)
        if layer is not None:
            self._record(layer)
        self._fill_prompt_layers(obj)
        self._show_object()
        self.status.value = f"committed; now {obj.title}"
        self._update_history_buttons()

    def clear_prompts(self, _value=None):
        """Empty the current object's prompt layers (its labels stay)."""
        image = self.image.value
        if image is None:
            return
        points, shapes = self._prompt_layers(image)
        self._quiet = True
        try:
            if points is not None:
                points.data = np.empty((0, points.ndim))
            if shapes is not None:
                shapes.data = []
        finally:
            self._quiet = False
        self._keep_sign(points)
        self.current.prompts = Prompts()
        self.status.value = "prompts cleared"

    def _on_label_value(self, value):
        obj = self.current
        if obj.result is not None:
            with self.label_value.changed.blocked():
                self.label_value.value = obj.label
            show_info(f"{obj.title} already has labels: commit it and give the next object this value")
            return
        obj.label = int(value)
        self._list_objects()

    def _on_label_name(self, value):
        obj = self.current
        obj.name = str(value).strip()
        if obj.layer is not None:
            names = obj.layer.metadata.setdefault(NAMES_KEY, {})
            names[obj.label] = obj.name
            obj.layer.features = name_features(names)
        self._list_objects()

    def _list_objects(self):
        """The object list shows every object, the current one chosen (not a user's choice: no signal)."""
        with self.object_list.changed.blocked():
            self.object_list.reset_choices()
            self.object_list.value = self.objects.index

    def _on_image_choice(self, _value=None):
        self.target.reset_choices()

    # --- prompt layers ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.session.busy

    def _require_image(self) -> Image:
        image = self.image.value
        if image is None:
            raise InputError("no image layer: open a NIfTI file first (File > Open, reader napari-sam2unet)")
        if image.multiscale or image.rgb or image.ndim != 3:
            raise InputError(f"{image.name} is not a 3D grey-level volume; open a 3D MRI or CT")
        return image

    def _axis(self) -> int:
        image = self.image.value
        return slice_axis(self.viewer, image) if image is not None else 2

    def _prompt_layers(self, image) -> tuple[Points | None, Shapes | None]:
        names = {f"{image.name} points": Points, f"{image.name} boxes": Shapes}
        found = [
            next((layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, kind)), None)
            for name, kind in names.items()
        ]
        return found[0], found[1]

    def add_prompt_layers(self, _value=None):
        """Add (or select) the points and boxes layers for the chosen image."""
        try:
            image = self._require_image()
        except Sam2UnetError as error:
            show_error(str(error))
            return None, None
        points, shapes = self._prompt_layers(image)
        frame = {"scale": image.scale, "translate": image.translate}
        if shapes is None:
            shapes = self.viewer.add_shapes(ndim=3, name=f"{image.name} boxes", edge_color="yellow",
                                            face_color="transparent",
                                            edge_width=0.6 * float(min(image.scale[-2:])), **frame)
            shapes.events.data.connect(self._on_boxes_changed)
        if points is None:
            sign = pd.Categorical([], categories=list(SIGN_COLOURS))
            # A voxel across, but never under MARKER_PX on screen: it marks a spot without hiding it.
            points = self.viewer.add_points(ndim=3, name=f"{image.name} points", features={"sign": sign},
                                            face_color=SIGN_COLOURS[self.point_sign.value], border_color="white",
                                            size=float(min(image.scale[-2:])),
                                            canvas_size_limits=MARKER_PX, **frame)
            points.feature_defaults["sign"] = self.point_sign.value
            points.bind_key("n", self._toggle_sign, overwrite=True)
            points.events.data.connect(self._on_points_changed)
        shapes.mode = "add_rectangle"
        self.viewer.layers.selection.active = shapes
        return points, shapes

    def _on_sign_choice(self, value):
        image = self.image.value
        if image is None:
            return
        points, _ = self._prompt_layers(image)
        if points is not None:
            points.feature_defaults["sign"] = value
            points.current_face_color = SIGN_COLOURS[value]
            colour_points(points)  # current_face_color also recolours selected points

    def _keep_sign(self, points):
        """Refilling the points layer resets its next point's sign: the combo's sign again (the
        old selection went with the old points)."""
        if points is not None:
            points.selected_data = set()
            self._on_sign_choice(self.point_sign.value)

    def _toggle_sign(self, layer=None):
        """n: flip the selected points' sign, or the sign of the next points when none is selected."""
        points = layer if isinstance(layer, Points) else self._prompt_layers(self._require_image())[0]
        if points is None:
            return
        selected = sorted(points.selected_data)
        if selected:
            signs = points.features["sign"].astype(str).to_numpy()
            flipped = np.where(signs[selected] == "negative", "positive", "negative")
            points.features.loc[selected, "sign"] = flipped
            colour_points(points)
            self._on_points_changed()
        else:
            self.point_sign.value = "negative" if self.point_sign.value == "positive" else "positive"

    # --- running ---------------------------------------------------------------------------

    def _gather(self, scope_text: str | None = None) -> dict:
        """Everything a run needs, read on the main thread."""
        image = self._require_image()
        axis = slice_axis(self.viewer, image)
        points, shapes = self._prompt_layers(image)
        drawn = layer_prompts(image, points, shapes, axis)
        scope_text = scope_text or self.scope.value
        scope, this_slice = dict(SCOPES)[scope_text]
        k = current_slice(self.viewer, image, axis)
        prompts = drawn
        if this_slice:
            prompts = only_slice(drawn, k)
            if not prompts:
                raise PromptError(f"no box or point on slice {k}: draw one there, or choose the scope "
                                  f"'prompted slices' or 'whole volume'")
        elif scope != "volume" and not prompts:
            raise PromptError("no prompts: add a box or a point (Add prompt layers), or choose 'whole volume'")
        obj = self.current
        target = self.target.value
        if target is None:
            target = obj.layer if obj.layer is not None and obj.layer in self.viewer.layers else None
        if target is None:
            target = next((layer for layer in self.viewer.layers if isinstance(layer, Labels)
                           and layer.name == f"{image.name} labels"
                           and tuple(layer.data.shape) == tuple(image.data.shape)), None)
        if target is not None and obj.label > np.iinfo(target.data.dtype).max:
            raise InputError(f"label {obj.label} does not fit the {target.data.dtype} layer {target.name}")
        data = image.data if isinstance(image.data, np.ndarray) else np.asarray(image.data)
        spacing = tuple(float(abs(s)) for s in image.scale[-3:])
        return {"image": image, "data": data, "spacing": spacing, "axis": axis, "prompts": prompts,
                "drawn": drawn, "scope": scope, "threshold": float(self.threshold.value), "window": self.window.value,
                "model": self._model_spec(), "backend": self.backend.value, "slice": k, "target": target,
                "min_overlap": float(self.min_overlap.value), "object": obj}

    def run(self, _value=None, scope: str | None = None):
        """Segment the current object in a thread worker; returns the worker (None when inputs are unusable)."""
        if self.busy:
            show_info("a run is in progress: wait for it or press Cancel")
            return None
        self._close_edit()
        try:
            job = self._gather(scope)
        except Sam2UnetError as error:
            self._say(str(error), error)
            return None
        # The labels layer exists before the thread starts: adding a layer processes Qt events,
        # which inside a signal handler would let later signals overtake the current one.
        obj = job["object"]
        job["created"] = job["target"] is None
        layer = job["target"] or self._new_labels_layer(job["image"], obj.label)
        if obj.layer is not None and layer_key(obj.layer) != layer_key(layer):
            obj.base = {}  # what the object remembered belongs to another layer
        obj.layer = layer
        job["layer"] = layer
        self._step = Step("run", layer, job["axis"], obj=obj, state_before=obj.state())
        self._job = job
        worker = create_worker(self._work, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda message: self._in_order(self._on_yield, job, message))
        worker.returned.connect(lambda value: self._in_order(self._on_done, job, value))
        worker.errored.connect(lambda error: self._in_order(self._on_error, error))
        worker.aborted.connect(lambda: self._in_order(self._on_abort))
        worker.finished.connect(lambda: self._in_order(self._on_finished))
        self.session.worker = worker
        self._pbar = progress(total=0, desc="SAM2-UNet")
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "loading the model..."
        worker.start()
        return worker

    def _in_order(self, handler, *args):
        """Handle worker signals one at a time, in the order they came.

        Updating a layer or napari's progress bar can process Qt events, which delivers the
        next worker signal inside the current handler; without this queue a late progress
        message could overwrite the final status, or a run end in the middle of a batch.
        """
        self._signals.append((handler, args))
        if self._handling:
            return
        self._handling = True
        try:
            while self._signals:
                handler, args = self._signals.pop(0)
                try:
                    handler(*args)
                except Exception as error:  # a bug of ours must not stop the signals behind it
                    self._say(str(error), error)
        finally:
            self._handling = False

    def _work(self, job):
        """The worker thread: the object's engine on the volume, segment batch by batch."""
        card, backend, why = self.session.backend(job["model"], job["backend"])
        obj = job["object"]
        engine = obj.engine
        if engine is None or engine.backend is not backend:
            engine = Engine(backend)  # one per object: its cache holds that object's probabilities
        yield "engine", engine, why
        source = getattr(engine, "source", None)
        if source is None or source[0] is not job["data"] or source[1:] != (job["axis"], job["window"]):
            # NaN/Inf voxels (napari shows them as black) count as the lowest intensity; said below.
            engine.set_volume(job["data"], spacing=job["spacing"], axis=job["axis"], window=job["window"],
                              replace_nonfinite=True)
            engine.source = (job["data"], job["axis"], job["window"])
            if engine.replaced_voxels:
                yield "nonfinite", engine.replaced_voxels
        engine.propagate_min_overlap = job["min_overlap"]
        result = None
        for done, total, result in engine.iter_segment(job["prompts"], job["scope"], job["threshold"]):
            yield "progress", done, total, result
        return engine, result

    def _layer_gone(self, layer) -> bool:
        return layer_key(layer) not in {layer_key(other) for other in self.viewer.layers}

    def _on_yield(self, job, message):
        step = self._step
        if step is None:
            return  # a late message from a finished run
        if message[0] == "engine":
            _, engine, reason = message
            self._show_engine(engine, reason)
            job["object"].engine = engine
            self._set_status("segmenting...")
            return
        if message[0] == "nonfinite":
            show_warning(f"{message[1]} NaN or infinite voxels in {job['image'].name} were treated as its lowest "
                         f"intensity; fix the file if they mark something else")
            return
        if self._layer_gone(job["layer"]):
            self._lost_layer(job)
            return
        _, done, total, result = message
        new = [k for k in result.slices if k not in step.before]
        self._write(job["object"], step, {k: result.slices[k].mask for k in new}, live=True)
        if self._pbar is not None:
            self._pbar.total = total
            self._pbar.update(done - self._pbar.n)
        self._set_status(f"segmenting: {done} of {total} slices")

    def _lost_layer(self, job):
        """The target layer was deleted during the run: stop, write nothing more, say so."""
        step, self._step = self._step, None
        if self.session.worker is not None:
            self.session.worker.quit()
        if step is not None:
            job["object"].restore(step.state_before)
        job["object"].base = {}
        show_warning(f"the labels layer {job['layer'].name} was deleted during the run: the run stopped and "
                     f"nothing was kept; run again to write into a new layer")
        self._set_status("stopped: the labels layer was deleted")

    def _write(self, obj: SegObject, step: Step, masks: dict, live: bool = False) -> None:
        """Write an object's masks on some slices into its layer (only free voxels or its own)."""
        layer = step.layer
        for k, mask in masks.items():
            index = slice_index(step.axis, k)
            current = np.asarray(layer.data[index])
            step.write(k, obj.new_slice_values(k, current, mask, step.axis))
        now = time.perf_counter()
        if not live or now - self._last_refresh > REFRESH_EVERY_S:
            self._last_refresh = now
            layer.refresh()
        else:
            self._refresh_timer.start(int(REFRESH_EVERY_S * 1000))
        self._refresh_layer = layer

    def _refresh_target(self):
        layer = getattr(self, "_refresh_layer", None)
        if layer is not None and not self._layer_gone(layer):
            layer.refresh()

    def _show_engine(self, engine: Engine, reason: str):
        self.engine = engine
        # The device in the panel; why this backend (e.g. why not the NPU) on hover.
        self._set(self.backend_info, "value", engine.backend.device)
        self._set(self.backend_info, "tooltip", reason)

    def _new_labels_layer(self, image, label: int) -> Labels:
        dtype = np.uint8 if label <= 255 else np.uint16
        metadata = {NAMES_KEY: {}, COLOURS_KEY: {}, RUNS_KEY: []}
        if META_KEY in image.metadata:
            metadata[META_KEY] = image.metadata[META_KEY]
        active = self.viewer.layers.selection.active  # a prompt layer: the next drag must draw, not pan
        layer = self.viewer.add_labels(
            np.zeros(image.data.shape, dtype=dtype), name=f"{image.name} labels", scale=image.scale,
            translate=image.translate, rotate=image.rotate, shear=image.shear,
            affine=image.affine.affine_matrix, metadata=metadata, opacity=0.5,
        )
        if active is not None:
            self.viewer.layers.selection.active = active
        self.target.reset_choices()
        return layer

    def _on_done(self, job, value):
        engine, result = value
        step, self._step = self._step, None
        obj = job["object"]
        if step is None:
            return  # stopped (layer deleted)
        if self._layer_gone(job["layer"]):
            self._step = step
            self._lost_layer(job)
            return
        if result is None or not result.slices:
            step.close().undo()
            show_warning("nothing was segmented: the prompts gave no slices to segment")
            return
        obj.engine, obj.image, obj.axis = engine, job["image"], job["axis"]
        obj.prompts = job["drawn"]
        obj.add_result(result)
        # Slices written while the run went need no second write: only the last batch's.
        self._write(obj, step, {k: s.mask for k, s in result.slices.items() if k not in step.before})
        step.close()
        step.state_after = obj.state()
        written = step.voxels(obj.label)
        step.record = run_record(
            self._source_name(job["image"]), card=engine.card, backend=engine.backend, engine=engine,
            result=result, prompts=job["prompts"], scope=job["scope"], axis=job["axis"], window=job["window"],
            label=obj.label, label_name=obj.name, voxels_written=written,
            backend_seconds=round(result.backend_seconds, 3),
        )
        self.session.history.push(step)
        self._remember_label(obj)
        self._record(step.layer)
        found = int(result.mask.sum())
        per_slice = result.seconds_per_slice * 1000
        why = ""
        if result.stops:
            ends = sorted(result.stops.items())
            why = "; stopped " + ", ".join(f"{'down' if d < 0 else 'up'}: {text}" for d, text in ends)
        self._set_status(f"{len(result.slices)} slices, {written} voxels written, "
                         f"{per_slice:.0f} ms per slice ({result.backend_calls} model calls){why}")
        if found == 0:
            show_warning(f"the model found nothing above threshold {result.threshold:.2f}: "
                         f"lower the threshold or draw the box around the structure")
        elif written == 0 and not step.after:
            show_warning(f"the model's {found} voxels all lie on other labels, so nothing was written: "
                         f"erase them, or write into another layer")
        self._show_object()
        if abs(self.threshold.value - result.threshold) > 1e-9:  # moved during the run
            self._refine(None)

    def _source_name(self, image) -> str:
        meta = image.metadata.get(META_KEY) or {}
        return meta.get("path") or image.name

    def _remember_label(self, obj: SegObject):
        """Name and colour of the object's label, with the layer (the writer saves them for Slicer/ITK-SNAP)."""
        layer = obj.layer
        rgba = np.asarray(layer.get_color(obj.label), dtype=float)
        obj.colour = tuple(int(round(255 * c)) for c in rgba[:3])
        layer.metadata.setdefault(COLOURS_KEY, {})[obj.label] = obj.colour
        names = layer.metadata.setdefault(NAMES_KEY, {})
        names[obj.label] = obj.name or f"object {obj.label}"
        layer.features = name_features(names)  # names on hover, as a reopened map shows them

    def _on_error(self, error):
        self._discard_partial()
        self._say(str(error), error)

    def _on_abort(self):
        self._discard_partial()
        pbar = self._pbar
        done = f" after {pbar.n} of {pbar.total} slices" if pbar and pbar.total else ""
        show_info(f"run cancelled{done}: the labels are as before the run")
        self._set_status("cancelled")

    def _discard_partial(self):
        step, self._step = self._step, None
        if step is None:
            return
        step.close()
        step.undo()  # the object's state goes back too
        layer = step.layer
        if not self._layer_gone(layer):
            layer.refresh()
            job = getattr(self, "_job", None) or {}
            if job.get("created") and job.get("layer") is layer and not np.asarray(layer.data).any():
                self.viewer.layers.remove(layer)  # a layer made for this run only

    def _on_finished(self):
        self.session.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set(self.run_button, "enabled", True)
        self._set(self.cancel_button, "enabled", False)
        self._update_history_buttons()
        if self._rerun and not self._closed:
            self._rerun = False
            self.run(scope="this slice")

    def cancel(self, _value=None):
        """Stop the run at the next batch; what it wrote so far is taken back."""
        if self.session.worker is not None:
            self._set_status("cancelling...")
            self.session.worker.quit()

    def _on_destroyed(self, _obj=None):
        """The widget was closed: its run goes on into the session's history (a new widget finds it)."""
        self._closed = True
        layers = self.viewer.layers.events
        for event, handler in ((layers.inserted, self._refresh_choices), (layers.removed, self._refresh_choices),
                               (layers.reordered, self._refresh_choices), (layers.inserted, self._on_layer_inserted),
                               (self.viewer.cursor.events.position, self._on_cursor),
                               (self.viewer.canvas.events.size, self._on_canvas_size)):
            event.disconnect(handler)

    def _set(self, widget, attribute, value):
        if self._closed:
            return
        try:
            setattr(widget, attribute, value)
        except RuntimeError:  # the Qt side is gone (widget closed): nothing to show
            self._closed = True

    def _set_status(self, text: str):
        self._set(self.status, "value", text)

    def _say(self, message: str, error: BaseException | None = None):
        self._set_status(message if len(message) < 80 else message[:77] + "...")
        if isinstance(error, Cancelled):
            show_info(message)
        elif error is None or isinstance(error, Sam2UnetError):
            show_error(message)
        else:  # a bug, not the user's doing: keep the details in the log
            log.error("SAM2-UNet run failed", exc_info=(type(error), error, error.__traceback__))
            show_error(f"SAM2-UNet failed unexpectedly ({type(error).__name__}: {error}); "
                       f"the labels are unchanged; please report this with the log")

    # --- edits without the model -----------------------------------------------------------

    def _editable(self) -> SegObject | None:
        """The current object, if it has a result whose image and layer still exist."""
        obj = self.current
        if self.busy or obj is None or obj.result is None or obj.engine is None:
            return None
        if self._layer_gone(obj.layer) or obj.image is None or self._layer_gone(obj.image):
            return None
        return obj

    def _on_threshold(self, _value=None):
        obj = self._editable()
        if obj is None:
            return
        try:
            k = current_slice(self.viewer, obj.image, obj.axis)
        except Sam2UnetError:
            return
        if k in obj.result.slices:
            self._refine([k], close=False)
        self._refine_timer.start()

    def _refine_all(self):
        self._refine(None)

    def _refine(self, slices, close: bool = True):
        """Re-apply threshold and points from the object's cache: no model call."""
        obj = self._editable()
        if obj is None:
            return
        image = obj.image
        try:
            points, _ = self._prompt_layers(image)
            drawn = layer_prompts(image, points, None, obj.axis).points
            prompts = Prompts(list(obj.prompts.boxes), drawn)
            if self._edit is None:
                self._edit = Step("edit", obj.layer, obj.axis, obj=obj, state_before=obj.state())
            began = time.perf_counter()
            obj.engine.refine(obj.result, prompts, float(self.threshold.value), slices)
        except Sam2UnetError as error:
            self._edit = None
            self._say(str(error), error)
            return
        obj.prompts = Prompts(list(obj.prompts.boxes), drawn)
        todo = list(obj.result.slices) if slices is None else [k for k in slices if k in obj.result.slices]
        self._write(obj, self._edit, {k: obj.result.slices[k].mask for k in todo})
        ms = (time.perf_counter() - began) * 1000
        self._set_status(f"updated {len(todo)} slices in {ms:.0f} ms")
        if close:
            self._close_edit()

    def _close_edit(self):
        """A finished edit (a threshold drag, a point) becomes one undo step."""
        self._refine_timer.stop()
        step, self._edit = self._edit, None
        if step is None:
            return
        obj = step.obj
        step.close()
        step.state_after = obj.state()
        step.record = edit_record("refine", obj.label, threshold=obj.result.threshold,
                                  points=prompts_record(obj.prompts)["points"],
                                  voxels_written=step.voxels(obj.label))
        self.session.history.push(step)
        self._record(step.layer)
        self._update_history_buttons()

    def _on_points_changed(self, event=None):
        """A point moved, appeared or vanished: re-select regions from the cache, or segment its slice."""
        if self._quiet or (event is not None and getattr(event, "action", "changed") not in
                           ("added", "removed", "changed")):
            return
        image = self.image.value
        if image is None:
            return
        points, _ = self._prompt_layers(image)
        obj = self.current
        try:
            axis = slice_axis(self.viewer, image)
            now = layer_prompts(image, points, None, axis).points
        except Sam2UnetError:
            return
        changed = set(now) ^ set(obj.prompts.points)
        touched = {p.slice for p in changed}
        editable = self._editable() is not None and obj.axis == axis
        segmented = set(obj.result.slices) if editable else set()
        if editable and obj.engine.prompted:
            self._prompted_points(image, axis, now, touched, segmented)
            return
        added = [p for p in changed if p in set(now)]
        # From the cache when the model already saw every new point; else the model, if allowed.
        cached = editable and touched <= segmented and all(obj.covers(p) for p in added)
        if cached and touched:
            self._refine(sorted(touched))
        elif self.auto_run.value and any(p.slice == current_slice(self.viewer, image, axis) for p in changed):
            self._auto_run()
        elif touched & segmented:
            self._refine(sorted(touched & segmented))

    def _prompted_points(self, image, axis: int, drawn: list, touched: set, segmented: set):
        """A model that sees clicks: a segmented slice looks again with its mask as the prior (one
        call); a slice without a mask yet is segmented from its prompts, as a new prompt is."""
        if touched & segmented:
            self._correct(sorted(touched & segmented), drawn)
        if self.auto_run.value and current_slice(self.viewer, image, axis) in touched - segmented:
            self._auto_run()

    def _correct(self, slices: list[int], drawn: list):
        """One undo step: each slice corrected by the object's engine from the points drawn now."""
        obj = self._editable()
        if obj is None:
            return
        self._close_edit()  # a threshold drag in flight is its own step
        step = Step("correct", obj.layer, obj.axis, obj=obj, state_before=obj.state())
        began = time.perf_counter()
        try:
            prompts = Prompts(list(obj.prompts.boxes), list(drawn))
            for k in slices:
                obj.engine.correct(obj.result, k, prompts, float(self.threshold.value))
        except Sam2UnetError as error:
            obj.restore(step.state_before)
            self._say(str(error), error)
            return
        obj.prompts = prompts
        self._write(obj, step, {k: obj.result.slices[k].mask for k in slices})
        step.close()
        step.state_after = obj.state()
        card = obj.engine.card
        step.record = edit_record("correct", obj.label, threshold=obj.result.threshold, slices=slices,
                                  points=prompts_record(prompts)["points"],
                                  model={"name": card.name, "file": str(card.file), "sha256": card.sha256},
                                  voxels_written=step.voxels(obj.label))
        self.session.history.push(step)
        self._record(step.layer)
        self._update_history_buttons()
        ms = (time.perf_counter() - began) * 1000
        self._set_status(f"corrected slice{'s' if len(slices) > 1 else ''} "
                         f"{', '.join(map(str, slices))} in {ms:.0f} ms (one model call each)")

    def _on_boxes_changed(self, event=None):
        if self._quiet or not self.auto_run.value:
            return
        if event is not None and getattr(event, "action", "added") not in ("added", "changed", "removed"):
            return
        self._auto_run()

    def _auto_run(self):
        """Segment as you prompt: the current slice, now (or when the run in flight ends)."""
        if self.busy:
            self._rerun = True
            return
        self.run(scope="this slice")

    # --- saving ----------------------------------------------------------------------------

    def _save_layer(self) -> Labels | None:
        """The labels layer a save means: the current object's, else the run target, else the only one."""
        layer = self.current.layer if self.current is not None else None
        if layer is None or self._layer_gone(layer):
            layer = self.target.value
        if layer is None:
            found = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
            layer = found[0] if len(found) == 1 else None
        return layer

    def default_save_path(self, layer: Labels) -> Path:
        """Beside the source image, named after it: <image>_labels.nii.gz."""
        source = (layer.metadata.get(META_KEY) or {}).get("path")
        if source:
            return Path(source).with_name(f"{nifti_stem(Path(source))}_labels{next(iter(SAVE_FORMATS))}")
        return Path.cwd() / f"{layer.name}{next(iter(SAVE_FORMATS))}"

    def save_labels(self, path: str | Path | None = None) -> list[str]:
        """Write the labels layer with its geometry, label files and provenance; asks where when no path."""
        layer = self._save_layer()
        if layer is None:
            show_error("no labels to save: segment something first, or choose the layer under Write into")
            return []
        if path is None:
            path = self._ask_save_path(layer)
            if not path:
                return []
        self._close_edit()
        path = _with_save_suffix(Path(path))
        writer = getattr(_writer, next(w for end, (_, w) in SAVE_FORMATS.items() if path.name.lower().endswith(end)))
        meta = {"name": layer.name, "metadata": layer.metadata, "scale": tuple(layer.scale),
                "translate": tuple(layer.translate)}
        try:
            written = writer(str(path), np.asarray(layer.data), meta)
        except (Sam2UnetError, OSError) as error:
            self._say(f"could not save {path.name}: {error}", error if isinstance(error, Sam2UnetError) else None)
            return []
        self._set_status(f"saved {Path(written[0]).name} beside its label files")
        show_info(f"saved {layer.name} to {written[0]}")
        return written

    def _ask_save_path(self, layer: Labels) -> str:
        types = ";;".join(f"{name} (*{end})" for end, (name, _) in SAVE_FORMATS.items())
        path, _ = QFileDialog.getSaveFileName(self.native, "Save labels", str(self.default_save_path(layer)), types)
        return path

    # --- history ---------------------------------------------------------------------------

    def undo(self, _value=None):
        """Take back the last operation (run, edit or commit)."""
        if self.busy:
            return
        self._close_edit()
        step = self.session.history.undo()
        self._after_history(step, "undone")

    def redo(self, _value=None):
        if self.busy:
            return
        step = self.session.history.redo()
        self._after_history(step, "redone")

    def _after_history(self, step: Step | None, what: str):
        if step is None:
            return
        hook = getattr(step, "undo_hook" if what == "undone" else "redo_hook", None)
        if hook is not None:
            hook()
        if step.layer is not None and not self._layer_gone(step.layer):
            step.layer.refresh()
            self._record(step.layer)
        if step.obj is self.current or hook is not None:
            self._fill_prompt_layers(self.current)
        self._show_object()
        self._set_status(f"{step.kind} {what}")
        self._update_history_buttons()

    def _update_history_buttons(self):
        self._set(self.undo_button, "enabled", bool(self.session.history.done) and not self.busy)
        self._set(self.redo_button, "enabled", bool(self.session.history.undone) and not self.busy)

    def _record(self, layer: Labels):
        """Every operation in effect on this layer, for the writer's provenance sidecar."""
        layer.metadata[RUNS_KEY] = self.session.history.records(layer_key(layer))
