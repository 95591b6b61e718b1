"""Segment a cohort on a Dask cluster: `sam2unet batch MANIFEST --out-dir DIR` and `run_batch`.

The driver reads the manifest and gives Dask one task per case. Each worker process opens the
model once and runs its cases one at a time through the same engine calls as `sam2unet segment`,
writing `DIR/<case>.nii.gz` and its sidecar atomically. The sidecar records a key (input, model,
prompts and settings): a rerun skips every case whose key still matches. A failing case is
recorded with its reason and the rest go on; `DIR/report.csv` lists every case.

This module plans the batch (checks before anything starts), runs it and writes the report; a
case's work is batch_case.py's, the cluster batch_cluster.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io as _stringio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import umask
from .backends import BACKEND_CHOICES
from .backends.pool import model_sha256
from .batch_case import BatchJob, CaseProgress, CaseResult
from .batch_cluster import check_address, collect, local_client, remote_client, require_distributed
from .errors import Cancelled, InputError, Terminated
from .manifest import CaseSpec, read_manifest
from .options import check_folder_writable
from .paths import sidecar_path_for
from .terminal import progress_bar

REPORT_NAME = "report.csv"
REPORT_COLUMNS = ("case", "status", "reason", "voxels", "seconds", "backend", "dice", "output")
NOT_RUN_REASON = "the batch was interrupted; run it again to resume"


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
    require_distributed()  # say what to install before anything starts
    if scheduler is not None and client is None:
        check_address(scheduler)
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
            collect(client, cases, job, results, progress)
        else:
            with remote_client(scheduler) if scheduler else local_client(workers) as own:
                started = True
                out.mkdir(exist_ok=True)  # only now: a batch stopped before it starts leaves nothing
                collect(own, cases, job, results, progress)
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
        os.chmod(tmp, 0o666 & ~umask())  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, path)  # readers see the old report or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
