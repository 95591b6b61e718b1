"""NIfTI in and out: the image's geometry is kept to the bit, writes are atomic.

A label map written here opens aligned with its image in 3D Slicer and ITK-SNAP: it carries
the source's qform and sform (with their codes), voxel sizes and orientation.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The NIfTI intent code for label maps (NIFTI_INTENT_LABEL).
_INTENT_LABEL = 1002
# Refuse volumes that would need more than this share of the free memory as float32.
_MEMORY_SHARE = 0.5


@dataclass
class Volume:
    """A 3D image with the geometry of the file it came from."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None
    source_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes along the three array axes (mm)."""
        zooms = tuple(float(z) for z in self.header.get_zooms()[:3])
        return zooms + (1.0,) * (3 - len(zooms))

    @property
    def orientation(self) -> str:
        """Axis codes of the array axes, e.g. 'RAS' or 'LPS'."""
        return "".join(nib.aff2axcodes(self.affine))


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _free_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def read_volume(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read a .nii/.nii.gz file as a 3D float32 volume (2D: one slice; 4D: one volume)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; check the path")
    if not is_nifti_path(path):
        raise InputError(f"{path.name} is not a NIfTI file: open a .nii or .nii.gz image (convert DICOM with dcm2niix)")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for broken headers
        raise InputError(f"cannot read {path.name} as NIfTI ({_first_line(error)}); is the file complete?") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path.name} is not a NIfTI-1 or NIfTI-2 image")
    shape = tuple(int(n) for n in image.shape)
    notes: list[str] = []
    # Trailing singleton dimensions (X, Y, Z, 1, 1) are common and harmless.
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 4 or len(squeezed) < 2:
        raise InputError(f"{path.name} has shape {shape}; expected a 2D, 3D or 4D image")
    if min(squeezed) == 0:
        raise InputError(f"{path.name} has an empty dimension (shape {shape})")
    _check_memory(path, squeezed[:3])
    try:
        data = np.asarray(image.dataobj, dtype=None)
        data = data.reshape(squeezed)
        if len(squeezed) == 4:
            count = squeezed[3]
            index = 0 if volume_index is None else volume_index
            if not 0 <= index < count:
                raise InputError(f"{path.name} has {count} volumes; choose a volume index from 0 to {count - 1}")
            data = data[..., index]
            notes.append(f"{path.name} is 4D with {count} volumes: using volume {index}")
        elif len(squeezed) == 2:
            data = data[..., np.newaxis]
            notes.append(f"{path.name} is a 2D image: treated as a volume of one slice")
        data = np.asarray(data, dtype=np.float32)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path.name} is truncated or corrupt ({_first_line(error)}); export it again") from None
    return Volume(data=data, affine=image.affine.copy(), header=image.header.copy(), path=path,
                  source_shape=shape, notes=notes)


def _check_memory(path: Path, shape: tuple[int, ...]) -> None:
    needed = int(np.prod(shape, dtype=np.int64)) * 4
    free = _free_memory_bytes()
    if free is not None and needed > free * _MEMORY_SHARE:
        raise InputError(
            f"{path.name} ({'x'.join(map(str, shape))} voxels) needs {needed / 2**30:.1f} GiB as float32 but only "
            f"{free / 2**30:.1f} GiB is free; crop or resample it first (e.g. in 3D Slicer: Crop Volume)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def check_output_path(out: str | os.PathLike, source: Volume | None = None, overwrite: bool = False) -> Path:
    """Refuse output paths that would lose the user's data or could not be read back."""
    out = Path(out)
    if not is_nifti_path(out):
        raise InputError(f"output {out.name} must end in .nii.gz or .nii")
    if source is not None and source.path is not None and out.resolve() == source.path.resolve():
        raise InputError(f"the output {out} is the input image; choose another --out path")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another path or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the folder {out.parent} does not exist; create it first")
    return out


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


def labels_image(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """A NIfTI image of a label map in the geometry of `like` (its qform, sform, codes, zooms)."""
    if labels.shape != like.data.shape:
        raise InputError(f"label map shape {labels.shape} does not match the image {like.data.shape}")
    array = np.asarray(labels).astype(labels_dtype(labels))
    if len(like.source_shape) == 2:
        array = array[..., 0]
    header = like.header.copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(array, like.affine, header=header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(array.max(initial=0))
    image.header.set_intent(_INTENT_LABEL)
    image.header["descrip"] = b"napari-sam2unet labels"
    qform, qcode = like.header.get_qform(coded=True)
    sform, scode = like.header.get_sform(coded=True)
    image.set_qform(qform if qform is not None else like.affine, code=int(qcode or 0))
    image.set_sform(sform if sform is not None else like.affine, code=int(scode or 0))
    return image


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: Volume,
    sidecar: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label map with `like`'s geometry, atomically; optionally a JSON sidecar beside it."""
    path = check_output_path(path, like, overwrite)
    image = labels_image(labels, like)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    _atomic_write(path, suffix, lambda tmp: nib.save(image, tmp))
    if sidecar is not None:
        sidecar_path = sidecar_path_for(path)
        text = json.dumps(sidecar, indent=2, default=str)
        _atomic_write(sidecar_path, ".json", lambda tmp: Path(tmp).write_text(text))
    return path


def sidecar_path_for(path: Path) -> Path:
    return path.with_name(_stem(path) + ".json")


def _atomic_write(path: Path, suffix: str, write) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{_stem(path)}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
