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
from napari_sam2unet.training import datasets  # noqa: E402
from napari_sam2unet.training import sources as tsources  # noqa: E402


def _small_data(real_data) -> list[str]:
    """Two small real cases, committed (tests/data): one to train on, one to validate on."""
    cases = real_data / "cases"
    return ["--data", str(cases / "msd_hippo_hippocampus_366"), "--val-data", str(cases / "msd_hippo_hippocampus_001")]


def test_training_crops_show_a_boxed_structure_framed_in_many_ways(shared_data):
    specs = datasets.find_cases([datasets.default_manifest()], root=shared_data)
    sources = tsources.load_sources([c for c in specs if c.split == "train"][:4])
    spec = InputSpec(channels="multiview", crop="box_aspect")
    rng = np.random.default_rng(0)
    x, y = tdata.batch(rng, sources, spec, (64, 64), 24)
    assert x.shape == (24, 3, 64, 64) and y.shape == (24, 1, 64, 64)
    assert np.isfinite(x).all()
    share = y.mean(axis=(1, 2, 3))
    assert (share > 0).all() and (share < 0.995).all()
    # the crop is centred on the box drawn around the target
    centres = np.array([np.argwhere(target[0]).mean(axis=0) / 64 for target in y])
    assert ((centres > 0.2) & (centres < 0.8)).all()
    # the framing varies (margins 0 to 0.5): some targets fill the crop, others sit small in it
    assert share.max() > 2.5 * share.min()
    # the three channels are different views (multiview), not copies
    assert np.abs(x[:, 0] - x[:, 1]).mean() > 0.05


def test_the_bundled_manifest_splits_by_patient_and_trains_only_on_shippable_licences(shared_data):
    cases = datasets.find_cases([datasets.default_manifest()], root=shared_data)
    splits = tsources.split_cases(cases)  # raises if a patient were in two splits
    assert all(splits[name] for name in ("train", "validation", "test"))
    for case in splits["train"]:
        assert all(path.is_file() for path in case.files()), case.name
        assert "NC" not in case.licence and "GPL" not in case.licence and "not restated" not in case.licence
    patients = {split: {c.patient for c in found} for split, found in splits.items()}
    assert not patients["train"] & patients["validation"] and not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]


def test_short_run_resumes_and_exports_a_model_the_engine_runs(real_data, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--config", "compact_s", *_small_data(real_data), "--out-dir", str(out),
              "--size", "64", "--batch", "2", "--val-crops", "4", "--val-every", "2", "--log-every", "2",
              "--warmup", "1", "--threads", "2"]
    assert main([*common, "--steps", "2", "--workers", "2"]) == 0  # two crop processes, as on a GPU
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
    assert card.raw["training"]["steps"] == 4
    assert card.raw["training"]["trained_on"].startswith("CPU: ")  # where it was trained, from the checkpoint
    assert [c["case"] for c in card.raw["data"]["train"]] == ["msd_hippo_hippocampus_366"]
    assert [c["case"] for c in card.raw["data"]["validation"]] == ["msd_hippo_hippocampus_001"]
    # exporting again later needs only the run folder: the card describes the run, not this call
    again = tmp_path / "again.onnx"
    assert main(["train", "--export-only", "--out-dir", str(out), "--export", str(again), "--name", "again"]) == 0
    card_again = find_model(again)
    assert card_again.raw["architecture"]["config"] == "compact_s"
    assert card_again.raw["training"]["steps"] == 4 and "--steps 4" in card_again.raw["training"]["command"]
    logits = OnnxBackend(card, threads=2).predict(np.zeros((1, 3, 352, 352), np.float32))
    assert logits.shape == (1, 1, 352, 352) and np.isfinite(logits).all()


def test_a_prompted_run_exports_a_card_that_propagates_and_clicks_as_trained(real_data, tmp_path):
    onnx_path = tmp_path / "prompted.onnx"
    assert main(["train", "--config", "compact_s", *_small_data(real_data), "--out-dir", str(tmp_path / "run"),
                 "--channels", "prompted", "--click-crop-extent", "0.3", "6", "--size", "64", "--batch", "2",
                 "--val-crops", "4", "--val-every", "2", "--warmup", "1", "--threads", "2", "--steps", "2",
                 "--export", str(onnx_path)]) == 0
    card = find_model(onnx_path)
    assert card.input.channels == "prompted"
    assert card.propagation_prior == 0.25  # the engine draws the neighbour's mask as the bundled model's card says
    assert "0.3-6x its extent" in card.raw["training"]["simulated_users"]
    assert "--click-crop-extent 0.3 6" in card.raw["training"]["command"]


def test_missing_training_data_is_named(tmp_path, capsys):
    args = ["train", "--data", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "r"), "--steps", "1"]
    assert main(args) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_a_typo_in_the_config_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", "compcat", "--out-dir", str(tmp_path / "r")]) == 2
    assert "unknown --config 'compcat'" in capsys.readouterr().err


def test_a_run_distils_from_a_teacher_run(real_data, tmp_path):
    common = ["train", "--config", "compact_s", *_small_data(real_data), "--size", "64", "--batch", "2",
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
        ("missing", "label.nii.gz is missing"),
        ("wrong grid", "same voxel grid"),
        ("empty", "label map is empty"),
        ("fractional", "fractional values"),
    ],
)
def test_bad_training_data_stops_with_a_clear_message(real_data, tmp_path, capsys, broken, message):
    # a real case folder whose label map is missing, on another grid, empty or fractional
    case = tmp_path / "data" / "brain"
    case.mkdir(parents=True)
    source = real_data / "cases" / "msd_hippo_hippocampus_366"
    (case / "image.nii.gz").symlink_to(source / "image.nii.gz")
    shape = nib.load(str(source / "image.nii.gz")).shape
    if broken == "wrong grid":
        write_nifti(case / "label.nii.gz", np.ones((shape[0], shape[1], shape[2] - 1), np.int16))
    elif broken == "empty":
        write_nifti(case / "label.nii.gz", np.zeros(shape, np.int16))
    elif broken == "fractional":
        write_nifti(case / "label.nii.gz", np.full(shape, 0.5, np.float32))
    out = tmp_path / "run"
    val = ["--val-data", str(real_data / "cases" / "msd_hippo_hippocampus_001")]
    assert main(["train", "--data", str(tmp_path / "data"), *val, "--out-dir", str(out), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert message in error and "brain" in error
    assert not (out / "last.pt").exists()


def test_a_checkpoint_holds_no_functions_and_is_written_whole(real_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "compact_s", *_small_data(real_data), "--out-dir", str(out), "--size", "64",
                 "--batch", "2", "--val-crops", "4", "--val-every", "3", "--log-every", "2", "--warmup", "1",
                 "--threads", "2", "--steps", "3"]) == 0
    # validation ran at step 3 although 3 is not a multiple of --log-every
    assert (out / "best.pt").is_file()
    state = torch.load(out / "best.pt", weights_only=True)
    assert "func" not in state["args"] and state["step"] == 3
    assert not list(out.glob("*.tmp"))


def test_the_card_licences_weights_as_apache_only_when_every_training_licence_allows_it():
    from types import SimpleNamespace

    from napari_sam2unet.training.train import weights_licence

    shippable = [SimpleNamespace(licence=text) for text in ("BSD-3-Clause", "Apache-2.0; TCIA CC BY 3.0")]
    assert weights_licence(shippable) == "Apache-2.0"
    brats = SimpleNamespace(licence="CC BY-NC-SA 3.0 CH (measuring only)")
    assert "CC BY-NC-SA" in weights_licence([*shippable, brats])
    assert weights_licence([brats]).startswith("not for redistribution")
    assert "unstated" in weights_licence([SimpleNamespace(licence="")])
