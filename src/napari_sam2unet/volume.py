"""The Volume every reader returns (NIfTI and DICOM alike), and the memory guard they share.

Readers build a Volume; nothing here reads a file format, so each reader can import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

# Refuse volumes that would need more than this share of the available memory as float32.
_MEMORY_SHARE = 0.5
# Available memory (free + reclaimable page cache) as Linux reports it.
_MEMINFO = Path("/proc/meminfo")


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
        """Voxel sizes along the three array axes (mm): |pixdim|, 0 read as 1 (as nibabel and ITK do)."""
        zooms = tuple(abs(float(z)) or 1.0 for z in self.header.get_zooms()[:3])
        return zooms + (1.0,) * (3 - len(zooms))

    @property
    def orientation(self) -> str:
        """Axis codes of the array axes, e.g. 'RAS' or 'LPS'."""
        return "".join(nib.aff2axcodes(self.affine))


def available_memory_bytes(meminfo: Path | None = None) -> int | None:
    """Memory a new allocation can get: MemAvailable (page cache counts), not MemFree."""
    try:
        for line in (meminfo or _MEMINFO).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS): free pages are the best the system says
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(what: str, shape: tuple[int, ...], advice: str = "") -> None:
    """Refuse a volume of `shape` that would take more than half the available memory as float32.
    `what` names it in the message ("ct.nii.gz", "the series in DIR"); `advice` says what to do."""
    needed = int(np.prod(shape, dtype=np.int64)) * 4
    available = available_memory_bytes()
    if available is not None and needed > available * _MEMORY_SHARE:
        raise InputError(f"{what} ({'x'.join(map(str, shape))} voxels) needs {needed / 2**30:.1f} GiB as float32 "
                         f"but only {available / 2**30:.1f} GiB is available" + (f"; {advice}" if advice else ""))
