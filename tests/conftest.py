"""Shared fixtures: real ONNX models with the SAM2-UNet contract, real NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import settings

from napari_sam2unet.models import INPUT_SIZE, InputSpec, ModelCard, card_fields, load_card, write_card

# The same examples on every run: CI must not turn red on a run's random draw. (A randomised
# run once found crop_for_box rounding a hair inside a box; that example is now fixed.)
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Small real scans committed with the tests, in shared/data's layout (tests/data/README.md).
FIXTURES = Path(__file__).resolve().parent / "data"


def save_model(graph, path: Path) -> None:
    """A test graph as a checked ONNX file (opset 18, IR 8: what onnxruntime and QNN read)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_brightness_model(path: Path, size: int = 352, batch: int | str = "N", gain: float = 8.0) -> Path:
    """A real ONNX model with the SAM2-UNet contract: logits = gain * mean over channels.

    With ImageNet normalisation a pixel brighter than ~45% of the window gets positive logits,
    so "bright structure" is the object: enough to check every step around the model.
    """
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, size, size])
    gain_tensor = helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "brightness", [image], [logits], [gain_tensor, axes])
    save_model(graph, path)
    return path


def write_test_card(onnx_path: Path, **input_overrides) -> ModelCard:
    """A model card beside a test model, with the official preprocessing unless overridden."""
    spec = InputSpec(**{"shape": (-1, 3, INPUT_SIZE, INPUT_SIZE), "name": "image", **input_overrides})
    write_card({**card_fields(onnx_path, spec), "licence": "test model"}, onnx_path.with_suffix(".yaml"))
    return load_card(onnx_path.with_suffix(".yaml"))


@pytest.fixture
def brightness_card(tmp_path: Path) -> ModelCard:
    """Card of a real ONNX model that segments bright regions."""
    return write_test_card(build_brightness_model(tmp_path / "brightness.onnx"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not found at {SHARED_DATA} (shared/ must sit beside the repository)")
    return SHARED_DATA


@pytest.fixture
def real_data() -> Path:
    """The committed scans: a fresh clone has them (shared_data is for the heavier ones)."""
    return FIXTURES


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A real NIfTI file with a given array and affine (default: 1 mm, RAS)."""
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(path))
    return path


def sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8.0, background=100.0, foreground=900.0):
    """A bright ball in a dim volume (MR-like units) and its true mask."""
    grid = np.indices(shape).astype(np.float32)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    mask = distance <= radius
    rng = np.random.default_rng(0)
    data = np.where(mask, foreground, background).astype(np.float32) + rng.normal(0, 5, shape).astype(np.float32)
    return data, mask


def build_prompt_model(path: Path, size: int = 352) -> Path:
    """A real ONNX model that follows prompts (card `channels: prompted`), linear in its input:
    logits = 8 (image - 0.45) + 3 (prior - 0.5) + 20 (clicks - 0.5), each channel back in 0..1.

    A bright pixel is the object; a prior alone cannot make a dim pixel the object; a positive
    click adds the pixels around it and a negative one removes them. A 1x1 convolution."""
    from onnx import TensorProto, helper

    from napari_sam2unet.models import IMAGENET_MEAN, IMAGENET_STD

    gains, centres = (8.0, 3.0, 20.0), (0.45, 0.5, 0.5)
    # logit = sum_c g_c (x_c std_c + mean_c - centre_c)
    weights = [g * s for g, s in zip(gains, IMAGENET_STD)]
    bias = sum(g * (m - c) for g, m, c in zip(gains, IMAGENET_MEAN, centres))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], weights)
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [bias])
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w", "b"], ["logits"])], "prompted",
                              [image], [logits], [w, b])
    save_model(graph, path)
    return path


@pytest.fixture
def prompted_card(tmp_path: Path) -> ModelCard:
    """Card of a real ONNX model that sees clicks and a prior mask in its input channels."""
    return write_test_card(build_prompt_model(tmp_path / "prompted.onnx"), channels="prompted")
