"""DICOM geometry: a series' frames sorted along the slice normal and checked (one orientation,
size and spacing, no duplicates, no missing slices), the regular grid they are laid on (the slices
themselves, or a resampled grid for a gantry tilt or uneven spacing), and labels on that grid
mapped back onto the acquired frames. Positions are DICOM's LPS mm; affines NIfTI's RAS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dicom_series import Frame
from .errors import InputError

# DICOM's patient space is LPS; NIfTI affines (and nibabel's) are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Two slices closer than this along the normal (mm) are the same position.
_SAME_POSITION_MM = 1e-3
# Slice gaps within this share of the typical gap are even (scanners round positions).
_GAP_TOLERANCE = 0.01
# An in-plane offset between slices above this (mm) is a gantry tilt (or a sheared stack).
_TILT_MM = 1e-2
# Directions closer than this (cosines) are the same orientation.
_ORIENTATION_TOLERANCE = 1e-4


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
        affine[:3, 0] = LPS_TO_RAS @ (dx * self.row_dir)
        affine[:3, 1] = LPS_TO_RAS @ (-dy * self.col_dir)
        affine[:3, 2] = LPS_TO_RAS @ self.step
        affine[:3, 3] = LPS_TO_RAS @ last_row
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
        raise InputError(f"{a.name} and {b.name} lie at the same position ({_mm(a.position)}) in {series}: "
                         f"the series holds several volumes (echoes, phases or a repeat); "
                         f"keep one volume in the folder")
    return frames


def _check_same(first: Frame, frame: Frame, series: str) -> None:
    if frame.size != first.size:
        raise InputError(f"{frame.name} is {frame.size[0]}x{frame.size[1]} pixels but {first.name} "
                         f"{first.size[0]}x{first.size[1]}: images of different sizes in {series}; "
                         f"keep the images of one volume in the folder")
    same_direction = (np.abs(frame.row_dir - first.row_dir).max() < _ORIENTATION_TOLERANCE
                      and np.abs(frame.col_dir - first.col_dir).max() < _ORIENTATION_TOLERANCE)
    if not same_direction:
        raise InputError(f"{frame.name} and {first.name} have different orientations in {series} "
                         f"(a localiser or a second stack?); keep the images of one volume in the folder")
    if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
        raise InputError(f"{frame.name} has pixel spacing {_mm(frame.pixel_spacing)} but {first.name} "
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
                         f"{frames[k].name} and {frames[k + 1].name} ({gaps[k]:.3g} mm apart, the others "
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


def labels_on_frames(labels: np.ndarray, affine: np.ndarray, frames: list[Frame]) -> np.ndarray:
    """(frames, rows, columns) labels on the acquired images: each pixel takes its nearest voxel."""
    inverse = np.linalg.inv(affine)
    out = np.zeros((len(frames), *frames[0].size), dtype=labels.dtype)
    for k, frame in enumerate(frames):
        rows, columns = frame.size
        dy, dx = frame.pixel_spacing
        base = inverse[:3, :3] @ (LPS_TO_RAS @ frame.position) + inverse[:3, 3]
        along_columns = inverse[:3, :3] @ (LPS_TO_RAS @ (dx * frame.row_dir))
        along_rows = inverse[:3, :3] @ (LPS_TO_RAS @ (dy * frame.col_dir))
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


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ") mm"
