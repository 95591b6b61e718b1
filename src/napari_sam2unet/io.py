"""NIfTI in and out: the image's geometry is kept to the bit, nothing the user has is ever lost.

Reading refuses, in one line each, what cannot be segmented as it is (a folder, a truncated or
lying file, RGB, complex or float32-overflowing voxels, impossible voxel sizes) and hands DICOM
to dicom.py. A label map written here opens aligned with its image in 3D Slicer and ITK-SNAP:
its header is the source's header (qform, sform, their codes, voxel sizes, units) with only the
data type, scaling and intent changed; it is published with its sidecar, both or neither
(atomic.py), after paths.py has checked the output path.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import write_with_sidecar
from .errors import InputError
from .paths import check_output_path, first_line, is_nifti_path, os_error_text
from .volume import Volume, check_memory

# The NIfTI intent code for label maps (NIFTI_INTENT_LABEL): written here, read by the napari reader.
INTENT_LABEL = 1002
# nibabel's words for a file that holds fewer voxel bytes than its header promises.
_SHORT_READ = re.compile(r"Expected (\d+) bytes, got (\d+) bytes")
# Header fields that place voxels in space: copied from the image to its labels unchanged.
_GEOMETRY_FIELDS = ("pixdim", "xyzt_units", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")


# --- reading -------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, volume_index: int | None = None, series: str | None = None) -> Volume:
    """Read a .nii/.nii.gz file as a 3D float32 volume (2D: one slice; 4D: one volume), or a DICOM
    series (a folder, DICOMDIR or file of it; `series`: its number or UID where there are several)."""
    path = Path(path)
    if not is_nifti_path(path):
        from .dicom import read_dicom
        from .dicom_series import is_dicom_input

        if is_dicom_input(path):
            return read_dicom(path, series)
    try:
        _check_input_path(path)
    except PermissionError as error:  # a folder on the way that the user may not search
        raise InputError(os_error_text(f"cannot read {path}", error, "check the folders' permissions")) from None
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    _check_voxel_type(path, image.get_data_dtype())
    _check_vox_offset(path, image)
    notes: list[str] = []
    # Trailing singleton dimensions (X, Y, Z, 1, 1) are common and harmless.
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 4 or len(squeezed) < 2:
        raise InputError(f"{path.name} has shape {shape}; expected a 2D, 3D or 4D image")
    if min(squeezed) == 0:
        raise InputError(f"{path.name} has an empty dimension (shape {shape})")
    check_memory(path.name, squeezed[:3], "crop or resample it first (e.g. in 3D Slicer: Crop Volume)")
    if len(squeezed) == 4:
        count = squeezed[3]
        index = 0 if volume_index is None else volume_index
        if not 0 <= index < count:
            raise InputError(f"{path.name} has {count} volumes; choose a volume index from 0 to {count - 1}")
    try:
        if len(squeezed) == 4:
            # Only the volume used is read and scaled: the whole 128^3 x 200 file with scl_slope
            # as float64 peaked at 4 GB for one 8 MiB volume.
            data = np.asarray(image.dataobj[(slice(None),) * 3 + (index,) + (0,) * (len(shape) - 4)])
            _check_gzip_end(path)
            notes.append(f"{path.name} is 4D with {count} volumes: using volume {index}")
        else:
            data = np.asarray(image.dataobj, dtype=None)
            _check_gzip_end(path)
            data = data.reshape(squeezed)
        if len(squeezed) == 2:
            data = data[..., np.newaxis]
            notes.append(f"{path.name} is a 2D image: treated as a volume of one slice")
        data = _as_float32(path, data)
    except InputError:
        raise
    except OSError as error:  # nibabel reports a file shorter than its header says as OSError too
        short = _SHORT_READ.search(str(error))
        raise InputError(_corrupt_text(path, error) if short else
                         os_error_text(f"cannot read {path.name}", error, "check the file")) from None
    except Exception as error:
        raise InputError(_corrupt_text(path, error)) from None
    volume = Volume(data=data, affine=image.affine.copy(), header=_raw_header(path, image), path=path,
                    source_shape=shape, notes=notes)
    _check_spacing(path, volume.spacing)
    return volume


def _check_gzip_end(path: Path) -> None:
    """Read a .nii.gz to its end: gzip checks its CRC only there, and nibabel stops after the
    voxels, so damage in the middle of the stream would pass as wrong voxels."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path.name} is corrupt ({first_line(error)}): its voxels are not what was saved; "
                         f"copy or export it again") from None


def _raw_header(path: Path, image: nib.Nifti1Image) -> nib.Nifti1Header:
    """The header as it is on disk. nibabel's load tidies it (negative or zero pixdim made
    positive), and label maps written with the tidied header sit elsewhere in ITK than the image."""
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except Exception:  # nibabel read it once already; its own copy is the next best
        return image.header.copy()


def _check_input_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image: give a .nii or .nii.gz file "
                         f"(convert a DICOM folder with dcm2niix)")
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if not is_nifti_path(path):
        raise InputError(f"{path.name} is not a NIfTI file: open a .nii or .nii.gz image (convert DICOM with dcm2niix)")


def _load(path: Path) -> nib.Nifti1Image:
    try:
        open(path, "rb").close()  # nibabel calls a file it may not read "not NIfTI"
        image = nib.load(str(path))
    except OSError as error:  # permissions, I/O: the file may well be complete
        raise InputError(os_error_text(f"cannot read {path.name}", error, "check the file's permissions")) from None
    except Exception as error:  # nibabel raises many types for broken headers
        raise InputError(f"cannot read {path.name} as NIfTI ({first_line(error)}); is the file complete?") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path.name} is not a NIfTI-1 or NIfTI-2 image")
    return image


def _check_vox_offset(path: Path, image: nib.Nifti1Image) -> None:
    """A single-file NIfTI-1 keeps its voxels after its 348-byte header and 4 extension bytes: a
    smaller vox_offset (the standard requires 352 or more) would read the header as voxels."""
    offset = getattr(image.dataobj, "offset", None)  # where nibabel will read (its header shows 0)
    if bytes(image.header["magic"]).rstrip(b"\0") == b"n+1" and offset is not None and offset < 352:
        raise InputError(f"{path.name} says its voxels start at byte {int(offset)} (vox_offset), "
                         f"inside its 352-byte header; the file is damaged: export it again")


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    """Intensities we can segment: one real number per voxel."""
    if dtype.fields is not None:
        raise InputError(f"{path.name} is a colour (RGB) image; segment a greyscale scan "
                         f"(convert it to one channel first)")
    if dtype.kind == "c":
        raise InputError(f"{path.name} holds complex values; save its magnitude (or phase) as a real image "
                         f"and segment that")


def _as_float32(path: Path, data: np.ndarray) -> np.ndarray:
    """float32, refusing finite intensities that float32 cannot hold (they would become Inf)."""
    converted = np.asarray(data, dtype=np.float32)
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        overflow = ~np.isfinite(converted)
        if overflow.any() and np.isfinite(data[overflow]).any():
            top = float(np.max(np.abs(data[overflow][np.isfinite(data[overflow])])))
            raise InputError(f"{path.name} has intensities up to {top:.3g}, beyond float32 (about 3.4e38); "
                             f"rescale the image (e.g. divide it by a power of ten) and try again")
    return converted


def _check_spacing(path: Path, spacing: tuple[float, float, float]) -> None:
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{path.name} gives voxel sizes {_sizes(spacing)} in its header (pixdim); "
                         f"fix them to positive sizes in mm, e.g. with nibabel or 3D Slicer")


def _sizes(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _corrupt_text(path: Path, error: BaseException) -> str:
    """A header that promises more voxels than the file holds, in words; else nibabel's own."""
    short = _SHORT_READ.search(str(error))
    if short:
        return (f"{path.name} is truncated: its header promises {short[1]} bytes of voxels but the file holds "
                f"{short[2]}; copy or export it again")
    return f"{path.name} is truncated or corrupt ({first_line(error)}); export it again"


# --- label maps ------------------------------------------------------------------------------


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """uint8 up to 255 labels, uint16 up to 65535."""
    top = int(labels.max()) if labels.size else 0
    if int(labels.min(initial=0)) < 0:
        raise InputError("label values must be 0 or positive")
    if top <= 255:
        return np.dtype(np.uint8)
    if top <= 65535:
        return np.dtype(np.uint16)
    raise InputError(f"label value {top} is above 65535; renumber the labels")


def label_array(labels: np.ndarray) -> np.ndarray:
    """Labels as uint8/uint16; fractional or NaN values are refused, never truncated."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iuf":
        raise InputError(f"label maps hold whole numbers; this one holds {labels.dtype}")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise InputError(f"label values must be whole numbers; found {labels[bad].flat[0]:g}: "
                             f"round or threshold the map first")
    return labels.astype(labels_dtype(labels))


def labels_on_grid(labels: np.ndarray, like: Volume) -> np.ndarray:
    """`labels` as label_array gives them, refused unless they lie on `like`'s voxel grid."""
    if np.shape(labels) != like.data.shape:
        raise InputError(f"label map shape {np.shape(labels)} does not match the image {like.data.shape}")
    return label_array(labels)


def labels_image(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """A NIfTI image of a label map with `like`'s header: geometry fields copied, never recomputed."""
    array = labels_on_grid(labels, like)
    if len(like.source_shape) == 2:
        array = array[..., 0]
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # affine=None: nibabel keeps the header's qform, sform, codes and pixdim as they are
    # (given an affine it would recompute pixdim from it, which moves the labels in ITK).
    image = image_class(array, None, header=header)
    for key in _GEOMETRY_FIELDS:  # the image class tidies the header it is given (|pixdim|): undo that
        image.header[key] = like.header[key]
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(array.max(initial=0))
    image.header.set_intent(INTENT_LABEL)
    image.header["descrip"] = b"napari-sam2unet labels"
    return image


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: Volume,
    sidecar: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label map with `like`'s geometry and optionally a JSON sidecar: both or neither."""
    path = check_output_path(path, like, overwrite, sidecar is not None)
    image = labels_image(labels, like)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    return write_with_sidecar(path, suffix, lambda tmp: nib.save(image, tmp), sidecar, overwrite)

