"""DICOM series in: a folder (or DICOMDIR) of CT/MR images becomes the same Volume a NIfTI gives.

The array and affine are laid out as dcm2niix writes the series (array axes: column, row counted
from the last, slice; affine in RAS mm), so prompts in voxel indices mean the same voxels whether
a user opens the folder or dcm2niix's NIfTI of it. Slices are sorted by their position along the
slice normal, pixels are rescaled (CT in HU). A gantry tilt or uneven slice spacing is resampled
by linear interpolation onto a regular grid perpendicular to the slices (docs/dicom.md); every
source frame is kept, so results map back onto the acquired images (DICOM-SEG).

pydicom parses the files and decodes compressed pixel data through the codec packages it supports.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError
from .io import Volume, available_memory_bytes

# DICOM's patient space is LPS; NIfTI affines (and nibabel's) are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Two slices closer than this along the normal (mm) are the same position.
_SAME_POSITION_MM = 1e-3
# Slice gaps within this share of the typical gap are even (scanners round positions).
_GAP_TOLERANCE = 0.01
# An in-plane offset between slices above this (mm) is a gantry tilt (or a sheared stack).
_TILT_MM = 1e-2
# Directions closer than this (cosines) are the same orientation.
_ORIENTATION_TOLERANCE = 1e-4
# Objects that are not images to segment: DICOM-SEG, RT structures, presentation states, reports.
_NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.11",
               "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.104")
_MEMORY_SHARE = 0.5
# Media Storage Directory (DICOMDIR and vendors' index files such as Philips' DIRFILE).
_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class Frame:
    """One image plane of a series: where it lies and where its pixels are stored."""

    file: Path
    frame: int | None  # index in a multi-frame (enhanced) object; None for a single-frame file
    position: np.ndarray  # ImagePositionPatient: the centre of the first pixel, LPS mm
    row_dir: np.ndarray  # direction of increasing column index (first three of ImageOrientationPatient)
    col_dir: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    size: tuple[int, int]  # (rows, columns)
    slope: float = 1.0
    intercept: float = 0.0
    sop_uid: str = ""

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


@dataclass
class Series:
    """The image frames of one series, as found in a folder."""

    uid: str
    number: str
    description: str
    modality: str
    frames: list[Frame] = field(default_factory=list)
    transfer_syntax: str = ""

    def line(self) -> str:
        return (f"series {self.number or '?'}: {self.description or '(no description)'}, {self.modality or '?'}, "
                f"{len(self.frames)} images")


@dataclass
class DicomVolume(Volume):
    """A Volume read from DICOM: its source frames, sorted along the normal, for writing DICOM-SEG."""

    frames: list[Frame] = field(default_factory=list)
    series_uid: str = ""
    resampled: bool = False


# --- finding series ----------------------------------------------------------------------------


def is_dicom_input(path: str | os.PathLike) -> bool:
    """A folder, a DICOMDIR, or a file that starts like DICOM (the 'DICM' magic)."""
    path = Path(path)
    if path.is_dir() or path.name.upper() == "DICOMDIR":
        return True
    return path.is_file() and _has_magic(path)


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def find_series(path: str | os.PathLike) -> list[Series]:
    """Every image series under a folder (or beside a DICOMDIR or DICOM file), in series-number order."""
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root} does not exist; check the path")
    files = _candidate_files(root)
    series: dict[str, Series] = {}
    for file in files:
        dataset = _read_header(file)
        if dataset is None:
            continue
        entry = series.get(str(dataset.SeriesInstanceUID))
        if entry is None:
            entry = series[str(dataset.SeriesInstanceUID)] = _new_series(dataset)
        entry.frames.extend(_frames(dataset, file))
    if not series:
        raise InputError(f"{root} holds no DICOM images ({len(files)} files looked at); "
                         f"give the folder of a CT or MR series, or a .nii/.nii.gz file")
    return sorted(series.values(), key=lambda s: (_as_number(s.number), s.uid))


def folder_sha256(folder: Path) -> str:
    """One hash of a series folder: each file's relative name and content (batch keys its outputs by it)."""
    import hashlib

    from .models import sha256_file

    digest = hashlib.sha256()
    for file in _candidate_files(Path(folder)):
        digest.update(f"{file.relative_to(folder)}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _candidate_files(root: Path) -> list[Path]:
    if root.is_file() and root.name.upper() != "DICOMDIR":
        return [root]
    folder = root.parent if root.is_file() else root
    files = []
    for base, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(base) / n for n in sorted(names) if not n.startswith(".") and n.upper() != "DICOMDIR")
    return files


def _read_header(file: Path):
    """The header of a DICOM image file; None for files that are not DICOM images."""
    import pydicom

    if not _has_magic(file):
        return None  # notes, scripts, non-DICOM files: not ours to judge
    try:
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception as error:
        raise InputError(f"{file.name} in {file.parent} is a corrupt DICOM file ({_first_line(error)}); "
                         f"remove it or export the series again") from None
    sop_class = str(dataset.get("SOPClassUID", "") or _meta(dataset, "MediaStorageSOPClassUID"))
    if sop_class == _DIRECTORY or sop_class.startswith(_NOT_IMAGES):
        return None  # DICOMDIR-like indexes, reports, segmentations
    if "Rows" not in dataset or "SeriesInstanceUID" not in dataset:
        if "Rows" not in dataset and ("ImagePositionPatient" in dataset or _meta(dataset, "MediaStorageSOPClassUID")):
            # an image's header that stops early: pydicom reads what is there without complaint
            raise InputError(f"{file.name} in {file.parent} is a corrupt DICOM file (its header ends early); "
                             f"remove it or export the series again")
        return None
    return dataset


def _meta(dataset, keyword: str) -> str:
    return str(getattr(getattr(dataset, "file_meta", None), keyword, "") or "")


def _new_series(dataset) -> Series:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "")
    return Series(uid=str(dataset.SeriesInstanceUID), number=str(dataset.get("SeriesNumber", "") or ""),
                  description=str(dataset.get("SeriesDescription", "") or ""),
                  modality=str(dataset.get("Modality", "") or ""), transfer_syntax=str(syntax))


def _frames(dataset, file: Path) -> list[Frame]:
    """One Frame per image plane: one for a classic image, NumberOfFrames for an enhanced object."""
    try:
        if "PerFrameFunctionalGroupsSequence" in dataset:
            return _enhanced_frames(dataset, file)
        return [_frame(dataset, dataset, dataset, file, None)]
    except InputError:
        raise
    except (AttributeError, KeyError, IndexError, ValueError, TypeError) as error:
        raise InputError(f"{file.name} lacks the geometry of its image ({_first_line(error)}); "
                         f"it cannot be placed in space: remove it or export the series again") from None


def _enhanced_frames(dataset, file: Path) -> list[Frame]:
    shared = dataset.get("SharedFunctionalGroupsSequence", [None])[0]
    frames = []
    for index, group in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        def pick(name, group=group):
            item = group.get(name) if name in group else None
            return (item or shared.get(name))[0]

        measures = pick("PixelMeasuresSequence")
        orientation = pick("PlaneOrientationSequence")
        position = pick("PlanePositionSequence")
        try:
            scaling = pick("PixelValueTransformationSequence")
        except (TypeError, AttributeError):
            scaling = dataset
        frames.append(_frame(dataset, position, orientation, file, index, measures, scaling))
    return frames


def _frame(dataset, position, orientation, file, index, measures=None, scaling=None) -> Frame:
    cosines = np.asarray([float(v) for v in orientation.ImageOrientationPatient], dtype=float)
    spacing = (measures or dataset).PixelSpacing
    scaling = dataset if scaling is None else scaling
    return Frame(file=file, frame=index, position=np.asarray([float(v) for v in position.ImagePositionPatient]),
                 row_dir=cosines[:3], col_dir=cosines[3:], pixel_spacing=(float(spacing[0]), float(spacing[1])),
                 size=(int(dataset.Rows), int(dataset.Columns)), slope=float(scaling.get("RescaleSlope", 1) or 1),
                 intercept=float(scaling.get("RescaleIntercept", 0) or 0), sop_uid=str(dataset.SOPInstanceUID))


def choose_series(series: list[Series], choice: str | None, where: Path) -> Series:
    """The one series, or the one the user chose by number or UID; else the list to choose from."""
    if choice is None:
        if len(series) == 1:
            return series[0]
        listing = "; ".join(s.line() for s in series)
        raise InputError(f"{where} holds {len(series)} series ({listing}); choose one with --series NUMBER")
    matches = [s for s in series if choice in (s.number, s.uid)]
    if len(matches) != 1:
        listing = "; ".join(s.line() for s in series)
        why = "no" if not matches else f"{len(matches)} series match"
        raise InputError(f"{why} series {choice} in {where} ({listing}); give a series number or UID from the list")
    return matches[0]


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


# --- geometry ----------------------------------------------------------------------------------


@dataclass
class Grid:
    """A regular grid in the DICOM frame of the first slice: where each output voxel lies."""

    origin: np.ndarray  # LPS position of output pixel (row 0, column 0) of slice 0
    row_dir: np.ndarray
    col_dir: np.ndarray
    step: np.ndarray  # LPS vector from one output slice to the next
    pixel_spacing: tuple[float, float]
    size: tuple[int, int, int]  # (rows, columns, slices)

    def affine(self) -> np.ndarray:
        """RAS affine of the array laid out as dcm2niix does: (column, rows from the last, slice)."""
        rows, columns, _ = self.size
        dy, dx = self.pixel_spacing
        last_row = self.origin + (rows - 1) * dy * self.col_dir
        affine = np.eye(4)
        affine[:3, 0] = _LPS_TO_RAS @ (dx * self.row_dir)
        affine[:3, 1] = _LPS_TO_RAS @ (-dy * self.col_dir)
        affine[:3, 2] = _LPS_TO_RAS @ self.step
        affine[:3, 3] = _LPS_TO_RAS @ last_row
        return affine


def sort_and_check(frames: list[Frame], series: str) -> list[Frame]:
    """Frames sorted along the slice normal; one orientation, size and spacing, no duplicates."""
    first = frames[0]
    for frame in frames[1:]:
        _check_same(first, frame, series)
    normal = first.normal
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    offsets = np.array([f.position @ normal for f in frames])
    gaps = np.diff(offsets)
    for k in np.flatnonzero(gaps < _SAME_POSITION_MM):
        a, b = frames[k], frames[k + 1]
        raise InputError(f"{_name(a)} and {_name(b)} lie at the same position ({_mm(a.position)}) in {series}: "
                         f"the series holds several volumes (echoes, phases or a repeat); "
                         f"keep one volume in the folder")
    return frames


def _check_same(first: Frame, frame: Frame, series: str) -> None:
    if frame.size != first.size:
        raise InputError(f"{_name(frame)} is {frame.size[0]}x{frame.size[1]} pixels but {_name(first)} "
                         f"{first.size[0]}x{first.size[1]}: images of different sizes in {series}; "
                         f"keep the images of one volume in the folder")
    same_direction = (np.abs(frame.row_dir - first.row_dir).max() < _ORIENTATION_TOLERANCE
                      and np.abs(frame.col_dir - first.col_dir).max() < _ORIENTATION_TOLERANCE)
    if not same_direction:
        raise InputError(f"{_name(frame)} and {_name(first)} have different orientations in {series} "
                         f"(a localiser or a second stack?); keep the images of one volume in the folder")
    if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
        raise InputError(f"{_name(frame)} has pixel spacing {_mm(frame.pixel_spacing)} but {_name(first)} "
                         f"{_mm(first.pixel_spacing)} in {series}; keep the images of one volume in the folder")


def plan_grid(frames: list[Frame], series: str) -> tuple[Grid, list[str]]:
    """The output grid: the slices themselves when even and untilted, else a resampled regular grid."""
    first, last = frames[0], frames[-1]
    rows, columns = first.size
    if len(frames) == 1:
        step = first.normal * 1.0
        return Grid(first.position, first.row_dir, first.col_dir, step, first.pixel_spacing, (rows, columns, 1)), []
    normal = first.normal
    offsets = np.array([(f.position - first.position) @ normal for f in frames])
    gaps = np.diff(offsets)
    typical = float(np.median(gaps))
    even = bool(np.all(np.abs(gaps - typical) <= _GAP_TOLERANCE * typical))
    _check_missing(frames, gaps, typical, series)
    shifts = _in_plane_shifts(frames)
    tilted = bool(np.abs(shifts).max() > _TILT_MM)
    if even and not tilted:
        step = (last.position - first.position) / (len(frames) - 1)
        return Grid(first.position, first.row_dir, first.col_dir, step, first.pixel_spacing,
                    (rows, columns, len(frames))), []
    return _resampled_grid(frames, offsets, shifts, typical, even, tilted)


def _check_missing(frames: list[Frame], gaps: np.ndarray, typical: float, series: str) -> None:
    """Gaps of two or more typical gaps between otherwise even slices: slices are missing."""
    multiples = gaps / typical
    near_whole = np.abs(multiples - np.round(multiples)) <= _GAP_TOLERANCE * np.round(multiples)
    if not near_whole.all():
        return  # truly uneven spacing (e.g. a head CT in two parts): resampled, not refused
    for k in np.flatnonzero(np.round(multiples) >= 2):
        missing = int(round(multiples[k])) - 1
        raise InputError(f"{missing} slice{'s' if missing > 1 else ''} missing in {series} between "
                         f"{_name(frames[k])} and {_name(frames[k + 1])} ({gaps[k]:.3g} mm apart, the others "
                         f"{typical:.3g} mm); copy the complete series again")


def _in_plane_shifts(frames: list[Frame]) -> np.ndarray:
    """(slices, 2): each slice's offset from the first along its rows' and columns' directions (mm)."""
    first = frames[0]
    moves = np.array([f.position - first.position for f in frames])
    return np.stack([moves @ first.row_dir, moves @ first.col_dir], axis=1)


def _resampled_grid(frames, offsets, shifts, typical, even, tilted) -> tuple[Grid, list[str]]:
    first = frames[0]
    rows, columns = first.size
    dy, dx = first.pixel_spacing
    span = float(offsets[-1])
    count = max(1, round(span / typical))
    spacing = span / count  # the first and the last slices are kept where they were
    # Whole pixels of the first slice's lattice, so the first slice is kept voxel for voxel.
    low_x = math.floor(shifts[:, 0].min() / dx + 1e-6) * dx
    low_y = math.floor(shifts[:, 1].min() / dy + 1e-6) * dy
    out_columns = columns + math.ceil((shifts[:, 0].max() - low_x) / dx - 1e-6)
    out_rows = rows + math.ceil((shifts[:, 1].max() - low_y) / dy - 1e-6)
    origin = first.position + low_x * first.row_dir + low_y * first.col_dir
    grid = Grid(origin, first.row_dir, first.col_dir, spacing * first.normal, first.pixel_spacing,
                (out_rows, out_columns, count + 1))
    why = []
    if tilted:
        tilt = math.degrees(math.atan2(float(np.hypot(*(shifts[-1]))), span))
        why.append(f"a gantry tilt of {tilt:.1f} degrees")
    if not even:
        why.append(f"uneven slice spacing ({np.diff(offsets).min():.3g} to {np.diff(offsets).max():.3g} mm)")
    note = (f"{' and '.join(why)}: resampled by linear interpolation onto a regular grid of {count + 1} slices "
            f"{spacing:.3g} mm apart, perpendicular to the images ({out_columns}x{out_rows} pixels); "
            f"DICOM-SEG output maps back onto the acquired images")
    return grid, [note]


# --- pixels ------------------------------------------------------------------------------------


def read_dicom(path: str | os.PathLike, series: str | None = None) -> DicomVolume:
    """Read one DICOM series (a folder, DICOMDIR or file of it) as a float32 volume, geometry as dcm2niix."""
    where = Path(path)
    chosen = choose_series(find_series(where), series, where)
    label = chosen.line().split(":")[0]
    frames = sort_and_check(chosen.frames, label)
    grid, notes = plan_grid(frames, label)
    _check_memory(where, grid.size)
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
            raise InputError(f"{_name(frame)} holds pixels of shape {pixels.shape}, not one greyscale "
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
        raise InputError(f"{file.name} in {file.parent} is a corrupt DICOM file ({_first_line(error)}); "
                         f"remove it or export the series again") from None
    if syntax.is_compressed:
        _check_codec(file, syntax)
    try:
        return dataset.pixel_array
    except Exception as error:
        raise InputError(f"cannot decode the pixels of {file.name} in {file.parent} ({_first_line(error)}); "
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


def labels_on_frames(labels: np.ndarray, volume: DicomVolume) -> np.ndarray:
    """(frames, rows, columns) labels on the acquired images: each pixel takes its nearest voxel."""
    inverse = np.linalg.inv(volume.affine)
    out = np.zeros((len(volume.frames), *volume.frames[0].size), dtype=labels.dtype)
    for k, frame in enumerate(volume.frames):
        rows, columns = frame.size
        dy, dx = frame.pixel_spacing
        base = inverse[:3, :3] @ (_LPS_TO_RAS @ frame.position) + inverse[:3, 3]
        along_columns = inverse[:3, :3] @ (_LPS_TO_RAS @ (dx * frame.row_dir))
        along_rows = inverse[:3, :3] @ (_LPS_TO_RAS @ (dy * frame.col_dir))
        inside = np.ones((rows, columns), bool)
        index = []
        for axis in range(3):
            # Broadcast shapes: an index that varies along one image axis only stays one-dimensional.
            steps = base[axis] + np.zeros((1, 1))
            if abs(along_columns[axis]) > 1e-9:
                steps = steps + np.arange(columns)[None, :] * along_columns[axis]
            if abs(along_rows[axis]) > 1e-9:
                steps = steps + np.arange(rows)[:, None] * along_rows[axis]
            nearest = np.rint(steps).astype(np.intp)
            inside &= (nearest >= 0) & (nearest < labels.shape[axis])
            index.append(np.clip(nearest, 0, labels.shape[axis] - 1))
        out[k] = np.where(inside, labels[tuple(index)], 0)
    return out


def _check_memory(where: Path, size: tuple[int, int, int]) -> None:
    needed = int(np.prod(size, dtype=np.int64)) * 4
    available = available_memory_bytes()
    if available is not None and needed > available * _MEMORY_SHARE:
        raise InputError(f"the series in {where} ({'x'.join(map(str, size))} voxels) needs {needed / 2**30:.1f} GiB "
                         f"as float32 but only {available / 2**30:.1f} GiB is available")


def _name(frame: Frame) -> str:
    return frame.file.name + ("" if frame.frame is None else f" (frame {frame.frame + 1})")


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ") mm"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__
