"""What the commands show on a terminal while they work: one progress bar, the same everywhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(quiet: bool, unit: str, total: int = 0) -> Iterator[Any | None]:
    """A tqdm bar on stderr, closed on leaving; None when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit=unit, file=sys.stderr, leave=False) as bar:
        yield bar
