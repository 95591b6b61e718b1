"""A model that sees prompts, driven through the widget in a real napari viewer (issue 27 item 4):
a click corrects its slice by one model call with the current mask as the prior."""

import numpy as np
import pytest
from conftest import build_prompt_model, sphere_volume, write_nifti, write_test_card
from test_widget import add_box, go_to_slice, labels_layer, open_axial, run_and_wait

from napari_sam2unet._widget import SegmentWidget

pytestmark = pytest.mark.gui
K = 6  # the slice every test works on


@pytest.fixture
def prompted_ball(tmp_path, make_napari_viewer):
    """The ball volume, the widget on the prompt-following test model, the ball boxed and segmented."""
    data, truth = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    path = write_nifti(tmp_path / "ball.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    open_axial(viewer, path)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    card = write_test_card(build_prompt_model(tmp_path / "prompted.onnx"), channels="prompted")
    widget.model_file.value = card.file
    widget.auto_run.value = False
    points, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, K)
    return viewer, widget, points, shapes, truth[:, :, K]


@pytest.fixture
def boxed(qtbot, prompted_ball):
    viewer, widget, points, shapes, truth = prompted_ball
    add_box(shapes, K, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer)
    before = labels.data[:, :, K] > 0
    assert 2 * (before & truth).sum() / (before.sum() + truth.sum()) > 0.95
    assert widget.engine.prompted
    return widget, points, labels, before


def click(points, i, j, sign="positive"):
    points.feature_defaults["sign"] = sign
    points.add(np.array([[float(i), float(j), float(K)]]))


def changed_near(before, after, centre, radius):
    """Whether the mask changed, and only within `radius` pixels of `centre`."""
    changed = np.argwhere(before != after)
    far = np.hypot(changed[:, 0] - centre[0], changed[:, 1] - centre[1]) > radius
    return len(changed) > 0 and not far.any()


def test_a_positive_click_outside_the_object_adds_there_in_one_model_call(qtbot, boxed):
    widget, points, labels, before = boxed
    calls = widget.engine.backend_calls
    click(points, 24, 30)  # two voxels right of the ball's edge (j = 28)
    after = labels.data[:, :, K] > 0
    assert widget.engine.backend_calls == calls + 1
    assert after[24, 30] and not before[24, 30]
    assert changed_near(before, after, (24, 30), 4)
    assert after.sum() > before.sum()
    assert "corrected slice 6" in widget.status.value


def test_a_negative_click_on_the_edge_trims_there_and_keeps_the_rest(qtbot, boxed):
    widget, points, labels, before = boxed
    click(points, 24, 28, "negative")  # on the ball's right edge (a click inside would be a filled hole)
    after = labels.data[:, :, K] > 0
    assert before[24, 28] and not after[24, 28]
    assert changed_near(before, after, (24, 28), 4)
    assert after[24, 14] and after.sum() > 0.8 * before.sum()


def test_corrections_undo_redo_and_threshold_edits_stay_in_the_cache(qtbot, boxed):
    widget, points, labels, before = boxed
    click(points, 24, 30)
    first = labels.data[:, :, K].copy()
    click(points, 24, 12, "negative")  # the far edge
    second = labels.data[:, :, K].copy()
    assert first[24, 30] and second[24, 30] and not second[24, 12]  # corrections build on each other
    calls = widget.engine.backend_calls
    widget.threshold.value = 0.05  # lower: the click's own trim is the model's crisp part, so the mask grows elsewhere
    assert (labels.data[:, :, K] > 0).sum() > (second > 0).sum()
    widget.threshold.value = 0.5
    qtbot.wait(400)  # the other slices' refresh after the drag settles
    np.testing.assert_array_equal(labels.data[:, :, K], second)
    assert widget.engine.backend_calls == calls  # threshold edits never call the model
    widget.undo()  # the threshold drag
    widget.undo()  # the negative click
    np.testing.assert_array_equal(labels.data[:, :, K], first)
    assert len(points.data) == 1  # its point went with it
    widget.undo()
    np.testing.assert_array_equal(labels.data[:, :, K] > 0, before)
    widget.redo()
    np.testing.assert_array_equal(labels.data[:, :, K], first)
    runs = [r["operation"] for r in labels.metadata["sam2unet_runs"]]
    assert runs == ["run", "correct"]


def test_a_click_on_a_slice_without_a_mask_segments_the_object_under_it(qtbot, boxed):
    widget, points, labels, _ = boxed
    widget.auto_run.value = True
    go_to_slice(widget.viewer, 8)
    points.feature_defaults["sign"] = "positive"
    points.add(np.array([[24.0, 20.0, 8.0]]))
    qtbot.waitUntil(lambda: not widget.busy and labels.data[:, :, 8].any(), timeout=60_000)
    mask = labels.data[:, :, 8] > 0
    assert mask[24, 20] and mask.sum() < 400  # the ball's section there (~150 px), not the slice
