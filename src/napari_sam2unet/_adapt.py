"""The segment widget's "Adapt to this scan": fine-tune the current object's model on the slices
the user prompted or corrected, then run the object's last prompts again with the adapted model.

The adapted model is written to a temporary folder, not the models folder: it is offered in the
Model list only while its image is chosen, and no other image or later session sees it, unless the
user saves it by name. Training is training/finetune.py's, in a worker thread with the dock's
progress bar and Cancel; the run that follows is an ordinary run (one undo step) that leaves the
slices the user taught as the user left them.
"""

import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from superqt.utils import create_worker

from .errors import InputError, Sam2UnetError
from .history import layer_key
from .preprocess import axis_plane
from .prompts import Prompts

# The list entry of the model adapted to the chosen image.
ADAPTED = "adapted to this scan"
# Training steps, not tuned: the CLI's 250 were chosen on the tuning set (docs/finetune.md); an
# adaptation the user waits for in the viewer is shorter. On the test CT's liver 20 steps gained
# +0.005 Dice on the untouched slices and 40 steps +0.051 (docs/user-guide.md). Advanced options set it.
ADAPT_STEPS = 100
_SCRATCH: tempfile.TemporaryDirectory | None = None


def scratch() -> Path:
    """This process's folder for adapted models (removed when napari exits)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="sam2unet-adapted-")
    return Path(_SCRATCH.name)


def taught_slices(obj, labels: np.ndarray, axis: int, min_pixels: int = 4) -> list[int]:
    """The object's slices the user accepted or corrected: those holding its prompts, and those
    where its label differs from the model's mask (painted or erased by hand, or never run)."""
    prompted = {b.slice for b in obj.prompts.boxes} | {p.slice for p in obj.prompts.points}
    segmented = obj.result.slices if obj.result is not None else {}
    taught = []
    for k in range(labels.shape[axis]):
        plane = axis_plane(labels, k, axis)
        own = plane == obj.label
        if np.count_nonzero(own) < min_pixels:
            continue
        model = segmented.get(k)
        if k in prompted or model is None or (own & ~model.mask).any() or (model.mask & (plane == 0)).any():
            taught.append(k)
    return taught


@dataclass
class AdaptJob:
    """What the worker needs, copied on the main thread."""

    image: Any  # the napari Image layer
    data: np.ndarray
    labels: np.ndarray  # 1 on the taught slices' object voxels, 0 elsewhere
    spacing: tuple[float, float, float]
    axis: int
    window: str
    base: str  # the object's model (card or .onnx path)
    base_name: str
    slices: list[int]
    steps: int
    out: Path
    rerun: Any  # the _run.Job run again with the adapted model


@dataclass(frozen=True)
class Adapted:
    """An adaptation's outcome, for the message and tests."""

    card: Path
    slices: list[int]
    dice_before: float
    dice_after: float
    seconds: float


def adapt_work(job: AdaptJob):
    """The worker thread: load the object's model, train on the taught slices, write it."""
    from .training import finetune as ft

    yield ft.Progress(0, job.steps, float("nan"), "loading the model")
    base = ft.load_base(job.base)
    data = ft.volume_data(job.data, job.labels, job.spacing, base.spec.channels, job.axis, window=job.window,
                          what="the slices you taught")
    settings = ft.Settings(steps=job.steps)
    began = time.perf_counter()
    before, after = yield from ft.iter_finetune(base, data, settings)
    seconds = time.perf_counter() - began
    extra = ft.card_extra(base, data, settings, before, after, seconds, "napari: Adapt to this scan")
    card = ft.write_model(base, job.out, extra, f"{job.base_name}-adapted", trunk=settings.trunk)
    return Adapted(card, job.slices, before, after, seconds)


class AdaptController:
    """Runs "Adapt to this scan" for the widget's current object and keeps each image's model."""

    def __init__(self, widget) -> None:
        self.widget = widget
        self.last: Adapted | None = None
        self._rerun = None  # the run to start once the training worker has finished
        self._cancelled = False

    @property
    def session(self):
        return self.widget.session

    def card_for(self, image) -> Path | None:
        """The model adapted to this image in this session, if any."""
        return None if image is None else self.session.adapted.get(layer_key(image))

    def read(self) -> AdaptJob:
        """The adaptation the current object asks for (raises a Sam2UnetError that says what to do)."""
        from .training import finetune as ft

        widget, obj = self.widget, self.widget.current
        last = getattr(obj, "last_run", None)
        if (obj.result is None or obj.engine is None or last is None or widget.layer_gone(obj.layer)
                or widget.layer_gone(last.image)):
            raise InputError(f"segment {obj.title} first, accept or correct a few of its slices (prompts, "
                             f"points, the brush), then adapt")
        ft._torch()  # says what to install now, not from the worker
        labels = np.asarray(obj.layer.data)
        slices = taught_slices(obj, labels, last.axis, ft.MIN_PIXELS)
        if not slices:
            raise InputError(f"{obj.title} has no slice you prompted or corrected: correct a slice, then adapt")
        taught = np.zeros(labels.shape, np.uint8)
        index = [slice(None)] * 3
        for k in slices:
            index[last.axis] = k
            taught[tuple(index)] = labels[tuple(index)] == obj.label
        card = obj.engine.card
        # The run again: the last run's scope, on the slices it was prompted on, with the points
        # as they are now; the taught slices stay the user's.
        on = {b.slice for b in last.prompts.boxes} | {p.slice for p in last.prompts.points}
        prompts = Prompts([b for b in obj.prompts.boxes if b.slice in on],
                          [p for p in obj.prompts.points if p.slice in on])
        rerun = replace(last, prompts=prompts, drawn=obj.prompts, target=obj.layer, layer=None, created=False,
                        step=None, keep=frozenset(slices), threshold=float(widget.threshold.value))
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", last.image.name)[:40] or "scan"
        out = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=scratch())) / f"{card.name}-adapted.onnx"
        return AdaptJob(image=last.image, data=last.data, labels=taught, spacing=last.spacing, axis=last.axis,
                        window=last.window, base=str(card.card_path or card.file), base_name=card.name,
                        slices=slices, steps=int(widget.adapt_steps.value), out=out, rerun=rerun)

    def start(self, _value=None):
        """Adapt the current object's model to this scan; returns the worker (None if refused)."""
        widget = self.widget
        if widget.busy:
            widget.tell("info", "a run is in progress: wait for it or press Cancel")
            return None
        widget.edits.close()
        try:
            job = self.read()
        except Sam2UnetError as error:
            widget.say(str(error), error)
            return None
        worker = create_worker(adapt_work, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(lambda report: self._on_progress(job, report))
        worker.returned.connect(lambda value: self._on_done(job, value))
        worker.errored.connect(lambda error: widget.say(str(error), error))
        worker.aborted.connect(self._on_abort)
        worker.finished.connect(self._on_finished)
        self.session.worker = worker
        self._rerun, self._cancelled = None, False
        for button in (widget.run_button, widget.adapt_button, widget.save_model_button):
            button.enabled = False
        widget.cancel_button.enabled = True
        widget.progress.min, widget.progress.max, widget.progress.value = 0, job.steps, 0
        widget.progress.visible = True
        widget.status.value = f"adapting to slices {', '.join(map(str, job.slices))}: loading the model..."
        worker.start()
        return worker

    def _on_progress(self, job: AdaptJob, report):
        if self._cancelled or self.session.worker is None:
            return
        widget = self.widget
        widget._set(widget.progress, "value", report.step)
        training = report.loss == report.loss  # NaN while loading or validating
        widget.set_status(f"adapting: step {report.step}/{report.total}, loss {report.loss:.3f}" if training
                          else f"adapting: {report.what}")

    def _on_done(self, job: AdaptJob, adapted: Adapted):
        widget = self.widget
        self.last = adapted
        self.session.adapted[layer_key(job.image)] = adapted.card
        widget.model.reset_choices()
        if widget.image.value is job.image:
            widget.model.value = ADAPTED
        self._rerun = replace(job.rerun, model=str(adapted.card))
        widget.tell("info", f"{job.base_name} adapted to {job.image.name} on slices "
                            f"{', '.join(map(str, adapted.slices))} (Dice there {adapted.dice_before:.3f} -> "
                            f"{adapted.dice_after:.3f}, {adapted.seconds:.0f} s); the object runs again with it "
                            f"(Undo takes that run back). The model is for this image only: Save model... keeps it")

    def _on_abort(self):
        self._cancelled = True
        self.widget.tell("info", "adapting cancelled: no model was kept, the labels are as they were")
        self.widget.set_status("cancelled")

    def _on_finished(self):
        widget = self.widget
        self.session.worker = None
        widget.set_visible(widget.progress, False)
        widget.set_enabled(widget.cancel_button, False)
        widget.set_enabled(widget.run_button, True)
        widget.set_enabled(widget.adapt_button, True)
        self.update_buttons()
        widget.update_history_buttons()
        rerun, self._rerun = self._rerun, None
        if rerun is not None and not widget.closed and not widget.layer_gone(rerun.target):
            widget.runs.start(rerun)

    def update_buttons(self, _value=None):
        widget = self.widget
        widget.set_enabled(widget.save_model_button, self.card_for(widget.image.value) is not None
                           and not widget.busy)

    # --- keeping it ------------------------------------------------------------------------

    def save(self, _value=None, name: str | None = None) -> Path | None:
        """Copy the chosen image's adapted model into the models folder under `name` (asked when
        None): from then on it is in the model list, for every image and session."""
        from .models import MODELS_ENV, list_models, load_card, models_folder, search_dirs, write_card
        from .training.finetune import check_output

        widget = self.widget
        image = widget.image.value
        card_path = self.card_for(image)
        if card_path is None:
            widget.say("no model adapted to this image: press Adapt to this scan first")
            return None
        if name is None:
            from qtpy.QtWidgets import QInputDialog

            name, ok = QInputDialog.getText(widget.native, "Save the adapted model", "Model name:")
            if not ok:
                return None
        name = str(name).strip()
        try:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
                raise InputError(f"model name {name!r}: use letters, digits and - _ . + (no spaces or slashes)")
            if name in {card.name for card in list_models()}:
                raise InputError(f"a model named {name} exists; choose another name")
            folder = models_folder()
            out = folder / f"{name}.onnx"
            check_output(out, overwrite=False)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(load_card(card_path).file, out)
            raw = dict(load_card(card_path).raw)
            write_card({**raw, "name": name, "file": out.name}, out.with_suffix(".yaml"))  # the card last
        except (Sam2UnetError, OSError) as error:
            widget.say(str(error), error if isinstance(error, Sam2UnetError) else None)
            return None
        del self.session.adapted[layer_key(image)]
        widget.model.reset_choices()
        widget.model.value = name
        self.update_buttons()
        searched = any(folder.resolve() == d.expanduser().resolve() for d in search_dirs())
        note = "" if searched else f"; set {MODELS_ENV}={folder} to list it in later sessions"
        widget.tell("info", f"saved the adapted model as {name} ({out}){note}")
        widget.set_status(f"saved model {name}")
        return out
