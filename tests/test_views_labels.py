"""Radiological views from the affine, and label names/colours in ITK-SNAP and Slicer files (no viewer)."""

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from napari_sam2unet import label_files
from napari_sam2unet._reader import read_nifti
from napari_sam2unet._writer import write_labels_layer
from napari_sam2unet.provenance import COLOURS_KEY, NAMES_KEY
from napari_sam2unet.views import array_axes, plane_view, ras_mm


def rotation_z(degrees):
    t = np.radians(degrees)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return affine


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 3.0, 1]), np.diag([-0.7, -0.7, 2.0, 1]),
                                    rotation_z(30) @ np.diag([1.0, -1.0, 2.5, 1]),
                                    np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_each_plane_shows_what_radiologists_expect(affine, plane):
    order, (vertical, horizontal) = plane_view(affine, plane)
    assert sorted(order) == [0, 1, 2]
    codes = nib.aff2axcodes(affine)
    slice_code = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}[plane]
    assert codes[order[0]] in slice_code
    # The code a growing index moves towards, and where that must land on screen.
    up = {"axial": "A", "coronal": "S", "sagittal": "S"}[plane]
    left = {"axial": "R", "coronal": "R", "sagittal": "A"}[plane]
    assert (codes[order[1]] == up) == (vertical == "up")
    assert (codes[order[2]] == left) == (horizontal == "left")


def test_oblique_axes_are_matched_one_to_one_and_ras_is_the_affine():
    affine = rotation_z(44) @ np.diag([0.8, 0.8, 3.0, 1])
    assert sorted(array_axes(affine)) == [0, 1, 2]
    affine[:3, 3] = (-10, 20, 5)
    assert ras_mm(affine, (1, 0, 2)) == pytest.approx(affine[:3, :3] @ [1, 0, 2] + affine[:3, 3])


def test_label_files_parse_as_itksnap_and_slicer_and_come_back_through_our_reader(tmp_path):
    labels = np.zeros((10, 8, 4), np.uint8)
    labels[2:5, 2:5, 1] = 1
    labels[6:9, 3:6, 2] = 4
    image = write_nifti(tmp_path / "ct.nii.gz", np.zeros(labels.shape, np.float32), np.diag([-1.0, -1, 2, 1]))
    (_, image_kwargs, _), = read_nifti(str(image))
    meta = {"name": "ct labels", "metadata": {**image_kwargs["metadata"],
                                              NAMES_KEY: {1: "left kidney", 4: 'odd "name"'},
                                              COLOURS_KEY: {1: (230, 25, 75)}}}
    out = tmp_path / "ct_labels.nii.gz"
    write_labels_layer(str(out), labels, meta)

    # ITK-SNAP: IDX R G B A VIS MSH "LABEL"; Slicer: VALUE NAME R G B A, whitespace-separated.
    snap = [line.split() for line in (tmp_path / "ct_labels-labels.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert [row[:4] for row in snap] == [["0", "0", "0", "0"], ["1", "230", "25", "75"], ["4", *snap[2][1:4]]]
    assert all(len(row) >= 8 and 0 <= float(row[4]) <= 1 for row in snap)
    slicer = [line.split() for line in (tmp_path / "ct_labels.ctbl").read_text().splitlines()
              if not line.startswith("#")]
    assert [row[:2] for row in slicer] == [["0", "Background"], ["1", "left_kidney"], ["4", "odd_\"name\""]]
    assert all(len(row) == 6 and all(0 <= int(v) <= 255 for v in row[2:]) for row in slicer)

    (data, kwargs, kind), = read_nifti(str(out))
    assert kind == "labels"
    assert kwargs["metadata"][NAMES_KEY] == {1: "left kidney", 4: "odd 'name'"}
    assert kwargs["metadata"][COLOURS_KEY][1] == (230, 25, 75)
    assert kwargs["colormap"][1][:3] == pytest.approx((230 / 255, 25 / 255, 75 / 255))
    assert label_files.read_slicer(tmp_path / "ct_labels.ctbl")[1][0] == "left_kidney"


def test_a_broken_label_file_does_not_stop_the_label_map_opening(tmp_path):
    out = write_nifti(tmp_path / "seg.nii.gz", np.ones((4, 4, 2), np.uint8))
    (tmp_path / "seg-labels.txt").write_text("1 2 3\n")
    (_, kwargs, kind), = read_nifti(str(out))
    assert kind == "labels" and NAMES_KEY not in kwargs["metadata"]
