"""DICOM series in: a folder (or DICOMDIR) of CT/MR images becomes the same Volume a NIfTI gives.

The array and affine are laid out as dcm2niix writes the series (array axes: column, row counted
from the last, slice; affine in RAS mm), so prompts in voxel indices mean the same voxels whether
a user opens the folder or dcm2niix's NIfTI of it. Slices are sorted by their position along the
slice normal, pixels are rescaled (CT in HU). A gantry tilt or uneven slice spacing is resampled
by linear interpolation onto a regular grid perpendicular to the slices (docs/dicom.md); every
source frame is kept, so results map back onto the acquired images (DICOM-SEG). Finding the
series is dicom_series.py's job, their geometry dicom_geometry.py's; this module assembles pixels.

pydicom parses the files and decodes compressed pixel data through the codec packages it supports.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom_geometry import Grid, plan_grid, sort_and_check
from .dicom_series import Frame, choose_series, find_series
from .errors import InputError
from .paths import first_line
from .volume import Volume, check_memory


@dataclass
class DicomVolume(Volume):
    """A Volume read from DICOM: its source frames, sorted along the normal, for writing DICOM-SEG."""

    frames: list[Frame] = field(default_factory=list)
    series_uid: str = ""
    resampled: bool = False


def read_dicom(path: str | os.PathLike, series: str | None = None) -> DicomVolume:
    """Read one DICOM series (a folder, DICOMDIR or file of it) as a float32 volume, geometry as dcm2niix."""
    where = Path(path)
    chosen = choose_series(find_series(where), series, where)
    label = chosen.line().split(":")[0]
    frames = sort_and_check(chosen.frames, label)
    grid, notes = plan_grid(frames, label)
    check_memory(f"the series in {where}", grid.size)
    if notes:
        data = _resample(frames, grid)
    else:
        data = _stack(frames)
    affine = grid.affine()
    return DicomVolume(data=data, affine=affine, header=_header(data.shape, affine), path=where,
                       source_shape=tuple(data.shape), notes=notes, frames=frames, series_uid=chosen.uid,
                       resampled=bool(notes))


def _header(shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI header with this geometry (scanner space, codes 1, as dcm2niix writes)."""
    image = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), affine)
    header = image.header
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def _stack(frames: list[Frame]) -> np.ndarray:
    """Pixels in dcm2niix's layout, written slice by slice into one Fortran-ordered array."""
    rows, columns = frames[0].size
    data = np.empty((columns, rows, len(frames)), dtype=np.float32, order="F")
    for k, pixels in enumerate(_pixels(frames)):
        data[:, :, k] = pixels.T[:, ::-1]
    return data


def _pixels(frames: list[Frame]):
    """Rescaled float32 pixels (rows, columns) of each frame in turn; a multi-frame file is read once."""
    cache: dict[Path, np.ndarray] = {}
    for frame in frames:
        if frame.frame is None:
            pixels = _decode(frame.file)
        else:
            if frame.file not in cache:
                cache.clear()
                cache[frame.file] = _decode(frame.file)
            pixels = cache[frame.file][frame.frame]
        if pixels.shape[-2:] != frame.size or pixels.ndim != 2:
            raise InputError(f"{frame.name} holds pixels of shape {pixels.shape}, not one greyscale "
                             f"{frame.size[0]}x{frame.size[1]} image; segment a greyscale series")
        scaled = pixels.astype(np.float32)
        if frame.slope != 1.0:
            scaled *= np.float32(frame.slope)
        if frame.intercept != 0.0:
            scaled += np.float32(frame.intercept)
        yield scaled


def _decode(file: Path) -> np.ndarray:
    """The stored pixel values of a file: a missing codec or a truncated file named, in one line."""
    import pydicom

    try:
        dataset = pydicom.dcmread(file)
        syntax = dataset.file_meta.TransferSyntaxUID
    except Exception as error:
        raise InputError(f"{file.name} in {file.parent} is a corrupt DICOM file ({first_line(error)}); "
                         f"remove it or export the series again") from None
    if syntax.is_compressed:
        _check_codec(file, syntax)
    try:
        return dataset.pixel_array
    except Exception as error:
        raise InputError(f"cannot decode the pixels of {file.name} in {file.parent} ({first_line(error)}); "
                         f"the file is truncated or corrupt: export the series again") from None


def _check_codec(file: Path, syntax) -> None:
    """Name the package to install when pydicom has no decoder for this compression."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise InputError(f"{file.name} is compressed as {syntax.name}, which pydicom cannot decode; "
                         f"decompress the series first (e.g. gdcmconv --raw)") from None
    if decoder.is_available:
        return
    options = [_install_hint(text) for text in decoder.missing_dependencies]
    raise InputError(f"{file.name} is compressed as {syntax.name} and no decoder for it is installed: "
                     f"pip install {' or pip install '.join(options)}")


def _install_hint(text: str) -> str:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> 'pylibjpeg pylibjpeg-libjpeg'."""
    wanted = text.split("requires", 1)[-1]
    names = re.findall(r"([A-Za-z][\w.-]*)\s*(?:[<>=]=?[\d.]+)?", wanted.replace(" and ", " "))
    return " ".join("python-gdcm" if n == "gdcm" else n for n in names)


def _resample(frames: list[Frame], grid: Grid) -> np.ndarray:
    """Each output voxel interpolated linearly from the two acquired slices around it (exact geometry)."""
    from scipy import ndimage

    first = frames[0]
    normal = first.normal
    dy, dx = first.pixel_spacing
    offsets = np.array([(f.position - first.position) @ normal for f in frames])
    rows, columns, count = grid.size
    spacing = float(np.linalg.norm(grid.step))
    data = np.empty((columns, rows, count), dtype=np.float32, order="F")
    cache: dict[int, np.ndarray] = {}
    source = _pixels(frames)

    def load(k: int) -> np.ndarray:
        """Acquired slice k; slices are read in order and only two are kept."""
        while max(cache, default=-1) < k:
            cache[max(cache, default=-1) + 1] = next(source)
        for old in [i for i in cache if i < k - 1]:
            del cache[old]
        return cache[k]

    fill = float(min(load(0).min(), 0.0))  # outside every acquired slice: the darkest value (air)

    def plane(k: int) -> np.ndarray:
        """Slice k shifted onto the output's in-plane grid (a translation: linear interpolation)."""
        move = frames[k].position - grid.origin
        shift = np.array([-(move @ first.col_dir) / dy, -(move @ first.row_dir) / dx])
        whole = np.rint(shift)
        shift = np.where(np.abs(shift - whole) < 1e-4, whole, shift)  # whole pixels copy exactly
        return ndimage.affine_transform(load(k), np.ones(2), offset=shift, output_shape=(rows, columns),
                                        order=1, mode="constant", cval=fill)

    for m in range(count):
        where = m * spacing
        k = int(min(np.searchsorted(offsets, where + 1e-6, side="right") - 1, len(frames) - 2))
        k = max(k, 0)
        weight = (where - offsets[k]) / (offsets[k + 1] - offsets[k])
        weight = float(np.clip(weight, 0.0, 1.0))
        below = plane(k)
        mixed = below if weight < 1e-9 else (1 - weight) * below + weight * plane(k + 1)
        data[:, :, m] = mixed.T[:, ::-1]
    return data
