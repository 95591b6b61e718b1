"""One case of a batch, on a Dask worker: segmented through the same engine calls as `sam2unet
segment`, or skipped when its sidecar's key (input, model, prompts and settings) still matches.
A failing case is reported with its reason, never raised: the cohort goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .backends.pool import BackendPool
from .errors import InputError, Sam2UnetError
from .manifest import CaseSpec, ResolvedCase, resolve_case
from .paths import sidecar_path_for
from .segment_case import segment_volume

SKIPPED_REASON = "already segmented with the same input, model and prompts"


@dataclass(frozen=True)
class BatchJob:
    """What every case of a batch shares; sent to the workers with each case."""

    out_dir: str
    model_card: str
    model_sha256: str
    backend: str = "auto"
    threads: int = 1
    overwrite: bool = False  # replace files in out_dir that the batch did not write


@dataclass
class CaseResult:
    """One row of report.csv. status: segmented, skipped, failed or not run."""

    case: str
    status: str
    reason: str = ""
    voxels: int | None = None
    seconds: float = 0.0
    backend: str = ""
    dice: float | None = None
    output: str = ""


# progress(done, total, the case that just finished)
CaseProgress = Callable[[int, int, CaseResult], None]

# One backend (model session) per worker process and model, opened by the first case it runs.
_POOL = BackendPool()


def run_case(spec: CaseSpec, job: BatchJob) -> CaseResult:
    """Segment one case (or skip it when done); never raises for a bad case, it reports it."""
    began = time.perf_counter()
    try:
        result = _segment_case(spec, job)
    except Sam2UnetError as error:
        result = CaseResult(spec.case, "failed", one_line(str(error)))
    except Exception as error:  # an input broken in a way no check foresaw: the cohort goes on
        result = CaseResult(spec.case, "failed", f"unexpected {type(error).__name__}: {one_line(str(error))}")
    result.seconds = round(time.perf_counter() - began, 3)
    return result


def _segment_case(spec: CaseSpec, job: BatchJob) -> CaseResult:
    from .io import read_volume, write_labels

    out = Path(job.out_dir) / f"{spec.case}.nii.gz"
    if not job.overwrite:
        _check_ours(out)
    case = resolve_case(spec)
    input_sha256 = _file_sha256(spec.image)
    key = case_key(input_sha256, job.model_sha256, case)
    done = finished_record(out, key)
    if done is not None:
        return CaseResult(spec.case, "skipped", SKIPPED_REASON, done["batch"]["voxels"],
                          backend=done["backend"]["name"], dice=_dice_of_file(out, case), output=str(out))
    options = replace(case.settings, model=job.model_card, model_sha256=job.model_sha256, backend=job.backend,
                      threads=job.threads)
    volume = read_volume(spec.image, options.volume_index)
    _check_grid(case, volume.data.shape)
    # A new engine per case: the cache (and its memory) goes with it.
    labels, _, record = segment_volume(volume, case.prompts, options, _POOL, source=spec.image)
    mask = labels > 0
    dice = _dice(mask, case)
    voxels = int(mask.sum())
    record["batch"] = {"case": spec.case, "key": key, "input_sha256": input_sha256, "name": options.name,
                       "voxels": voxels, "reference": spec.values.get("reference"), "dice": dice}
    write_labels(out, labels, volume, record, overwrite=True)
    return CaseResult(spec.case, "segmented", "", voxels, backend=record["backend"]["name"], dice=dice,
                      output=str(out))


def case_key(input_sha256: str, model_sha256: str, case: ResolvedCase) -> str:
    """What decides a case's output, hashed: the input, the model, the prompts and settings."""
    identity = {"input": input_sha256, "model": model_sha256, **case.identity()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def finished_record(out: Path, key: str) -> dict | None:
    """The sidecar of a finished case whose key matches, else None (the case runs again)."""
    sidecar = sidecar_path_for(out)
    if not out.is_file():
        return None
    record = _batch_record(sidecar)
    return record if record is not None and record["batch"]["key"] == key else None


def _batch_record(sidecar: Path) -> dict | None:
    """A sidecar written by a batch (its `batch` entry holds a key), else None."""
    from .provenance import read_sidecar

    record = read_sidecar(sidecar)
    batch = record.get("batch") if record is not None else None
    return record if isinstance(batch, dict) and isinstance(batch.get("key"), str) else None


def _check_ours(out: Path) -> None:
    """Refuse to replace a label map or sidecar that a batch did not write (its sidecar's key
    marks a batch's own output): the user's files may share a case's name."""
    sidecar = sidecar_path_for(out)
    if not (out.exists() or sidecar.exists()) or _batch_record(sidecar) is not None:
        return
    raise InputError(f"{out.parent / out.name} or {sidecar.name} exists and was not written by sam2unet batch; "
                     f"pass --overwrite to replace it or choose another --out-dir")


def _file_sha256(path: Path) -> str:
    from .models import sha256_file

    if path.is_dir():  # a DICOM series: every file under the folder, by name and content
        from .dicom_series import folder_sha256

        return folder_sha256(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; check the manifest's image column")
    return sha256_file(path)


def _check_grid(case: ResolvedCase, shape: tuple[int, ...]) -> None:
    import nibabel as nib

    for column in ("boxes_from", "reference"):
        path = case.spec.path(column)
        if path is None:
            continue
        try:
            other = tuple(int(n) for n in nib.load(str(path)).shape[:3])
        except Exception as error:  # nibabel raises many types for broken files
            raise InputError(f"cannot read {column} {path.name} ({one_line(str(error))})") from None
        if other != tuple(shape):
            raise InputError(f"{column} {path.name} has shape {other} but the image {shape}; "
                             f"use a label map on the image's grid")


def _dice(mask: np.ndarray, case: ResolvedCase) -> float | None:
    from .geometry import dice
    from .io import read_volume

    path = case.spec.path("reference")
    if path is None:
        return None
    reference = np.rint(read_volume(path).data) == case.settings.label
    return round(dice(mask, reference), 4)


def _dice_of_file(out: Path, case: ResolvedCase) -> float | None:
    if case.spec.path("reference") is None:
        return None
    from .io import read_volume

    return _dice(read_volume(out).data > 0, case)


def one_line(text: str) -> str:
    """An error message's first line, cut to 300 characters: a report row or a one-line message."""
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "no message"
