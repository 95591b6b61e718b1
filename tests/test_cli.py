"""The `sam2unet` command on real scans: the output's geometry, the messages for bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_nifti

from napari_sam2unet.cli import main


@pytest.fixture
def mr(shared_data):
    return shared_data / "totalseg" / "example_mr_sm.nii.gz"


def _liver_box(shared_data, k=10):
    """The liver's bounding box on slice k of the abdominal MRI, grown by 10%."""
    seg = np.asarray(nib.load(str(shared_data / "totalseg" / "example_seg_mr.nii.gz")).dataobj)
    rows, cols = np.nonzero(seg[:, :, k] == 5)
    return f"{k}:{rows.min() - 2},{cols.min() - 2},{rows.max() + 3},{cols.max() + 3}"


def test_segment_the_liver_box_writes_labels_aligned_with_the_image(mr, shared_data, tmp_path, brightness_card):
    out = tmp_path / "liver.nii.gz"
    code = main(["segment", str(mr), "--out", str(out), "--box", _liver_box(shared_data),
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
