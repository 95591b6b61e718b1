"""File names and the file system: what NIfTI files and their sidecars are called, OS errors in
words, and the checks that refuse an output path before any work (never the input, never an
existing file without `overwrite`, never the input's own BIDS/dcm2niix JSON).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError
from .volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Temporary files are short and hidden, so a legal long output name never becomes too long.
TEMP_PREFIX = ".sam2unet-"


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without .nii / .nii.gz (sidecars and label files are named after it)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path_for(path: Path) -> Path:
    """`<stem>.json` beside a label map: its provenance sidecar."""
    return path.with_name(nifti_stem(path) + ".json")


def first_line(error: BaseException) -> str:
    """An error's first line, cut to 200 characters: enough to name the cause in a one-line message."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def os_error_text(what: str, error: OSError, advice: str) -> str:
    """'cannot read x.nii: permission denied; check the file's permissions' from an OSError."""
    reason = error.strerror or first_line(error)
    return f"{what}: {reason[:1].lower()}{reason[1:]}; {advice}"


def check_output_path(
    out: str | os.PathLike, source: Volume | None = None, overwrite: bool = False, sidecar: bool = False,
    nifti: bool = True,
) -> Path:
    """Refuse output paths that would lose the user's data or could not be written, before any work.
    nifti=False: the caller writes another format (seg_formats.py) and has checked its name."""
    out = Path(out)
    if nifti and not is_nifti_path(out):
        raise InputError(f"output {out.name} must end in .nii.gz or .nii")
    _check_name_lengths(out, sidecar_path_for(out) if sidecar else None)
    try:
        _check_target(out, source, overwrite, sidecar)
    except OSError as error:  # e.g. a folder on the way that cannot be searched
        raise InputError(os_error_text(f"cannot use {out}", error, "choose another --out")) from None
    return out


def _check_target(out: Path, source: Volume | None, overwrite: bool, sidecar: bool) -> None:
    if out.is_symlink() and not out.exists():  # found before the work, not when writing
        raise InputError(f"the output {out} is a link to nothing ({os.readlink(out)}); choose another --out")
    if out.is_dir():
        raise InputError(f"the output {out} is a folder; give a file name ending in .nii.gz")
    if source is not None and source.path is not None and _same_file(out, source.path):
        raise InputError(f"the output {out} is the input image; choose another --out path")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another path or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the folder {out.parent} does not exist; create it first")
    if sidecar:
        _check_sidecar_path(out, overwrite)
    _check_writable(out.parent)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and os.path.samefile(a, b)  # a hard link to the input
    except OSError:
        return False


def _check_name_lengths(*paths: Path | None) -> None:
    for path in (p for p in paths if p is not None):
        name_max = _pathconf(path.parent, "PC_NAME_MAX", 255)
        if len(os.fsencode(path.name)) > name_max:
            raise InputError(f"the file name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long, over "
                             f"this file system's limit of {name_max}; choose a shorter --out")
        path_max = _pathconf(path.parent, "PC_PATH_MAX", 4096)
        if len(os.fsencode(str(path.absolute()))) >= path_max:
            raise InputError(f"the output path is {len(os.fsencode(str(path.absolute())))} bytes long, over this "
                             f"system's limit of {path_max}; choose a shorter --out")


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError, AttributeError):
        return default


def _check_sidecar_path(out: Path, overwrite: bool) -> None:
    """The sidecar `<stem>.json` must belong to `out` alone: never the input's BIDS/dcm2niix JSON."""
    sidecar = sidecar_path_for(out)
    if sidecar.is_dir():
        raise InputError(f"the sidecar path {sidecar} is a folder; choose another --out or pass --no-sidecar")
    for other in _same_stem_images(out):
        if other.name != out.name:
            raise InputError(f"the sidecar {sidecar.name} would also describe {other.name} (same name); "
                             f"choose another --out name or pass --no-sidecar")
    if sidecar.exists() and not overwrite:
        raise InputError(f"{sidecar} already exists; choose another --out, pass --overwrite to replace it, "
                         f"or --no-sidecar")


def _same_stem_images(out: Path) -> list[Path]:
    """NIfTI files beside `out` whose stem matches its own in any letter case (x.NII.GZ too): a
    sidecar named after the stem would describe them on every file system."""
    stem = nifti_stem(out).lower()
    try:
        names = os.listdir(out.parent)
    except OSError:  # a missing folder is reported by the caller
        return []
    return [out.with_name(name) for name in names if is_nifti_path(name) and nifti_stem(Path(name)).lower() == stem]


def probe_writable(folder: Path) -> None:
    """Create and remove a temporary file in `folder`: OSError if we cannot write there (read-only,
    full, no permission), found before the work rather than after it."""
    handle, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    os.close(handle)
    os.unlink(probe)


def _check_writable(folder: Path) -> None:
    try:
        probe_writable(folder)
    except OSError as error:
        raise InputError(os_error_text(f"cannot write in {folder}", error, "choose another --out folder")) from None
