"""Label maps out in the format the output's name asks for: NIfTI, DICOM-SEG (.dcm) or 3D Slicer .seg.nrrd.

- DICOM-SEG (highdicom): references the source series frame by frame, one segment per label with
  its name, colour and the algorithm (model name, sha256 as its version). Labels on a resampled
  grid (gantry tilt, uneven spacing) are mapped back onto the acquired images.
- .seg.nrrd (pynrrd): Slicer's segmentation file, one label layer, segment names and colours.
Each is written with its provenance sidecar, both or neither (atomic.write_with_sidecar).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_with_sidecar
from .dicom_geometry import LPS_TO_RAS, labels_on_frames
from .errors import InputError
from .io import labels_on_grid, write_labels
from .label_files import Table
from .objects import label_colour
from .paths import check_output_path, is_nifti_path
from .volume import Volume

DICOM_SEG_SUFFIXES = (".dcm",)
SLICER_SUFFIX = ".seg.nrrd"


def output_kind(path: str | os.PathLike) -> str:
    """'nifti', 'dicom-seg' or 'seg.nrrd', from the name's ending."""
    name = str(path).lower()
    if is_nifti_path(name):
        return "nifti"
    if name.endswith(DICOM_SEG_SUFFIXES):
        return "dicom-seg"
    if name.endswith(SLICER_SUFFIX):
        return "seg.nrrd"
    raise InputError(f"output {Path(path).name} must end in .nii.gz or .nii (NIfTI), .dcm (DICOM-SEG) "
                     f"or .seg.nrrd (3D Slicer)")


def check_output(out: str | os.PathLike, source: Volume, overwrite: bool = False, sidecar: bool = False) -> Path:
    """Refuse an output that cannot be written for this input, before any work."""
    kind = output_kind(out)
    if kind == "dicom-seg" and not _is_dicom_volume(source):
        name = source.path.name if source.path else "this image"
        raise InputError(f"a DICOM-SEG references the DICOM images it was made on, and {name} is not a DICOM "
                         f"series: write .nii.gz or .seg.nrrd, or segment the DICOM series itself")
    return check_output_path(out, source, overwrite, sidecar, nifti=kind == "nifti")


def write_segmentation(
    path: str | os.PathLike,
    labels: np.ndarray,
    volume: Volume,
    sidecar: dict[str, Any] | None = None,
    overwrite: bool = False,
    table: Table | None = None,
    algorithm: tuple[str, str] | None = None,
) -> Path:
    """Write `labels` (on `volume`'s grid) as the output's name asks, with its sidecar: both or neither."""
    if output_kind(path) == "nifti":
        return write_labels(path, labels, volume, sidecar, overwrite)
    path = check_output(path, volume, overwrite, sidecar is not None)
    labels = labels_on_grid(labels, volume)
    table = full_table(labels, table)
    if output_kind(path) == "dicom-seg":
        dataset = dicom_seg(labels, volume, table, algorithm)
        suffix, write = ".dcm", lambda tmp: dataset.save_as(tmp, enforce_file_format=True)
    else:
        suffix, write = ".nrrd", lambda tmp: write_seg_nrrd(tmp, labels, volume.affine, table)
    return write_with_sidecar(path, suffix, write, sidecar, overwrite)  # the sidecar names its sha256, published last


def full_table(labels: np.ndarray, table: Table | None) -> Table:
    """Names and colours for every label present (and those asked for): the given ones, else defaults."""
    table = dict(table or {})
    for value in (int(v) for v in np.unique(labels) if v):
        table.setdefault(value, (f"label {value}", label_colour(value)))
    return dict(sorted(table.items()))


def layer_volume(volume: Volume, meta: dict) -> Volume:
    """The writer's Volume of a napari layer, with the DICOM frames its geometry carries (if any)."""
    from .dicom import DicomVolume
    from .provenance import META_KEY

    dicom = ((meta.get("metadata") or {}).get(META_KEY) or {}).get("dicom")
    if not dicom:
        return volume
    return DicomVolume(volume.data, volume.affine, volume.header, volume.path, volume.source_shape,
                       frames=list(dicom["frames"]), series_uid=dicom.get("series_uid", ""))


def last_model(runs: list[dict]) -> tuple[str, str] | None:
    """(name, sha256) of the model of the latest run that used one: the DICOM-SEG's algorithm."""
    for run in reversed(runs or []):
        model = run.get("model") if isinstance(run, dict) else None
        if model and model.get("name"):
            return str(model["name"]), str(model.get("sha256") or "")
    return None


def _is_dicom_volume(volume: Volume) -> bool:
    return bool(getattr(volume, "frames", None))


# --- DICOM-SEG ---------------------------------------------------------------------------------


def dicom_seg(labels: np.ndarray, volume: Volume, table: Table, algorithm: tuple[str, str] | None):
    """A highdicom Segmentation of the source series: one segment per label, frames of the source images."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    frames = volume.frames
    on_frames = labels_on_frames(labels, volume.affine, frames)
    if labels.any() and not on_frames.any():
        warnings.warn("the labelled voxels lie between the acquired images of this resampled series, so the "
                      "DICOM-SEG holds no segment voxels; label more slices or write .nii.gz / .seg.nrrd",
                      stacklevel=2)
    sources, order = _source_datasets(frames, pydicom)
    segments = np.zeros(on_frames.shape, dtype=np.uint16 if len(table) > 255 else np.uint8)
    descriptions = []
    for number, (value, (name, rgb)) in enumerate(table.items(), start=1):
        segments[on_frames == value] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type="AUTOMATIC" if algorithm else "MANUAL",
            algorithm_identification=_algorithm(hd, codes, algorithm),
            display_color=hd.color.CIELabColor.from_rgb(*rgb), tracking_id=f"label {value}", tracking_uid=hd.UID()))
    first = sources[0]
    with warnings.catch_warnings():  # highdicom judges the source's patient name: not ours to fix
        warnings.filterwarnings("ignore", message=".*person name.*")
        return _segmentation(hd, sources, segments[order], descriptions, first, algorithm)


def _segmentation(hd, sources, pixels, descriptions, first, algorithm):
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=_series_number(first), sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="napari-sam2unet", manufacturer_model_name=(algorithm[0] if algorithm else "manual")[:64],
        software_versions=__version__, device_serial_number="none", series_description="SAM2-UNet segmentation",
        omit_empty_frames=bool(pixels.any()))


def _source_datasets(frames, pydicom) -> tuple[list, np.ndarray]:
    """The source headers highdicom references and the order of our frames in its pixel array."""
    files = list(dict.fromkeys(f.file for f in frames))
    headers = [_with_type2(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    if len(files) == 1 and frames[0].frame is not None:  # one enhanced object: frames in stored order
        return headers, np.argsort([f.frame for f in frames])
    return headers, np.arange(len(frames))


# Patient and study attributes a SEG copies from its source; de-identified series often drop them
# although DICOM requires them present (empty is allowed).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName")


def _with_type2(dataset):
    for keyword in _TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    return dataset


def _algorithm(hd, codes, algorithm):
    if not algorithm:
        return None
    name, sha256 = algorithm
    return hd.AlgorithmIdentificationSequence(name=name[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=(sha256 or "unknown")[:64])


def _series_number(source) -> int:
    try:
        return int(source.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


def read_dicom_seg(path: str | os.PathLike, volume: Volume) -> np.ndarray:
    """A DICOM-SEG read back with highdicom as labels on `volume`'s source frames (frames, rows, columns)."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    values = {d.segment_number: int(d.tracking_id.split()[-1]) for d in seg.SegmentSequence}
    files = list(dict.fromkeys(f.file for f in volume.frames))
    if len(files) == 1 and volume.frames[0].frame is not None:
        numbers = [f.frame + 1 for f in volume.frames]
        stack = seg.get_pixels_by_source_frame(volume.frames[0].sop_uid, numbers, combine_segments=True)
    else:
        uids = [f.sop_uid for f in volume.frames]
        stack = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    out = np.zeros(stack.shape, dtype=np.uint16)
    for number, value in values.items():
        out[stack == number] = value
    return out


# --- 3D Slicer .seg.nrrd ------------------------------------------------------------------------


def write_seg_nrrd(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, table: Table) -> None:
    """One label layer; geometry in Slicer's LPS; segment names, colours and label values in the header."""
    import nrrd

    header: dict[str, Any] = {
        "type": labels.dtype.name,
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": (LPS_TO_RAS @ affine[:3, :3]).T,
        "space origin": LPS_TO_RAS @ affine[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, (value, (name, rgb)) in enumerate(table.items()):
        key = f"Segment{index}_"
        header[key + "ID"] = f"Segment_{value}"
        header[key + "Name"] = name
        header[key + "Color"] = " ".join(f"{c / 255:.6g}" for c in rgb)
        header[key + "ColorAutoGenerated"] = "0"
        header[key + "NameAutoGenerated"] = "0"
        header[key + "LabelValue"] = str(value)
        header[key + "Layer"] = "0"
        header[key + "Extent"] = _extent(labels == value)
    nrrd.write(str(path), labels, header, index_order="F")


def _extent(mask: np.ndarray) -> str:
    """Slicer's segment extent: first and last index along each axis ('0 -1 ...' when empty)."""
    if not mask.any():
        return " ".join(["0 -1"] * 3)
    bounds = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds += [str(hits[0]), str(hits[-1])]
    return " ".join(bounds)
