"""Issue 26 defects 10-13 (labels and progress, a laptop screen, 4D files, undo after a deleted
layer) and the DICOM leftovers of issue 23 (axial on open, Save as DICOM-SEG and .seg.nrrd), each
in a real napari viewer. Defect 14 is asserted in test_finetune_widget.py."""

import re

import numpy as np
import pytest
from conftest import build_brightness_model, sphere_volume, write_nifti, write_test_card
from test_widget import add_box, ball, go_to_slice, labels_layer, messages, open_axial, run_and_wait

from napari_sam2unet import _reader
from napari_sam2unet._save_labels import SAVE_FORMATS, default_save_path
from napari_sam2unet._widget import SegmentWidget
from napari_sam2unet.io import read_volume
from napari_sam2unet.provenance import META_KEY

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
__all__ = ["ball", "messages"]  # fixtures, used by name


@pytest.fixture
def short_ball(tmp_path, make_napari_viewer):
    """A ball that ends 6 slices before each end of the volume, the widget on a test model."""
    data, truth = sphere_volume(shape=(48, 40, 24), centre=(24, 20, 12), radius=6)
    viewer = make_napari_viewer()
    open_axial(viewer, write_nifti(tmp_path / "short.nii.gz", data))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_file.value = write_test_card(build_brightness_model(tmp_path / "bright.onnx", gain=2.0)).file
    widget.auto_run.value = False
    _, shapes = widget.add_prompt_layers()
    go_to_slice(viewer, 12)
    return widget, shapes


def test_defect10_the_run_button_names_its_scope_and_propagation_counts_what_it_did(qtbot, short_ball):
    widget, shapes = short_ball
    assert widget.run_button.text == "Run: this slice"
    widget.scope.value = "propagate from this slice"
    assert widget.run_button.text == "Run: propagate from this slice"
    add_box(shapes, 12, 14, 10, 34, 30)
    seen = []  # each status shown, with whether the dock's progress bar showed then (a Label emits no signal)
    show = widget.set_status

    def recorded(text):
        seen.append((text, not widget.progress.native.isHidden()))
        show(text)

    widget.set_status = recorded
    run_and_wait(qtbot, widget)
    done = len(widget.current.result.slices)
    assert done < 24  # the ball ends before the volume does: a total of 24 would be false
    during = [(text, shown) for text, shown in seen if text.startswith("propagating")]
    assert during and all(shown for _, shown in during)  # a progress bar in the dock, not napari's panel
    assert not [text for text, _ in seen if re.search(r"of \d+ slices", text)]
    assert widget.status.value.startswith(f"{done} slices")
    assert widget.progress.native.isHidden()  # gone when the run ends


def test_defect11_both_docks_fit_a_1366x768_screen(make_napari_viewer, tmp_path, qtbot):
    from napari_sam2unet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer(show=True)
    data, _ = sphere_volume()
    viewer.open(str(write_nifti(tmp_path / "ball.nii.gz", data)), plugin=PLUGIN)
    segment, finetune = SegmentWidget(viewer), FinetuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment with SAM2-UNet")
    viewer.window.add_dock_widget(finetune, name="Fine-tune SAM2-UNet")
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.wait(200)
    hint = window.minimumSizeHint()
    assert hint.width() <= 1366 and hint.height() <= 768
    assert window.width() <= 1366 and window.height() <= 768
    for dock in (segment, finetune):  # each scrolls: its height does not set the window's
        assert dock.native.minimumSizeHint().height() <= 300
        assert dock.native.minimumSizeHint().width() <= 520
    assert not segment.advanced_section.isExpanded()  # options most users leave alone are folded
    assert segment.advanced.native.isAncestorOf(segment.model_file.native)


def controls_cut_off(scroll) -> list[str]:
    """The visible controls of a scrolled dock that reach past its viewport's left or right edge."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractSpinBox,
        QComboBox,
        QLabel,
        QLineEdit,
        QProgressBar,
        QSlider,
        QWidget,
    )

    kinds = (QAbstractButton, QAbstractSpinBox, QComboBox, QLabel, QLineEdit, QProgressBar, QSlider)
    inner, viewport = scroll.widget(), scroll.viewport()
    cut = []
    for control in inner.findChildren(QWidget):
        if isinstance(control, kinds) and control.isVisibleTo(inner):
            left = control.mapTo(viewport, QPoint(0, 0)).x()
            if left < 0 or left + control.width() > viewport.width():
                text = control.text() if hasattr(control, "text") else ""
                cut.append(f"{type(control).__name__} {text!r} spans x {left}..{left + control.width()} "
                           f"of {viewport.width()}")
    return cut


def test_defect11_every_control_of_both_docks_shows_whole_in_a_1366x768_window(make_napari_viewer, tmp_path, qtbot):
    """Horizontally too: no button cut at the dock's right edge, with the options unfolded, a
    long file name, the longest Run label and a long status."""
    from qtpy.QtCore import QPoint

    from napari_sam2unet._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer(show=True)
    data, _ = sphere_volume()
    viewer.open(str(write_nifti(tmp_path / "patient_0042_t1_vibe_dixon_opposed_phase_post.nii.gz", data)),
                plugin=PLUGIN)
    segment, finetune = SegmentWidget(viewer), FinetuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment with SAM2-UNet")
    viewer.window.add_dock_widget(finetune, name="Fine-tune SAM2-UNet")
    window = viewer.window._qt_window
    window.resize(1366, 768)
    segment.scope.value = "propagate from this slice"
    segment.advanced_section.expand()
    segment.progress.visible = True
    segment.set_status("8 slices, 1234 voxels written, 97 ms per slice (8 model calls); stopped up: it vanished")
    qtbot.wait(300)
    assert window.width() <= 1366 and window.height() <= 768
    for dock in (segment, finetune):
        viewport = dock.scroll.viewport()
        right = viewport.mapTo(window, QPoint(viewport.width(), 0)).x()
        assert 0 < viewport.width() and right <= window.width()  # the dock itself is on the screen
        assert controls_cut_off(dock.scroll) == [], type(dock).__name__


def test_defect12_a_4d_file_says_which_volume_opened_and_another_can_be_chosen(tmp_path, make_napari_viewer,
                                                                               monkeypatch):
    said = []
    monkeypatch.setattr(_reader, "show_info", said.append)
    ball, _ = sphere_volume()
    frames = np.stack([ball + 1000 * n for n in range(3)], axis=-1)
    path = write_nifti(tmp_path / "dynamic.nii.gz", frames)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin=PLUGIN)
    assert [m for m in said if "volume 0 of 3" in m and "Volume" in m]
    widget = SegmentWidget(viewer)
    picker = widget.volumes.control
    assert not picker.native.isHidden() and picker.max == 2
    picker.value = 2
    np.testing.assert_allclose(image.data, frames[..., 2])
    assert image.metadata[META_KEY]["volume"] == 2 and "volume 2 of 3" in widget.status.value


def test_defect12_a_3d_file_shows_no_volume_control(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(write_nifti(tmp_path / "ball.nii.gz", sphere_volume()[0])), plugin=PLUGIN)
    assert SegmentWidget(viewer).volumes.control.native.isHidden()


def test_defect13_undo_after_the_labels_layer_was_deleted_says_so(qtbot, ball, messages):
    viewer, widget, _, _, shapes, _ = ball
    add_box(shapes, 6, 10, 8, 38, 32)
    run_and_wait(qtbot, widget)
    viewer.layers.remove(labels_layer(viewer))
    widget.undo()
    assert "was deleted" in widget.status.value and "undone" not in widget.status.value
    assert [m for m in messages["warning"] if "cannot undo the run" in m and "was deleted" in m]
    assert not widget.session.history.done  # nothing left that pretends to be undoable


@pytest.fixture
def dicom_series(real_data, tmp_path):
    from test_dicom import ct_block, write_series

    write_series(tmp_path / "series", ct_block(real_data))
    return tmp_path / "series"


def test_dicom_series_open_axial_without_the_widget(dicom_series, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(dicom_series), plugin=PLUGIN)
    assert viewer.dims.order[0] == 2  # the slider walks the series' slices, as for NIfTI files


def test_save_button_writes_dicom_seg_and_seg_nrrd_that_read_back(dicom_series, make_napari_viewer, tmp_path):
    from napari_sam2unet.seg_formats import read_dicom_seg

    slicerio = pytest.importorskip("slicerio", reason="slicerio is in the [testing] extra")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(dicom_series), plugin=PLUGIN)
    labels = np.zeros(image.data.shape, np.uint8)
    labels[10:30, 5:25, 3:7] = 2
    viewer.add_labels(labels, name="series labels", scale=image.scale, metadata={META_KEY: image.metadata[META_KEY]})
    widget = SegmentWidget(viewer)
    assert {".dcm", ".seg.nrrd"} <= set(SAVE_FORMATS)
    assert default_save_path(labels_layer(viewer)).name == "series_labels.dcm"  # a DICOM series: DICOM-SEG
    (dcm,) = widget.save_labels(tmp_path / "out.dcm")
    volume = read_volume(dicom_series)
    np.testing.assert_array_equal(read_dicom_seg(dcm, volume), np.transpose(labels[:, ::-1, :], (2, 1, 0)))
    (nrrd,) = widget.save_labels(tmp_path / "out.seg.nrrd")
    assert nrrd.endswith("out.seg.nrrd")
    np.testing.assert_array_equal(slicerio.read_segmentation(nrrd)["voxels"], labels)
