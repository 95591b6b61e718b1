"""DICOM series in (geometry against dcm2niix and the DICOM positions), DICOM-SEG and .seg.nrrd out, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from scipy import ndimage

from napari_sam2unet.cli import main
from napari_sam2unet.dicom import read_dicom
from napari_sam2unet.dicom_geometry import LPS_TO_RAS, labels_on_frames
from napari_sam2unet.dicom_series import find_series
from napari_sam2unet.errors import InputError
from napari_sam2unet.io import read_volume
from napari_sam2unet.seg_formats import read_dicom_seg

# --- helpers -----------------------------------------------------------------------------------


def _rotation(x_deg: float, z_deg: float) -> np.ndarray:
    a, c = np.radians(x_deg), np.radians(z_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx


# (row direction, column direction) in LPS: the plane of the images
ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "oblique": tuple(tuple(_rotation(20, 10) @ v) for v in ((1.0, 0, 0), (0, 1.0, 0))),
}


def write_series(folder: Path, block: np.ndarray, orientation: str = "axial", descending: bool = False,
                 spacing=(0.8, 0.7), step: float = 2.5, positions=None, slope: float = 1.0,
                 intercept: float = -1024.0, series_number: int = 7, study_uid: str | None = None,
                 names=None) -> list[Path]:
    """A CT series written with pydicom from `block` (columns, rows, slices) of stored values.

    Files get shuffled names and, when `descending`, instance 1 is the highest slice along the normal."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = (np.asarray(v, float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    columns, rows, count = block.shape
    origin = np.array([-40.3, 25.7, 110.2])
    offsets = positions if positions is not None else [k * step for k in range(count)]
    study, series, frame_of_reference = study_uid or generate_uid(), generate_uid(), generate_uid()
    order = list(range(count))[::-1] if descending else list(range(count))
    rng = np.random.default_rng(series_number)
    paths = []
    for instance, k in enumerate(order, start=1):
        ds = _ct_dataset(study, series, frame_of_reference, series_number)
        ds.InstanceNumber = instance
        ds.Rows, ds.Columns = rows, columns
        ds.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + offsets[k] * normal]
        ds.SliceThickness = f"{step:.6g}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(block[:, :, k].T.astype(np.int16)).tobytes()
        name = names[instance - 1] if names else f"{rng.integers(1 << 30):x}.dcm"
        paths.append(folder / name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _ct_dataset(study: str, series: str, frame_of_reference: str, number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", number, f"test series {number}"
    ds.PatientName, ds.PatientID, ds.StudyID, ds.AccessionNumber = "Test^Patient", "TEST01", "1", ""
    ds.StudyDate, ds.StudyTime, ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = (
        "20240101", "120000", "", "O", "")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    return ds


def ct_block(real_data: Path) -> np.ndarray:
    """A crop of a real CT (TotalSegmentator's example) as stored values (HU + 1024)."""
    image = nib.load(str(real_data / "totalseg" / "example_ct_sm.nii.gz"))
    return np.asarray(image.dataobj)[20:80, 15:65, 8:20].astype(np.int16) + 1024


def dcm2niix(folder: Path, out: Path) -> list[Path]:
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not installed (scripts/setup.sh --test installs it)")
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    return sorted(out.glob("*.nii"))


def assert_same_grid(ours, reference: nib.Nifti1Image, tolerance_mm: float = 1e-3) -> None:
    """Every voxel at the same place (1e-3 mm) with the same value, whatever the axis order and signs."""
    transform = np.linalg.inv(reference.affine) @ ours.affine  # our index -> the reference's index
    permutation = np.rint(transform[:3, :3])
    assert sorted(np.abs(permutation).sum(0)) == [1, 1, 1] and sorted(np.abs(permutation).sum(1)) == [1, 1, 1]
    shift = np.rint(transform[:3, 3])
    corners = np.array([[i, j, k, 1] for i in (0, ours.data.shape[0] - 1) for j in (0, ours.data.shape[1] - 1)
                        for k in (0, ours.data.shape[2] - 1)]).T
    mapped = np.vstack([permutation @ corners[:3] + shift[:, None], np.ones(8)])
    assert np.abs(ours.affine @ corners - reference.affine @ mapped).max() < tolerance_mm
    axes = [int(np.flatnonzero(permutation[:, a])[0]) for a in range(3)]
    data = np.transpose(np.asarray(reference.dataobj, dtype=np.float32), axes)
    for a in range(3):
        if permutation[axes[a], a] < 0:
            data = np.flip(data, a)
    assert data.shape == ours.data.shape
    np.testing.assert_array_equal(data, ours.data)


@pytest.fixture
def dicom_data(shared_data) -> Path:
    folder = shared_data / "dicom"
    if not folder.is_dir():
        pytest.skip("the real DICOM series are not in shared/data/dicom")
    return folder


# --- reading: geometry -------------------------------------------------------------------------


def test_plain_ct_agrees_with_dcm2niix(dicom_data, tmp_path):
    ours = read_volume(dicom_data / "philips_ct_phantom")
    (reference,) = dcm2niix(dicom_data / "philips_ct_phantom", tmp_path / "ref")
    assert_same_grid(ours, nib.load(str(reference)))
    assert ours.data.min() == -1024  # rescale intercept applied: HU
    assert ours.notes == [] and ours.spacing == pytest.approx((0.451171875, 0.451171875, 5.0))
    np.testing.assert_allclose(ours.affine, nib.load(str(reference)).affine, atol=1e-4)  # even the layout


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_written_series_agree_with_dcm2niix(real_data, tmp_path, orientation, descending):
    block = ct_block(real_data)
    write_series(tmp_path / "series", block, orientation, descending)
    ours = read_volume(tmp_path / "series")
    # Sorted along the normal whatever the file names and instance numbers: dcm2niix's layout.
    np.testing.assert_array_equal(ours.data, block[:, ::-1, :].astype(np.float32) - 1024)
    (reference,) = dcm2niix(tmp_path / "series", tmp_path / "ref")
    assert_same_grid(ours, nib.load(str(reference)))


def test_tilted_uneven_head_ct_is_resampled_onto_the_acquired_positions(dicom_data):
    """dcm2niix 1.0.20220720 writes this series with qform != sform (docs/dicom.md): the check is the
    DICOM standard's own geometry. Each acquired pixel, sampled from our grid at its position, comes back."""
    volume = read_volume(dicom_data / "ge_head_ct_tilt")
    assert "gantry tilt of 18.5 degrees" in volume.notes[0] and "uneven slice spacing" in volume.notes[0]
    first = volume.frames[0]
    stored = pydicom.dcmread(first.file).pixel_array * first.slope + first.intercept
    inverse = np.linalg.inv(volume.affine)
    for k, frame in enumerate(volume.frames):
        pixels = pydicom.dcmread(frame.file).pixel_array * frame.slope + frame.intercept
        j, i = np.mgrid[0:512:3, 0:512:3]
        lps = (frame.position[:, None, None] + i * frame.pixel_spacing[1] * frame.row_dir[:, None, None]
               + j * frame.pixel_spacing[0] * frame.col_dir[:, None, None])
        index = np.einsum("ab,bij->aij", inverse[:3, :3], np.einsum("ab,bij->aij", LPS_TO_RAS, lps))
        index += inverse[:3, 3][:, None, None]
        sampled = ndimage.map_coordinates(volume.data, index.reshape(3, -1), order=1, mode="nearest").reshape(i.shape)
        assert np.corrcoef(sampled.ravel(), pixels[j, i].ravel())[0, 1] > 0.99, k
    # the first acquired slice is kept voxel for voxel
    np.testing.assert_array_equal(volume.data[:, :512, 0], stored.T[:, ::-1].astype(np.float32))


def test_tilt_without_uneven_spacing_is_resampled_exactly(real_data, tmp_path):
    """A sheared stack of even slices: the resampled grid puts each acquired slice where it was."""
    block = ct_block(real_data)
    folder = tmp_path / "tilt"
    paths = write_series(folder, block)
    for k, path in enumerate(sorted(paths, key=lambda p: pydicom.dcmread(p).InstanceNumber)):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + 0.8 * k:.6f}", f"{z:.6f}"]  # one row further a slice
        ds.save_as(path)
    volume = read_volume(folder)
    assert "gantry tilt" in volume.notes[0] and volume.data.shape == (60, 50 + 11, 12)
    for k in range(12):  # whole-pixel shifts: each slice comes back exactly, shifted by k rows
        rows = slice(volume.data.shape[1] - 50 - k, volume.data.shape[1] - k)
        np.testing.assert_allclose(volume.data[:, rows, k], block[:, ::-1, k] - 1024.0, atol=1e-3)


def test_rle_compressed_series_reads_like_the_uncompressed(real_data, tmp_path):
    block = ct_block(real_data)
    paths = write_series(tmp_path / "plain", block)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_volume(tmp_path / "plain").data, block[:, ::-1, :] - 1024.0)


def test_enhanced_multiframe_object_reads_like_its_single_frames(real_data, tmp_path):
    hd = pytest.importorskip("highdicom")
    block = ct_block(real_data)
    paths = write_series(tmp_path / "single", block)
    legacy = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm", enforce_file_format=True)
    single, multi = read_volume(tmp_path / "single"), read_volume(tmp_path / "multi")
    np.testing.assert_array_equal(multi.data, single.data)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    assert multi.frames[0].frame is not None


def test_several_series_are_listed_and_one_is_chosen(real_data, tmp_path, capsys):
    block = ct_block(real_data)
    study = generate_uid()
    write_series(tmp_path / "study", block, series_number=3, study_uid=study)
    write_series(tmp_path / "study" / "sub", block[:, :, :6] + 100, series_number=4, study_uid=study)
    assert [s.number for s in find_series(tmp_path / "study")] == ["3", "4"]
    with pytest.raises(InputError, match=r"holds 2 series \(series 3: test series 3, CT, 12 images; "
                                         r"series 4: test series 4, CT, 6 images\); choose one with --series"):
        read_volume(tmp_path / "study")
    assert read_volume(tmp_path / "study", series="4").data.shape == (60, 50, 6)
    assert read_dicom(tmp_path / "study", "3").data.shape == (60, 50, 12)


# --- writing -----------------------------------------------------------------------------------


def _segment(image: Path, out: Path, card, box: str, *extra: str) -> None:
    assert main(["segment", str(image), "--box", box, "-o", str(out), "--model", str(card.card_path), "-q",
                 *extra]) == 0


@pytest.mark.parametrize("name, box", [("philips_ct_phantom", "14:150,150,360,360"),
                                       ("ge_head_ct_tilt", "10:150,150,360,360")])
def test_cli_writes_dicom_seg_and_slicer_files_on_the_right_voxels(dicom_data, tmp_path, brightness_card, name,
                                                                   box):
    slicerio = pytest.importorskip("slicerio", reason="slicerio is in the [testing] extra")
    series = dicom_data / name
    for out in ("grid.nii.gz", "seg.dcm", "seg.seg.nrrd"):
        _segment(series, tmp_path / out, brightness_card, box)
    labels = np.asarray(nib.load(str(tmp_path / "grid.nii.gz")).dataobj)
    volume = read_volume(series)
    assert labels.sum() > 100
    # DICOM-SEG: read back with highdicom, frame by frame of the source series
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    on_frames = read_dicom_seg(tmp_path / "seg.dcm", volume)
    np.testing.assert_array_equal(on_frames, labels_on_frames(labels, volume.affine, volume.frames))
    if name == "philips_ct_phantom":  # untilted: frame k is slice k of the grid, rows flipped
        np.testing.assert_array_equal(on_frames, np.transpose(labels[:, ::-1, :], (2, 1, 0)))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    segment = seg.SegmentSequence[0]
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (segment.SegmentLabel, algorithm.AlgorithmName) == ("label 1", brightness_card.name)
    assert algorithm.AlgorithmVersion == brightness_card.sha256
    assert len(segment.RecommendedDisplayCIELabValue) == 3
    # Slicer: names, colours, the same voxels and geometry
    slicer = slicerio.read_segmentation(str(tmp_path / "seg.seg.nrrd"))
    np.testing.assert_array_equal(slicer["voxels"], labels)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    np.testing.assert_allclose(slicer["ijkToLPS"], lps, atol=1e-5)
    assert [(s["name"], s["labelValue"]) for s in slicer["segments"]] == [("label 1", 1)]
    for sidecar, output in (("seg.json", "seg.dcm"), ("seg.seg.json", "seg.seg.nrrd")):
        record = json.loads((tmp_path / sidecar).read_text())
        assert record["model"]["sha256"] == brightness_card.sha256
        # the sidecar names the file it describes and its hash, as for NIfTI outputs
        digest = hashlib.sha256((tmp_path / output).read_bytes()).hexdigest()
        assert record["output"] == {"file": output, "sha256": digest}


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def _refused(capsys, tmp_path, image: Path, card, words: str, out: str = "seg.dcm", *extra: str) -> None:
    before = set(tmp_path.rglob("*"))
    code = main(["segment", str(image), "--box", "2:5,5,30,30", "-o", str(tmp_path / out), "--model",
                 str(card.card_path), "-q", *extra])
    error = capsys.readouterr().err
    assert code == 2, error
    assert words in error and error.count("\n") == 1 and "Traceback" not in error
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_a_folder_without_dicom_is_refused(tmp_path, capsys, brightness_card):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    _refused(capsys, tmp_path, tmp_path / "notes", brightness_card, "holds no DICOM images (1 files looked at)")


def test_mixed_series_without_a_choice_are_listed(real_data, tmp_path, capsys, brightness_card):
    block = ct_block(real_data)
    write_series(tmp_path / "mixed", block, series_number=3)
    write_series(tmp_path / "mixed", block[:, :, :5], series_number=5)
    _refused(capsys, tmp_path, tmp_path / "mixed", brightness_card, "choose one with --series NUMBER")
    _refused(capsys, tmp_path, tmp_path / "mixed", brightness_card, "no series 8 in", "seg.dcm", "--series", "8")


def test_a_missing_slice_is_named(real_data, tmp_path, capsys, brightness_card):
    block = ct_block(real_data)
    names = [f"im{k:02d}.dcm" for k in range(12)]
    write_series(tmp_path / "gap", block, names=names)
    (tmp_path / "gap" / "im06.dcm").unlink()
    _refused(capsys, tmp_path, tmp_path / "gap", brightness_card,
             "1 slice missing in series 7 between im05.dcm and im07.dcm (5 mm apart, the others 2.5 mm)")


def test_duplicate_positions_are_refused(real_data, tmp_path, capsys, brightness_card):
    block = ct_block(real_data)
    write_series(tmp_path / "dup", block, positions=[0, 2.5, 5, 5, 7.5, 10, 12.5, 15, 17.5, 20, 22.5, 25])
    _refused(capsys, tmp_path, tmp_path / "dup", brightness_card, "lie at the same position")


def test_other_orientations_or_sizes_within_a_series_are_refused(real_data, tmp_path, capsys,
                                                                 brightness_card):
    block = ct_block(real_data)
    paths = write_series(tmp_path / "turned", block)
    ds = pydicom.dcmread(paths[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(paths[3])
    _refused(capsys, tmp_path, tmp_path / "turned", brightness_card, "have different orientations in series 7")
    paths = write_series(tmp_path / "sized", block)
    ds = pydicom.dcmread(paths[3])
    ds.Rows, ds.PixelData = 40, ds.PixelData[: 40 * 60 * 2]
    ds.save_as(paths[3])
    _refused(capsys, tmp_path, tmp_path / "sized", brightness_card, "images of different sizes in series 7")


def test_a_corrupt_file_among_good_ones_is_named(real_data, tmp_path, capsys, brightness_card):
    block = ct_block(real_data)
    names = [f"im{k:02d}.dcm" for k in range(12)]
    write_series(tmp_path / "cut", block, names=names)
    bad = tmp_path / "cut" / "im04.dcm"
    whole = bad.read_bytes()
    bad.write_bytes(whole[:-3000])  # the copy stopped inside the pixels
    _refused(capsys, tmp_path, tmp_path / "cut", brightness_card, "cannot decode the pixels of im04.dcm")
    bad.write_bytes(whole[:400])  # ... or inside the header
    _refused(capsys, tmp_path, tmp_path / "cut", brightness_card, "im04.dcm in")
    # ... or inside a UID: pydicom's complaint about the cut value is not a second line
    uid_cut = whole.index(b"1.2.840.10008.") + len(b"1.2.840.10008.")
    bad.write_bytes(whole[:uid_cut])
    _refused(capsys, tmp_path, tmp_path / "cut", brightness_card, "im04.dcm in")


def test_a_compression_without_its_codec_names_the_package(real_data, tmp_path, capsys, brightness_card):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    block = ct_block(real_data)
    paths = write_series(tmp_path / "jpeg", block)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path)
    _refused(capsys, tmp_path, tmp_path / "jpeg", brightness_card,
             "and no decoder for it is installed: pip install python-gdcm or pip install pylibjpeg pylibjpeg-libjpeg")


def test_dicom_seg_of_a_nifti_input_is_refused(real_data, tmp_path, capsys, brightness_card):
    _refused(capsys, tmp_path, real_data / "totalseg" / "example_ct_sm.nii.gz", brightness_card,
             "a DICOM-SEG references the DICOM images it was made on, and example_ct_sm.nii.gz is not a DICOM series")


# --- napari: reader and writer hooks ------------------------------------------------------------


def _layer_meta(kwargs: dict, name: str = "labels") -> dict:
    from napari_sam2unet.provenance import META_KEY

    return {"name": name, "metadata": {META_KEY: kwargs["metadata"][META_KEY]}}


def test_napari_hooks_open_a_folder_and_save_dicom_seg(real_data, tmp_path):
    from napari_sam2unet._reader import get_reader, read_dicom_layers
    from napari_sam2unet._writer import write_dicom_seg_layer, write_seg_nrrd_layer

    block = ct_block(real_data)
    write_series(tmp_path / "series", block)
    assert get_reader(str(tmp_path / "series")) is read_dicom_layers
    assert get_reader(str(tmp_path / "nothing.tif")) is None
    ((data, kwargs, kind),) = read_dicom_layers(str(tmp_path / "series"))
    assert kind == "image" and kwargs["name"] == "series series 7" and data.shape == (60, 50, 12)
    labels = np.zeros(data.shape, np.uint8)
    labels[10:30, 5:25, 3:7] = 2
    (written,) = write_dicom_seg_layer(str(tmp_path / "out.dcm"), labels, _layer_meta(kwargs))
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(read_dicom_seg(written, volume), np.transpose(labels[:, ::-1, :], (2, 1, 0)))
    assert (tmp_path / "out.json").is_file()
    (nrrd_path,) = write_seg_nrrd_layer(str(tmp_path / "out.nrrd"), labels, _layer_meta(kwargs))
    assert nrrd_path.endswith("out.seg.nrrd")


@pytest.mark.gui
def test_napari_opens_a_dicom_folder_and_saves_a_dicom_seg(dicom_data, make_napari_viewer, tmp_path):
    from napari_sam2unet.provenance import META_KEY

    viewer = make_napari_viewer()
    (image,) = viewer.open(str(dicom_data / "philips_ct_phantom"), plugin="napari-sam2unet")
    assert image.data.shape == (512, 512, 28) and tuple(image.scale) == pytest.approx((0.451171875,) * 2 + (5.0,))
    labels = np.zeros(image.data.shape, np.uint8)
    labels[200:260, 220:300, 10:14] = 1
    layer = viewer.add_labels(labels, name="phantom labels", scale=image.scale,
                              metadata={META_KEY: image.metadata[META_KEY]})
    layer.save(str(tmp_path / "phantom.dcm"), plugin="napari-sam2unet")
    volume = read_volume(dicom_data / "philips_ct_phantom")
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "phantom.dcm", volume),
                                  np.transpose(labels[:, ::-1, :], (2, 1, 0)))


def test_batch_reads_a_dicom_series_folder(real_data, tmp_path, brightness_card):
    pytest.importorskip("distributed", reason="sam2unet batch needs the [cohort] extra")
    write_series(tmp_path / "p001", ct_block(real_data))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f'case,image,box\np001,{tmp_path / "p001"},"6:10,10,40,40"\n')
    command = ["batch", str(manifest), "-o", str(tmp_path / "out"), "--model", str(brightness_card.card_path),
               "--workers", "1", "-q"]
    assert main(command) == 0
    labels = nib.load(str(tmp_path / "out" / "p001.nii.gz"))
    np.testing.assert_allclose(labels.affine, read_volume(tmp_path / "p001").affine, atol=1e-6)
    assert main(command) == 0  # the same series and prompts: skipped, keyed by the folder's files
    assert "skipped" in (tmp_path / "out" / "report.csv").read_text()
