"""Segment a cohort on a Dask cluster: `sam2unet batch MANIFEST --out-dir DIR` and `run_batch`.

The driver reads the manifest and gives Dask one task per case. Each worker process opens the
model once and runs its cases one at a time through the same engine calls as `sam2unet segment`,
writing `DIR/<case>.nii.gz` and its sidecar atomically. The sidecar records a key (input, model,
prompts and settings): a rerun skips every case whose key still matches. A failing case is
recorded with its reason and the rest go on; `DIR/report.csv` lists every case.

Dask (`pip install "napari-sam2unet[cohort]"`) is imported only when a batch runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io as _stringio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BACKEND_CHOICES
from .backends.pool import BackendPool, model_sha256
from .errors import Cancelled, InputError, Sam2UnetError, Terminated
from .manifest import CaseSpec, ResolvedCase, read_manifest, resolve_case
from .options import check_folder_writable
from .segment_case import segment_volume
from .terminal import progress_bar

INSTALL_HINT = 'sam2unet batch needs Dask (dask.distributed): pip install "napari-sam2unet[cohort]"'
REPORT_NAME = "report.csv"
REPORT_COLUMNS = ("case", "status", "reason", "voxels", "seconds", "backend", "dice", "output")
SKIPPED_REASON = "already segmented with the same input, model and prompts"
NOT_RUN_REASON = "the batch was interrupted; run it again to resume"
# How long a batch waits for a remote cluster's first worker.
WORKER_WAIT_S = 60


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


@dataclass
class BatchReport:
    rows: list[CaseResult]
    seconds: float
    path: Path
    workers: int = 0
    threads: int = 0
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = {s: sum(r.status == s for r in self.rows) for s in ("segmented", "skipped", "failed", "not run")}

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.rows if r.status == "failed"]

    def summary(self) -> str:
        rate = 60 * self.counts["segmented"] / max(self.seconds, 1e-9)
        parts = [f"{n} {status}" for status, n in self.counts.items() if n]
        return (f"{len(self.rows)} cases in {self.seconds:.1f} s: {', '.join(parts)} "
                f"({rate:.1f} cases/min); report: {self.path}")


# progress(done, total, the case that just finished)
CaseProgress = Callable[[int, int, CaseResult], None]


# --- on a worker ---------------------------------------------------------------------------

# One backend (model session) per worker process and model, opened by the first case it runs.
_POOL = BackendPool()


def run_case(spec: CaseSpec, job: BatchJob) -> CaseResult:
    """Segment one case (or skip it when done); never raises for a bad case, it reports it."""
    began = time.perf_counter()
    try:
        result = _segment_case(spec, job)
    except Sam2UnetError as error:
        result = CaseResult(spec.case, "failed", _one_line(str(error)))
    except Exception as error:  # an input broken in a way no check foresaw: the cohort goes on
        result = CaseResult(spec.case, "failed", f"unexpected {type(error).__name__}: {_one_line(str(error))}")
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
    from .io import sidecar_path_for

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
    from .io import sidecar_path_for

    sidecar = sidecar_path_for(out)
    if not (out.exists() or sidecar.exists()) or _batch_record(sidecar) is not None:
        return
    raise InputError(f"{out.parent / out.name} or {sidecar.name} exists and was not written by sam2unet batch; "
                     f"pass --overwrite to replace it or choose another --out-dir")


def _file_sha256(path: Path) -> str:
    from .models import sha256_file

    if path.is_dir():  # a DICOM series: every file under the folder, by name and content
        from .dicom import folder_sha256

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
            raise InputError(f"cannot read {column} {path.name} ({_one_line(str(error))})") from None
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


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "no message"


# --- on the driver -------------------------------------------------------------------------


def plan_workers(workers: int | None, threads: int | None, cores: int, cases: int) -> tuple[int, int]:
    """Worker processes and model threads each, so that workers x threads never exceed the cores."""
    for value, flag in ((workers, "--workers"), (threads, "--threads-per-worker")):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value} must be 1 or more")
    if workers is None:
        workers = max(1, min(cores // (threads or 1), cases))
    if threads is None:
        threads = max(1, cores // workers)
    if workers * threads > cores:
        raise InputError(f"--workers {workers} x --threads-per-worker {threads} = {workers * threads} threads, "
                         f"but this machine has {cores} cores; lower one of them")
    return workers, threads


def _distributed():
    try:
        import distributed
    except ImportError:
        raise Sam2UnetError(INSTALL_HINT) from None
    return distributed


@contextlib.contextmanager
def _local_client(workers: int) -> Iterator[Any]:
    """A LocalCluster of worker processes, one case at a time each (memory: one volume per worker)."""
    import dask

    distributed = _distributed()
    key = "distributed.worker.multiprocessing-method"
    with dask.config.set({key: "forkserver" if _forkserver_ignoring_ctrl_c() else dask.config.get(key)}):
        cluster = _started(lambda: distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR))
        with cluster, distributed.Client(cluster) as client:
            yield client


def _started(start: Callable[[], Any]) -> Any:
    """start() a cluster; Ctrl-C or SIGTERM while it starts (seconds) stops it at once: what had
    started is closed here, and left out of Dask's exit hook, which would print a traceback."""
    from distributed.deploy.spec import SpecCluster

    before = set(SpecCluster._instances)
    try:
        return start()
    except BaseException:
        logging.getLogger("asyncio").addFilter(_not_a_stopped_start)
        for cluster in set(SpecCluster._instances) - before:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
            cluster.shutdown_on_close = False
        raise


def _not_a_stopped_start(record: logging.LogRecord) -> bool:
    """asyncio's late "Task exception was never retrieved" for a worker of a cluster stopped while it
    started ("Nanny failed to start"): the batch has said what happened, in one line."""
    error = record.exc_info[1] if record.exc_info else None
    return not ("never retrieved" in str(record.msg) and "failed to start" in str(error))


def _forkserver_ignoring_ctrl_c() -> bool:
    """Start multiprocessing's fork server with SIGINT ignored, so that the workers forked from it
    ignore it too: Ctrl-C reaches the batch alone, which stops the cluster in order (else each
    worker dies printing a traceback). Only the server's start (milliseconds) ignores Ctrl-C, not
    the cluster's. False where there is no fork server (Windows) or this is not the main thread."""
    import multiprocessing
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (a GUI's worker thread): no Ctrl-C to keep from the workers
        return False
    try:
        forkserver.ensure_running()  # a server started before (not by a batch) keeps its own Ctrl-C
    finally:
        signal.signal(signal.SIGINT, previous)
    return True


def _check_address(address: str) -> None:
    """A scheduler address that Dask can parse (scheme, host and port), before anything starts."""
    from distributed.comm.addressing import get_address_host_port

    try:
        get_address_host_port(address)
    except (ValueError, TypeError) as error:
        raise InputError(f"--scheduler {address} is not a Dask scheduler address ({_one_line(str(error))}); "
                         f"give it as `dask scheduler` prints it, e.g. tcp://10.0.0.5:8786") from None


@contextlib.contextmanager
def _remote_client(address: str) -> Iterator[Any]:
    distributed = _distributed()
    try:
        client = distributed.Client(address, timeout=30)
    except Exception as error:  # OSError, TimeoutError, or what a server that is no scheduler sends
        raise InputError(f"cannot connect to a Dask scheduler at {address} ({_one_line(str(error))}); "
                         f"check the address, or start one with `dask scheduler`") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise InputError(f"no worker joined the scheduler at {address} within {WORKER_WAIT_S} s; "
                             f"start one with `dask worker {address} --nthreads 1`") from None
        yield client


def _collect(client, cases: list[CaseSpec], job: BatchJob, results: dict[str, CaseResult],
             progress: CaseProgress | None) -> None:
    """Run the cases; fill `results` as they finish (on Ctrl-C it holds those that did)."""
    distributed = _distributed()
    futures = client.map(run_case, cases, job=job, pure=False)
    by_future = dict(zip(futures, cases))
    try:
        for future in distributed.as_completed(futures):
            spec = by_future[future]
            if future.status == "error":  # the worker died or could not run the task at all
                error = future.exception()
                result = CaseResult(spec.case, "failed", f"its worker failed ({type(error).__name__}: "
                                                         f"{_one_line(str(error))}); out of memory?")
            else:
                result = future.result()
            results[spec.case] = result
            if progress:
                progress(len(results), len(cases), result)
    finally:
        client.cancel([f for f in futures if not f.done()])


def run_batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    backend: str = "auto",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    client=None,
    progress: CaseProgress | None = None,
    overwrite: bool = False,
) -> BatchReport:
    """Segment every case of a manifest; write DIR/report.csv; return the report.

    Runs on `client` when given, else on the scheduler at `scheduler`, else on a LocalCluster
    sized to this machine. Files in `out_dir` that a batch did not write are replaced only with
    `overwrite`; a manifest's own inputs never are. Raises Cancelled on Ctrl-C after writing
    the report of what finished.
    """
    from .models import find_model

    began = time.perf_counter()
    cases = read_manifest(manifest)
    out = _out_dir(out_dir)
    _check_outputs_are_not_inputs(cases, out)
    _distributed()  # say what to install before anything starts
    if scheduler is not None and client is None:
        _check_address(scheduler)
    card = find_model(model)
    _check_model_opens(card)
    remote = client is not None or scheduler is not None
    workers, threads = (0, threads_per_worker or 1) if remote else plan_workers(
        workers, threads_per_worker, os.cpu_count() or 1, len(cases))
    job = BatchJob(str(out), str(card.card_path or card.file), model_sha256(card), backend, threads, overwrite)
    results: dict[str, CaseResult] = {}
    started = False
    try:
        if client is not None:
            started = True
            out.mkdir(exist_ok=True)
            _collect(client, cases, job, results, progress)
        else:
            with _remote_client(scheduler) if scheduler else _local_client(workers) as own:
                started = True
                out.mkdir(exist_ok=True)  # only now: a batch stopped before it starts leaves nothing
                _collect(own, cases, job, results, progress)
    except KeyboardInterrupt as stop:
        if not started:
            raise  # the command says "nothing was written"
        what, code = ("terminated", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        report = _finish(cases, results, out, began, workers, threads)
        raise Cancelled(f"{what} after {len(results)} of {len(cases)} cases; finished cases are kept "
                        f"(report: {report.path}); run the same command again to resume", code) from None
    return _finish(cases, results, out, began, workers, threads)


def _out_dir(path: str | os.PathLike) -> Path:
    """--out-dir, resolved and checked but not yet created: a folder that cannot take the label
    maps and report.csv is found before any case runs, not after the last one."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out} is a file; choose a folder")
    if not out.parent.is_dir():
        raise InputError(f"the folder {out.parent} does not exist; create it first")
    check_folder_writable(out, "--out-dir")
    if (out / REPORT_NAME).is_dir():
        raise InputError(f"{out / REPORT_NAME} is a folder, where the batch writes its report; "
                         f"move it or choose another --out-dir")
    return out


def _check_model_opens(card) -> None:
    """Open the model once here (CPU, one thread) and close it: a model that cannot load is one
    line and exit 2 before any worker starts, not every case failing with the same reason."""
    from .backends import open_backend

    backend, _ = open_backend(card, "cpu", threads=1)
    backend.close()


def _check_outputs_are_not_inputs(cases: list[CaseSpec], out: Path) -> None:
    """Refuse a batch that would write over one of its own inputs (an image, a reference, a prompts
    file), even with --overwrite: it would score, or take boxes from, its own output."""
    from .io import sidecar_path_for
    from .manifest import PATH_COLUMNS

    inputs = {}
    for spec in cases:
        for column in PATH_COLUMNS:
            path = spec.image if column == "image" else spec.path(column)
            if path is not None:
                inputs[_identity(path)] = (spec.case, column, path)
        image_json = sidecar_path_for(spec.image)  # a BIDS / dcm2niix sidecar, whatever the case of .NII.GZ
        if image_json.exists():
            inputs[_identity(image_json)] = (spec.case, "image's JSON", image_json)
    for spec in cases:
        target = out / f"{spec.case}.nii.gz"
        for path in (target, sidecar_path_for(target)):
            if path.is_dir():
                raise InputError(f"case {spec.case}'s output {path} is a folder; move it or choose another --out-dir")
            found = inputs.get(_identity(path))
            if found:
                raise InputError(f"case {spec.case}'s output {path} is case {found[0]}'s {found[1]} "
                                 f"({found[2]}); choose an --out-dir that holds none of the manifest's files")


def _identity(path: Path) -> tuple:
    """The same file however it is named: its inode when it exists (links, case-insensitive
    names), else its resolved path."""
    try:
        stat = path.stat()
        return (stat.st_dev, stat.st_ino)
    except OSError:
        return (str(path.resolve()),)


def _finish(cases, results, out: Path, began: float, workers: int, threads: int) -> BatchReport:
    rows = [results.get(c.case) or CaseResult(c.case, "not run", NOT_RUN_REASON) for c in cases]
    report = BatchReport(rows, time.perf_counter() - began, out / REPORT_NAME, workers, threads)
    write_report(report.path, rows)
    return report


def write_report(path: Path, rows: list[CaseResult]) -> Path:
    """report.csv, atomically: one row per case in manifest order."""
    buffer = _stringio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = vars(row).copy()
        values["dice"] = "" if row.dice is None else f"{row.dice:.4f}"
        values["voxels"] = "" if row.voxels is None else row.voxels
        writer.writerow(values)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(buffer.getvalue())
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, path)  # readers see the old report or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the command ---------------------------------------------------------------------------


def add_batch_parser(commands) -> None:
    batch = commands.add_parser("batch", help="segment every case of a manifest on a Dask cluster, resumable")
    batch.add_argument("manifest", type=Path, help="a .csv or .json manifest: one row per case (docs/cohorts.md)")
    batch.add_argument("--out-dir", "-o", type=Path, required=True,
                       help="folder for <case>.nii.gz, their sidecars and report.csv")
    batch.add_argument("--model", default=None, help="model name or path to .onnx/.yaml (default: bundled)")
    batch.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    batch.add_argument("--workers", type=int, default=None,
                       help="worker processes of a local Dask cluster (default: sized to the cores)")
    batch.add_argument("--threads-per-worker", type=int, default=None,
                       help="CPU threads each worker's model uses (default: cores / workers; 1 on a --scheduler)")
    batch.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786, instead of a local cluster")
    batch.add_argument("--overwrite", action="store_true",
                       help="replace files in --out-dir named like a case's output that no batch wrote "
                            "(never the manifest's own inputs)")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    batch.set_defaults(func=run_batch_command)


def run_batch_command(args: argparse.Namespace) -> int:
    """0: every case segmented or skipped; 1: some failed (see report.csv); 2: nothing could start
    (manifest, model, out-dir, scheduler address); 130 after Ctrl-C, 143 after SIGTERM."""
    if args.scheduler and args.workers:
        raise InputError("--workers sizes a local cluster; with --scheduler start the workers with `dask worker`")
    with _progress_bar(args.quiet) as progress:
        report = run_batch(args.manifest, args.out_dir, model=args.model, backend=args.backend,
                           workers=args.workers, threads_per_worker=args.threads_per_worker,
                           scheduler=args.scheduler, progress=progress, overwrite=args.overwrite)
    if not args.quiet:
        for row in report.failed:
            print(f"failed: {row.case}: {row.reason}", file=sys.stderr)
        print(f"sam2unet batch: {report.summary()}", file=sys.stderr)
    return 1 if report.failed else 0


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator[CaseProgress | None]:
    with progress_bar(quiet, "case") as bar:
        if bar is None:
            yield None
            return

        def update(done: int, total: int, result: CaseResult) -> None:
            bar.total, bar.n = total, done
            bar.set_postfix_str(f"{result.case}: {result.status}")

        yield update
