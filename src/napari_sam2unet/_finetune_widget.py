"""napari dock widget "Fine-tune SAM2-UNet": train a model on the slices the user labelled.

The labels layer is copied when the run starts and never written to. Training runs in a thread
worker (training/finetune.py's `finetune`, as the command runs it) with napari's progress bar and
Cancel; a cancelled run writes nothing. The new model goes into the models folder that discovery searches, so it
appears in "Segment with SAM2-UNet", where it is selected. No ``from __future__ import
annotations``: napari reads the ``Viewer`` annotation at runtime.
"""

import logging
import time
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import create_worker, ensure_main_thread

from ._dock import scroll_into
from .errors import Cancelled, Sam2UnetError
from .models import DEFAULT_MODEL, MODELS_ENV, list_models, models_folder, search_dirs
from .training.finetune import TRUNK_CHOICES, Settings  # torch-free: torch is imported when a run starts

log = logging.getLogger(__name__)

ALL_LABELS = 0  # the label value that means "every label in the layer"


def not_searched_note(folder: Path) -> str | None:
    """A note when discovery will not find models in `folder` (models.search_dirs owns the
    folders searched: $SAM2UNET_MODELS and the per-user folder)."""
    folder = folder.expanduser().resolve()
    if any(folder == d.expanduser().resolve() for d in search_dirs()):
        return None
    return (f"{folder} is not searched for models; open the model from there with 'or model file', "
            f"or set {MODELS_ENV}={folder}")


def dice_scope(scored_on: str | None) -> str:
    """Where the Dice was measured, for the notification (None: on the slices the model trained on,
    which shows that it learned them, not how it does elsewhere)."""
    if not scored_on:
        return ("on the labelled slices it trained on (every labelled slice trained, none held out: "
                "check the other slices yourself)")
    return f"on {scored_on}"


class FinetuneWidget(Container):
    """Fine-tune a SAM2-UNet model on the labelled slices of a labels layer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self.viewer = viewer
        self.worker = None
        self.result = None  # the last run's finetune.Result (for messages and tests)
        self._pbar = None
        self._cancelling = False
        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.labels = ComboBox(label="Labels", choices=self._labels_choices,
                               tooltip="The slices that hold a label are the training data; the layer is not changed")
        self.label_value = SpinBox(label="Label value", min=0, max=65535, value=ALL_LABELS,
                                   tooltip="0: every label in the layer")
        self.base = ComboBox(label="Base model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.steps = SpinBox(label="Steps", min=1, max=5000, value=Settings.steps)
        self.trunk = ComboBox(label="Trunk", choices=list(TRUNK_CHOICES), value=Settings.trunk,
                              tooltip="frozen: adapters and decoder train (faster, keeps what the model knew)")
        self.name = LineEdit(label="New model name", value="")
        self.folder = FileEdit(label="Models folder", mode="d", value=str(models_folder()))
        self.run_button = PushButton(text="Fine-tune on my labels")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(label="Status", value="ready")
        self.status.native.setWordWrap(True)  # a long status wraps instead of widening the dock
        # The controls scroll (a laptop screen holds this dock under the segment dock).
        self.body = Container(widgets=[
            self.image, self.labels, self.label_value, self.base, self.steps, self.trunk, self.name, self.folder,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.status])
        self.scroll = scroll_into(self, self.body)
        self.image.changed.connect(lambda _v=None: self.labels.reset_choices())
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh)

    # --- choices ---------------------------------------------------------------------------

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _labels_choices(self, _widget=None):
        image = self.image.value if hasattr(self, "image") else None
        shape = tuple(image.data.shape) if image is not None else None
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and tuple(layer.data.shape) == shape]

    def _model_choices(self, _widget=None):
        return sorted({card.name for card in list_models()} | {DEFAULT_MODEL})

    def reset_choices(self, _event=None):
        if hasattr(self, "body"):  # napari may ask while the controls are being made
            self.body.reset_choices()

    def _refresh(self, _event=None):
        self.image.reset_choices()
        self.labels.reset_choices()

    # --- running ---------------------------------------------------------------------------

    def job(self) -> dict:
        """What the worker needs, copied now: later edits to the layers do not reach the run."""
        from .errors import InputError
        from .layer_prompts import slice_axis

        image, labels = self.image.value, self.labels.value
        if image is None or labels is None:
            raise InputError("choose an image and a labels layer on its grid (label a few slices first)")
        if image.ndim != 3:
            raise InputError(f"{image.name} is {image.ndim}D; fine-tuning needs a 3D volume")
        base = self.base.value
        name = self.name.value.strip() or f"{base}-ft-{time.strftime('%Y%m%d-%H%M%S')}"
        return {
            "image": np.asarray(image.data, dtype=np.float32), "labels": np.array(labels.data, copy=True),
            "spacing": tuple(float(s) for s in image.scale[-3:]), "axis": slice_axis(self.viewer, image),
            "label_ids": None if self.label_value.value == ALL_LABELS else [int(self.label_value.value)],
            "base": base, "name": name, "out": Path(self.folder.value).expanduser() / f"{name}.onnx",
            "steps": int(self.steps.value), "trunk": self.trunk.value, "what": labels.name,
        }

    def run(self, _value=None):
        """Start fine-tuning on the chosen labels layer."""
        if self.worker is not None:
            return
        try:
            job = self.job()
            from .training import finetune as ft

            ft._torch()  # say what to install now, not from the worker
            ft.check_output(job["out"], overwrite=False)
            # Bad labels are said at once: the worker would first spend seconds loading the model.
            ft.select_slices(job["image"], job["labels"], job["axis"], None, job["label_ids"], job["what"])
        except Sam2UnetError as error:
            self._say(str(error), error)
            return
        self._cancelling = False
        # Reports go to the main thread (the progress bar and status are Qt's); Cancel is read
        # by the run after each step. Errors, Cancel's included, are _on_error's to tell.
        self.worker = create_worker(self._work, job, ensure_main_thread(self._on_progress),
                                    lambda: self._cancelling, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._pbar = progress(total=job["steps"], desc="Fine-tuning SAM2-UNet")
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "loading the base model..."
        self.worker.start()

    @staticmethod
    def _work(job, report, cancelled):
        """The worker thread: load the base and the labelled slices, then the command's run."""
        from .training import finetune as ft

        base = ft.load_base(job["base"])
        report(ft.Progress(0, job["steps"], float("nan"), "reading the labelled slices"))
        data = ft.volume_data(job["image"], job["labels"], job["spacing"], base.spec.channels, job["axis"],
                              label_ids=job["label_ids"], what=job["what"])
        settings = ft.Settings(steps=job["steps"], trunk=job["trunk"])
        result = ft.finetune(base, data, job["out"], settings, job["name"], progress=report,
                             command="napari: Fine-tune SAM2-UNet", cancelled=cancelled)
        held_out = data.validation is not data.train  # else scored on the slices it trained on
        return result, job["name"], held_out and data.validation_what

    def _on_progress(self, report):
        if self._cancelling:
            return  # a step that ended after Cancel was pressed may be reported after it
        if self._pbar is not None:
            self._pbar.update(report.step - self._pbar.n)
        training = report.loss == report.loss  # NaN while loading or validating
        self.status.value = f"step {report.step}/{report.total}, loss {report.loss:.3f}" if training else report.what

    def _on_done(self, value):
        result, name, scored_on = value
        self.result = result
        note = not_searched_note(result.onnx.parent)
        selected = self.select_in_segment_widget(name)
        self.base.reset_choices()
        where = "selected in Segment with SAM2-UNet" if selected else "in the model list of Segment with SAM2-UNet"
        message = (f"{name}: Dice {result.dice_before:.3f} -> {result.dice_after:.3f} {dice_scope(scored_on)} "
                   f"({result.seconds:.0f} s); {where}: run the remaining slices with it")
        self.status.value = f"done: Dice {result.dice_before:.3f} -> {result.dice_after:.3f}"
        show_info(message + (f"; {note}" if note else ""))

    def select_in_segment_widget(self, name: str) -> bool:
        """Refresh the model list of every open segmentation widget and choose the new model."""
        from ._widget import SegmentWidget

        chosen = False
        for widget in list(self.viewer.window.dock_widgets.values()):
            if isinstance(widget, SegmentWidget):
                widget.model.reset_choices()
                if name in widget.model.choices:
                    widget.model.value = name
                    chosen = True
        return chosen

    def _on_error(self, error):
        if isinstance(error, Cancelled):
            show_info(str(error))  # that no model was written
            self.status.value = "cancelled"
        else:
            self._say(str(error), error)

    def _on_finished(self):
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def cancel(self, _value=None):
        """Stop after the current step; nothing is written."""
        if self.worker is not None:
            self._cancelling = True
            self.status.value = "cancelling..."

    def _say(self, message: str, error: BaseException | None = None):
        self.status.value = message if len(message) < 80 else message[:77] + "..."
        if error is None or isinstance(error, Sam2UnetError):
            show_error(message)
        else:  # a bug, not the user's doing: details in the log
            log.error("fine-tuning failed", exc_info=(type(error), error, error.__traceback__))
            show_error(f"fine-tuning failed unexpectedly ({type(error).__name__}: {error}); no model was written")
