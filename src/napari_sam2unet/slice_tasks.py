"""What the engine works with: a slice's model calls (tasks), a slice's result, a volume's result.

Plain data, shared by the engine and the modules that plan and walk its slices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .preprocess import Crop


@dataclass(frozen=True, eq=False)
class Prior:
    """A slice's mask given to a prompted model (the neighbour's when propagating, the current
    one when correcting), drawn at `weight` (0..1) in the prior channel; the digest keys the
    cache without hashing the array each time."""

    mask: np.ndarray
    digest: str
    weight: float = 1.0

    @classmethod
    def of(cls, mask: np.ndarray, weight: float = 1.0) -> Prior:
        mask = np.ascontiguousarray(mask, dtype=bool)
        stamp = np.packbits(mask).tobytes() + repr((mask.shape, float(weight))).encode()
        return cls(mask, hashlib.blake2b(stamp, digest_size=16).hexdigest(), float(weight))


@dataclass(frozen=True)
class SliceTask:
    """One model call's worth of work: a slice, the region the model sees, the box results keep to."""

    slice: int
    crop: Crop
    clip: tuple[float, float, float, float] | None = None
    # One of several candidate crops around a click: the slice keeps the best one, not their union.
    choose: bool = False
    # What a prompted model sees besides the image: a prior mask and clicks (i, j, positive).
    prior: Prior | None = None
    clicks: tuple[tuple[float, float, bool], ...] = ()
    # A mask from clicks alone keeps only the regions under its positive clicks.
    keep_clicked: bool = False
    # One of the crops around a click whose probabilities the slice's mask averages.
    fused: bool = False


@dataclass
class SliceResult:
    tasks: list[SliceTask]
    mask: np.ndarray


@dataclass
class SegmentationResult:
    """Masks per slice, in the engine's volume and slice axis."""

    shape: tuple[int, int, int]
    axis: int
    threshold: float
    slices: dict[int, SliceResult] = field(default_factory=dict)
    # The engine key (volume, views, axis, model) the probabilities belong to: refine checks it.
    key: tuple | None = None
    # Why propagation stopped, per direction (-1, +1): 'vanished', 'jumped ...', 'edge of the volume'.
    stops: dict[int, str] = field(default_factory=dict)
    cancelled: bool = False
    total_seconds: float = 0.0
    backend_seconds: float = 0.0
    backend_calls: int = 0

    @property
    def mask(self) -> np.ndarray:
        """The whole volume's mask (False on slices that were not segmented)."""
        volume = np.zeros(self.shape, dtype=bool)
        for k, result in self.slices.items():
            index = [slice(None)] * 3
            index[self.axis] = k
            volume[tuple(index)] = result.mask
        return volume

    def labels(self, label: int = 1) -> np.ndarray:
        return self.mask.astype(np.uint16 if label > 255 else np.uint8) * label

    @property
    def seconds_per_slice(self) -> float:
        return self.total_seconds / max(1, len(self.slices))


WalkSteps = Iterator[tuple[int, int]]  # a walk's progress: (slices done, slices planned) after each step
