"""The plugin's reader, writer and sample data without a viewer (plain functions, no Qt)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from napari_sam2unet._reader import META_KEY, get_reader, read_nifti
from napari_sam2unet._sample_data import SAMPLE_LIVER, sample_mri, sample_paths
from napari_sam2unet._writer import write_labels_layer
from napari_sam2unet.errors import InputError


def test_sample_files_are_the_attributed_totalsegmentator_example():
    image, labels = sample_paths()
    assert image.is_file() and labels.is_file()
    readme = (image.parent / "README.md").read_text()
    assert "TotalSegmentator" in readme and "Apache" in readme
    layers = sample_mri()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    (data, kwargs, _), (seg, _, _) = layers
    assert data.shape == seg.shape == (117, 91, 20)
    assert kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0))
    assert (seg == SAMPLE_LIVER).sum() > 1000  # the liver is there


def test_reader_claims_only_nifti(tmp_path):
    assert get_reader(str(tmp_path / "a.nii.gz")) is read_nifti
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.NII.GZ")]) is read_nifti
    assert get_reader(str(tmp_path / "a.tif")) is None
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.png")]) is None


def test_reader_keeps_geometry_and_tells_labels_from_images(tmp_path):
    affine = np.array([[-2.0, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 4, -30], [0, 0, 0, 1]])
    image = write_nifti(tmp_path / "scan.nii.gz", np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 50, affine)
    seg = write_nifti(tmp_path / "seg.nii.gz", (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 3).astype(np.uint8), affine)
    (data, kwargs, kind), (labels, _, label_kind) = read_nifti([str(image), str(seg)])
    assert kind == "image" and label_kind == "labels"
    assert data.dtype == np.float32 and np.issubdtype(labels.dtype, np.integer)
    assert kwargs["scale"] == pytest.approx((2.0, 1.5, 4.0))
    geometry = kwargs["metadata"][META_KEY]
    np.testing.assert_allclose(geometry["affine"], affine)
    assert geometry["path"] == str(image) and geometry["orientation"] == "LPS"


def test_reader_reports_a_corrupt_file(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="broken.nii.gz"):
        read_nifti(str(broken))


def test_writer_uses_the_source_geometry_and_writes_a_sidecar(tmp_path):
    image_path, _ = sample_paths()
    data, kwargs, _ = read_nifti(str(image_path))[0]
    labels = (data > np.percentile(data, 90)).astype(np.uint8) * 3
    meta = {"name": "liver", "metadata": {**kwargs["metadata"], "sam2unet_runs": [{"scope": "slices"}]},
            "scale": kwargs["scale"]}
    written = write_labels_layer(str(tmp_path / "out.nii.gz"), labels, meta)
    out = nib.load(written[0])
    source = nib.load(str(image_path))
    np.testing.assert_allclose(out.affine, source.affine)
    assert out.header.get_qform(coded=True)[1] == source.header.get_qform(coded=True)[1]
    assert out.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["source_image"] == str(image_path) and sidecar["runs"] == [{"scope": "slices"}]


def test_writer_without_source_geometry_uses_the_layer_scale(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 7
    written = write_labels_layer(str(tmp_path / "plain"), labels, {"name": "x", "scale": (2.0, 3.0, 4.0)})
    assert Path(written[0]).name == "plain.nii.gz"
    out = nib.load(written[0])
    assert out.header.get_zooms() == pytest.approx((2.0, 3.0, 4.0))
    assert "no source NIfTI geometry" in json.loads((tmp_path / "plain.json").read_text())["note"]


def test_writer_refuses_labels_from_another_grid(tmp_path):
    image_path, _ = sample_paths()
    _, kwargs, _ = read_nifti(str(image_path))[0]
    with pytest.raises(InputError, match="do not match"):
        write_labels_layer(str(tmp_path / "o.nii.gz"), np.zeros((3, 3, 3), np.uint8), {"metadata": kwargs["metadata"]})


def test_manifest_is_valid_and_the_package_carries_the_root_file():
    npe2 = pytest.importorskip("npe2", reason="npe2 is in the [testing] extra")
    import napari_sam2unet

    root = Path(__file__).resolve().parents[1] / "napari.yaml"
    packaged = Path(napari_sam2unet.__file__).parent / "napari.yaml"
    assert packaged.read_text() == root.read_text()
    manifest = npe2.PluginManifest.from_distribution("napari-sam2unet")
    contributions = manifest.contributions
    assert [r.filename_patterns[:2] for r in contributions.readers] == [["*.nii", "*.nii.gz"], ["*.dcm", "*.DCM"]]
    assert contributions.readers[1].accepts_directories  # a DICOM series' folder
    assert contributions.writers[0].layer_types == ["labels"]
    assert contributions.widgets and contributions.sample_data
    for command in contributions.commands:  # every command points at a real function
        module, _, name = command.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name))
