"""ONNX export: the model contract, card, and parity of onnxruntime with torch on real slices."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export tests need the [export] extra (torch)")
pytest.importorskip("onnx", reason="export tests need the [export] extra (onnx)")
import torch.nn.functional as F  # noqa: E402

from napari_sam2unet.backends.onnx import OnnxBackend  # noqa: E402
from napari_sam2unet.convert.export import (  # noqa: E402
    add_export_parser,
    card_dict,
    export_onnx,
    quantize_int8,
)
from napari_sam2unet.errors import ModelError  # noqa: E402
from napari_sam2unet.modeling import Sam2Unet, build_sam2unet, count_parameters  # noqa: E402
from napari_sam2unet.modeling.configs import tiny_test_config  # noqa: E402
from napari_sam2unet.models import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_card,
    sha256_file,
    write_card,
)

DATA = Path(__file__).resolve().parent / "data"  # committed scans (tests/data/README.md)
MR = DATA / "totalseg" / "example_mr_sm.nii.gz"
MR_LABELS = DATA / "totalseg" / "example_seg_mr.nii.gz"
LIVER = 5
SIZE = 352


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def real_slices() -> tuple[torch.Tensor, torch.Tensor]:
    """The three MR slices with the most liver, preprocessed like the engine does
    (0.5-99.5 percentile window, resize to 352, /255, ImageNet mean/std), and liver masks."""
    import nibabel

    volume = np.asarray(nibabel.load(MR).dataobj, dtype=np.float32)
    labels = np.asarray(nibabel.load(MR_LABELS).dataobj)
    picks = sorted(np.argsort((labels == LIVER).sum(axis=(0, 1)))[-3:])
    low, high = np.percentile(volume, [0.5, 99.5])
    picked = np.stack([volume[:, :, k] for k in picks])
    window = np.clip((picked - low) / (high - low), 0, 1).astype(np.float32)
    image = F.interpolate(torch.from_numpy(window)[:, None], size=(SIZE, SIZE), mode="bilinear")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = (image.repeat(1, 3, 1, 1) - mean) / std
    masks = np.stack([labels[:, :, k] == LIVER for k in picks]).astype(np.float32)
    target = F.interpolate(torch.from_numpy(masks)[:, None], size=(SIZE, SIZE), mode="nearest")
    return image, target


@pytest.fixture(scope="module")
def trained():
    """A tiny SAM2-UNet trained for a few steps to segment the liver, so its masks are real
    shapes with confident logits rather than the noise of random weights."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    image, target = real_slices()
    model = Sam2Unet(tiny_test_config()).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    middle = slice(1, 2)  # train on one slice (cheap), test on all three
    for _ in range(30):
        logit_maps = model(image[middle])
        loss = sum(F.binary_cross_entropy_with_logits(o, target[middle]) for o in logit_maps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = model(image)[0].numpy()
    masks = logits > 0
    # The parity Dice below only means something if the masks are neither empty nor full.
    assert 0.02 < masks.mean() < 0.6, f"training failed: foreground {masks.mean():.3f}"
    assert dice(masks, target.numpy() > 0) > 0.7
    return model, image.numpy(), logits


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, _, _ = trained
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, folder / "tiny.onnx", "test", card_extra={"licence": "test"})
    # Quantise the same graph the way export_onnx(int8=True) does, without a second export
    # (each dynamo export costs ~15 s here); the CLI test covers the int8 export path.
    int8_onnx = quantize_int8(fp32.with_suffix(".onnx"), folder / "tiny-int8.onnx")
    card = card_dict("tiny-int8", int8_onnx, "test", count_parameters(model), "dynamic", "nchw", True)
    int8 = write_card(card, int8_onnx.with_suffix(".yaml"))
    return fp32, int8


def test_fp32_matches_torch_on_real_slices(trained, exported):
    _, image, logits = trained
    backend = OnnxBackend(load_card(exported[0]), threads=2)
    onnx_logits = backend.predict(image)  # dynamic batch: 3 slices in one call
    assert onnx_logits.shape == (3, 1, SIZE, SIZE)
    assert np.abs(onnx_logits - logits).max() < 1e-3
    assert dice(onnx_logits > 0, logits > 0) >= 0.99


def test_int8_close_to_fp32(trained, exported):
    _, image, logits = trained
    backend = OnnxBackend(load_card(exported[1]), threads=2)
    int8_logits = backend.predict(image)
    assert dice(int8_logits > 0, logits > 0) >= 0.97
    # int8 is not identical: a quantised graph that silently fell back to fp32 would be.
    assert np.abs(int8_logits - logits).max() > 1e-6


def test_a_work_size_model_keeps_the_352_contract(tmp_path):
    """Compact models compute at a smaller side inside the graph; ONNX still takes and returns 352."""
    torch.manual_seed(0)
    model = Sam2Unet(tiny_test_config(work_size=96)).eval()
    image = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = model(image)[0].numpy()
        small = model(F.interpolate(image, size=(96, 96), mode="bilinear", antialias=True))[0]
    assert small.shape == (2, 1, 96, 96)  # at its work size the model resizes nothing
    card = export_onnx(model, tmp_path / "work96.onnx", "test")
    onnx_logits = OnnxBackend(load_card(card), threads=2).predict(image.numpy())
    assert onnx_logits.shape == (2, 1, SIZE, SIZE)
    assert np.abs(onnx_logits - logits).max() < 1e-3


def test_card_describes_the_file(exported):
    card = load_card(exported[0])
    card.verify()  # sha256 matches the file
    assert card.input.shape == (-1, 3, SIZE, SIZE)
    assert card.input.name == "image"
    assert card.output_shape == (-1, 1, SIZE, SIZE)
    assert card.raw["architecture"]["config"] == "test"
    assert card.raw["licence"] == "test"  # card_extra wins
    assert "int8" in load_card(exported[1]).raw["architecture"]["precision"]


def test_position_embedding_is_a_constant(exported):
    import onnx

    graph = onnx.load(exported[0].with_suffix(".onnx")).graph
    modes = [
        attribute.s
        for node in graph.node
        if node.op_type == "Resize"
        for attribute in node.attribute
        if attribute.name == "mode"
    ]
    assert modes and b"cubic" not in modes  # the bicubic resize was folded away
    assert [o.name for o in graph.output] == ["logits"]


def test_cli_export_int8_nhwc_batch1(tmp_path):
    """`sam2unet export` end to end: strict load, int8, NHWC, batch 1, card, backend."""
    from napari_sam2unet.convert.export import run_export

    torch.manual_seed(0)
    model = build_sam2unet("compact_s").eval()
    checkpoint = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.onnx"
    argv = ["export", str(checkpoint), "--config", "compact_s", "--out", str(out)]
    args = parser.parse_args([*argv, "--int8", "--batch", "1", "--layout", "nhwc"])
    assert run_export(args) == 0
    card = load_card(out.with_suffix(".yaml"))
    card.verify()
    assert card.input.shape == (1, SIZE, SIZE, 3) and card.input.layout == "nhwc"
    assert card.output_shape == (1, 1, SIZE, SIZE)
    assert card.raw["source"]["checkpoint_sha256"] == sha256_file(checkpoint)
    assert card.raw["architecture"]["parameters"] == count_parameters(model)
    backend = OnnxBackend(card, threads=2)
    assert backend.max_batch == 1
    image = torch.randn(2, 3, SIZE, SIZE)
    logits = backend.predict(image.numpy())  # NCHW in; the backend transposes, one at a time
    with torch.no_grad():
        expected = model(image)[0].numpy()
    assert logits.shape == (2, 1, SIZE, SIZE)
    # Random weights: only a loose check that the layout is right (a wrong transpose is far off).
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.9


def test_bad_options_are_refused(tmp_path):
    model = Sam2Unet(tiny_test_config())
    with pytest.raises(ModelError, match="--layout"):
        export_onnx(model, tmp_path / "m.onnx", "test", layout="hwc")
    with pytest.raises(ModelError, match=".onnx"):
        export_onnx(model, tmp_path / "m.pt", "test")


def test_cli_parser():
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "w.pth", "--out", "m.onnx", "--int8", "--batch", "1"])
    assert (args.config, args.int8, args.batch, args.layout) == ("large", True, "1", "nchw")
    assert args.func.__name__ == "run_export"


def test_the_torch_pin_in_messages_is_the_one_pyproject_installs():
    import tomllib

    from napari_sam2unet.errors import TORCH

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]

    def packages(extra: str) -> list[str]:  # an extra may name another: napari-sam2unet[export]
        named = [r for r in extras[extra] if r.startswith("napari-sam2unet[")]
        return [r for r in extras[extra] if r not in named] + [p for r in named for p in packages(r[16:-1])]

    assert TORCH in extras["export"] and TORCH in packages("train")


def test_import_without_torch():
    """The CLI imports export.py on every run: it must not need torch until it exports."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import napari_sam2unet.convert.export as e\n"
        "from napari_sam2unet.errors import ModelError\n"
        "try:\n    e._import_torch()\nexcept ModelError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'pip install "napari-sam2unet[export]"' in result.stdout
