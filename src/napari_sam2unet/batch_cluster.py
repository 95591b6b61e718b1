"""The Dask side of a batch: a local cluster sized to this machine (or a running scheduler), its
workers forked so that Ctrl-C reaches the batch alone, and the cases run on it as they finish.

Dask (`pip install "napari-sam2unet[cohort]"`) is imported only when a batch runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

from .batch_case import BatchJob, CaseProgress, CaseResult, one_line, run_case
from .errors import InputError, Sam2UnetError
from .manifest import CaseSpec

INSTALL_HINT = 'sam2unet batch needs Dask (dask.distributed): pip install "napari-sam2unet[cohort]"'
# How long a batch waits for a remote cluster's first worker.
WORKER_WAIT_S = 60


def require_distributed():
    """The dask.distributed module, or a one-line error that says what to install."""
    try:
        import distributed
    except ImportError:
        raise Sam2UnetError(INSTALL_HINT) from None
    return distributed


@contextlib.contextmanager
def local_client(workers: int) -> Iterator[Any]:
    """A LocalCluster of worker processes, one case at a time each (memory: one volume per worker)."""
    import dask

    distributed = require_distributed()
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


def _not_dasks_cancel_race(record: logging.LogRecord) -> bool:
    """Dask's sync() cancels its call on Ctrl-C with a callback that fails (NameError on `future`)
    when the Ctrl-C comes before the call began; the event loop logs that traceback. Nothing is
    lost: the batch stops in order and says so in one line."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, NameError) and "'future'" in str(error))


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


def check_address(address: str) -> None:
    """A scheduler address that Dask can parse (scheme, host and port), before anything starts."""
    from distributed.comm.addressing import get_address_host_port

    try:
        get_address_host_port(address)
    except (ValueError, TypeError) as error:
        raise InputError(f"--scheduler {address} is not a Dask scheduler address ({one_line(str(error))}); "
                         f"give it as `dask scheduler` prints it, e.g. tcp://10.0.0.5:8786") from None


@contextlib.contextmanager
def remote_client(address: str) -> Iterator[Any]:
    distributed = require_distributed()
    try:
        client = distributed.Client(address, timeout=30)
    except Exception as error:  # OSError, TimeoutError, or what a server that is no scheduler sends
        raise InputError(f"cannot connect to a Dask scheduler at {address} ({one_line(str(error))}); "
                         f"check the address, or start one with `dask scheduler`") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise InputError(f"no worker joined the scheduler at {address} within {WORKER_WAIT_S} s; "
                             f"start one with `dask worker {address} --nthreads 1`") from None
        yield client


def collect(client, cases: list[CaseSpec], job: BatchJob, results: dict[str, CaseResult],
             progress: CaseProgress | None) -> None:
    """Run the cases; fill `results` as they finish (on Ctrl-C it holds those that did)."""
    distributed = require_distributed()
    logging.getLogger("tornado.application").addFilter(_not_dasks_cancel_race)
    futures = client.map(run_case, cases, job=job, pure=False)
    by_future = dict(zip(futures, cases))
    try:
        for future in distributed.as_completed(futures):
            spec = by_future[future]
            if future.status == "error":  # the worker died or could not run the task at all
                error = future.exception()
                result = CaseResult(spec.case, "failed", f"its worker failed ({type(error).__name__}: "
                                                         f"{one_line(str(error))}); out of memory?")
            else:
                result = future.result()
            results[spec.case] = result
            if progress:
                progress(len(results), len(cases), result)
    finally:
        client.cancel([f for f in futures if not f.done()])
