"""The bugs of issue 11, each driven through a real napari viewer (headless, under xvfb-run)."""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import build_brightness_model, write_nifti, write_test_card
from test_widget import RUN_TIMEOUT_MS, add_box, go_to_slice, labels_layer, messages, open_axial, run_and_wait

from napari_sam2unet._sample_data import sample_paths
from napari_sam2unet._widget import SegmentWidget

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
__all__ = ["messages"]  # a fixture, used by name

BALL_A = ((18, 16, 6), 6)
BALL_B = ((46, 32, 6), 6)
SHAPE = (64, 48, 12)


def balls(centres, shape=SHAPE, noise=5.0):
    grid = np.indices(shape).astype(np.float32)
    data = np.full(shape, 100.0, np.float32)
    truths = []
    for centre, radius in centres:
        inside = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) <= radius
        data[inside] = 900.0
        truths.append(inside)
    data += np.random.default_rng(0).normal(0, noise, shape).astype(np.float32)
    return data, truths


def make_widget(viewer, tmp_path, auto_run=False):
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    card = write_test_card(build_brightness_model(tmp_path / "bright.onnx", gain=2.0))
    widget.model_file.value = card.file
    widget.auto_run.value = auto_run
    return widget


@pytest.fixture
def two_balls(tmp_path, make_napari_viewer):
    data, truths = balls([BALL_A, BALL_B])
    path = write_nifti(tmp_path / "two.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    image = open_axial(viewer, path)
    widget = make_widget(viewer, tmp_path)
    points, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 6)
    return viewer, widget, image, points, shapes, truths


def box_around(shapes, k, centre, radius, pad=3):
    (i, j, _), r = centre, radius + pad
    add_box(shapes, k, i - r, j - r, i + r, j + r)


def test_bug1_a_second_object_runs_with_its_own_prompts_only(qtbot, two_balls):
    viewer, widget, _, _, shapes, (ball_a, ball_b) = two_balls
    go_to_slice(viewer, 2)
    box_around(shapes, 2, *BALL_A)
    run_and_wait(qtbot, widget)
    first = labels_layer(viewer).data.copy()
    widget.commit()
    assert widget.current.label == 2 and len(shapes.data) == 0  # the next object starts empty
    for k in (5, 8):
        box_around(shapes, k, *BALL_B)
    widget.scope.value = "between prompted slices"
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer).data
    two = labels == 2
    # only between its own boxes (5..8), only on ball B: the first object's box on slice 2 plays no part
    assert set(np.flatnonzero(two.any(axis=(0, 1)))) == {5, 6, 7, 8}
    assert not (two & ~ball_b).any()
    np.testing.assert_array_equal(labels == 1, first == 1)
    assert f"{int(two.sum())} voxels written" in widget.status.value


def test_bug2_threshold_and_points_reach_an_earlier_object(qtbot, two_balls):
    viewer, widget, _, points, shapes, (ball_a, ball_b) = two_balls
    box_around(shapes, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    widget.commit()
    box_around(shapes, 6, *BALL_B)
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer)
    ones, twos = int((labels.data == 1).sum()), int((labels.data == 2).sum())
    assert ones > 50 and twos > 50

    widget.select_object(0)  # its box comes back, and edits go to it
    assert len(shapes.data) == 1 and widget.current.label == 1
    widget.threshold.value = 0.99
    qtbot.wait(REFINE_WAIT_MS)
    assert int((labels.data == 1).sum()) < ones and int((labels.data == 2).sum()) == twos
    widget.threshold.value = 0.5
    qtbot.wait(REFINE_WAIT_MS)
    assert int((labels.data == 1).sum()) == ones
    points.feature_defaults["sign"] = "negative"
    points.add(np.array([[18.0, 16.0, 6.0]]))  # on the first ball's centre: not that
    assert not (labels.data[:, :, 6] == 1).any() and int((labels.data == 2).sum()) == twos
    widget.undo()
    assert int((labels.data == 1).sum()) == ones


REFINE_WAIT_MS = 600


@pytest.fixture
def leaky(tmp_path, make_napari_viewer):
    """A ball with a bright bar touching it (a leak into a neighbour), one box around both."""
    data, (ball,) = balls([((24, 20, 6), 8)], shape=(48, 48, 12))
    bar = np.zeros(data.shape, bool)
    bar[22:27, 27:44, 4:9] = True
    data[bar] = 900.0
    path = write_nifti(tmp_path / "leaky.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    open_axial(viewer, path)
    widget = make_widget(viewer, tmp_path)
    points, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 6)
    return viewer, widget, points, shapes, ball, bar & ~ball


def test_bug3_a_negative_point_on_a_touching_leak_trims_it(qtbot, leaky):
    viewer, widget, points, shapes, ball, bar = leaky
    add_box(shapes, 6, 12, 8, 37, 36)  # around the ball, with room: the bar leaks into it
    run_and_wait(qtbot, widget)
    labels = labels_layer(viewer)
    before = labels.data[:, :, 6] > 0
    assert (before & bar[:, :, 6]).sum() > 25  # the leak is there
    points.feature_defaults["sign"] = "negative"
    points.add(np.array([[24.0, 33.0, 6.0]]))  # on the leak
    after = labels.data[:, :, 6] > 0
    truth = ball[:, :, 6]
    assert 2 * (after & truth).sum() / (after.sum() + truth.sum()) > 0.9  # the ball stays
    assert (after & bar[:, :, 6]).sum() < 0.25 * (before & bar[:, :, 6]).sum()  # the leak goes


def test_bug4_one_click_segments_the_structure_under_it_not_the_body(qtbot, make_napari_viewer):
    image_path, labels_path = sample_paths()
    viewer = make_napari_viewer()
    open_axial(viewer, image_path)
    kidney = np.asarray(nib.load(str(labels_path)).dataobj)[:, :, 5] == 2  # right kidney, 159 px
    widget = SegmentWidget(viewer)
    widget.auto_run.value = False
    points, _ = widget.add_prompt_layers()
    go_to_slice(viewer, 5)
    points.add(np.array([[31.0, 62.0, 5.0]]))  # its middle
    run_and_wait(qtbot, widget)
    mask = labels_layer(viewer).data[:, :, 5] > 0
    # Tolerant (the bundled model is retrained): the kidney, with at most a rim of its
    # neighbours, not the abdomen (7791 px before, 49 times the kidney).
    assert 0 < mask.sum() < 3 * kidney.sum()
    assert (mask & kidney).sum() >= 0.8 * kidney.sum()


def test_bug5_the_sidecar_lists_every_run_through_napari_proxies(qtbot, tmp_path, make_napari_viewer):
    from napari.utils._proxies import PublicOnlyProxy

    data, _ = balls([BALL_A, BALL_B])
    path = write_nifti(tmp_path / "two.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    open_axial(viewer, path)
    widget = make_widget(PublicOnlyProxy(viewer), tmp_path)  # as napari hands it to plugins
    _, shapes = widget.add_prompt_layers()
    for k in (4, 6, 8):
        go_to_slice(viewer, k)
        box_around(shapes, k, *BALL_A)
        run_and_wait(qtbot, widget)
    assert len([layer for layer in viewer.layers if layer.__class__.__name__ == "Labels"]) == 1
    out = tmp_path / "runs.nii.gz"
    labels_layer(viewer).save(str(out), plugin=PLUGIN)
    runs = json.loads(out.with_name("runs.json").read_text())["runs"]
    assert [r["slices"] for r in runs] == [[4], [6], [8]]
    assert runs[0]["prompts"]["boxes"][0].keys() == {"slice", "i0", "j0", "i1", "j1"}  # as the CLI writes


def test_bug6_a_result_is_not_refined_from_another_volumes_probabilities(qtbot, tmp_path, make_napari_viewer, messages):
    data_a, _ = balls([BALL_A])
    data_b, _ = balls([BALL_B])
    viewer = make_napari_viewer()
    image_a = open_axial(viewer, write_nifti(tmp_path / "a.nii.gz", data_a, np.diag([1.0, 1.0, 2.0, 1.0])))
    image_b = open_axial(viewer, write_nifti(tmp_path / "b.nii.gz", data_b, np.diag([1.0, 1.0, 2.0, 1.0])))
    widget = make_widget(viewer, tmp_path)
    go_to_slice(viewer, 6)
    widget.image.value = image_a
    _, shapes_a = widget.add_prompt_layers()
    box_around(shapes_a, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    labels_a = viewer.layers["a labels"]
    written = labels_a.data.copy()
    widget.image.value = image_b
    _, shapes_b = widget.add_prompt_layers()
    box_around(shapes_b, 6, *BALL_A)  # the same object, now on image B
    run_and_wait(qtbot, widget)
    widget.undo()
    widget.image.value = image_a
    widget.threshold.value = 0.9
    qtbot.wait(REFINE_WAIT_MS)
    np.testing.assert_array_equal(labels_a.data, written)  # not recomputed from B
    assert any("another volume" in m for m in messages["error"])


def test_bug6_after_an_axis_change_an_edit_says_so_instead_of_raising(qtbot, two_balls, messages):
    viewer, widget, image, _, shapes, _ = two_balls
    box_around(shapes, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    written = labels_layer(viewer).data.copy()
    widget.show_plane("sagittal")  # now slicing another axis
    widget.clear_prompts()
    widget.scope.value = "whole volume"
    run_and_wait(qtbot, widget)
    widget.undo()
    widget.threshold.value = 0.9
    qtbot.wait(REFINE_WAIT_MS)
    np.testing.assert_array_equal(labels_layer(viewer).data, written)
    assert not [m for m in messages["error"] if "unexpectedly" in m]
    assert any("another volume, slice axis" in m for m in messages["error"])


def test_bug7_a_labels_layer_deleted_mid_run_is_noticed(qtbot, two_balls, messages):
    viewer, widget, _, _, _, _ = two_balls
    widget.scope.value = "whole volume"
    worker = widget.run()
    viewer.layers.remove(labels_layer(viewer))
    qtbot.waitUntil(lambda: not widget.busy, timeout=RUN_TIMEOUT_MS)
    assert worker is not None
    assert any("was deleted during the run" in m for m in messages["warning"])
    assert "voxels written" not in widget.status.value
    assert not widget.session.history.done


def test_bug7_closing_the_widget_mid_run_keeps_the_history(qtbot, two_balls):
    viewer, widget, _, _, shapes, _ = two_balls
    box_around(shapes, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    widget.scope.value = "whole volume"
    widget.run()
    viewer.window.remove_dock_widget(widget.native)
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: not widget.session.busy, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(100)
    again = SegmentWidget(viewer)
    assert [s.kind for s in again.session.history.done] == ["run", "run"]
    again.undo()
    again.undo()
    assert not labels_layer(viewer).data.any()


def test_bug7_choosing_another_model_leaves_the_last_result_alone(qtbot, two_balls, tmp_path):
    viewer, widget, _, _, shapes, _ = two_balls
    box_around(shapes, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    before = int(labels_layer(viewer).data.sum())
    widget.threshold.value = 0.99  # above most of the ball
    qtbot.wait(REFINE_WAIT_MS)
    shown = labels_layer(viewer).data.copy()
    assert 0 < shown.sum() < before
    other = write_test_card(build_brightness_model(tmp_path / "other.onnx", gain=1.0))
    widget.model_file.value = other.file  # its card's threshold (0.5) is for the next run
    qtbot.wait(REFINE_WAIT_MS)
    np.testing.assert_array_equal(labels_layer(viewer).data, shown)


def test_bug7_the_status_counts_the_voxels_written_and_warns_when_none_could_be(qtbot, two_balls, messages):
    viewer, widget, image, _, shapes, (ball_a, _) = two_balls
    mine = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mine", scale=image.scale)
    mine.data[ball_a] = 9  # the user's own label covers the ball
    widget.target.reset_choices()
    widget.target.value = mine
    box_around(shapes, 6, *BALL_A)
    run_and_wait(qtbot, widget)
    assert "0 voxels written" in widget.status.value
    assert any("nothing was written" in m for m in messages["warning"])


def oblique(degrees):
    t = np.radians(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation
    return affine


@pytest.mark.parametrize(
    "name, affine",
    [
        ("ras", np.diag([0.8, 0.8, 3.0, 1.0])),
        ("lps", np.diag([-0.8, -0.8, 3.0, 1.0])),
        ("oblique", oblique(20) @ np.diag([-1.0, 1.0, 2.0, 1.0])),
    ],
)
def test_bug8_volumes_open_in_the_radiological_axial_view_of_their_affine(name, affine, tmp_path, make_napari_viewer):
    data, _ = balls([BALL_A])
    path = write_nifti(tmp_path / f"{name}.nii.gz", data, affine)
    viewer = make_napari_viewer()
    SegmentWidget(viewer)
    viewer.open(str(path), plugin=PLUGIN)
    slice_axis, vertical, horizontal = viewer.dims.order
    up_down, left_right = viewer.camera.orientation2d
    # A growing vertical index must move towards posterior on screen-down; a growing horizontal
    # index towards the patient's left on screen-right (RAS: +x is right, +y anterior).
    assert abs(affine[2, slice_axis]) == max(abs(affine[2, :3]))
    assert (affine[1, vertical] < 0) == (up_down == "down")
    assert (affine[0, horizontal] < 0) == (left_right == "right")
