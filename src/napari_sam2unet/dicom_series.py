"""DICOM series found: the image series under a folder (or beside a DICOMDIR or DICOM file), each
as the frames (image planes) its files hold, with where each lies in space; one chosen by number
or UID. Files that are not images (reports, DICOM-SEG, RT structures) are passed over; a corrupt
image file or one without geometry is refused in one line.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .paths import first_line

# Objects that are not images to segment: DICOM-SEG, RT structures, presentation states, reports.
_NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.11",
               "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.104")
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

    @property
    def name(self) -> str:
        """Its file's name, with the frame's number in a multi-frame file: for messages."""
        return self.file.name + ("" if self.frame is None else f" (frame {self.frame + 1})")


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
    with warnings.catch_warnings():
        # pydicom warns about each odd value it reads (a UID cut short, a stray character): a
        # corrupt file gets one message of ours, and a usable series should not print a line per file.
        warnings.simplefilter("ignore", UserWarning)
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
        raise InputError(f"{file.name} in {file.parent} is a corrupt DICOM file ({first_line(error)}); "
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
        raise InputError(f"{file.name} lacks the geometry of its image ({first_line(error)}); "
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
