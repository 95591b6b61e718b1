"""Numbers and output places of `finetune` and `train` are refused in one line before any work (issue 25)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_sam2unet.cli import main

pytest.importorskip("torch", reason="finetune and train need torch (the [train] extra)")


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


# Paths that do not exist: the check must come before any file is read or torch trains.
FINETUNE = ["finetune", "--image", "missing.nii.gz", "--labels", "missing-labels.nii.gz"]


@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"),
    ("--deform", "2"), ("--deform", "nan"), ("--exact", "-1"),
    ("--threads", "10000"), ("--threads", "-1"), ("--steps", "0"), ("--batch", "0"),
])
def test_finetune_refuses_a_bad_number_before_any_work(tmp_path, capsys, option, value):
    out = tmp_path / "out"
    out.mkdir()
    assert main([*FINETUNE, "--out", str(out / "m.onnx"), option, value]) == 2
    _one_line(capsys, option)
    assert _files(tmp_path) == [Path("out")]  # the empty folder only: nothing written


def test_finetune_out_with_another_suffix_is_refused_not_made_a_folder(tmp_path, capsys):
    assert main([*FINETUNE, "--out", str(tmp_path / "m.pt")]) == 2
    _one_line(capsys, "m.pt", ".onnx")
    assert not (tmp_path / "m.pt").exists()


def test_finetune_out_in_a_file_or_a_dangling_link_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*FINETUNE, "--out", str(tmp_path / "notes.txt" / "m.onnx")]) == 2
    _one_line(capsys, "is a file")
    (tmp_path / "m.onnx").symlink_to(tmp_path / "gone" / "m.onnx")
    assert main([*FINETUNE, "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "link to nothing")
    assert (tmp_path / "notes.txt").read_text() == "mine"


TRAIN = ["train", "--data", "missing-data"]


@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--min-lr", "-1"), ("--weight-decay", "nan"),
    ("--ema", "2"), ("--click-share", "1.5"), ("--margin", "inf"), ("--threads", "10000"), ("--threads", "-1"),
    ("--steps", "0"), ("--batch", "0"), ("--val-every", "0"), ("--workers", "0"),
])
def test_train_refuses_a_bad_number_before_any_work(tmp_path, capsys, option, value):
    assert main([*TRAIN, "--out-dir", str(tmp_path / "run"), option, value]) == 2
    _one_line(capsys, option)
    assert not (tmp_path / "run").exists()


def test_train_out_dir_on_a_file_and_a_bad_export_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main([*TRAIN, "--out-dir", str(tmp_path / "file")]) == 2
    _one_line(capsys, "--out-dir", "is a file")
    assert main([*TRAIN, "--out-dir", str(tmp_path / "run"), "--export", str(tmp_path / "m.pt")]) == 2
    _one_line(capsys, "--export", ".onnx")
    assert main([*TRAIN, "--out-dir", str(tmp_path / "run"), "--export", str(tmp_path / "file" / "m.onnx")]) == 2
    _one_line(capsys, "--export", "is a file")
    assert _files(tmp_path) == [tmp_path.joinpath("file").relative_to(tmp_path)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; test_unprivileged.py runs this as nobody")
def test_read_only_outputs_are_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    assert main([*FINETUNE, "--out", str(locked / "m.onnx")]) == 2
    _one_line(capsys, "permission denied")
    assert main([*TRAIN, "--out-dir", str(locked / "run")]) == 2
    _one_line(capsys, "permission denied")
