"""Issue 11's "done when": a two-object session through the real viewer, saved and reopened.

Liver by box and propagation, kidney by one click, a negative point trims, the liver
re-thresholded after the kidney exists, commit, save; the files reopen with names and colours,
on the image's grid, and the sidecar lists every operation. The bundled model is being
retrained, so accuracy assertions are tolerant; the workflow assertions are exact.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_widget import RUN_TIMEOUT_MS, go_to_slice, open_axial

from napari_sam2unet._sample_data import SAMPLE_LIVER, sample_paths
from napari_sam2unet._widget import SegmentWidget
from napari_sam2unet.label_files import read_itksnap, read_slicer

pytestmark = pytest.mark.gui
PLUGIN = "napari-sam2unet"
KIDNEY, LIVER_SLICE, KIDNEY_SLICE = 2, 10, 5


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(50)


def test_two_objects_segmented_edited_saved_and_reopened(qtbot, make_napari_viewer, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is in the [testing] extra")
    image_path, labels_path = sample_paths()
    truth = np.asarray(nib.load(str(labels_path)).dataobj)
    viewer = make_napari_viewer()
    open_axial(viewer, image_path)
    widget = SegmentWidget(viewer)  # segment as you prompt: on, as a user gets it
    viewer.window.add_dock_widget(widget)
    points, shapes = widget.add_prompt_layers()

    # 1. the liver: a box on one slice runs that slice at once, then propagate from it
    liver = truth == SAMPLE_LIVER
    rows, cols = np.flatnonzero(liver[:, :, LIVER_SLICE].any(1)), np.flatnonzero(liver[:, :, LIVER_SLICE].any(0))
    go_to_slice(viewer, LIVER_SLICE)
    widget.label_name.value = "liver"
    corners = [[rows[0] - 2, cols[0] - 2], [rows[0] - 2, cols[-1] + 2], [rows[-1] + 2, cols[-1] + 2],
               [rows[-1] + 2, cols[0] - 2]]
    shapes.add_rectangles(np.array([[r, c, LIVER_SLICE] for r, c in corners], dtype=float))
    wait(qtbot, widget)
    assert widget.current.result is not None and list(widget.current.result.slices) == [LIVER_SLICE]
    widget.scope.value = "propagate from this slice"
    widget.run()
    wait(qtbot, widget)
    layer = viewer.layers["example_mr_sm labels"]
    liver_mask = layer.data == 1
    assert len(np.flatnonzero(liver_mask.any(axis=(0, 1)))) > 3  # it went through the volume
    assert 2 * (liver_mask & liver).sum() / (liver_mask.sum() + liver.sum()) > 0.3
    assert "stopped" in widget.status.value  # propagation says why it ended

    # 2. the kidney, the next object: one click, segmented as it lands
    widget.commit()
    widget.label_name.value = "right kidney"
    widget.scope.value = "this slice"
    go_to_slice(viewer, KIDNEY_SLICE)
    kidney = truth[:, :, KIDNEY_SLICE] == KIDNEY
    depth = ndimage.distance_transform_edt(kidney)
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    points.add(np.array([[r, c, KIDNEY_SLICE]], dtype=float))
    wait(qtbot, widget)
    kidney_mask = layer.data[:, :, KIDNEY_SLICE] == 2
    assert 0 < kidney_mask.sum() < 3 * kidney.sum() and (kidney_mask & kidney).sum() >= 0.8 * kidney.sum()

    # 3. a negative point trims the kidney's mask where it is clicked, not the whole of it
    far = np.argwhere(kidney_mask)[np.argmax(np.hypot(*(np.argwhere(kidney_mask) - (r, c)).T))]
    points.feature_defaults["sign"] = "negative"
    points.add(np.array([[far[0], far[1], KIDNEY_SLICE]], dtype=float))
    wait(qtbot, widget)
    trimmed = layer.data[:, :, KIDNEY_SLICE] == 2
    assert trimmed.sum() < kidney_mask.sum() and trimmed.sum() >= 0.5 * kidney_mask.sum()
    assert not trimmed[far[0], far[1]]

    # 4. back to the liver: the threshold reaches it, the kidney stays
    kidney_now = layer.data == 2
    widget.select_object(0)
    assert len(shapes.data) == 1 and len(points.data) == 0  # the liver's own prompts
    liver_before = int((layer.data == 1).sum())
    widget.threshold.value = 0.8
    qtbot.wait(600)
    assert int((layer.data == 1).sum()) < liver_before
    np.testing.assert_array_equal(layer.data == 2, kidney_now)
    widget.commit()

    # 5. save, reopen
    out = tmp_path / "session.nii.gz"
    layer.save(str(out), plugin=PLUGIN)
    (reopened,) = viewer.open(str(out), plugin=PLUGIN)
    assert reopened.metadata["sam2unet_label_names"] == {1: "liver", 2: "right kidney"}
    assert set(read_itksnap(tmp_path / "session-labels.txt")) == {1, 2}
    assert read_slicer(tmp_path / "session.ctbl")[2][0] == "right_kidney"
    assert np.allclose(reopened.colormap.map(np.array([2]))[0][:3],
                       np.array(layer.metadata["sam2unet_label_colours"][2]) / 255, atol=0.01)
    saved, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_path))
    assert saved.GetOrigin() == pytest.approx(source.GetOrigin())
    assert saved.GetSpacing() == pytest.approx(source.GetSpacing())
    assert saved.GetDirection() == pytest.approx(source.GetDirection())
    runs = json.loads((tmp_path / "session.json").read_text())["runs"]
    operations = [(run["operation"], run["label"]) for run in runs]
    assert operations[:3] == [("run", 1), ("run", 1), ("commit", 1)]
    # The point edit on the kidney: a correction by the model when it sees prompts (the bundled
    # model does), else a refinement of its cached mask; either is recorded with its points.
    assert ("run", 2) in operations and (("correct", 2) in operations or ("refine", 2) in operations)
    assert operations[-2:] == [("refine", 1), ("commit", 1)]
    # edited points are recorded as the CLI records them: {slice, i, j, positive}
    edited = [point for run in runs if run["operation"] in ("refine", "correct") for point in run.get("points", [])]
    assert edited and all(set(point) == {"slice", "i", "j", "positive"} for point in edited)
