"""The "Fine-tune SAM2-UNet" dock widget in a real napari viewer (under xvfb-run)."""

import numpy as np
import pytest

pytest.importorskip("torch", reason="fine-tuning needs the [train] extra (torch)")

from napari_sam2unet import _finetune_widget  # noqa: E402
from napari_sam2unet._finetune_widget import FinetuneWidget  # noqa: E402
from napari_sam2unet._widget import SegmentWidget  # noqa: E402
from napari_sam2unet.backends import open_backend  # noqa: E402
from napari_sam2unet.engine import Engine  # noqa: E402
from napari_sam2unet.io import read_volume  # noqa: E402
from napari_sam2unet.models import find_model, list_models  # noqa: E402
from napari_sam2unet.prompts import Box, Prompts  # noqa: E402

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
CASE = "cases/itksnap_mricrop_brain"
# Generous: a wait, not a timing claim (a few steps take seconds, CI machines are shared).
DONE_TIMEOUT_MS = 900_000
LABELLED = (14, 22)  # the user labelled the right hippocampus on these two slices


@pytest.fixture
def said(monkeypatch):
    messages = {"error": [], "info": []}
    for kind in messages:
        monkeypatch.setattr(_finetune_widget, f"show_{kind}", messages[kind].append)
    return messages


@pytest.fixture
def labelled(shared_data, make_napari_viewer, tmp_path, monkeypatch):
    """A viewer with the brain crop, a labels layer holding two labelled slices, the widget on it."""
    monkeypatch.setenv("SAM2UNET_MODELS", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(shared_data / CASE / "image.nii.gz"), plugin=PLUGIN)
    viewer.dims.order = (2, 0, 1)  # slice through the last array axis (axial)
    truth = np.asarray(read_volume(shared_data / CASE / "label.nii.gz").data) == 4
    drawn = np.zeros(truth.shape, np.uint8)
    for k in LABELLED:
        drawn[:, :, k] = truth[:, :, k] * 3  # the user's label value 3
    layer = viewer.add_labels(drawn.copy(), name="my labels", scale=image.scale, translate=image.translate)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value, widget.labels.value = image, layer
    widget.folder.value = str(tmp_path / "models")
    widget.name.value = "hippo-gui"
    return viewer, widget, image, layer, drawn, truth


def test_finetune_from_a_labels_layer_writes_a_model_the_engine_runs(qtbot, labelled, said):
    viewer, widget, image, layer, drawn, truth = labelled
    segment = SegmentWidget(viewer)  # the segmentation widget, open beside it
    viewer.window.add_dock_widget(segment)
    widget.steps.value = 2
    widget.run()
    assert widget.worker is not None, widget.status.value
    qtbot.waitUntil(lambda: widget.worker is None, timeout=DONE_TIMEOUT_MS)
    assert not said["error"], said["error"]
    assert widget.result is not None and widget.status.value.startswith("done")
    # every labelled slice trained, so the Dice was measured on them: the notification says so (defect 14)
    assert [m for m in said["info"] if "Dice" in m and "trained on" in m and "none held out" in m]
    # nothing the user labelled was touched
    np.testing.assert_array_equal(layer.data, drawn)
    # the model is listed where the segmentation widget finds its models, and offered here as a base
    assert "hippo-gui" in [card.name for card in list_models()]
    assert "hippo-gui" in widget.base.choices
    assert segment.model.value == "hippo-gui"  # chosen there, ready to run the remaining slices
    card = find_model("hippo-gui")
    assert card.raw["finetune"]["data"]["slices"] == list(LABELLED)
    assert card.raw["finetune"]["data"]["labels"] == [3]
    # ... and it segments one of the other slices from a box
    k = 18
    rows, cols = np.flatnonzero(truth[:, :, k].any(1)), np.flatnonzero(truth[:, :, k].any(0))
    backend, _ = open_backend(card, "cpu", threads=1)
    with backend:
        engine = Engine(backend)
        engine.set_volume(np.asarray(image.data), tuple(image.scale), 2)
        box = Box(k, rows[0] - 2, cols[0] - 2, rows[-1] + 3, cols[-1] + 3)
        assert engine.segment(Prompts(boxes=[box]), scope="slices").mask[:, :, k].any()


def test_cancel_writes_no_model_and_leaves_the_labels(qtbot, labelled, said, tmp_path):
    viewer, widget, image, layer, drawn, truth = labelled
    widget.steps.value = 5000
    widget.run()
    qtbot.waitUntil(lambda: widget.status.value.startswith("step"), timeout=DONE_TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=DONE_TIMEOUT_MS)
    assert widget.status.value == "cancelled" and widget.result is None
    assert said["info"] == ["fine-tuning cancelled: no model was written"]
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())
    np.testing.assert_array_equal(layer.data, drawn)


def test_a_labels_layer_with_nothing_labelled_is_explained(qtbot, labelled, said):
    viewer, widget, image, layer, drawn, truth = labelled
    layer.data = np.zeros_like(drawn)
    widget.steps.value = 2
    widget.run()
    assert widget.worker is None  # refused before any work starts
    assert len(said["error"]) == 1 and "no labelled slice" in said["error"][0]
    assert widget.status.value.startswith("my labels has no labelled slice")
