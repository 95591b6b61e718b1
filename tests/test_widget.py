"""The dock widget in a real napari viewer (headless, under xvfb-run): prompts, runs, edits, undo, save."""

import gzip

import numpy as np
import pytest
from conftest import build_brightness_model, sphere_volume, write_nifti, write_test_card

from napari_sam2unet import _widget
from napari_sam2unet._sample_data import SAMPLE_LIVER, sample_paths
from napari_sam2unet._widget import SegmentWidget

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
RUN_TIMEOUT_MS = 60_000


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture
def messages(monkeypatch):
    """What the widget tells the user (napari notifications), by kind."""
    said = {"error": [], "warning": [], "info": []}
    for kind in said:
        monkeypatch.setattr(_widget, f"show_{kind}", said[kind].append)
    return said


def open_axial(viewer, path):
    """Open a NIfTI file with our reader and slice through its last array axis (axial here)."""
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    viewer.dims.order = (2, 0, 1)
    return layer


def add_box(shapes, k, i0, j0, i1, j1):
    """A rectangle on slice k of the last axis, in the layer's data (voxel) coordinates."""
    corners = [[i0, j0, k], [i0, j1, k], [i1, j1, k], [i1, j0, k]]
    shapes.add_rectangles(np.array(corners, dtype=float))


def run_and_wait(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget.status.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=RUN_TIMEOUT_MS)
    return worker


def go_to_slice(viewer, k):
    viewer.dims.set_current_step(2, k)


@pytest.fixture
def ball(tmp_path, make_napari_viewer):
    """A viewer with a bright ball volume, the widget on a real test ONNX model, prompt layers added."""
    data, truth = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    path = write_nifti(tmp_path / "ball.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    image = open_axial(viewer, path)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    card = write_test_card(build_brightness_model(tmp_path / "bright.onnx", gain=2.0))
    widget.model_file.value = card.file
    widget.auto_run.value = False  # these tests press Run themselves
    points, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 6)
    return viewer, widget, image, points, shapes, truth


def labels_layer(viewer):
    (layer,) = [layer for layer in viewer.layers if layer.__class__.__name__ == "Labels"]
    return layer


def test_bundled_model_segments_the_sample_liver_from_a_box(qtbot, make_napari_viewer):
    image_path, labels_path = sample_paths()
    viewer = make_napari_viewer()
    image = open_axial(viewer, image_path)
    (reference,) = viewer.open(str(labels_path), plugin=PLUGIN)
    liver = np.asarray(reference.data) == SAMPLE_LIVER
    viewer.layers.remove(reference)
    widget = SegmentWidget(viewer)
    widget.auto_run.value = False
    _, shapes = widget.add_prompt_layers()
    k = 10
    rows = np.flatnonzero(liver[:, :, k].any(1))
    cols = np.flatnonzero(liver[:, :, k].any(0))
    add_box(shapes, k, rows[0] - 2, cols[0] - 2, rows[-1] + 2, cols[-1] + 2)
    go_to_slice(viewer, k)
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer)
    assert labels.scale == pytest.approx(image.scale) and labels.translate == pytest.approx(image.translate)
    assert dice(labels.data[:, :, k] > 0, liver[:, :, k]) >= 0.7
    assert not labels.data[:, :, k + 1].any()  # scope "this slice"
    assert "ms per slice" in widget.status.value


def test_box_run_then_threshold_and_points_refine_without_the_model(qtbot, ball):
    viewer, widget, _, points, shapes, truth = ball
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer)
    assert dice(labels.data[:, :, 6] > 0, truth[:, :, 6]) > 0.9
    # which backend runs, and on hover why (no aidlite here: not the NPU)
    assert widget.backend_info.value.startswith("onnxruntime CPU")
    assert "NPU not used" in widget.backend_info.tooltip
    engine = widget.engine
    calls = engine.backend_calls
    before = int((labels.data > 0).sum())

    widget.threshold.value = 0.99  # above most of the ball: logits = 2 x its normalised brightness
    assert int((labels.data > 0).sum()) < before
    widget.threshold.value = 0.5
    assert int((labels.data > 0).sum()) == before

    points.feature_defaults["sign"] = "negative"
    points.add(np.array([[24.0, 20.0, 6.0]]))  # a negative click on the ball removes it
    assert not labels.data[:, :, 6].any()
    points.data = np.empty((0, 3))
    assert int((labels.data > 0).sum()) == before
    assert engine.backend_calls == calls


def test_a_run_keeps_other_labels_and_undo_redo_restore(qtbot, ball):
    viewer, widget, image, _, shapes, truth = ball
    other = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mine", scale=image.scale)
    other.data[20:28, 16:24, 6] = 7  # the user's own label, inside the ball
    before = other.data.copy()
    widget.target.reset_choices()
    widget.target.value = other
    widget.label_value.value = 3
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    assert (other.data[20:28, 16:24, 6] == 7).all()
    assert ((other.data == 3) == (truth & (before == 0)))[:, :, 6].mean() > 0.97
    widget.undo()
    np.testing.assert_array_equal(other.data, before)
    widget.redo()
    assert (other.data == 3).sum() > 100 and (other.data[20:28, 16:24, 6] == 7).all()


def test_saved_labels_open_aligned_in_itk(qtbot, ball, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is in the [testing] extra")
    viewer, widget, image, _, shapes, _ = ball
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    out = tmp_path / "ball_labels.nii.gz"
    written = labels_layer(viewer).save(str(out), plugin=PLUGIN)
    assert written == [str(out)]
    source = sitk.ReadImage(image.metadata["sam2unet"]["path"])
    saved = sitk.ReadImage(str(out))
    assert saved.GetOrigin() == pytest.approx(source.GetOrigin())
    assert saved.GetSpacing() == pytest.approx(source.GetSpacing())
    assert saved.GetDirection() == pytest.approx(source.GetDirection())
    assert sitk.GetArrayFromImage(saved).sum() > 0
    assert out.with_name("ball_labels.json").is_file() or out.with_suffix("").with_suffix(".json").is_file()


def test_missing_model_says_why_and_leaves_no_layer(qtbot, ball, messages, tmp_path):
    viewer, widget, _, _, shapes, _ = ball
    widget.model_file.value = tmp_path / "nowhere.onnx"
    add_box(shapes, 6, 10, 8, 38, 32)
    layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert any("nowhere.onnx" in m and "does not exist" in m for m in messages["error"])
    assert len(viewer.layers) == layers
    assert widget.run_button.enabled


def test_cancelled_run_leaves_the_labels_as_they_were(qtbot, ball, messages):
    viewer, widget, _, _, _, _ = ball
    widget.scope.value = "whole volume"
    worker = widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=RUN_TIMEOUT_MS)
    assert worker.abort_requested
    assert not [layer for layer in viewer.layers if layer.__class__.__name__ == "Labels" and layer.data.any()]
    assert any("cancelled" in m for m in messages["info"])


def test_no_prompt_on_this_slice_is_explained(qtbot, ball, messages):
    _, widget, _, _, shapes, _ = ball
    add_box(shapes, 2, 10, 8, 38, 32)  # on another slice than the one shown
    assert widget.run() is None
    assert any("no box or point on slice 6" in m for m in messages["error"])


def test_corrupt_file_is_refused_with_a_reason_and_napari_goes_on(make_napari_viewer, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="broken.nii.gz") as raised:
        viewer.open(str(bad), plugin=PLUGIN)
    assert "NIfTI" in str(raised.value)
    assert len(viewer.layers) == 0
    open_axial(viewer, sample_paths()[0])  # the viewer still works
    assert len(viewer.layers) == 1


def test_nan_voxels_count_as_the_lowest_intensity_and_are_reported(qtbot, ball, messages):
    viewer, widget, image, _, shapes, truth = ball
    image.data[0:3, 0:3, :] = np.nan
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    assert any("108 NaN or infinite voxels" in m for m in messages["warning"])
    assert dice(labels_layer(viewer).data[:, :, 6] > 0, truth[:, :, 6]) > 0.9


def test_propagation_fills_the_volume_and_the_status_tells_the_end(qtbot, ball):
    viewer, widget, _, _, shapes, truth = ball
    add_box(shapes, 6, 10, 8, 38, 32)
    widget.scope.value = "propagate from this slice"
    run_and_wait(qtbot, widget)
    qtbot.wait(200)  # let any late Qt event through
    labels = labels_layer(viewer).data > 0
    assert dice(labels, truth) > 0.9
    assert widget.status.value.startswith(f"{len(widget.current.result.slices)} slices")
    assert "ms per slice" in widget.status.value
