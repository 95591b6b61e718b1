"""`sam2unet finetune` on a real scan: weights from the ONNX file, a short run, interruptions, bad input."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fine-tuning needs the [train] extra (torch)")

from conftest import build_brightness_model, write_nifti, write_test_card  # noqa: E402

from napari_sam2unet import models  # noqa: E402
from napari_sam2unet.backends import open_backend  # noqa: E402
from napari_sam2unet.cli import main  # noqa: E402
from napari_sam2unet.convert import export  # noqa: E402
from napari_sam2unet.engine import Engine  # noqa: E402
from napari_sam2unet.io import read_volume  # noqa: E402
from napari_sam2unet.models import find_model, list_models, sha256_file  # noqa: E402
from napari_sam2unet.prompts import Box, Prompts  # noqa: E402
from napari_sam2unet.training import finetune as ft  # noqa: E402
from napari_sam2unet.training import finetune_model  # noqa: E402
from napari_sam2unet.training.onnx_weights import TOLERANCE, model_from_onnx  # noqa: E402

SMALL = "cases/msd_hippo_hippocampus_366"  # committed (tests/data): label 1 on axial slices 5-19


def small_args(real_data, out, *more):
    return ["finetune", "--image", str(real_data / SMALL / "image.nii.gz"), "--labels",
            str(real_data / SMALL / "label.nii.gz"), "--label", "1", "--slices", "8,12,16",
            "--steps", "2", "--batch", "2", "--threads", "2", "--out", str(out), *more]


def one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sam2unet: error:"), err
    assert all(w in err[0] for w in words), err[0]
    return err[0]


def test_weights_rebuilt_from_the_bundled_onnx_give_its_outputs():
    card = find_model()  # whatever model is bundled now
    model, difference = model_from_onnx(card)
    # the same logits as the file (up to fp32 rounding between two runtimes) on real-range inputs
    assert difference < TOLERANCE
    # frozen trunk: only adapters (in the trunk) and the decoder learn; the side heads stay out
    chosen = {id(p) for p in ft.trainable(model, "frozen")}
    for name, p in model.named_parameters():
        expected = (".prompt_learn." in name if name.startswith("encoder.") else not name.startswith("side"))
        assert (id(p) in chosen) == expected, name
    assert len({id(p) for p in ft.trainable(model, "trained")}) > len(chosen)


def test_finetune_writes_a_model_discovery_lists_and_the_engine_runs(real_data, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    monkeypatch.setenv("SAM2UNET_MODELS", str(models))
    out = models / "hippo-ft.onnx"
    args = small_args(real_data, out, "--name", "hippo-ft")

    # Ctrl-C during training: exit 130, no model and no temporary folder left
    calls = []
    real_batch = ft.training_batch

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*a, **k)

    monkeypatch.setattr(ft, "training_batch", interrupted)
    assert main(args) == 130
    assert not models.exists() or not any(models.iterdir())
    monkeypatch.setattr(ft, "training_batch", real_batch)

    # Ctrl-C while the model is being written: still nothing (the files move in at the end),
    # whether the weights go into the base graph (frozen trunk) or the model is exported again
    real_card, real_export = finetune_model._write_card, export.export_onnx

    def then_stop(real):
        def run(*a, **k):
            real(*a, **k)
            raise KeyboardInterrupt
        return run

    monkeypatch.setattr(finetune_model, "_write_card", then_stop(real_card))
    assert main(args) == 130
    assert not any(models.iterdir())
    monkeypatch.setattr(finetune_model, "_write_card", real_card)
    monkeypatch.setattr(export, "export_onnx", then_stop(real_export))
    assert main([*args, "--trunk", "trained"]) == 130
    assert not any(models.iterdir())
    monkeypatch.setattr(export, "export_onnx", real_export)
    capsys.readouterr()

    assert main(args) == 0
    card = find_model("hippo-ft")  # by name through $SAM2UNET_MODELS; the hash is checked
    assert "hippo-ft" in [c.name for c in list_models()]
    info = card.raw["finetune"]
    base = find_model()
    assert info["base"]["name"] == base.name and info["base"]["sha256"] == base.sha256
    assert info["data"]["slices"] == [8, 12, 16] and info["data"]["labels"] == [1] and info["steps"] == 2
    files = {entry["file"]: entry["sha256"] for entry in info["data"]["files"]}
    assert files[str(real_data / SMALL / "label.nii.gz")] == sha256_file(real_data / SMALL / "label.nii.gz")
    assert len(info["data"]["data_sha256"]) == 64
    validation = info["validation"]
    assert validation["crops"] == 12  # the labelled slices 5-19 not trained on
    assert 0 <= validation["dice_before"] <= 1 and 0 <= validation["dice_after"] <= 1
    assert card.input == base.input and card.threshold == base.threshold
    assert info["written"].startswith("weights written into the base graph")  # no second export

    # the engine runs the new model: a box on an unlabelled slice gives a mask inside it
    volume = read_volume(real_data / SMALL / "image.nii.gz")
    truth = read_volume(real_data / SMALL / "label.nii.gz").data[:, :, 10] == 1
    rows, cols = np.flatnonzero(truth.any(1)), np.flatnonzero(truth.any(0))
    box = Box(10, rows[0] - 2, cols[0] - 2, rows[-1] + 3, cols[-1] + 3)
    backend, _ = open_backend(card, "cpu", threads=1)
    with backend:
        engine = Engine(backend)
        engine.set_volume(volume.data, volume.spacing, 2)
        mask = engine.segment(Prompts(boxes=[box]), scope="slices").mask[:, :, 10]
    assert mask.any()

    # the new model can be fine-tuned again: its weights come back from its own ONNX file
    assert model_from_onnx(card)[1] < TOLERANCE

    # a second run into the same file is refused and leaves the model as it was
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    one_error_line(capsys, "exists", "--overwrite")
    assert out.read_bytes() == before


def test_trained_weights_written_into_the_base_graph_are_the_models(tmp_path):
    # every kind of weight the graph holds in its own form: linear (transposed), convolution with
    # a folded BatchNorm (scale and shift trained), plain ones; onnxruntime must give torch's logits
    base = ft.load_base(None)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ft.trainable(base.model, "frozen"):
            p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 1e-3))
    how = ft.weights_into_graph(base, tmp_path / "w.onnx")
    assert how and "logit difference" in how
    finetune_model._write_card(base, tmp_path / "w.onnx", {}, "w", how)
    rebuilt, difference = model_from_onnx(models.load_card(tmp_path / "w.yaml"))
    assert difference < TOLERANCE
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 352, 352)).astype(np.float32))
    with torch.no_grad():
        got, want = rebuilt(x)[0], base.model(x)[0]
    assert float((got - want).abs().max()) < TOLERANCE * max(1.0, float(want.abs().max()))


def test_exact_crops_are_framed_as_the_evaluation_frames_them(real_data):
    # --exact 1: every training crop is the validation crop of its slice (up to flips and window)
    volume = read_volume(real_data / SMALL / "image.nii.gz")
    labels = np.asarray(read_volume(real_data / SMALL / "label.nii.gz").data)
    base = ft.load_base(None)
    data = ft.volume_data(volume.data, labels, volume.spacing, base.spec.channels, 2, [12], [1])
    _, want = ft.validation_crops(data.train, base.spec, base.train_size)
    _, ys = ft.training_batch(np.random.default_rng(0), data.train, base.spec, base.train_size, 6, exact=1.0)
    flips = [want[0, 0], want[0, 0, ::-1], want[0, 0, :, ::-1], want[0, 0, ::-1, ::-1]]
    assert all(any(np.array_equal(y[0], f) for f in flips) for y in ys)
    _, jittered = ft.training_batch(np.random.default_rng(0), data.train, base.spec, base.train_size, 6)
    assert not all(any(np.array_equal(y[0], f) for f in flips) for y in jittered)


def test_without_a_models_folder_set_models_go_to_the_per_user_folder_that_is_searched(tmp_path, monkeypatch):
    # models.py owns the default: no widget or command has to set $SAM2UNET_MODELS to find them
    monkeypatch.delenv("SAM2UNET_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    user = tmp_path / "data" / "napari-sam2unet" / "models"
    assert models.models_folder() == user and user in models.search_dirs()
    out = ft.output_path(None, "sam2unet-compact")
    assert out.parent == user and out.suffix == ".onnx"
    user.mkdir(parents=True)
    write_test_card(build_brightness_model(user / "mine.onnx"))
    assert "mine" in [card.name for card in list_models()]
    assert find_model("mine").file == user / "mine.onnx"
    # $SAM2UNET_MODELS, when set, is where new models go; the per-user folder is still searched
    monkeypatch.setenv("SAM2UNET_MODELS", str(tmp_path / "elsewhere"))
    assert models.models_folder() == tmp_path / "elsewhere"
    assert models.search_dirs()[:2] == [tmp_path / "elsewhere", user]


def test_a_label_map_without_labelled_slices_is_refused(real_data, tmp_path, capsys):
    image = read_volume(real_data / SMALL / "image.nii.gz")
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(image.data.shape, np.uint8), image.affine)
    args = small_args(real_data, tmp_path / "m.onnx")
    args[args.index("--labels") + 1] = str(empty)
    assert main(args) == 2
    one_error_line(capsys, "no labelled slice", "label the object")
    # slices that hold no label are refused too, naming the ones that do
    args = small_args(real_data, tmp_path / "m.onnx")
    args[args.index("--slices") + 1] = "40,41"
    assert main(args) == 2
    one_error_line(capsys, "none of the slices [40, 41]", "labelled slices: 5")
    assert not (tmp_path / "m.onnx").exists()


def test_a_label_map_on_another_grid_is_refused(real_data, tmp_path, capsys):
    image = read_volume(real_data / SMALL / "image.nii.gz")
    labels = np.asarray(read_volume(real_data / SMALL / "label.nii.gz").data).astype(np.uint8)
    args = small_args(real_data, tmp_path / "m.onnx")
    other = write_nifti(tmp_path / "other.nii.gz", labels[:, :, :20], image.affine)
    args[args.index("--labels") + 1] = str(other)
    assert main(args) == 2
    one_error_line(capsys, "37x47x20", "37x47x34", "same voxel grid")
    shifted = image.affine.copy()
    shifted[:3, 3] += 12.0
    moved = write_nifti(tmp_path / "moved.nii.gz", labels, shifted)
    args[args.index("--labels") + 1] = str(moved)
    assert main(args) == 2
    one_error_line(capsys, "another grid", "resample")


def test_a_model_without_trainable_weights_is_refused(real_data, tmp_path, capsys):
    card = write_test_card(build_brightness_model(tmp_path / "bright.onnx"))
    assert main(small_args(real_data, tmp_path / "m.onnx", "--base", str(card.file))) == 2
    one_error_line(capsys, "bright has no trainable weights", "--base")


def test_without_torch_one_line_says_what_to_install(real_data, tmp_path):
    # torch made unimportable in a fresh interpreter, as on an install without the [train] extra
    code = ("import sys; sys.modules['torch'] = None\n"
            "from napari_sam2unet.cli import main\n"
            f"sys.exit(main({small_args(real_data, tmp_path / 'm.onnx')!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        'sam2unet: error: fine-tuning needs PyTorch: pip install "napari-sam2unet[train]" (torch==2.13.0, '
        'CPU wheels are enough)']
