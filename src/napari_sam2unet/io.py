"""NIfTI in and out: the image's geometry is kept to the bit, nothing the user has is ever lost.

A label map written here opens aligned with its image in 3D Slicer and ITK-SNAP: its header is
the source's header (qform, sform, their codes, voxel sizes, units) with only the data type,
scaling and intent changed. Writes are all-or-nothing: the label map and its JSON sidecar go to
temporary files first and are published only when both are complete; an existing file is never
replaced without `overwrite`, not even by a second run racing this one.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import re
import signal
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The NIfTI intent code for label maps (NIFTI_INTENT_LABEL): written here, read by the napari reader.
INTENT_LABEL = 1002
# Refuse volumes that would need more than this share of the available memory as float32.
_MEMORY_SHARE = 0.5
# Available memory (free + reclaimable page cache) as Linux reports it.
_MEMINFO = Path("/proc/meminfo")
# Temporary files are short and hidden, so a legal long output name never becomes too long.
_TEMP_PREFIX = ".sam2unet-"
# nibabel's words for a file that holds fewer voxel bytes than its header promises.
_SHORT_READ = re.compile(r"Expected (\d+) bytes, got (\d+) bytes")
# Header fields that place voxels in space: copied from the image to its labels unchanged.
_GEOMETRY_FIELDS = ("pixdim", "xyzt_units", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")


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


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without .nii / .nii.gz (sidecars and label files are named after it)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --- reading -------------------------------------------------------------------------------


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


def read_volume(path: str | os.PathLike, volume_index: int | None = None, series: str | None = None) -> Volume:
    """Read a .nii/.nii.gz file as a 3D float32 volume (2D: one slice; 4D: one volume), or a DICOM
    series (a folder, DICOMDIR or file of it; `series`: its number or UID where there are several)."""
    path = Path(path)
    if not is_nifti_path(path):
        from .dicom import is_dicom_input, read_dicom

        if is_dicom_input(path):
            return read_dicom(path, series)
    try:
        _check_input_path(path)
    except PermissionError as error:  # a folder on the way that the user may not search
        raise InputError(_os_error_text(f"cannot read {path}", error, "check the folders' permissions")) from None
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    _check_voxel_type(path, image.get_data_dtype())
    _check_vox_offset(path, image)
    notes: list[str] = []
    # Trailing singleton dimensions (X, Y, Z, 1, 1) are common and harmless.
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 4 or len(squeezed) < 2:
        raise InputError(f"{path.name} has shape {shape}; expected a 2D, 3D or 4D image")
    if min(squeezed) == 0:
        raise InputError(f"{path.name} has an empty dimension (shape {shape})")
    _check_memory(path, squeezed[:3])
    if len(squeezed) == 4:
        count = squeezed[3]
        index = 0 if volume_index is None else volume_index
        if not 0 <= index < count:
            raise InputError(f"{path.name} has {count} volumes; choose a volume index from 0 to {count - 1}")
    try:
        if len(squeezed) == 4:
            # Only the volume used is read and scaled: the whole 128^3 x 200 file with scl_slope
            # as float64 peaked at 4 GB for one 8 MiB volume.
            data = np.asarray(image.dataobj[(slice(None),) * 3 + (index,) + (0,) * (len(shape) - 4)])
            _check_gzip_end(path)
            notes.append(f"{path.name} is 4D with {count} volumes: using volume {index}")
        else:
            data = np.asarray(image.dataobj, dtype=None)
            _check_gzip_end(path)
            data = data.reshape(squeezed)
        if len(squeezed) == 2:
            data = data[..., np.newaxis]
            notes.append(f"{path.name} is a 2D image: treated as a volume of one slice")
        data = _as_float32(path, data)
    except InputError:
        raise
    except OSError as error:  # nibabel reports a file shorter than its header says as OSError too
        short = _SHORT_READ.search(str(error))
        raise InputError(_corrupt_text(path, error) if short else
                         _os_error_text(f"cannot read {path.name}", error, "check the file")) from None
    except Exception as error:
        raise InputError(_corrupt_text(path, error)) from None
    volume = Volume(data=data, affine=image.affine.copy(), header=_raw_header(path, image), path=path,
                    source_shape=shape, notes=notes)
    _check_spacing(path, volume.spacing)
    return volume


def _check_gzip_end(path: Path) -> None:
    """Read a .nii.gz to its end: gzip checks its CRC only there, and nibabel stops after the
    voxels, so damage in the middle of the stream would pass as wrong voxels."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path.name} is corrupt ({_first_line(error)}): its voxels are not what was saved; "
                         f"copy or export it again") from None


def _raw_header(path: Path, image: nib.Nifti1Image) -> nib.Nifti1Header:
    """The header as it is on disk. nibabel's load tidies it (negative or zero pixdim made
    positive), and label maps written with the tidied header sit elsewhere in ITK than the image."""
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except Exception:  # nibabel read it once already; its own copy is the next best
        return image.header.copy()


def _check_input_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image: give a .nii or .nii.gz file "
                         f"(convert a DICOM folder with dcm2niix)")
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if not is_nifti_path(path):
        raise InputError(f"{path.name} is not a NIfTI file: open a .nii or .nii.gz image (convert DICOM with dcm2niix)")


def _load(path: Path) -> nib.Nifti1Image:
    try:
        open(path, "rb").close()  # nibabel calls a file it may not read "not NIfTI"
        image = nib.load(str(path))
    except OSError as error:  # permissions, I/O: the file may well be complete
        raise InputError(_os_error_text(f"cannot read {path.name}", error, "check the file's permissions")) from None
    except Exception as error:  # nibabel raises many types for broken headers
        raise InputError(f"cannot read {path.name} as NIfTI ({_first_line(error)}); is the file complete?") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path.name} is not a NIfTI-1 or NIfTI-2 image")
    return image


def _check_vox_offset(path: Path, image: nib.Nifti1Image) -> None:
    """A single-file NIfTI-1 keeps its voxels after its 348-byte header and 4 extension bytes: a
    smaller vox_offset (the standard requires 352 or more) would read the header as voxels."""
    offset = getattr(image.dataobj, "offset", None)  # where nibabel will read (its header shows 0)
    if bytes(image.header["magic"]).rstrip(b"\0") == b"n+1" and offset is not None and offset < 352:
        raise InputError(f"{path.name} says its voxels start at byte {int(offset)} (vox_offset), "
                         f"inside its 352-byte header; the file is damaged: export it again")


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    """Intensities we can segment: one real number per voxel."""
    if dtype.fields is not None:
        raise InputError(f"{path.name} is a colour (RGB) image; segment a greyscale scan "
                         f"(convert it to one channel first)")
    if dtype.kind == "c":
        raise InputError(f"{path.name} holds complex values; save its magnitude (or phase) as a real image "
                         f"and segment that")


def _as_float32(path: Path, data: np.ndarray) -> np.ndarray:
    """float32, refusing finite intensities that float32 cannot hold (they would become Inf)."""
    converted = np.asarray(data, dtype=np.float32)
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        overflow = ~np.isfinite(converted)
        if overflow.any() and np.isfinite(data[overflow]).any():
            top = float(np.max(np.abs(data[overflow][np.isfinite(data[overflow])])))
            raise InputError(f"{path.name} has intensities up to {top:.3g}, beyond float32 (about 3.4e38); "
                             f"rescale the image (e.g. divide it by a power of ten) and try again")
    return converted


def _check_spacing(path: Path, spacing: tuple[float, float, float]) -> None:
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{path.name} gives voxel sizes {_sizes(spacing)} in its header (pixdim); "
                         f"fix them to positive sizes in mm, e.g. with nibabel or 3D Slicer")


def _sizes(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _check_memory(path: Path, shape: tuple[int, ...]) -> None:
    needed = int(np.prod(shape, dtype=np.int64)) * 4
    available = available_memory_bytes()
    if available is not None and needed > available * _MEMORY_SHARE:
        raise InputError(
            f"{path.name} ({'x'.join(map(str, shape))} voxels) needs {needed / 2**30:.1f} GiB as float32 but only "
            f"{available / 2**30:.1f} GiB is available; crop or resample it first (e.g. in 3D Slicer: Crop Volume)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _corrupt_text(path: Path, error: BaseException) -> str:
    """A header that promises more voxels than the file holds, in words; else nibabel's own."""
    short = _SHORT_READ.search(str(error))
    if short:
        return (f"{path.name} is truncated: its header promises {short[1]} bytes of voxels but the file holds "
                f"{short[2]}; copy or export it again")
    return f"{path.name} is truncated or corrupt ({_first_line(error)}); export it again"


def _os_error_text(what: str, error: OSError, advice: str) -> str:
    reason = error.strerror or _first_line(error)
    return f"{what}: {reason[:1].lower()}{reason[1:]}; {advice}"


# --- output paths ----------------------------------------------------------------------------


def sidecar_path_for(path: Path) -> Path:
    return path.with_name(nifti_stem(path) + ".json")


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
        raise InputError(_os_error_text(f"cannot use {out}", error, "choose another --out")) from None
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


def _check_writable(folder: Path) -> None:
    """Create and remove a temporary file: a read-only or full folder fails now, not after the work."""
    try:
        handle, probe = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(_os_error_text(f"cannot write in {folder}", error, "choose another --out folder")) from None


# --- label maps ------------------------------------------------------------------------------


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """uint8 up to 255 labels, uint16 up to 65535."""
    top = int(labels.max()) if labels.size else 0
    if int(labels.min(initial=0)) < 0:
        raise InputError("label values must be 0 or positive")
    if top <= 255:
        return np.dtype(np.uint8)
    if top <= 65535:
        return np.dtype(np.uint16)
    raise InputError(f"label value {top} is above 65535; renumber the labels")


def label_array(labels: np.ndarray) -> np.ndarray:
    """Labels as uint8/uint16; fractional or NaN values are refused, never truncated."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iuf":
        raise InputError(f"label maps hold whole numbers; this one holds {labels.dtype}")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise InputError(f"label values must be whole numbers; found {labels[bad].flat[0]:g}: "
                             f"round or threshold the map first")
    return labels.astype(labels_dtype(labels))


def labels_image(labels: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """A NIfTI image of a label map with `like`'s header: geometry fields copied, never recomputed."""
    if labels.shape != like.data.shape:
        raise InputError(f"label map shape {labels.shape} does not match the image {like.data.shape}")
    array = label_array(labels)
    if len(like.source_shape) == 2:
        array = array[..., 0]
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # affine=None: nibabel keeps the header's qform, sform, codes and pixdim as they are
    # (given an affine it would recompute pixdim from it, which moves the labels in ITK).
    image = image_class(array, None, header=header)
    for key in _GEOMETRY_FIELDS:  # the image class tidies the header it is given (|pixdim|): undo that
        image.header[key] = like.header[key]
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(array.max(initial=0))
    image.header.set_intent(INTENT_LABEL)
    image.header["descrip"] = b"napari-sam2unet labels"
    return image


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


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: Volume,
    sidecar: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label map with `like`'s geometry and optionally a JSON sidecar: both or neither."""
    path = check_output_path(path, like, overwrite, sidecar is not None)
    image = labels_image(labels, like)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    files = [(path, suffix, lambda tmp: nib.save(image, tmp))]
    if sidecar is not None:
        files.append(sidecar_entry(path, sidecar))
    write_all_or_nothing(files, overwrite)
    return path


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
            os.chmod(temps[-1], _new_file_mode(current))
        with _folder_lock(files[0][0].parent), _signals_deferred():
            _publish_all([target for target, _, _ in files], temps, overwrite)
    except OSError as error:
        raise InputError(_write_error_text(current, error, [])) from None
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
    handle, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=suffix, dir=target.parent)
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


def _new_file_mode(target: Path) -> int:
    """The mode a plain open() would give (0666 minus the umask), or the replaced file's mode."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back)
    os.umask(mask)
    return mask


def _write_error_text(target: Path, error: OSError, published: list[Path]) -> str:
    kept = (f"{', '.join(p.name for p in published)} was written, the rest not" if published
            else "nothing was written")
    return _os_error_text(f"cannot write {target.name}", error, f"{kept}: free space or choose another --out")
