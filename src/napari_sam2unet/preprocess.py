"""Intensity windows, crops around boxes, resizing to the model input, and the exact inverse.

Coordinates: a slice is a 2D array indexed [row, col]. A `Crop` is a rectangle in continuous
slice coordinates where pixel (i, j) covers [i, i+1) x [j, j+1). Model pixel (u, v) of an SxS
input covers the crop's (u/S, v/S) cell, so forward sampling and pasting back are exact
inverses of one affine map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .models import MARGIN, InputSpec

# CT windows as (level, width) in Hounsfield units.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40, 400),
    "lung": (-600, 1500),
    "bone": (400, 1800),
    "brain": (40, 80),
}
MR_PERCENTILES = (0.5, 99.5)
WINDOW_CHOICES = ("auto", "mr", *CT_PRESETS)
# A box smaller than this (in pixels of the finer in-plane spacing) is enlarged: magnifying a
# few pixels to the model's full input only shows it blur.
MIN_CROP_PIXELS = 24
# Percentiles are taken on at most this many voxels: the window is the same to the unit,
# and a huge volume does not cost seconds.
_PERCENTILE_SAMPLES = 2_000_000


@dataclass(frozen=True)
class View:
    """Maps raw intensities to 0..255: linear between low and high, then a gamma."""

    low: float
    high: float
    gamma: float = 1.0
    label: str = ""

    def apply(self, raw: np.ndarray) -> np.ndarray:
        # No floor on the width: an ADC map in m^2/s spans 3e-9, and any floor above that is black.
        width = self.high - self.low
        if not (math.isfinite(width) and width > 0):
            raise InputError(f"the intensity window {self.low:g} to {self.high:g} is empty; choose LOW below HIGH")
        scaled = (np.asarray(raw, dtype=np.float32) - np.float32(self.low)) * np.float32(1.0 / width)
        np.clip(scaled, 0.0, 1.0, out=scaled)
        if self.gamma != 1.0:
            np.power(scaled, self.gamma, out=scaled)
        return scaled * 255.0


def ct_view(preset: str, offset: float = 0.0) -> View:
    """A CT window preset for a file whose stored values + offset are HU (offset -1024 for a
    file stored as HU + 1024: its window moves up by 1024)."""
    level, width = CT_PRESETS[preset]
    label = f"CT {preset} W{width:g}/L{level:g}" + (f" (stored as HU{-offset:+g})" if offset else "")
    return View(level - width / 2 - offset, level + width / 2 - offset, 1.0, label)


# CT is stored in Hounsfield units or, without the rescale intercept, as HU + 1024.
_CT_OFFSETS = (0.0, -1024.0)
# In HU, air is below -850 and most of a body is fat to soft tissue (-150..150); an MR shifted
# below zero has air-like lows too, but its tissue does not pile up exactly there.
_CT_SOFT_SHARE = 0.35
_CT_AIR_SHARE = 0.02
# Body voxels from -500 to -200 HU: CT 4% (abdomen); the MR of msd_hippo_hippocampus_366 read
# as HU + 1024, 23%.
_CT_GAP_SHARE = 0.10
# A float file read as HU + 1024 is CT only if its air's median is at most this (air is -1000 HU,
# outside the field of view -1024); a dim MR background shifted down by 1024 sits higher.
_CT_AIR_HU = -950.0


def guess_modality(volume: np.ndarray) -> str:
    """'ct' when intensities look like Hounsfield units (or HU + 1024), else 'mr'.

    Not just "air near -1000": an MR stored with a negative offset has that too. CT is air
    *and* a body whose voxels gather at fat to soft tissue, in HU or in HU + 1024.
    """
    return "mr" if _hounsfield_offset(volume) is None else "ct"


def _hounsfield_offset(volume: np.ndarray) -> float | None:
    """What to add to the volume to get Hounsfield units, or None when it does not look like CT."""
    sample = _sample(volume)
    sample = sample[np.isfinite(sample)]
    whole_numbers = bool(np.all(sample == np.round(sample)))
    for offset in _CT_OFFSETS if sample.size else ():
        hu = sample + offset
        if np.percentile(hu, 99) > 4000:
            continue
        body = hu[hu >= -850]
        air_share = 1 - body.size / hu.size
        if air_share >= _CT_AIR_SHARE and body.size and np.mean(np.abs(body) <= 150) >= _CT_SOFT_SHARE:
            # Raw scanner integers are HU + 1024; a float file may be too (a resampled one),
            # but an MR shifted down by 1024 can then look like CT: its tissue fills the band
            # between lung and fat where CT holds only partial volumes.
            # Its air must also lie at CT's air (about -1000 HU), not just below -850.
            if offset and not whole_numbers and (np.mean((body >= -500) & (body < -200)) > _CT_GAP_SHARE
                                                 or np.median(hu[hu < -850]) > _CT_AIR_HU):
                continue
            return offset
    return None


def _sample(volume: np.ndarray) -> np.ndarray:
    """About _PERCENTILE_SAMPLES voxels as float32, without copying the volume: reshape(-1) of a
    Fortran-ordered array (as nibabel gives) copied it whole, 11 of 16 s on 512x512x400."""
    volume = np.asarray(volume)
    step = max(1, volume.size // _PERCENTILE_SAMPLES)
    if volume.flags.c_contiguous or volume.flags.f_contiguous:
        return volume.ravel(order="K")[::step].astype(np.float32)  # a view in memory order
    each = math.ceil(step ** (1 / max(1, volume.ndim)))  # a strided view: a lattice of voxels
    return volume[(slice(None, None, each),) * volume.ndim].astype(np.float32).reshape(-1)


def plan_views(volume: np.ndarray, window: str = "auto", channels: str = "replicate") -> tuple[View, View, View]:
    """The three input channels for a volume, computed once per volume.

    window: 'auto' (CT soft tissue or MR percentiles, guessed from intensities), 'mr', a CT
    preset name, or 'LOW:HIGH' in raw units. channels: 'replicate' (one view three times, as the
    official models expect), 'multiview' (the window plus two complementary views) or 'prompted'
    (the window in channel 0; prompt_maps.py overwrites channels 1 and 2 with the prompts).
    """
    modality, offset = "mr", 0.0
    if window == "auto":
        found = _hounsfield_offset(volume)
        modality = "mr" if found is None else "ct"
        offset = found or 0.0
        window = "soft_tissue" if modality == "ct" else "mr"
    if window in CT_PRESETS:
        modality = "ct"
        primary = ct_view(window, offset)
    elif window == "mr":
        low, high = np.percentile(_sample(volume), MR_PERCENTILES)
        primary = View(float(low), float(high), 1.0, f"MR percentiles {MR_PERCENTILES[0]}-{MR_PERCENTILES[1]}")
    else:
        primary = _custom_view(window)
    if primary.high <= primary.low:  # only percentiles get here: custom windows are checked as parsed
        raise InputError(
            f"the image is nearly constant: its {primary.label} window is empty ({primary.low:g} to "
            f"{primary.high:g}); choose a window with --window LOW:HIGH"
        )
    if channels in ("replicate", "prompted"):
        return primary, primary, primary
    if modality == "ct":
        others = [ct_view(name, offset) for name in ("lung", "bone", "soft_tissue") if ct_view(name, offset) != primary]
        return primary, others[0], others[1]
    # MR: the same range with a brightening and a darkening gamma shows faint and bright edges.
    return (
        primary,
        View(primary.low, primary.high, 0.5, primary.label + " gamma 0.5"),
        View(primary.low, primary.high, 2.0, primary.label + " gamma 2"),
    )


def _custom_view(window: str) -> View:
    try:
        low, high = (float(part) for part in window.split(":"))
    except ValueError:
        choices = ", ".join(WINDOW_CHOICES)
        raise InputError(f"unknown window {window!r}: use one of {choices} or LOW:HIGH") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"--window {window}: LOW and HIGH must be finite numbers in the image's units, e.g. 0:300")
    if not low < high:
        raise InputError(
            f"--window {window}: LOW must be below HIGH, e.g. --window {high:g}:{low:g}" if low > high
            else f"--window {window}: LOW and HIGH are equal, an empty range; give LOW below HIGH"
        )
    return View(low, high, 1.0, f"window {low:g}:{high:g}")


@dataclass(frozen=True)
class Crop:
    """A rectangle in continuous slice coordinates: rows [r0, r1), cols [c0, c1)."""

    r0: float
    c0: float
    r1: float
    c1: float

    def key(self) -> tuple[float, float, float, float]:
        """Rounded corners, for cache keys."""
        return tuple(round(v, 3) for v in (self.r0, self.c0, self.r1, self.c1))


def crop_for_box(
    box: tuple[float, float, float, float],
    spacing: tuple[float, float] = (1.0, 1.0),
    mode: str = "square",
    margin: float = MARGIN,
    min_pixels: float | None = None,
) -> Crop:
    """The region the model sees for a box (r0, c0, r1, c1), half-open voxel ranges.

    square: a physically square region around the box centre, the box's longer side plus
    the margin on each side. box_aspect: the box plus the margin, keeping the box's shape.
    """
    r0, c0, r1, c1 = box
    sr, sc = spacing
    centre_r, centre_c = (r0 + r1) / 2, (c0 + c1) / 2
    min_mm = (MIN_CROP_PIXELS if min_pixels is None else min_pixels) * min(sr, sc)
    height_mm = max((r1 - r0) * sr * (1 + 2 * margin), min_mm)
    width_mm = max((c1 - c0) * sc * (1 + 2 * margin), min_mm)
    if mode == "square":
        height_mm = width_mm = max(height_mm, width_mm)
    half_r, half_c = height_mm / sr / 2, width_mm / sc / 2
    # min/max: millimetres and back can round a margin-free crop a hair inside the box.
    return Crop(float(min(centre_r - half_r, r0)), float(min(centre_c - half_c, c0)),
                float(max(centre_r + half_r, r1)), float(max(centre_c + half_c, c1)))


def axis_plane(volume: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Slice k along `axis`, as a view. np.take copies the whole volume first when it is
    Fortran-ordered, as nibabel's arrays are: ~40 ms for a 240x240x155 scan, per slice read."""
    return volume[(slice(None),) * axis + (k,)]


def crop_for_slice(shape: tuple[int, int], spacing: tuple[float, float] = (1.0, 1.0), mode: str = "square") -> Crop:
    """The whole slice; square mode pads the shorter physical side so nothing is stretched."""
    rows, cols = shape
    if mode != "square":
        return Crop(0.0, 0.0, float(rows), float(cols))
    side_mm = max(rows * spacing[0], cols * spacing[1])
    half_r, half_c = side_mm / spacing[0] / 2, side_mm / spacing[1] / 2
    return Crop(rows / 2 - half_r, cols / 2 - half_c, rows / 2 + half_r, cols / 2 + half_c)


def _axis_coords(start: float, stop: float, size: int) -> np.ndarray:
    """Array-index coordinates (pixel centres) of the size model pixels spanning [start, stop)."""
    return start + (np.arange(size, dtype=np.float32) + 0.5) * ((stop - start) / size) - 0.5


def sample_crop(image: np.ndarray, crop: Crop, size: tuple[int, int], fill: float | None = None) -> np.ndarray:
    """Resample a slice's crop to size (bilinear); outside the slice reads `fill` (default: its minimum)."""
    rows = _axis_coords(crop.r0, crop.r1, size[0])
    cols = _axis_coords(crop.c0, crop.c1, size[1])
    image = np.asarray(image, dtype=np.float32)
    if fill is None:
        fill = float(image.min())
    # Shrinking by more than ~1.5x aliases thin structures: smooth first, as a resize with
    # antialiasing would.
    zoom = ((crop.r1 - crop.r0) / size[0], (crop.c1 - crop.c0) / size[1])
    sigma = [max(0.0, (z - 1) / 2) if z > 1.5 else 0.0 for z in zoom]
    if any(sigma):
        image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    # Sample the two axes separately (outer product), far cheaper than a full coordinate grid.
    return _bilinear(image, rows, cols, fill)


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill: float) -> np.ndarray:
    """Separable bilinear interpolation at rows x cols; points outside the image get fill."""
    row_ok = (rows > -1) & (rows < image.shape[0])
    col_ok = (cols > -1) & (cols < image.shape[1])
    out = np.full((rows.size, cols.size), fill, dtype=np.float32)
    if not row_ok.any() or not col_ok.any():
        return out
    # Rows first (a gather of whole rows), then columns: half the work of a 2D gather.
    r0, r1, fr = _neighbours(rows[row_ok], image.shape[0])
    c0, c1, fc = _neighbours(cols[col_ok], image.shape[1])
    by_rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    block = by_rows[:, c0] * (1 - fc) + by_rows[:, c1] * fc
    if row_ok.all() and col_ok.all():
        return block
    out[np.ix_(row_ok, col_ok)] = block
    return out


def _neighbours(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper neighbour indices and the weight of the upper one; half a pixel past
    the edge reads the edge pixel, as image resizers do."""
    coords = np.clip(coords, 0, n - 1)
    low = np.minimum(np.floor(coords).astype(np.int64), max(n - 2, 0))
    high = np.minimum(low + 1, n - 1)
    return low, high, (coords - low).astype(np.float32)


def paste_back(values: np.ndarray, crop: Crop, shape: tuple[int, int]) -> np.ndarray:
    """Map an SxS map in the crop's frame back onto a slice of `shape`; zero outside the crop."""
    out = np.zeros(shape, dtype=np.float32)
    size_r, size_c = values.shape
    r_lo, r_hi = max(0, int(np.floor(crop.r0))), min(shape[0], int(np.ceil(crop.r1)))
    c_lo, c_hi = max(0, int(np.floor(crop.c0))), min(shape[1], int(np.ceil(crop.c1)))
    if r_lo >= r_hi or c_lo >= c_hi:
        return out
    # Slice pixel centre i + 0.5 -> model index ((i + 0.5) - r0) * S / (r1 - r0) - 0.5.
    rows = (np.arange(r_lo, r_hi) + 0.5 - crop.r0) * (size_r / (crop.r1 - crop.r0)) - 0.5
    cols = (np.arange(c_lo, c_hi) + 0.5 - crop.c0) * (size_c / (crop.c1 - crop.c0)) - 0.5
    # Pixels whose centre lies outside the crop stay zero.
    row_in = (rows >= -0.5) & (rows < size_r - 0.5)
    col_in = (cols >= -0.5) & (cols < size_c - 0.5)
    block = _bilinear(values.astype(np.float32, copy=False), rows, cols, 0.0)
    block[~row_in, :] = 0.0
    block[:, ~col_in] = 0.0
    out[r_lo:r_hi, c_lo:c_hi] = block
    return out


def to_model_input(
    raw_crop: np.ndarray, views: tuple[View, View, View], spec: InputSpec, out: np.ndarray | None = None
) -> np.ndarray:
    """3 x H x W float32: each view to 0..255, then the card's scale, mean and std.

    `out` (3 x H x W) lets the caller fill a batch in place, saving a copy per slice.
    """
    if out is None:
        out = np.empty((3, *raw_crop.shape), dtype=np.float32)
    if spec.channels == "prompted":
        # Channels 1-2 hold prompts (prompt_maps.py); until they are drawn: no prior, no click.
        out[1] = np.float32((0.0 - spec.mean[1]) / spec.std[1])
        out[2] = np.float32((0.5 - spec.mean[2]) / spec.std[2])
        views = views[:1]
    scaled: dict[View, np.ndarray] = {}
    for index, view in enumerate(views):
        if view not in scaled:
            scaled[view] = view.apply(raw_crop) * np.float32(spec.scale)
        np.subtract(scaled[view], np.float32(spec.mean[index]), out=out[index])
        out[index] *= np.float32(1 / spec.std[index])
    return out
