"""The `sam2unet` command on real scans: the output's geometry, the messages for bad input."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_nifti

from napari_sam2unet.cli import main


@pytest.fixture
def mr(real_data):
    return real_data / "totalseg" / "example_mr_sm.nii.gz"


def _liver_box(real_data, k=10):
    """The liver's bounding box on slice k of the abdominal MRI, grown by 10%."""
    seg = np.asarray(nib.load(str(real_data / "totalseg" / "example_seg_mr.nii.gz")).dataobj)
    rows, cols = np.nonzero(seg[:, :, k] == 5)
    return f"{k}:{rows.min() - 2},{cols.min() - 2},{rows.max() + 3},{cols.max() + 3}"


def test_segment_the_liver_box_writes_labels_aligned_with_the_image(mr, real_data, tmp_path, brightness_card):
    out = tmp_path / "liver.nii.gz"
    code = main(["segment", str(mr), "--out", str(out), "--box", _liver_box(real_data),
                 "--model", str(brightness_card.card_path), "--label", "5", "--quiet"])
    assert code == 0
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(mr))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing())
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    labels = np.asarray(nib.load(str(out)).dataobj)
    assert set(np.unique(labels)) == {0, 5}
    assert labels[:, :, 10].any() and not labels[:, :, 9].any()
    sidecar = json.loads((tmp_path / "liver.json").read_text())
    assert sidecar["model"]["sha256"] == brightness_card.sha256
    assert sidecar["prompts"]["boxes"][0]["slice"] == 10 and sidecar["scope"] == "slices"
    assert sidecar["backend"]["name"] == "cpu"


def test_installed_command_runs_and_reports(mr, tmp_path, brightness_card):
    out = tmp_path / "all.nii.gz"
    run = subprocess.run([sys.executable, "-m", "napari_sam2unet.cli", "segment", str(mr), "-o", str(out),
                          "--model", str(brightness_card.file), "--no-sidecar"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "segmented 20 slices" in run.stderr and out.is_file()
    assert not (tmp_path / "all.json").exists()


def _fails(capsys, args, message):
    code = main(args)
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error
    assert "Traceback" not in error
    return error


def test_bad_inputs_fail_with_one_clear_line_and_write_nothing(mr, tmp_path, capsys, brightness_card):
    model = ["--model", str(brightness_card.card_path)]
    out = tmp_path / "out.nii.gz"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _fails(capsys, ["segment", str(text), "-o", str(out), *model], "not a NIfTI file")
    _fails(capsys, ["segment", str(mr), "-o", str(mr), *model], "is the input image")
    _fails(capsys, ["segment", str(mr), "-o", str(out), "--box", "99:1,1,5,5", *model], "slices 0 to 19")
    _fails(capsys, ["segment", str(mr), "-o", str(out), "--point", "3:500,5", *model], "outside the slice")
    _fails(capsys, ["segment", str(mr), "-o", str(out), "--box", "3:1,1", *model], "K:I0,J0,I1,J1")
    _fails(capsys, ["segment", str(mr), "-o", str(out), "--model", str(tmp_path / "none.onnx")], "does not exist")
    _fails(capsys, ["segment", str(mr), "-o", str(out), "--window", "wide", *model], "unknown window")
    _fails(capsys, ["segment", str(mr), "-o", str(tmp_path / "out.png"), *model], "must end in .nii.gz")
    nan = np.random.rand(10, 10, 4).astype(np.float32)
    nan[1, 1, 1] = np.nan
    nan_path = write_nifti(tmp_path / "nan.nii.gz", nan)
    _fails(capsys, ["segment", str(nan_path), "-o", str(out), *model], "--replace-nonfinite")
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 10, 4), np.float32))
    _fails(capsys, ["segment", str(flat), "-o", str(out), *model], "constant")
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []
    assert main(["segment", str(nan_path), "-o", str(out), "--replace-nonfinite", "-q", *model]) == 0


def test_existing_output_is_kept_unless_overwrite(mr, tmp_path, capsys, brightness_card):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"the user's earlier work")
    model = ["--model", str(brightness_card.card_path), "-q"]
    _fails(capsys, ["segment", str(mr), "-o", str(out), *model], "already exists")
    assert out.read_bytes() == b"the user's earlier work"
    assert main(["segment", str(mr), "-o", str(out), "--overwrite", *model]) == 0
    assert nib.load(str(out)).shape == (117, 91, 20)


def test_models_and_info_list_what_is_there(capsys, brightness_card, monkeypatch):
    monkeypatch.setenv("SAM2UNET_MODELS", str(brightness_card.file.parent))
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "brightness" in listing and "crop square" in listing
    main(["info", "--model", "brightness"])
    info = capsys.readouterr().out
    assert "onnxruntime" in info and "backend auto -> CPU" in info


def test_the_inputs_bids_json_is_kept_and_the_run_stops_before_the_work(mr, tmp_path, capsys, brightness_card):
    (tmp_path / "bids").mkdir()
    tmp_path = tmp_path / "bids"
    source = tmp_path / "sub-01_T2w.nii.gz"
    source.write_bytes(mr.read_bytes())
    bids = tmp_path / "sub-01_T2w.json"
    bids.write_text('{"EchoTime": 0.08}')
    args = ["segment", str(source), "-o", str(tmp_path / "sub-01_T2w.nii"), "--model", str(brightness_card.file)]
    _fails(capsys, [*args, "--overwrite"], "would also describe sub-01_T2w.nii.gz")
    assert bids.read_text() == '{"EchoTime": 0.08}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-01_T2w.json", "sub-01_T2w.nii.gz"]
    assert main([*args, "--no-sidecar", "-q"]) == 0
    assert bids.read_text() == '{"EchoTime": 0.08}'


# --- issue 13, defects 7, 8, 10, 11: every bad input gets one line, before the work ----------


def _model(card):
    return ["--model", str(card.card_path), "-q"]


@pytest.mark.parametrize("option, words", [
    (["--box", "10:nan,21,43,71"], "--box 10:nan,21,43,71: corners must be numbers"),
    (["--point", "10:inf,3"], "--point 10:inf,3: coordinates must be numbers"),
    (["--threads", "10000"], "--threads 10000 is out of range; use 1 to"),
    (["--threads", "-2"], "--threads -2 is out of range"),
    (["--window", "5:1"], "--window 5:1: LOW must be below HIGH, e.g. --window 1:5"),
    (["--window", "nan:inf"], "--window nan:inf: LOW and HIGH must be finite numbers"),
])
def test_bad_options_get_one_line_naming_the_option(mr, tmp_path, capsys, brightness_card, option, words):
    error = _fails(capsys, ["segment", str(mr), "-o", str(tmp_path / "o.nii.gz"), *option,
                            *_model(brightness_card)], words)
    assert error.count("\n") == 1 and "model" not in error.split(words)[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_an_unwritable_folder_is_refused_before_the_work(mr, capsys, brightness_card):
    if not Path("/sys").is_dir():
        pytest.skip("needs Linux's /sys, a folder that even root cannot create files in")
    _fails(capsys, ["segment", str(mr), "-o", "/sys/seg.nii.gz", *_model(brightness_card)],
           "cannot write in /sys: permission denied; choose another --out folder")


def test_a_long_legal_name_is_written(mr, tmp_path, brightness_card):
    """A 250-character name is legal; the temporary file's name must not make it too long."""
    out = tmp_path / ("s" * 243 + ".nii.gz")
    assert main(["segment", str(mr), "-o", str(out), "--box", "10:40,30,60,50", *_model(brightness_card)]) == 0
    assert out.is_file() and (tmp_path / ("s" * 243 + ".json")).is_file()


def test_names_and_paths_over_the_system_limits_get_one_line(mr, tmp_path, capsys, brightness_card):
    _fails(capsys, ["segment", str(mr), "-o", str(tmp_path / ("s" * 300 + ".nii.gz")), *_model(brightness_card)],
           "over this file system's limit of 255")
    deep = tmp_path / "/".join(["d" * 200] * 25) / "seg.nii.gz"
    _fails(capsys, ["segment", str(mr), "-o", str(deep), *_model(brightness_card)], "over this system's limit")


def test_a_folder_as_output_or_input_is_named_a_folder(mr, tmp_path, capsys, brightness_card):
    (tmp_path / "seg.nii.gz").mkdir()
    _fails(capsys, ["segment", str(mr), "-o", str(tmp_path / "seg.nii.gz"), "--overwrite", *_model(brightness_card)],
           "is a folder; give a file name ending in .nii.gz")
    (tmp_path / "dicom").mkdir()
    _fails(capsys, ["segment", str(tmp_path / "dicom"), "-o", str(tmp_path / "o.nii.gz"), *_model(brightness_card)],
           "holds no DICOM images")


_CLI = [sys.executable, "-c", "import sys; from napari_sam2unet.cli import main; sys.exit(main())"]


def test_a_full_disk_while_writing_gets_one_line_and_leaves_nothing(mr, tmp_path, brightness_card):
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    out = tmp_path / "out" / "seg.nii"
    out.parent.mkdir()
    run = subprocess.run([*_CLI, "segment", str(mr), "-o", str(out), *_model(brightness_card)],
                         capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert run.returncode == 2, run.stderr
    assert "cannot write seg.nii: file too large; nothing was written" in run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert list(out.parent.iterdir()) == []


_TERM_DURING_WRITE = """
import os, signal, sys
import nibabel as nib
from napari_sam2unet import cli, io

def save_then_get_terminated(image, filename):
    with open(filename, "wb") as handle:
        handle.write(b"half a label map")
    os.kill(os.getpid(), signal.SIGTERM)

io.nib.save = save_then_get_terminated
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_the_write_leaves_no_partial_file(mr, tmp_path, brightness_card):
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-c", _TERM_DURING_WRITE, "segment", str(mr), "-o", str(out),
                          *_model(brightness_card)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr
    assert "terminated; nothing was written" in run.stderr
    assert list(out.parent.iterdir()) == []  # not even a hidden temporary file


def test_a_cpu_run_says_why_in_a_few_words(mr, tmp_path, brightness_card):
    import yaml

    data = {**brightness_card.raw, "npu": [{"file": "brightness.bin", "soc": "QCS6490"}]}
    brightness_card.card_path.write_text(yaml.safe_dump(data))
    run = subprocess.run([*_CLI, "segment", str(mr), "-o", str(tmp_path / "seg.nii.gz"), "--box", "10:40,30,60,50",
                          "--model", str(brightness_card.card_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = next(text for text in run.stderr.splitlines() if text.startswith("model brightness"))
    assert "`sam2unet info` says why" in line and len(line) < 120 and "aid-pkg" not in run.stderr


def test_outputs_follow_the_umask_and_the_sidecar_is_strict_json(mr, tmp_path, brightness_card):
    old = os.umask(0o022)
    try:
        assert main(["segment", str(mr), "-o", str(tmp_path / "seg.nii.gz"), "--box", "10:40,30,60,50",
                     *_model(brightness_card)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "seg.nii.gz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "seg.json").stat().st_mode) == 0o644


def test_a_bad_card_in_the_models_folder_is_skipped_with_one_warning(capsys, brightness_card, monkeypatch):
    (brightness_card.file.parent / "broken.yaml").write_text("file: x.onnx\ninput: oops\n")
    monkeypatch.setenv("SAM2UNET_MODELS", str(brightness_card.file.parent))
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert "brightness" in captured.out and "sam2unet-compact" in captured.out
    assert captured.err.startswith("sam2unet: warning: skipped: model card") and "broken.yaml" in captured.err
    assert captured.err.count("\n") == 1


def test_a_terminal_sees_the_progress_bar_and_the_model_line_apart_from_it(mr, tmp_path, brightness_card):
    """A pty that reports a size of 0 x 0 (`script`, some CI runners) got no bar at all."""
    import pty

    leader, follower = pty.openpty()  # a fresh pty reports 0 x 0
    run = subprocess.run([sys.executable, "-m", "napari_sam2unet.cli", "segment", str(mr), "-o",
                          str(tmp_path / "all.nii.gz"), "--model", str(brightness_card.file), "--no-sidecar"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # Linux answers EIO once the pty is closed on the other side
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert run.returncode == 0
    text = shown.decode("utf-8", "replace")
    assert "20/20" in text  # the bar reached the last slice
    model_line = next(line for line in text.replace("\r\n", "\n").split("\n") if "model " in line)
    assert model_line.rstrip("\r").split("\r")[-1].startswith("model ")  # not drawn over by the bar
