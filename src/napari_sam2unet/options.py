"""Checks of command-line numbers and output places, shared by the commands.

Each runs before any work and raises InputError with one line naming the option: a bad value
found after minutes of training (--lr inf wrote NaN weights) or a folder that cannot be
written found after the run costs the user the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import InputError
from .paths import probe_writable


def check_threads(threads: int | None, option: str = "--threads", zero_is_default: bool = False) -> None:
    """1 to the number of cores (0 too where it means the library's default). More threads than
    cores only makes the runtime spin: 10000 turned 0.3 s into minutes, or hung."""
    cores = os.cpu_count() or 1
    if threads is None or (zero_is_default and threads == 0):
        return
    if not 1 <= threads <= cores:
        low = 0 if zero_is_default else 1
        raise InputError(f"{option} {threads} is out of range; use {low} to {cores} (this machine has {cores} cores)")


def check_positive(option: str, value: float) -> None:
    """A finite number above 0 (a learning rate, a decay)."""
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{option} {value} must be a finite number above 0")


def check_share(option: str, value: float) -> None:
    """A share of crops or batches: 0 to 1."""
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise InputError(f"{option} {value} is a share: use a number from 0 to 1")


def check_count(option: str, value: int, low: int = 1) -> None:
    if value < low:
        raise InputError(f"{option} {value} must be at least {low}")


def check_folder_writable(folder: Path, option: str) -> None:
    """`folder` is, or can be created as, a folder we can write in: checked by creating and
    removing a temporary file in it (or in the nearest existing folder above it)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise InputError(f"{option} {folder}: {existing} is a link to nothing; choose another {option}")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder; choose another {option}")
    try:
        probe_writable(existing)
    except OSError as error:
        why = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
        raise InputError(f"{option} {folder}: cannot write in {existing} ({why}); choose another {option}") from None


def check_output_file(path: Path, option: str) -> None:
    """A file to be written: not a folder, not a link to nothing, in a folder we can write."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    if path.is_symlink() and not path.exists():
        raise InputError(f"{option} {path} is a link to nothing ({os.readlink(path)}); choose another {option}")
    check_folder_writable(path.parent, option)
