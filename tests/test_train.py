"""`sam2unet train` on the real scans: crops, a short run, resume, export to the model contract."""

import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra (torch)")

from conftest import write_nifti  # noqa: E402

from napari_sam2unet.backends.onnx import OnnxBackend  # noqa: E402
from napari_sam2unet.cli import main  # noqa: E402
from napari_sam2unet.models import InputSpec, find_model  # noqa: E402
from napari_sam2unet.training import data as tdata  # noqa: E402


def test_training_crops_show_a_boxed_structure(shared_data):
    sources = tdata.load_sources(shared_data)
    spec = InputSpec(channels="multiview", crop="box_aspect")
    rng = np.random.default_rng(0)
    x, y = tdata.batch(rng, sources, spec, (64, 64), 12)
    assert x.shape == (12, 3, 64, 64) and y.shape == (12, 1, 64, 64)
    assert np.isfinite(x).all()
    share = y.mean(axis=(1, 2, 3))
    assert (share > 0).all() and (share < 0.98).all()
    # the crop is centred on the box drawn around the target (small ones get 24 px of context)
    centres = np.array([np.argwhere(target[0]).mean(axis=0) / 64 for target in y])
    assert ((centres > 0.25) & (centres < 0.75)).all()
    # the three channels are different views (multiview), not copies
    assert np.abs(x[:, 0] - x[:, 1]).mean() > 0.05


def test_validation_structures_are_held_out_of_training(shared_data):
    train = {(s.name, li, lid) for s in tdata.load_sources(shared_data) for (_, li, lid) in s.slices}
    val = {(s.name, li, lid) for s in tdata.validation_sources(shared_data) for (_, li, lid) in s.slices}
    assert val and not train & val


def test_short_run_resumes_and_exports_a_model_the_engine_runs(shared_data, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--config", "compact_s", "--data-dir", str(shared_data), "--out-dir", str(out),
              "--size", "64", "--batch", "2", "--val-crops", "4", "--val-every", "2", "--log-every", "2",
              "--warmup", "1", "--threads", "2"]
    assert main([*common, "--steps", "2"]) == 0
    # an interrupted run may have logged steps past its last checkpoint: they are run again
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # the last line cut short by the stop
    onnx_path = tmp_path / "tiny.onnx"
    assert main([*common, "--steps", "4", "--resume", "--export", str(onnx_path), "--name", "tiny"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the second run went on from step 2
    # a fresh run into the same folder would overwrite its checkpoints: refused, nothing touched
    before = (out / "last.pt").read_bytes()
    assert main([*common, "--steps", "2"]) == 2
    assert (out / "last.pt").read_bytes() == before
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    card = find_model(onnx_path)  # hash checked
    assert card.input.channels == "multiview" and card.input.crop == "box_aspect"
    assert card.raw["training"]["steps"] == 4 and "test" in card.raw["data"]
    # exporting again later needs only the run folder: the card describes the run, not this call
    again = tmp_path / "again.onnx"
    assert main(["train", "--export-only", "--out-dir", str(out), "--export", str(again), "--name", "again"]) == 0
    card_again = find_model(again)
    assert card_again.raw["architecture"]["config"] == "compact_s"
    assert card_again.raw["training"]["steps"] == 4 and "--steps 4" in card_again.raw["training"]["command"]
    logits = OnnxBackend(card, threads=2).predict(np.zeros((1, 3, 352, 352), np.float32))
    assert logits.shape == (1, 1, 352, 352) and np.isfinite(logits).all()


def test_missing_training_data_is_named(tmp_path):
    args = ["train", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "r"), "--steps", "1"]
    assert main(args) == 2


def test_a_run_distils_from_a_teacher_run(shared_data, tmp_path):
    common = ["train", "--config", "compact_s", "--data-dir", str(shared_data), "--size", "64", "--batch", "2",
              "--val-crops", "4", "--val-every", "2", "--log-every", "2", "--warmup", "1", "--threads", "2",
              "--steps", "2"]
    assert main([*common, "--arch", "unet", "--out-dir", str(tmp_path / "teacher")]) == 0
    teacher = tmp_path / "teacher" / "best.pt"
    student = tmp_path / "student.onnx"
    assert main([*common, "--out-dir", str(tmp_path / "student"), "--teacher", str(teacher),
                 "--export", str(student)]) == 0
    training = find_model(student).raw["training"]
    assert training["teacher"] == str(teacher) and "teacher" in training["loss"]
    # a file that is not a training checkpoint is named, before any training
    assert main([*common, "--out-dir", str(tmp_path / "bad"), "--teacher", str(student)]) == 2


@pytest.mark.parametrize(
    "broken, message",
    [
        ("missing", "does not exist"),
        ("wrong grid", "same voxel grid"),
        ("empty", "label map is empty"),
    ],
)
def test_bad_training_data_stops_with_a_clear_message(shared_data, tmp_path, capsys, broken, message):
    # the real training folder, with the vertebra label map missing, on another grid, or empty
    data = tmp_path / "data"
    for path in shared_data.rglob("*"):
        if path.is_file():
            (data / path.relative_to(shared_data)).parent.mkdir(parents=True, exist_ok=True)
            (data / path.relative_to(shared_data)).symlink_to(path)
    labels = data / "totalseg" / "example_ct_vertebrae.nii.gz"
    labels.unlink()
    shape = nib.load(str(shared_data / "totalseg" / "example_ct.nii.gz")).shape
    if broken == "wrong grid":
        write_nifti(labels, np.ones((shape[0], shape[1], shape[2] - 1), np.int16))
    elif broken == "empty":
        write_nifti(labels, np.zeros(shape, np.int16))
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out-dir", str(out), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert message in error and "example_ct_vertebrae" in error
    assert not (out / "last.pt").exists()
