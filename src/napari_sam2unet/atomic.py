"""Writes that publish all or nothing: a label map and its sidecar go to hidden temporary files
first and are published only when both are complete; an existing file is never replaced without
`overwrite`, not even by a second run racing this one; a reader never sees one run's map beside
another's sidecar. Files get the mode a plain open() would give them (0666 minus the umask).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .paths import TEMP_PREFIX, os_error_text, sidecar_path_for


def sidecar_text(record: dict[str, Any]) -> str:
    """Strict JSON (no NaN/Infinity: those become null), indented."""
    return json.dumps(_strict(record), indent=2, default=str, allow_nan=False)


def _strict(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SidecarWriter:
    """Writes a sidecar that names its label map's file and sha256, hashed from the map's
    temporary file: a reader can check that a map and a sidecar belong together."""

    def __init__(self, record: dict[str, Any], labels_path: Path):
        self.record, self.labels_path = record, labels_path
        sidecar_text(record)  # a record that is not JSON fails now, before the map is written

    def __call__(self, tmp: str, labels_tmp: str) -> None:
        with open(labels_tmp, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        output = {"file": self.labels_path.name, "sha256": digest}
        Path(tmp).write_text(sidecar_text({**self.record, "output": output}))


def sidecar_entry(path: Path, record: dict[str, Any]) -> tuple[Path, str, SidecarWriter]:
    """The sidecar's (path, suffix, write) for write_all_or_nothing, after its label map's entry."""
    return sidecar_path_for(path), ".json", SidecarWriter(record, path)


def write_with_sidecar(path: Path, suffix: str, write: Callable[[str], Any], sidecar: dict[str, Any] | None,
                       overwrite: bool = False) -> Path:
    """Write one file (`write(tmp)`, `suffix` for its temporary name) and, unless `sidecar` is None,
    its JSON sidecar naming its sha256: both or neither."""
    files = [(path, suffix, write)]
    if sidecar is not None:
        files.append(sidecar_entry(path, sidecar))
    write_all_or_nothing(files, overwrite)
    return path


def write_all_or_nothing(files: list[tuple[Path, str, Any]], overwrite: bool = False) -> None:
    """Write each (path, suffix, write(tmp)) to a temporary file, then publish them all.

    Disk full, a signal or a crash while writing leaves the targets as they were and no
    temporary file behind. Without `overwrite` a target is published with a hard link, which
    fails if the file appeared meanwhile (another run): nothing is ever replaced silently.
    A SidecarWriter is called with the first file's temporary file too (it names its hash).
    """
    temps: list[str] = []
    current = files[0][0]
    try:
        for current, suffix, write in files:
            temps.append(_temp_file(current, suffix))
            if isinstance(write, SidecarWriter):
                write(temps[-1], temps[0])
            else:
                write(temps[-1])
            os.chmod(temps[-1], new_file_mode(current))
        with _folder_lock(files[0][0].parent), _signals_deferred():
            _publish_all([target for target, _, _ in files], temps, overwrite)
    except OSError as error:
        raise InputError(_write_error_text(current, error)) from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


# Every file this process published, in order: an interrupted command says what it left on disk.
_published: list[Path] = []


def published_files() -> list[Path]:
    return list(_published)


def _publish_all(targets: list[Path], temps: list[str], overwrite: bool) -> None:
    """Publish the files in order (the sidecar last). With `overwrite` the old files are moved
    aside first and put back if anything fails: a reader sees the old set or the new one (or,
    for a moment, part of it), never old and new files mixed."""
    aside: list[tuple[str, Path]] = []
    published: list[Path] = []
    try:
        for target in reversed(targets) if overwrite else ():  # the old sidecar goes first
            if os.path.lexists(target):
                aside.append((_temp_file(target, ".old"), target))
                os.replace(target, aside[-1][0])
        for target, tmp in zip(targets, temps):
            _publish(tmp, target, overwrite)
            published.append(target)
    except BaseException:
        for target in published:  # files this call created: take them back, so it is both or neither
            target.unlink(missing_ok=True)
        for hidden, target in aside:
            os.replace(hidden, target)
        raise
    for hidden, _ in aside:
        Path(hidden).unlink(missing_ok=True)
    _published.extend(targets)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Writers into one folder publish one at a time (an flock on the folder): concurrent
    --overwrite runs never leave one run's map beside another's sidecar."""
    try:
        import fcntl

        handle = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here (Windows): publishing still moves the old set aside
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks: as above
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until publishing (a few renames) is done: a run stops before the
    files are in place or after, never between them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)  # now handled as it would have been


def _temp_file(target: Path, suffix: str) -> str:
    handle, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=target.parent)
    os.close(handle)
    return tmp


def _publish(tmp: str, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic and never replaces: fails if target exists
    except FileExistsError:
        raise InputError(f"{target} appeared while this run was writing (another run?); it was kept: "
                         f"choose another path or pass --overwrite") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links on this file system (FAT, some network shares): check, then rename.
        if target.exists():
            raise InputError(f"{target} already exists; choose another path or pass --overwrite") from None
        os.replace(tmp, target)


def new_file_mode(target: Path) -> int:
    """The mode a plain open() would give (0666 minus the umask), or the replaced file's mode."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~umask()


def umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back)
    os.umask(mask)
    return mask


def _write_error_text(target: Path, error: OSError) -> str:
    return os_error_text(f"cannot write {target.name}", error,
                         "nothing was written: free space or choose another --out")
