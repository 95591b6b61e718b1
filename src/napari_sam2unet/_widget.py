"""The napari dock widget: gathers prompts and settings, runs the engine in a thread, shows results.

Qt and magicgui glue only: every segmentation decision is the engine's. No
``from __future__ import annotations`` here: napari reads the ``Viewer`` annotation at runtime.
"""

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Points, Shapes
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from superqt.utils import create_worker

from .backends import BACKEND_CHOICES, open_backend
from .engine import Engine, SegmentationResult
from .errors import Cancelled, InputError, PromptError, Sam2UnetError
from .models import DEFAULT_MODEL, find_model, list_models
from .prompts import Box, Point, Prompts

log = logging.getLogger(__name__)

META_KEY = "sam2unet"
RUNS_KEY = "sam2unet_runs"
NAMES_KEY = "sam2unet_label_names"
NEW_LAYER = "new labels layer"
WINDOWS = ("auto", "mr", "soft_tissue", "lung", "bone", "brain")
# Scope choices: (shown text, (engine scope, only the current slice's prompts?)).
SCOPES = (
    ("this slice", ("slices", True)),
    ("prompted slices", ("slices", False)),
    ("between prompted slices", ("between", False)),
    ("propagate from this slice", ("propagate", True)),
    ("whole volume", ("volume", False)),
)
SIGN_COLOURS = {"positive": "lime", "negative": "magenta"}
# After the threshold moves, the current slice updates at once and the rest after this pause.
REFINE_ALL_DELAY_MS = 250


# --- layers -> prompts (no Qt) -------------------------------------------------------------


def slice_axis(viewer, image) -> int:
    """The image axis napari's 2D view slices through (the one it does not display)."""
    world_axis = viewer.dims.order[-3] if viewer.dims.ndim >= 3 else 0
    axis = world_axis - (viewer.dims.ndim - image.ndim)
    if not 0 <= axis < image.ndim:
        raise InputError("the slider does not move through the image; reset the view (Home)")
    return axis


def current_slice(viewer, image, axis: int) -> int:
    """The image slice index shown now on the slice axis."""
    point = np.asarray(viewer.dims.point)[-image.ndim :]
    k = int(np.round(image.world_to_data(point)[axis]))
    return int(np.clip(k, 0, image.data.shape[axis] - 1))


def _to_image(layer, image, coords: np.ndarray) -> np.ndarray:
    """Layer data coordinates (N x D) -> the image's data coordinates, through world space."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))[:, -image.ndim :]
    out = [np.asarray(image.world_to_data(np.asarray(layer.data_to_world(c), dtype=float))) for c in coords]
    return np.asarray(out, dtype=float).reshape(-1, image.ndim)


def _in_plane(coords: np.ndarray, axis: int) -> np.ndarray:
    """The two in-plane coordinates in array order, shifted to the engine's voxel-edge frame.

    napari puts voxel centres on integers; the engine's voxel i spans [i, i + 1).
    """
    return np.delete(coords, axis, axis=1) + 0.5


def layer_prompts(image, points=None, shapes=None, axis: int = 2) -> Prompts:
    """Points (sign from the 'sign' feature) and shapes (their bounding boxes) as engine prompts."""
    result = Prompts()
    if points is not None and len(points.data):
        coords = _to_image(points, image, points.data)
        signs = points.features["sign"] if "sign" in points.features else None
        for n, c in enumerate(coords):
            i, j = _in_plane(c[None], axis)[0]
            positive = signs is None or str(signs.iloc[n]) != "negative"
            result.points.append(Point(int(np.round(c[axis])), float(i), float(j), positive))
    if shapes is not None:
        for vertices in shapes.data:
            coords = _to_image(shapes, image, vertices)
            ks = np.round(coords[:, axis]).astype(int)
            if ks.min() != ks.max():
                raise PromptError("a box is not drawn on one slice; draw boxes in the 2D view")
            plane = _in_plane(coords, axis)
            (i0, j0), (i1, j1) = plane.min(axis=0), plane.max(axis=0)
            result.boxes.append(Box(int(ks[0]), float(i0), float(j0), float(i1), float(j1)))
    return result


def colour_points(points) -> None:
    """Each point's face colour from its sign (positive / negative)."""
    if len(points.data) and "sign" in points.features:
        points.face_color = [SIGN_COLOURS.get(str(s), "lime") for s in points.features["sign"]]


def only_slice(prompts: Prompts, k: int) -> Prompts:
    return Prompts(prompts.boxes_on(k), prompts.points_on(k))


def _index(axis: int, k: int) -> tuple:
    index = [slice(None)] * 3
    index[axis] = k
    return tuple(index)


# --- one run: what it wrote, so it can be refined, undone and redone --------------------------


@dataclass
class Run:
    """A segmentation run on one labels layer: pre-run slices, the result, provenance."""

    layer: Labels
    image: Image
    engine: Engine | None
    label: int
    name: str
    axis: int
    prompts: Prompts
    info: dict
    before: dict[int, np.ndarray] = field(default_factory=dict)
    result: SegmentationResult | None = None

    def remember(self, k: int) -> None:
        if k not in self.before:
            self.before[k] = np.array(self.layer.data[_index(self.axis, k)], copy=True)

    def after(self, k: int) -> np.ndarray:
        """Slice k after this run: the mask gets the label where the voxel was free or already ours."""
        before = self.before[k]
        after = before.copy()
        if self.result is not None and k in self.result.slices:
            mask = self.result.slices[k].mask
            after[mask & ((before == 0) | (before == self.label))] = self.label
        return after

    def apply(self, slices=None) -> None:
        """Write the run's current masks (only voxels that were free or carried its label)."""
        for k in list(self.result.slices) if slices is None else slices:
            if k not in self.result.slices:
                continue
            self.remember(k)
            index = _index(self.axis, k)
            current = np.array(self.layer.data[index])
            before, after = self.before[k], self.after(k)
            own = (before == 0) | (before == self.label)  # voxels this run may change
            current[own] = after[own]
            self.layer.data[index] = current
        self.layer.refresh()

    def restore(self) -> None:
        """Undo: the voxels this run set get their pre-run values; other edits stay."""
        self._swap(to_before=True)

    def reapply(self) -> None:
        """Redo: the run's voxels again."""
        self._swap(to_before=False)

    def _swap(self, to_before: bool) -> None:
        for k, before in self.before.items():
            index = _index(self.axis, k)
            current = np.array(self.layer.data[index])
            after = self.after(k)
            changed = after != before
            current[changed] = (before if to_before else after)[changed]
            self.layer.data[index] = current
        self.layer.refresh()


# --- the widget ----------------------------------------------------------------------------


class SegmentWidget(Container):
    """Segment the chosen image with SAM2-UNet, steered by point and box layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.engine: Engine | None = None
        self._engines: dict[tuple, tuple[Engine, str]] = {}
        self._worker = None
        self._pbar = None
        self._run: Run | None = None
        self._undo: list[Run] = []
        self._redo: list[Run] = []
        self._created_layer = False
        self._signals: list = []  # worker signals waiting for the one being handled
        self._handling = False

        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.add_prompts_button = PushButton(text="Add prompt layers (points, boxes)")
        self.point_sign = ComboBox(
            label="New points", choices=["positive", "negative"], tooltip="Press n on the points layer to switch"
        )
        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.model_file = FileEdit(
            label="or model file",
            filter="*.onnx *.yaml",
            value="",
            tooltip="A .onnx (or its .yaml card); wins over the model list",
        )
        self.backend = ComboBox(label="Backend", choices=list(BACKEND_CHOICES), value="auto")
        self.backend_info = Label(label="Runs on", value="(chosen at the first run)")
        self.window = ComboBox(
            label="Window",
            choices=list(WINDOWS),
            value="auto",
            tooltip="auto: MR percentiles, or CT soft tissue for CT-like values",
        )
        self.scope = ComboBox(label="Scope", choices=[(text, text) for text, _ in SCOPES], value="this slice")
        self.threshold = FloatSlider(
            label="Threshold",
            min=0.01,
            max=0.99,
            step=0.01,
            value=0.5,
            tooltip="Re-applied from cached probabilities: no model call",
        )
        self.label_value = SpinBox(label="Label value", min=1, max=65535, value=1)
        self.label_name = LineEdit(label="Label name", value="")
        self.target = ComboBox(label="Write into", choices=self._target_choices)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.undo_button = PushButton(text="Undo run", enabled=False)
        self.redo_button = PushButton(text="Redo run", enabled=False)
        self.status = Label(label="Status", value="ready")
        self.extend(
            [
                self.image,
                self.add_prompts_button,
                self.point_sign,
                self.model,
                self.model_file,
                self.backend,
                self.backend_info,
                self.window,
                self.scope,
                self.threshold,
                self.label_value,
                self.label_name,
                self.target,
                Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
                Container(widgets=[self.undo_button, self.redo_button], layout="horizontal", labels=False),
                self.status,
            ]
        )

        self.add_prompts_button.changed.connect(self.add_prompt_layers)
        self.point_sign.changed.connect(self._on_sign_choice)
        self.image.changed.connect(lambda _value: self.target.reset_choices())
        self.model.changed.connect(self._on_model_choice)
        self.model_file.changed.connect(self._on_model_choice)
        self.threshold.changed.connect(self._on_threshold)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.undo_button.changed.connect(self.undo)
        self.redo_button.changed.connect(self.redo)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            event.connect(self._refresh_choices)
        self._refine_timer = QTimer()
        self._refine_timer.setSingleShot(True)
        self._refine_timer.setInterval(REFINE_ALL_DELAY_MS)
        self._refine_timer.timeout.connect(self._refine_all)
        self._on_model_choice()

    # --- choices ---------------------------------------------------------------------------

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _model_choices(self, _widget=None):
        names = [card.name for card in list_models()]
        return sorted(set(names) | {DEFAULT_MODEL})

    def _target_choices(self, _widget=None):
        image = self.image.value if hasattr(self, "image") else None
        shape = tuple(image.data.shape) if image is not None else None
        layers = [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and tuple(layer.data.shape) == shape
        ]
        return [(NEW_LAYER, None), *layers]

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
        self.threshold.value = card.threshold

    # --- prompt layers ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _require_image(self) -> Image:
        image = self.image.value
        if image is None:
            raise InputError("no image layer: open a NIfTI file first (File > Open, reader napari-sam2unet)")
        if image.multiscale or image.rgb or image.ndim != 3:
            raise InputError(f"{image.name} is not a 3D grey-level volume; open a 3D MRI or CT")
        return image

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
            shapes = self.viewer.add_shapes(
                ndim=3,
                name=f"{image.name} boxes",
                edge_color="yellow",
                face_color="transparent",
                edge_width=0.6 * float(min(image.scale[-2:])),
                **frame,
            )
        if points is None:
            sign = pd.Categorical([], categories=list(SIGN_COLOURS))
            points = self.viewer.add_points(
                ndim=3,
                name=f"{image.name} points",
                features={"sign": sign},
                face_color=SIGN_COLOURS[self.point_sign.value],
                border_color="white",
                size=3 * float(min(image.scale[-2:])),
                **frame,
            )
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

    def _engine_for(self, spec: str, kind: str) -> tuple[Engine, str]:
        """Runs in the worker thread: find the model, open the backend (once per model and kind)."""
        card = find_model(spec)
        key = (str(card.file), card.sha256, kind)
        if key not in self._engines:
            backend, reason = open_backend(card, kind)
            self._engines[key] = (Engine(backend), reason)
        return self._engines[key]

    def _gather(self) -> dict:
        """Everything a run needs, read on the main thread."""
        image = self._require_image()
        axis = slice_axis(self.viewer, image)
        points, shapes = self._prompt_layers(image)
        prompts = layer_prompts(image, points, shapes, axis)
        scope, this_slice = dict(SCOPES)[self.scope.value]
        k = current_slice(self.viewer, image, axis)
        if this_slice:
            prompts = only_slice(prompts, k)
            if not prompts:
                raise PromptError(
                    f"no box or point on slice {k}: draw one there, or choose the scope "
                    f"'prompted slices' or 'whole volume'"
                )
        elif scope != "volume" and not prompts:
            raise PromptError("no prompts: add a box or a point (Add prompt layers), or choose 'whole volume'")
        label = int(self.label_value.value)
        target = self.target.value
        if target is not None and label > np.iinfo(target.data.dtype).max:
            raise InputError(f"label {label} does not fit the {target.data.dtype} layer {target.name}")
        data = image.data
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
        spacing = tuple(float(abs(s)) for s in image.scale[-3:])
        return {
            "image": image,
            "data": data,
            "spacing": spacing,
            "axis": axis,
            "prompts": prompts,
            "scope": scope,
            "threshold": float(self.threshold.value),
            "label": label,
            "name": self.label_name.value.strip(),
            "window": self.window.value,
            "model": self._model_spec(),
            "backend": self.backend.value,
            "slice": k,
        }

    def run(self, _value=None):
        """Start a run in a thread worker; returns the worker (None when the inputs are not usable)."""
        if self.busy:
            show_info("a run is in progress: wait for it or press Cancel")
            return None
        try:
            job = self._gather()
        except Sam2UnetError as error:
            self._say(str(error), error)
            return None
        worker = create_worker(self._work, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda message: self._in_order(self._on_yield, message))
        worker.returned.connect(lambda value: self._in_order(self._on_done, value))
        worker.errored.connect(lambda error: self._in_order(self._on_error, error))
        worker.aborted.connect(lambda: self._in_order(self._on_abort))
        worker.finished.connect(lambda: self._in_order(self._on_finished))
        self._worker = worker
        self._job = job
        # The labels layer exists before the thread starts: adding a layer processes Qt events,
        # which inside a signal handler would let later signals overtake the current one.
        self._run = self._start_run(job)
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
        """The worker thread: open the engine, set the volume, segment batch by batch."""
        engine, reason = self._engine_for(job["model"], job["backend"])
        yield "engine", engine, reason
        # NaN/Inf voxels (napari shows them as black) count as the lowest intensity; said below.
        engine.set_volume(job["data"], spacing=job["spacing"], axis=job["axis"], window=job["window"],
                          replace_nonfinite=True)
        if engine.replaced_voxels:
            yield "nonfinite", engine.replaced_voxels
        result = None
        for done, total, result in engine.iter_segment(job["prompts"], job["scope"], job["threshold"]):
            yield "progress", done, total, result
        return engine, result

    def _on_yield(self, message):
        run = self._run
        if self._worker is None or run is None:
            return  # a late message from a finished run
        if message[0] == "engine":
            _, engine, reason = message
            self._show_engine(engine, reason)
            run.engine = engine
            run.info.update(model=engine.card.name, model_sha256=engine.card.sha256, backend=engine.backend.describe())
            self.status.value = "segmenting..."
            return
        if message[0] == "nonfinite":
            show_warning(f"{message[1]} NaN or infinite voxels in {run.image.name} were treated as its lowest "
                         f"intensity; fix the file if they mark something else")
            return
        _, done, total, result = message
        run.result = result
        new = [k for k in result.slices if k not in run.before]
        run.apply(new)
        if self._pbar is not None:
            self._pbar.total = total
            self._pbar.update(done - self._pbar.n)
        self.status.value = f"segmenting: {done} of {total} slices"

    def _show_engine(self, engine: Engine, reason: str):
        self.engine = engine
        # The device in the panel; why this backend (e.g. why not the NPU) on hover.
        self.backend_info.value = engine.backend.device
        self.backend_info.tooltip = reason

    def _start_run(self, job) -> Run:
        image = job["image"]
        layer = self.target.value
        self._created_layer = False
        if layer is None or layer not in self.viewer.layers:
            layer = self._new_labels_layer(image, job["label"])
            self._created_layer = True
        info = {
            "model": None,
            "model_sha256": None,
            "backend": None,
            "scope": job["scope"],
            "window": job["window"],
            "slice_axis": job["axis"],
            "label": job["label"],
            "label_name": job["name"],
            "image": image.name,
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "prompts": {
                "boxes": [list(b.rect) + [b.slice] for b in job["prompts"].boxes],
                "points": [[p.slice, p.i, p.j, p.positive] for p in job["prompts"].points],
            },
        }
        return Run(layer, image, None, job["label"], job["name"], job["axis"], job["prompts"], info)

    def _new_labels_layer(self, image, label: int) -> Labels:
        dtype = np.uint8 if label <= 255 else np.uint16
        metadata = {NAMES_KEY: {}, RUNS_KEY: []}
        if META_KEY in image.metadata:
            metadata[META_KEY] = image.metadata[META_KEY]
        layer = self.viewer.add_labels(
            np.zeros(image.data.shape, dtype=dtype),
            name=f"{image.name} labels",
            scale=image.scale,
            translate=image.translate,
            rotate=image.rotate,
            shear=image.shear,
            affine=image.affine.affine_matrix,
            metadata=metadata,
            opacity=0.5,
        )
        self.target.reset_choices()
        return layer

    def _on_done(self, value):
        engine, result = value
        run = self._run
        if result is None or run is None or not result.slices:
            self._discard_partial()
            show_warning("nothing was segmented: the prompts gave no slices to segment")
            return
        run.engine = engine
        run.result = result
        run.apply()
        run.info.update(
            threshold=result.threshold,
            slices=sorted(result.slices),
            seconds=round(result.total_seconds, 3),
            backend_seconds=round(result.backend_seconds, 3),
        )
        self._run = None
        self._undo.append(run)
        self._redo.clear()
        self._record(run.layer)
        if run.name:
            run.layer.metadata.setdefault(NAMES_KEY, {})[run.label] = run.name
        voxels = int(result.mask.sum())
        per_slice = result.seconds_per_slice * 1000
        self.status.value = (
            f"{len(result.slices)} slices, {voxels} voxels, "
            f"{per_slice:.0f} ms per slice ({result.backend_calls} model calls)"
        )
        if voxels == 0:
            show_warning(
                f"the model found nothing above threshold {result.threshold:.2f}: "
                f"lower the threshold or draw the box around the structure"
            )
        if abs(self.threshold.value - result.threshold) > 1e-9:  # moved during the run
            self._refine(None)

    def _on_error(self, error):
        self._discard_partial()
        self._say(str(error), error)

    def _on_abort(self):
        self._discard_partial()
        done = f" after {self._pbar.n} of {self._pbar.total} slices" if self._pbar and self._pbar.total else ""
        show_info(f"run cancelled{done}: the labels are as before the run")
        self.status.value = "cancelled"

    def _discard_partial(self):
        run, self._run = self._run, None
        if run is None:
            return
        if run.result is not None:
            run.restore()
        if self._created_layer and run.layer in self.viewer.layers and not run.layer.data.any():
            self.viewer.layers.remove(run.layer)

    def _on_finished(self):
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self._update_history_buttons()

    def cancel(self, _value=None):
        """Stop the run at the next batch; what it wrote so far is taken back."""
        if self._worker is not None:
            self.status.value = "cancelling..."
            self._worker.quit()

    def _say(self, message: str, error: BaseException | None = None):
        self.status.value = message if len(message) < 80 else message[:77] + "..."
        if isinstance(error, Cancelled):
            show_info(message)
        elif error is None or isinstance(error, Sam2UnetError):
            show_error(message)
        else:  # a bug, not the user's doing: keep the details in the log
            log.error("SAM2-UNet run failed", exc_info=(type(error), error, error.__traceback__))
            show_error(
                f"SAM2-UNet failed unexpectedly ({type(error).__name__}: {error}); "
                f"the labels are unchanged; please report this with the log"
            )

    # --- edits without the model -----------------------------------------------------------

    def _last_run(self) -> Run | None:
        if self.busy or not self._undo:
            return None
        run = self._undo[-1]
        if run.layer not in self.viewer.layers or run.image not in self.viewer.layers:
            return None
        return run

    def _on_threshold(self, _value=None):
        run = self._last_run()
        if run is None:
            return
        k = current_slice(self.viewer, run.image, run.axis)
        if k in run.result.slices:
            self._refine([k])
        self._refine_timer.start()

    def _refine_all(self):
        self._refine(None)

    def _refine(self, slices):
        """Re-apply threshold and points from the engine's cache to the last run: no model call."""
        run = self._last_run()
        if run is None:
            return
        try:
            points, _ = self._prompt_layers(run.image)
            prompts = layer_prompts(run.image, points, None, run.axis)
            prompts = Prompts(list(run.prompts.boxes), prompts.points)
            began = time.perf_counter()
            run.engine.refine(run.result, prompts, float(self.threshold.value), slices)
        except Sam2UnetError as error:
            self._say(str(error), error)
            return
        run.apply(slices)
        run.info["threshold"] = run.result.threshold
        self._record(run.layer)
        ms = (time.perf_counter() - began) * 1000
        self.status.value = f"updated {len(slices) if slices else len(run.result.slices)} slices in {ms:.0f} ms"

    def _on_points_changed(self, event=None):
        """A point moved, appeared or vanished: re-select regions on the affected slices."""
        if event is not None and getattr(event, "action", "changed") not in ("added", "removed", "changed"):
            return
        run = self._last_run()
        if run is None:
            return
        points, _ = self._prompt_layers(run.image)
        try:
            now = layer_prompts(run.image, points, None, run.axis).points
        except Sam2UnetError:
            return
        before = run.info.get("_point_slices", {p.slice for p in run.prompts.points})
        touched = ({p.slice for p in now} | set(before)) & set(run.result.slices)
        run.info["_point_slices"] = {p.slice for p in now}
        if touched:
            self._refine(sorted(touched))

    # --- history ---------------------------------------------------------------------------

    def undo(self, _value=None):
        """Take back the last run (its voxels get their pre-run values)."""
        if self.busy or not self._undo:
            return
        run = self._undo.pop()
        run.restore()
        self._redo.append(run)
        self._record(run.layer)
        self.status.value = "run undone"
        self._update_history_buttons()

    def redo(self, _value=None):
        if self.busy or not self._redo:
            return
        run = self._redo.pop()
        run.reapply()
        self._undo.append(run)
        self._record(run.layer)
        self.status.value = "run redone"
        self._update_history_buttons()

    def _update_history_buttons(self):
        self.undo_button.enabled = bool(self._undo) and not self.busy
        self.redo_button.enabled = bool(self._redo) and not self.busy

    def _record(self, layer: Labels):
        """The runs that made this layer's labels, for the writer's provenance sidecar."""
        layer.metadata[RUNS_KEY] = [
            {k: v for k, v in run.info.items() if not k.startswith("_")} for run in self._undo if run.layer is layer
        ]

    # --- views -----------------------------------------------------------------------------

    def model_path(self) -> Path | None:
        try:
            return find_model(self._model_spec(), verify=False).file
        except Sam2UnetError:
            return None
