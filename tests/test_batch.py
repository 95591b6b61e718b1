"""`sam2unet batch` on real Dask clusters (a LocalCluster of processes, a scheduler by address), real scans."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_brightness_model, write_test_card

from napari_sam2unet.batch import plan_workers
from napari_sam2unet.batch_case import SKIPPED_REASON
from napari_sam2unet.cli import main
from napari_sam2unet.manifest import CaseSpec, boxes_from_labels, resolve_case

pytest.importorskip("distributed", reason="the [cohort] extra (dask.distributed) is not installed")

MR, MR_SEG = "totalseg/example_mr_sm.nii.gz", "totalseg/example_seg_mr.nii.gz"
BRAIN = "cases/itksnap_mricrop_brain/image.nii.gz"  # 78x110x64 MR
LIVER = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A real ONNX model (bright regions) with its card, shared by the module's clusters."""
    folder = tmp_path_factory.mktemp("model")
    return str(write_test_card(build_brightness_model(folder / "brightness.onnx")).card_path)


def _box_text(box) -> str:
    # repr keeps every float digit, so the CLI parses back exactly the batch's box
    return f"{box.slice}:{box.i0!r},{box.j0!r},{box.i1!r},{box.j1!r}"


def _write_csv(path: Path, rows: list[dict]) -> Path:
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _report(out: Path) -> dict[str, dict]:
    with open(out / "report.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _segment(args: list[str], out: Path, model: str) -> np.ndarray:
    assert main(["segment", *args, "--out", str(out), "--model", model, "--quiet"]) == 0
    return _labels(out)


def test_cohort_matches_segment_reports_bad_cases_and_a_rerun_skips_the_finished(shared_data, tmp_path, model):
    mr, seg, brain = shared_data / MR, shared_data / MR_SEG, shared_data / BRAIN
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(mr.read_bytes()[:60000])  # a copy cut short, as an interrupted transfer leaves it
    replayed = tmp_path / "session" / "brain.nii.gz"
    replayed.parent.mkdir()
    session = ["--box", "30:20,30,60,80", "--point", "30:35,57", "--scope", "propagate", "--label", "2"]
    brain_by_cli = _segment([str(brain), *session], replayed, model)
    manifest = _write_csv(tmp_path / "cohort.csv", [
        {"case": "liver", "image": str(mr), "boxes_from": str(seg), "label": LIVER, "reference": str(seg)},
        {"case": "brain", "image": str(brain), "prompts": str(replayed.with_suffix("").with_suffix(".json"))},
        {"case": "corrupt", "image": str(corrupt), "box": "10:20,20,60,60"},
        {"case": "bad_prompt", "image": str(mr), "box": "99:20,20,60,60"},
        {"case": "nan_prompt", "image": str(mr), "point": "3:nan,4"},
    ])
    out = tmp_path / "out"
    command = ["batch", str(manifest), "--out-dir", str(out), "--model", model, "--workers", "2", "-q"]

    assert main(command) == 1  # some cases failed
    report = _report(out)
    assert [r["status"] for r in report.values()] == ["segmented", "segmented", "failed", "failed", "failed"]
    assert "truncated" in report["corrupt"]["reason"]
    assert "slices 0 to 19" in report["bad_prompt"]["reason"]
    assert "not nan or inf" in report["nan_prompt"]["reason"]
    assert not list(out.glob("corrupt*")) and not list(out.glob("bad_prompt*"))

    # The same prompts through `sam2unet segment` give the same label maps, voxel for voxel.
    boxes = [_box_text(b) for b in boxes_from_labels(seg, LIVER, axis=2)]
    liver_by_cli = _segment([str(mr), *[a for b in boxes for a in ("--box", b)], "--label", str(LIVER)],
                            tmp_path / "liver_cli.nii.gz", model)
    np.testing.assert_array_equal(_labels(out / "liver.nii.gz"), liver_by_cli)
    np.testing.assert_array_equal(_labels(out / "brain.nii.gz"), brain_by_cli)
    assert set(np.unique(liver_by_cli)) == {0, LIVER} and set(np.unique(brain_by_cli)) == {0, 2}
    np.testing.assert_allclose(nib.load(str(out / "liver.nii.gz")).affine, nib.load(str(mr)).affine)
    assert int(report["liver"]["voxels"]) == int((liver_by_cli > 0).sum())
    reference = _labels(seg) == LIVER
    dice = 2 * ((liver_by_cli > 0) & reference).sum() / ((liver_by_cli > 0).sum() + reference.sum())
    assert float(report["liver"]["dice"]) == pytest.approx(dice, abs=1e-4) and report["brain"]["dice"] == ""
    sidecar = json.loads((out / "liver.json").read_text())
    assert sidecar["batch"]["case"] == "liver" and sidecar["label"] == LIVER and len(sidecar["slices"]) > 5

    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert main(command) == 1
    again = _report(out)
    assert {c: r["status"] for c, r in again.items() if r["status"] != "failed"} == {
        "liver": "skipped", "brain": "skipped"}
    assert again["liver"]["reason"] == SKIPPED_REASON and again["liver"]["dice"] == report["liver"]["dice"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == written  # nothing rewritten


def test_a_changed_prompt_runs_its_case_again(real_data, tmp_path, model):
    mr = real_data / MR
    out = tmp_path / "out"
    for box, expected in (("10:20,20,60,60", "segmented"), ("10:20,20,60,60", "skipped"),
                          ("10:20,20,70,70", "segmented")):
        manifest = _write_csv(tmp_path / "one.csv", [{"case": "mr", "image": str(mr), "box": box}])
        assert main(["batch", str(manifest), "-o", str(out), "--model", model, "--workers", "1", "-q"]) == 0
        assert _report(out)["mr"]["status"] == expected
    assert _labels(out / "mr.nii.gz")[:, :, 10][65:70].any()  # the larger box's output replaced the first


def _dask(*args: str, log: Path) -> subprocess.Popen:
    dask = Path(sys.executable).with_name("dask")
    return subprocess.Popen([str(dask), *args], stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_batch_on_a_scheduler_started_separately_by_address(real_data, tmp_path, model):
    info = tmp_path / "scheduler.json"
    scheduler = _dask("scheduler", "--scheduler-file", str(info), "--port", "0", "--no-dashboard",
                      log=tmp_path / "scheduler.log")
    worker = None
    try:
        _wait_for(info, scheduler)
        address = json.loads(info.read_text())["address"]
        worker = _dask("worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                       log=tmp_path / "worker.log")
        manifest = tmp_path / "cohort.json"
        manifest.write_text(json.dumps({"cases": [
            {"case": "liver", "image": str(real_data / MR), "boxes_from": str(real_data / MR_SEG),
             "label": LIVER}]}))
        out = tmp_path / "out"
        code = main(["batch", str(manifest), "--out-dir", str(out), "--scheduler", address, "--model", model, "-q"])
        assert code == 0
        assert _report(out)["liver"]["status"] == "segmented"
        assert (_labels(out / "liver.nii.gz") == LIVER).any()
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(real_data, tmp_path, model):
    mr = real_data / MR
    rows = [{"case": f"mr{n:02d}", "image": str(mr), "box": f"{n % 20}:20,20,60,60"} for n in range(24)]
    manifest = _write_csv(tmp_path / "cohort.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_sam2unet.cli", "batch", str(manifest), "-o", str(out),
               "--model", model, "--workers", "2"]
    # A session of its own, so the signal goes to the batch and its workers, as Ctrl-C in a terminal does.
    # SIGINT at its default in the child: pytest started in the background (`cmd &`, nohup) runs
    # with it ignored, and Python would not turn an inherited ignored SIGINT into Ctrl-C.
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_any(out, run)
    os.killpg(run.pid, signal.SIGINT)
    _, error = run.communicate(timeout=120)
    assert run.returncode == 130, error
    assert "interrupted after" in error and "Traceback" not in error
    report = _report(out)
    assert "not run" in {r["status"] for r in report.values()}
    # Cases finished as the signal came may be written but not yet reported: all that is there is whole.
    done = {p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")}
    assert done >= {c for c, r in report.items() if r["status"] == "segmented"} and done
    for case in done:
        assert _labels(out / f"{case}.nii.gz").shape == (117, 91, 20)
        assert json.loads((out / f"{case}.json").read_text())["batch"]["case"] == case
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left

    resumed = subprocess.run(command + ["-q"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    statuses = {c: r["status"] for c, r in _report(out).items()}
    assert {c for c, s in statuses.items() if s == "skipped"} >= done
    assert set(statuses.values()) <= {"segmented", "skipped"}


def test_dasks_failing_cancel_callback_is_kept_off_the_terminal_and_other_loop_errors_are_not():
    """Ctrl-C before Dask's sync() began its call makes Dask's cancel callback fail with a NameError
    that the event loop logs as a traceback (seen once in CI); the batch keeps that off the terminal."""
    import logging

    from napari_sam2unet.batch_cluster import _not_dasks_cancel_race

    def dasks_cancel():  # the shape of distributed.utils.sync's cancel: `future` not yet assigned
        def cancel():
            return future is not None
        cancel()
        future = None  # noqa: F841

    def logged(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, "Exception in callback",
                                 None, (type(error), error, error.__traceback__))

    try:
        dasks_cancel()
    except NameError as error:
        race = logged(error)
    assert not _not_dasks_cancel_race(race)
    assert _not_dasks_cancel_race(logged(NameError("name 'frame' is not defined")))
    assert _not_dasks_cancel_race(logged(RuntimeError("a worker failed")))


def _wait_for_any(out: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    """Until the first case is written (a hang guard: a loaded machine took minutes to start a cluster)."""
    deadline = time.monotonic() + seconds
    while not (out.is_dir() and any(out.glob("*.json"))):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no case was written"
        time.sleep(0.05)


def test_manifest_mistakes_stop_before_anything_runs(real_data, tmp_path, capsys, model):
    image = str(real_data / MR)
    out = tmp_path / "out"
    cases = {
        "unknown column(s) boxes": "case,image,boxes\na,{0},1:2\n",
        "no 'image' column": "case,box\na,1:2\n",
        "both case 'a'": "case,image\na,{0}\na,{0}\n",
        "quote cells that hold commas": "case,image,box\na,{0},10:20,20,60,60\n",
        "cannot be a file name": "case,image\n../a,{0}\n",
    }
    for message, text in cases.items():
        manifest = tmp_path / "m.csv"
        manifest.write_text(text.format(image))
        assert main(["batch", str(manifest), "-o", str(out), "--model", model, "-q"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    assert not out.exists()


def test_without_dask_one_line_says_what_to_install(real_data, tmp_path, capsys, monkeypatch, model):
    manifest = _write_csv(tmp_path / "m.csv", [{"image": str(real_data / MR)}])
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--model", model]) == 2
    error = capsys.readouterr().err
    assert 'pip install "napari-sam2unet[cohort]"' in error and error.count("\n") == 1


def test_workers_times_threads_never_exceed_the_cores():
    assert plan_workers(None, None, cores=8, cases=100) == (8, 1)
    assert plan_workers(None, None, cores=8, cases=2) == (2, 4)  # few cases: fewer workers, more threads
    assert plan_workers(None, 4, cores=8, cases=100) == (2, 4)
    assert plan_workers(2, None, cores=8, cases=100) == (2, 4)
    with pytest.raises(Exception, match="4 threads, but this machine has 2 cores"):
        plan_workers(2, 2, cores=2, cases=10)


def test_boxes_from_a_label_map_cover_the_structure_on_every_slice_it_touches(real_data):
    seg = np.asarray(nib.load(str(real_data / MR_SEG)).dataobj)
    boxes = boxes_from_labels(real_data / MR_SEG, LIVER, axis=2)
    assert [b.slice for b in boxes] == [k for k in range(seg.shape[2]) if (seg[:, :, k] == LIVER).any()]
    for box in boxes:
        rows, cols = np.nonzero(seg[:, :, box.slice] == LIVER)
        assert box.i0 <= rows.min() and rows.max() < box.i1 and box.j0 <= cols.min() and cols.max() < box.j1


def test_a_napari_session_replays_with_its_prompts_and_options(tmp_path):
    record = {"tool": "napari-sam2unet", "runs": [
        {"label": 3, "label_name": "tumour", "scope": "between", "window": "mr", "slice_axis": 1,
         "prompts": {"boxes": [[1, 2, 30, 40, 4], [1, 2, 30, 40, 9]], "points": [[4, 10, 12, True]]}},
        {"label": 4, "scope": "slices", "prompts": {"boxes": [], "points": [[5, 1, 1, False]]}},
    ]}
    (tmp_path / "session.json").write_text(json.dumps(record))
    spec = CaseSpec("c", tmp_path / "scan.nii.gz", {"prompts": str(tmp_path / "session.json"), "label": "3"})
    case = resolve_case(spec)
    settings = case.settings
    assert (settings.label, settings.axis, settings.scope, settings.window) == (3, 1, "between", "mr")
    assert [b.slice for b in case.prompts.boxes] == [4, 9] and case.prompts.points[0].positive
    with pytest.raises(Exception, match="2 matching runs"):
        resolve_case(CaseSpec("c", spec.image, {"prompts": str(tmp_path / "session.json")}))


# --- issue 25: a batch never replaces what it did not write ---------------------------------


def _case_job(tmp_path, model, overwrite=False):
    from conftest import sphere_volume, write_nifti

    from napari_sam2unet.backends.pool import model_sha256
    from napari_sam2unet.batch_case import BatchJob
    from napari_sam2unet.models import find_model

    image = write_nifti(tmp_path / "ball.nii.gz", sphere_volume()[0])
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    card = find_model(model)
    job = BatchJob(str(out), model, model_sha256(card), "cpu", 1, overwrite)
    return CaseSpec("ball", image, {"box": ["6:14,12,34,28"]}), job, out


def test_a_users_file_named_like_a_case_output_is_kept_unless_overwrite(tmp_path, model):
    from napari_sam2unet.batch_case import run_case

    spec, job, out = _case_job(tmp_path, model)
    for name in ("ball.nii.gz", "ball.json"):  # the user's label map, or a JSON of theirs, with a case's name
        mine = out / name
        mine.write_bytes(b"the user's own file")
        result = run_case(spec, job)
        assert result.status == "failed" and "was not written by sam2unet batch" in result.reason
        assert "--overwrite" in result.reason and mine.read_bytes() == b"the user's own file"
        mine.unlink()
    # a batch's own output is its to replace: the same case again with a new box runs over it
    assert run_case(spec, job).status == "segmented"
    changed = CaseSpec("ball", spec.image, {"box": ["6:12,10,36,30"]})
    assert run_case(changed, job).status == "segmented"
    # with --overwrite the user's file is replaced
    (out / "ball.json").unlink()
    (out / "ball.nii.gz").write_bytes(b"the user's own file")
    spec, job, out = _case_job(tmp_path, model, overwrite=True)
    assert run_case(spec, job).status == "segmented"
    assert _labels(out / "ball.nii.gz").any()


@pytest.mark.parametrize("column", ["reference", "boxes_from", "image", "prompts", "image's JSON"])
def test_an_output_that_is_an_input_of_the_manifest_is_refused_before_anything_runs(tmp_path, capsys, model,
                                                                                    column):
    from conftest import sphere_volume, write_nifti

    data, truth = sphere_volume()
    out = tmp_path / "refs"
    out.mkdir()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    row = {"case": "ball", "image": str(image), "box": "6:14,12,34,28"}
    if column in ("reference", "boxes_from"):
        row[column] = str(write_nifti(out / "ball.nii.gz", truth.astype(np.uint8)))
    elif column == "image":
        row["image"] = str(write_nifti(out / "ball.nii.gz", data))
    elif column == "prompts":
        (out / "ball.json").write_text('{"prompts": {"boxes": [], "points": []}}')
        row["prompts"] = str(out / "ball.json")
    else:  # a BIDS sidecar beside an upper-case image: ball.NII.GZ + ball.json
        row["image"] = str(write_nifti(out / "ball.NII.GZ", data))
        (out / "ball.json").write_text('{"RepetitionTime": 2.0}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = _write_csv(tmp_path / "cohort.csv", [row])
    code = main(["batch", str(manifest), "--out-dir", str(out), "--model", model, "--overwrite", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose an --out-dir that holds none of the manifest's files" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no report.csv either


# --- issue 25: a batch that cannot finish says so before it starts, and stops when told --------


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_bad_scheduler_address_is_one_line_before_anything_runs(real_data, tmp_path, capsys, model):
    manifest = _write_csv(tmp_path / "m.csv", [{"case": "mr", "image": str(real_data / MR), "box": "10:20,20,60,60"}])
    out = tmp_path / "out"
    for address, says in (("notanaddress", "missing port number"), ("foo://10.0.0.5:8786", "unknown address scheme"),
                          ("tcp://[::1", "invalid address")):
        assert main(["batch", str(manifest), "-o", str(out), "--scheduler", address, "--model", model]) == 2
        error = _one_error_line(capsys)
        assert f"--scheduler {address} is not a Dask scheduler address" in error and says in error
        assert "tcp://10.0.0.5:8786" in error  # what one looks like
    # A server that answers but is no scheduler (here a line of HTTP) is one line too.
    server = socket.create_server(("127.0.0.1", 0))
    answer = threading.Thread(target=lambda: server.accept()[0].sendall(b"HTTP/1.0 200 OK\r\n\r\n" * 64), daemon=True)
    answer.start()
    try:
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        assert main(["batch", str(manifest), "-o", str(out), "--scheduler", address, "--model", model]) == 2
    finally:
        server.close()
    assert f"cannot connect to a Dask scheduler at {address}" in _one_error_line(capsys)
    assert not out.exists()


def test_a_broken_model_is_exit_2_before_any_worker_starts(real_data, tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    manifest = _write_csv(tmp_path / "m.csv", [{"case": "mr", "image": str(real_data / MR), "box": "10:20,20,60,60"}])
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--model", str(broken)]) == 2  # was 1: every case failed
    assert "broken.onnx is not a loadable ONNX model" in _one_error_line(capsys)
    assert not out.exists()


def test_an_out_dir_that_cannot_take_the_outputs_is_refused_before_anything_runs(real_data, tmp_path, capsys, model):
    manifest = _write_csv(tmp_path / "m.csv", [{"case": "mr", "image": str(real_data / MR), "box": "10:20,20,60,60"}])
    out = tmp_path / "out"
    out.mkdir()
    command = ["batch", str(manifest), "-o", str(out), "--model", model, "-q"]
    for taken, says in (("report.csv", "where the batch writes its report"), ("mr.nii.gz", "case mr's output"),
                        ("mr.json", "case mr's output")):
        (out / taken).mkdir()
        assert main(command) == 2
        assert says in _one_error_line(capsys)
        (out / taken).rmdir()
    assert main(["batch", str(manifest), "-o", str(tmp_path / "missing" / "out"), "--model", model]) == 2
    assert "does not exist; create it first" in _one_error_line(capsys)
    assert not list(out.iterdir()) and not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; test_unprivileged.py runs this as nobody")
def test_a_read_only_out_dir_is_refused_before_anything_runs(real_data, tmp_path, capsys, model):
    manifest = _write_csv(tmp_path / "m.csv", [{"case": "mr", "image": str(real_data / MR), "box": "10:20,20,60,60"}])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for out in (locked, locked / "out"):  # the folder itself, or one to be made in it
        assert main(["batch", str(manifest), "-o", str(out), "--model", model]) == 2  # it ran every case first
        assert "permission denied" in _one_error_line(capsys)
    assert not list(locked.iterdir())


# Held in each worker process before it joins the cluster, until the test lets it go.
HOLD = """
import os, pathlib, time
folder = pathlib.Path(os.environ["SAM2UNET_TEST_HOLD"])
(folder / f"worker-{os.getpid()}").touch()
while not (folder / "release").exists():
    time.sleep(0.05)
"""


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_the_cluster_starts_stops_it_at_once_and_writes_nothing(real_data, tmp_path, model, signum,
                                                                              code, word):
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "hold.py").write_text(HOLD)
    env = {**os.environ, "SAM2UNET_TEST_HOLD": str(hold),
           "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(hold / "hold.py")])}
    manifest = _write_csv(tmp_path / "m.csv", [{"case": "mr", "image": str(real_data / MR), "box": "10:20,20,60,60"}])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_sam2unet.cli", "batch", str(manifest), "-o", str(out), "--model", model,
               "--workers", "1"]
    run = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not list(hold.glob("worker-*")):  # a worker process runs but cannot join: the cluster is starting
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.05)
        if signum == signal.SIGINT:
            os.killpg(run.pid, signum)  # Ctrl-C in a terminal: the batch and its workers (it was ignored)
        else:
            os.kill(run.pid, signum)  # `kill`, or a job scheduler's time limit (it exited 130)
        _, error = run.communicate(timeout=300)  # before the fix Ctrl-C waited for the worker: forever here
    finally:
        (hold / "release").touch()
        if run.poll() is None:
            run.kill()
            run.wait()
    assert (run.returncode, error) == (code, f"sam2unet: {word}; nothing was written (existing files were kept)\n")
    assert not out.exists()
    for marker in hold.glob("worker-*"):  # the held worker went with the batch
        _wait_until_gone(int(marker.name.removeprefix("worker-")))


def _wait_until_gone(pid: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"worker {pid} outlived the batch"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_sigterm_mid_batch_exits_143_and_keeps_the_finished_cases(real_data, tmp_path, model):
    """`kill` or a job scheduler's time limit after some cases: exit 143 (it was 130), the report
    says what finished, and no worker prints a traceback."""
    rows = [{"case": f"mr{n:02d}", "image": str(real_data / MR), "box": f"{n % 20}:20,20,60,60"} for n in range(12)]
    manifest = _write_csv(tmp_path / "cohort.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_sam2unet.cli", "batch", str(manifest), "-o", str(out),
               "--model", model, "--workers", "1"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_any(out, run)
    os.kill(run.pid, signal.SIGTERM)
    _, error = run.communicate(timeout=300)
    assert run.returncode == 143, error
    assert error.startswith("sam2unet: terminated after ") and error.count("\n") == 1, error
    assert "not run" in {r["status"] for r in _report(out).values()}
