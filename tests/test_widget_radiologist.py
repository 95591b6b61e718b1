"""The defects of issue 26 (the plugin as a radiologist finds it), each in a real napari viewer."""

import nibabel as nib
import numpy as np
import pytest
from conftest import build_brightness_model, sphere_volume, write_nifti, write_test_card
from test_widget import add_box, ball, go_to_slice, labels_layer, messages, open_axial, run_and_wait

from napari_sam2unet import _reader
from napari_sam2unet._widget import SegmentWidget
from napari_sam2unet.models import DEFAULT_MODEL, MODELS_ENV

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
__all__ = ["ball", "messages"]  # fixtures, used by name


def last_point_sign(widget, points):
    return str(points.features["sign"].iloc[-1]), widget.current.prompts.points[-1].positive


def test_defect1_a_negative_point_stays_negative_after_undo_and_clear(qtbot, ball):
    viewer, widget, _, points, shapes, _ = ball
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    widget.point_sign.value = "negative"
    points.add(np.array([[24.0, 20.0, 6.0]]))
    assert last_point_sign(widget, points) == ("negative", False)
    widget.undo()  # the point's edit: the points layer is refilled
    points.add(np.array([[24.0, 20.0, 6.0]]))
    assert last_point_sign(widget, points) == ("negative", False)
    assert not labels_layer(viewer).data[:, :, 6].any()  # a negative click on the ball removes it
    widget.clear_prompts()
    points.add(np.array([[24.0, 20.0, 6.0]]))
    assert str(points.features["sign"].iloc[-1]) == "negative"


def nan_ball(tmp_path, name="nan", everywhere=False):
    data, truth = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    if everywhere:
        data[:] = np.nan
    else:
        data[0:3, 0:3, :] = np.nan
        data[40, 30, 2] = np.inf
    return write_nifti(tmp_path / f"{name}.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0])), truth


def test_defect2_nan_voxels_open_with_a_warning_and_segment(qtbot, tmp_path, make_napari_viewer, monkeypatch):
    warned = []
    monkeypatch.setattr(_reader, "show_warning", warned.append)
    path, truth = nan_ball(tmp_path)
    viewer = make_napari_viewer()
    image = open_axial(viewer, path)
    assert image in viewer.layers and np.isfinite(image.contrast_limits).all()
    assert any("109 NaN or infinite voxels" in m for m in warned)
    widget = SegmentWidget(viewer)
    widget.model_file.value = write_test_card(build_brightness_model(tmp_path / "b.onnx", gain=2.0)).file
    widget.auto_run.value = False
    _, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 6)
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    mask = labels_layer(viewer).data[:, :, 6] > 0
    assert 2 * (mask & truth[:, :, 6]).sum() / (mask.sum() + truth[:, :, 6].sum()) > 0.9
    viewer.layers.remove(image)  # no KeyError from the widget
    assert widget.image.value is None


def test_defect2_an_all_nan_file_is_refused_without_a_ghost_layer(tmp_path, make_napari_viewer):
    path, _ = nan_ball(tmp_path, "all_nan", everywhere=True)
    viewer = make_napari_viewer()
    SegmentWidget(viewer)
    with pytest.raises(Exception, match="every voxel of all_nan is NaN"):
        viewer.open(str(path), plugin=PLUGIN)
    assert len(viewer.layers) == 0


def test_defect3_a_fine_tuned_model_does_not_become_the_default(tmp_path, make_napari_viewer, monkeypatch, qtbot):
    folder = tmp_path / "models"
    folder.mkdir()
    write_test_card(build_brightness_model(folder / "aaa-liver-finetuned.onnx", gain=2.0))
    monkeypatch.setenv(MODELS_ENV, str(folder))
    path = write_nifti(tmp_path / "ball.nii.gz", sphere_volume()[0], np.diag([1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer()
    open_axial(viewer, path)
    widget = SegmentWidget(viewer)
    assert "aaa-liver-finetuned" in widget.model.choices
    assert widget.model.value == DEFAULT_MODEL
    widget.model.value = "aaa-liver-finetuned"  # chosen by the user: then objects say so
    widget.auto_run.value = False
    _, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 6)
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    assert "(aaa-liver-finetuned)" in widget.object_list.native.currentText()


def test_defect4_the_reader_opens_axial_and_the_dock_keeps_it_fitted(tmp_path, make_napari_viewer, qtbot):
    data, _ = sphere_volume(shape=(40, 48, 12), centre=(20, 24, 6))
    path = write_nifti(tmp_path / "las.nii.gz", data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    viewer = make_napari_viewer(show=True)
    viewer.open(str(path), plugin=PLUGIN)  # no widget: as `napari --plugin napari-sam2unet FILE`
    assert viewer.dims.order[0] == 2  # the slider walks inferior-superior
    # LAS: a growing column index goes anterior (up), a growing row index to the patient's left,
    # which the radiological view puts on the screen's right
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "right")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    qtbot.wait(300)
    zoom = viewer.scene.camera.zoom
    viewer.reset_view()
    assert viewer.scene.camera.zoom == pytest.approx(zoom)  # fitted to the canvas the dock left


def test_defect5_ct_opens_in_the_soft_tissue_window_and_mr_in_its_percentiles(tmp_path, make_napari_viewer):
    rng = np.random.default_rng(0)
    ct = np.full((40, 40, 8), -1000.0, np.float32)
    ct[5:35, 5:35] = 40 + rng.normal(0, 20, (30, 30, 8))  # a body of soft tissue in air
    ct[15:20, 15:20] = 700  # bone
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(write_nifti(tmp_path / "ct.nii.gz", ct)), plugin=PLUGIN)
    assert tuple(layer.contrast_limits) == pytest.approx((-160.0, 240.0))
    stored = (ct + 1024).astype(np.int16)  # raw scanner values without the rescale intercept
    (layer,) = viewer.open(str(write_nifti(tmp_path / "ct_raw.nii.gz", stored)), plugin=PLUGIN)
    assert tuple(layer.contrast_limits) == pytest.approx((864.0, 1264.0))
    mr, _ = sphere_volume()
    (layer,) = viewer.open(str(write_nifti(tmp_path / "mr.nii.gz", mr)), plugin=PLUGIN)
    assert tuple(layer.contrast_limits) == pytest.approx(tuple(np.percentile(mr, (0.5, 99.5))), rel=0.02)


def test_defect7_a_reopened_label_map_names_its_labels_and_restores_the_objects(qtbot, ball, tmp_path):
    viewer, widget, _, _, shapes, _ = ball
    widget.label_name.value = "ball"
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    saved = widget.save_labels(tmp_path / "saved.nii.gz")
    widget.commit()
    viewer.layers.remove(labels_layer(viewer))
    (reopened,) = viewer.open(saved[0], plugin=PLUGIN)
    assert "name: ball" in str(reopened.get_status(position=(24, 20, 12), world=True))  # on hover
    titles = [title for title, _ in widget._object_choices()]
    assert [t for t in titles if t.startswith("1: ball")]
    assert widget.current.label == 2 and widget.current.layer is reopened  # the next object, in that map
    widget.select_object(next(n for n, o in enumerate(widget.objects.objects) if o.name == "ball"))
    assert widget.current.layer is reopened  # new runs for it write into the reopened map


def test_defect8_point_markers_are_small_on_the_image_yet_visible(ball):
    viewer, widget, image, points, _, _ = ball
    points.add(np.array([[24.0, 20.0, 6.0]]))
    assert points.size[0] <= 1.5 * min(image.scale[-2:])  # at most a voxel and a half across
    low, high = points.canvas_size_limits
    assert 5 <= low and high <= 16  # a few pixels on screen at any zoom


def test_defect9_the_prompt_layer_stays_active_after_the_first_run(qtbot, ball):
    viewer, widget, _, _, shapes, _ = ball
    assert viewer.layers.selection.active is shapes
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    assert viewer.layers.selection.active is shapes  # the next drag draws a box


def test_defect6_save_writes_nifti_and_label_files_beside_the_image(qtbot, ball, monkeypatch, tmp_path):
    viewer, widget, image, _, shapes, truth = ball
    widget.label_name.value = "ball"
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    asked = []

    def dialog(parent, title, default, types):
        asked.append((default, types))
        return str(tmp_path / "typed_without_type"), types.split(";;")[0]

    monkeypatch.setattr("napari_sam2unet._save_labels.QFileDialog.getSaveFileName", dialog)
    widget.save_button.changed.emit(True)
    (default, types), = asked
    assert default == str(tmp_path / "ball_labels.nii.gz") and "NIfTI" in types
    out = tmp_path / "typed_without_type.nii.gz"
    saved = nib.load(str(out))
    np.testing.assert_allclose(saved.affine, nib.load(str(tmp_path / "ball.nii.gz")).affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0, labels_layer(viewer).data > 0)
    assert "ball" in (tmp_path / "typed_without_type-labels.txt").read_text()
    assert (tmp_path / "typed_without_type.ctbl").exists() and (tmp_path / "typed_without_type.json").exists()
