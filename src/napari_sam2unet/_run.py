"""The segment widget's runs: a Job read on the main thread, a worker thread that sends typed
messages, and the controller that handles them in order, writes the labels and can cancel.

The worker's function (``work``) is Qt-free; the controller speaks to the dock only through
the widget's ``set_status``, ``tell`` and ``say`` and its layer helpers.
"""

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import QTimer
from superqt.utils import create_worker

from .engine import Engine
from .errors import InputError, PromptError
from .history import Step
from .label_files import name_features
from .layer_prompts import current_slice, only_slice, slice_axis
from .prompts import Prompts
from .provenance import COLOURS_KEY, META_KEY, NAMES_KEY, RUNS_KEY, run_record
from .segment_case import NonFinite, Opened, SegmentOptions, iter_segment_volume

# Scope choices: (shown text, (engine scope, only the current slice's prompts?)).
SCOPE_TEXTS = (
    ("this slice", ("slices", True)),
    ("prompted slices", ("slices", False)),
    ("between prompted slices", ("between", False)),
    ("propagate from this slice", ("propagate", True)),
    ("whole volume", ("volume", False)),
)
# During a run the labels layer is redrawn at most this often (a redraw costs more than a slice).
REFRESH_EVERY_S = 0.3


@dataclass
class Job:
    """Everything one run needs, read from the controls and layers on the main thread."""

    image: Any  # the napari Image layer
    data: np.ndarray
    spacing: tuple[float, float, float]
    axis: int
    prompts: Prompts  # what this run segments
    drawn: Prompts  # every prompt on the layers (kept with the object)
    scope: str  # the engine's scope
    threshold: float
    window: str
    model: str
    backend: str
    slice: int
    obj: Any  # the SegObject
    target: Any = None  # the labels layer chosen, None: a new one
    min_overlap: float = 0.5
    layer: Any = None  # the labels layer written (set when the run starts)
    keep: frozenset = frozenset()  # slices left as they are (the ones the user taught, after Adapt)
    created: bool = False  # the layer was made for this run
    step: Step | None = field(default=None, repr=False)

    def options(self) -> SegmentOptions:
        """How segment_case runs this job."""
        return SegmentOptions(axis=self.axis, scope=self.scope, window=self.window, threshold=self.threshold,
                              label=self.obj.label, name=self.obj.name, replace_nonfinite=True,  # said on the dock
                              min_overlap=self.min_overlap, model=self.model, backend=self.backend)


def read_job(widget, scope_text: str | None = None) -> Job:
    """The run the controls and layers ask for now (raises a Sam2UnetError that says what to do)."""
    image = widget.prompt_layers.require_image()
    viewer = widget.viewer
    axis = slice_axis(viewer, image)
    drawn = widget.prompt_layers.read(image, axis)
    scope, this_slice = dict(SCOPE_TEXTS)[scope_text or widget.scope.value]
    k = current_slice(viewer, image, axis)
    prompts = drawn
    if this_slice:
        prompts = only_slice(drawn, k)
        if not prompts:
            raise PromptError(f"no box or point on slice {k}: draw one there, or choose the scope "
                              f"'prompted slices' or 'whole volume'")
    elif scope != "volume" and not prompts:
        raise PromptError("no prompts: add a box or a point (Add prompt layers), or choose 'whole volume'")
    obj = widget.current
    target = widget.target.value
    if target is None and obj.layer is not None and obj.layer in viewer.layers:
        target = obj.layer
    if target is None:
        target = next((layer for layer in viewer.layers if isinstance(layer, Labels)
                       and layer.name == f"{image.name} labels"
                       and tuple(layer.data.shape) == tuple(image.data.shape)), None)
    if target is not None and obj.label > np.iinfo(target.data.dtype).max:
        raise InputError(f"label {obj.label} does not fit the {target.data.dtype} layer {target.name}")
    data = image.data if isinstance(image.data, np.ndarray) else np.asarray(image.data)
    return Job(image=image, data=data, spacing=tuple(float(abs(s)) for s in image.scale[-3:]), axis=axis,
               prompts=prompts, drawn=drawn, scope=scope, threshold=float(widget.threshold.value),
               window=widget.window.value, model=widget.models.spec(), backend=widget.backend.value, slice=k,
               obj=obj, target=target, min_overlap=float(widget.min_overlap.value))


def work(job: Job, session):
    """The worker thread: segment_case's steps (its events are the messages) on the object's engine,
    without a full-volume label map (slices are written as they come); returns (engine, result)."""
    # The job holds the volume (.data, .spacing); the object's engine keeps its cache.
    steps = iter_segment_volume(job, job.prompts, job.options(), session.backends, engine=job.obj.engine,
                                labels=False)
    opened = next(steps)  # always first: the engine the run uses
    yield opened
    _, result, _ = yield from steps
    return opened.engine, result


class InOrder:
    """Handle worker signals one at a time, in the order they came.

    Updating a layer or napari's progress bar processes Qt events, which delivers the next
    worker signal inside the current handler (Qt's queued connections do not prevent that);
    without this, a late progress message could overwrite the final status.
    """

    def __init__(self, on_error) -> None:
        self._queue: list = []
        self._handling = False
        self._on_error = on_error

    def __call__(self, handler, *args) -> None:
        self._queue.append((handler, args))
        if self._handling:
            return
        self._handling = True
        try:
            while self._queue:
                handler, args = self._queue.pop(0)
                try:
                    handler(*args)
                except Exception as error:  # a bug of ours must not stop the signals behind it
                    self._on_error(error)
        finally:
            self._handling = False


class RunController:
    """Starts runs of the widget's session, writes their slices as they come, ends or undoes them."""

    def __init__(self, widget) -> None:
        self.widget = widget
        self.job: Job | None = None  # the run in flight, or the last one
        self._done = 0  # slices segmented so far by the run in flight
        self._in_order = InOrder(lambda error: widget.say(str(error), error))
        self._last_refresh = 0.0
        self._refresh_layer = None
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._refresh_late)

    @property
    def session(self):
        return self.widget.session

    def start(self, job: Job):
        """Run the job in a thread worker (the labels layer exists before it starts)."""
        widget = self.widget
        # Adding a layer processes Qt events, which inside a signal handler would let later
        # signals overtake the current one: the layer is made here, on the main thread.
        job.created = job.target is None
        layer = job.target or self.new_labels_layer(job.image, job.obj.label)
        job.layer = layer
        job.step = widget.editor.begin_run(job.obj, layer, job.axis)
        self.job = job
        worker = create_worker(work, job, self.session, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda message: self._in_order(self._on_message, job, message))
        worker.returned.connect(lambda value: self._in_order(self._on_done, job, value))
        worker.errored.connect(lambda error: self._in_order(self._on_error, job, error))
        worker.aborted.connect(lambda: self._in_order(self._on_abort, job))
        worker.finished.connect(lambda: self._in_order(self._on_finished))
        self.session.worker = worker
        self._done = 0
        self._started()
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the run at the next batch; what it wrote so far is taken back."""
        if self.session.worker is not None:
            self.widget.set_status("cancelling...")
            self.session.worker.quit()

    # --- writing -------------------------------------------------------------------------------

    def write(self, obj, step: Step, masks: dict, live: bool = False) -> None:
        """Write masks into the step's layer; during a run redraw at most every REFRESH_EVERY_S."""
        self.widget.editor.write(obj, step, masks)
        layer, now = step.layer, time.perf_counter()
        if not live or now - self._last_refresh > REFRESH_EVERY_S:
            self._last_refresh = now
            layer.refresh()
        else:
            self._refresh_timer.start(int(REFRESH_EVERY_S * 1000))
        self._refresh_layer = layer

    def _refresh_late(self):
        layer = self._refresh_layer
        if layer is not None and not self.widget.layer_gone(layer):
            layer.refresh()

    def new_labels_layer(self, image, label: int) -> Labels:
        viewer = self.widget.viewer
        dtype = np.uint8 if label <= 255 else np.uint16
        metadata = {NAMES_KEY: {}, COLOURS_KEY: {}, RUNS_KEY: []}
        if META_KEY in image.metadata:
            metadata[META_KEY] = image.metadata[META_KEY]
        active = viewer.layers.selection.active  # a prompt layer: the next drag must draw, not pan
        layer = viewer.add_labels(
            np.zeros(image.data.shape, dtype=dtype), name=f"{image.name} labels", scale=image.scale,
            translate=image.translate, rotate=image.rotate, shear=image.shear,
            affine=image.affine.affine_matrix, metadata=metadata, opacity=0.5,
        )
        if active is not None:
            viewer.layers.selection.active = active
        self.widget.target.reset_choices()
        return layer

    # --- the worker's signals ------------------------------------------------------------------

    def _on_message(self, job: Job, message):
        widget, step = self.widget, job.step
        if step is None:
            return  # a late message from a stopped run
        if isinstance(message, Opened):
            self._show_engine(message.engine, message.why)
            job.obj.engine = message.engine
            widget.set_status("segmenting...")
        elif isinstance(message, NonFinite):
            widget.tell("warning", f"{message.voxels} NaN or infinite voxels in {job.image.name} were treated as "
                                   f"its lowest intensity; fix the file if they mark something else")
        elif widget.layer_gone(job.layer):
            self._lost_layer(job)
        else:
            result = message.result
            self.write(job.obj, step, {k: result.slices[k].mask for k in result.slices
                                       if k not in step.before and k not in job.keep}, live=True)
            self._done = message.done
            self.show_progress(job, message.done, message.total)

    def show_progress(self, job: Job, done: int, total: int):
        """Propagation stops where the object ends, unknown ahead: it counts up with a busy bar;
        other scopes know their slices."""
        bar = self.widget.progress
        if job.scope == "propagate":
            bar.min, bar.max = 0, 0
            self.widget.set_status(f"propagating: {done} slices so far, until the object ends")
        else:
            bar.max, bar.value = total, done
            self.widget.set_status(f"segmenting: {done} of {total} slices")

    def _lost_layer(self, job: Job):
        """The target layer was deleted during the run: stop, write nothing more, say so."""
        step, job.step = job.step, None
        if self.session.worker is not None:
            self.session.worker.quit()
        if step is not None:
            job.obj.restore(step.state_before)
        job.obj.base = {}
        self.widget.tell("warning", f"the labels layer {job.layer.name} was deleted during the run: the run stopped "
                                    f"and nothing was kept; run again to write into a new layer")
        self.widget.set_status("stopped: the labels layer was deleted")

    def _on_done(self, job: Job, value):
        engine, result = value
        widget, step = self.widget, job.step
        if step is None:
            return  # stopped (layer deleted)
        if widget.layer_gone(job.layer):
            self._lost_layer(job)
            return
        job.step = None
        if result is None or not result.slices:
            widget.editor.discard(step)
            widget.tell("warning", "nothing was segmented: the prompts gave no slices to segment")
            return
        obj = job.obj
        for k in job.keep:  # the user's slices: neither written nor refined later from this result
            result.slices.pop(k, None)
        obj.last_run = job  # Adapt to this scan runs it again

        def record(written: int) -> dict:
            return run_record(
                widget.source_name(job.image), card=engine.card, backend=engine.backend, engine=engine,
                result=result, prompts=job.prompts, scope=job.scope, axis=job.axis, window=job.window,
                label=obj.label, label_name=obj.name, voxels_written=written,
                backend_seconds=round(result.backend_seconds, 3),
            )

        written = widget.editor.finish_run(step, engine, result, job.image, job.drawn, record)
        step.layer.refresh()
        self._remember_label(obj)
        found = int(result.mask.sum())
        why = ""
        if result.stops:
            ends = sorted(result.stops.items())
            why = "; stopped " + ", ".join(f"{'down' if d < 0 else 'up'}: {text}" for d, text in ends)
        per_slice = result.seconds_per_slice * 1000
        widget.set_status(f"{len(result.slices)} slices, {written} voxels written, "
                          f"{per_slice:.0f} ms per slice ({result.backend_calls} model calls){why}")
        if found == 0:
            widget.tell("warning", f"the model found nothing above threshold {result.threshold:.2f}: "
                                   f"lower the threshold or draw the box around the structure")
        elif written == 0 and not step.after:
            widget.tell("warning", f"the model's {found} voxels all lie on other labels, so nothing was written: "
                                   f"erase them, or write into another layer")
        widget.show_object()
        if abs(widget.threshold.value - result.threshold) > 1e-9:  # moved during the run
            widget.edits.refine(None)

    def _remember_label(self, obj):
        """Name and colour of the object's label, with the layer (the writer saves them for Slicer/ITK-SNAP)."""
        layer = obj.layer
        rgba = np.asarray(layer.get_color(obj.label), dtype=float)
        obj.colour = tuple(int(round(255 * c)) for c in rgba[:3])
        layer.metadata.setdefault(COLOURS_KEY, {})[obj.label] = obj.colour
        names = layer.metadata.setdefault(NAMES_KEY, {})
        names[obj.label] = obj.name or f"object {obj.label}"
        layer.features = name_features(names)  # names on hover, as a reopened map shows them

    def _on_error(self, job: Job, error):
        self._discard(job)
        self.widget.say(str(error), error)

    def _on_abort(self, job: Job):
        self._discard(job)
        done = f" after {self._done} slices" if self._done else ""
        self.widget.tell("info", f"run cancelled{done}: the labels are as before the run")
        self.widget.set_status("cancelled")

    def _discard(self, job: Job):
        """Take back what the run wrote; a layer made for this run only goes too."""
        step, job.step = job.step, None
        if step is None:
            return
        self.widget.editor.discard(step)
        layer = step.layer
        if not self.widget.layer_gone(layer):
            layer.refresh()
            if job.created and job.layer is layer and not np.asarray(layer.data).any():
                self.widget.viewer.layers.remove(layer)

    def _on_finished(self):
        self.session.worker = None
        widget = self.widget
        widget.set_visible(widget.progress, False)
        widget.set_enabled(widget.run_button, True)
        widget.set_enabled(widget.cancel_button, False)
        widget.update_history_buttons()
        if widget.edits.rerun and not widget.closed:
            widget.edits.rerun = False
            widget.run(scope="this slice")

    def _started(self):
        widget = self.widget
        widget.run_button.enabled, widget.cancel_button.enabled = False, True
        widget.progress.min, widget.progress.max, widget.progress.value = 0, 0, 0  # busy until the first batch
        widget.progress.visible = True
        widget.status.value = "loading the model..."

    def _show_engine(self, engine: Engine, reason: str):
        widget = self.widget
        widget.engine = engine
        # The device in the panel; why this backend (e.g. why not the NPU) on hover.
        widget.set_text(widget.backend_info, engine.backend.device, tooltip=reason)
