"""What the commands show on a terminal while they work: one progress bar, the same everywhere."""

from __future__ import annotations

import contextlib
import shutil
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

    # A terminal that reports a size of 0 x 0 (a pty opened by `script`, some CI runners) has no
    # rows for tqdm to draw on, so it drew nothing; get_terminal_size falls back to 80 x 24.
    size = shutil.get_terminal_size()
    with tqdm(total=total, unit=unit, file=sys.stderr, leave=False, ncols=size.columns, nrows=size.lines) as bar:
        yield bar
