"""The QNN-ready export: batch 1, no antialiased Resize, no constant-left MatMul, same logits.

These need only onnx and onnxruntime (no Qualcomm runtime), so they run everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the QNN-ready export needs onnx ([qnn] or [testing] extra)")

from napari_sam2unet.backends.onnx import OnnxBackend  # noqa: E402
from napari_sam2unet.convert import qnn_rewrite as rewrite  # noqa: E402
from napari_sam2unet.errors import ModelError  # noqa: E402
from napari_sam2unet.models import find_model, load_card  # noqa: E402
from napari_sam2unet.preprocess import crop_for_slice, plan_views, sample_crop, to_model_input  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MR = DATA / "totalseg" / "example_mr_sm.nii.gz"


def graph_facts(path: Path) -> dict:
    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    return {
        "batch": [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][0],
        "antialiased": [n.name for n in model.graph.node if n.op_type == "Resize" and rewrite._antialiased(n)],
        "constant_left": [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in initializers],
    }


def real_inputs(card, count: int = 3) -> np.ndarray:
    if not MR.is_file():
        pytest.skip(f"real scans not found at {DATA} (shared/ must sit beside the repository)")
    volume = np.asanyarray(nib.load(str(MR)).dataobj, dtype=np.float32)
    views = plan_views(volume, "auto", card.input.channels)
    slices = []
    for k in np.linspace(4, volume.shape[2] - 5, count).astype(int):
        raw = volume[:, :, k]
        slices.append(to_model_input(sample_crop(raw, crop_for_slice(raw.shape), card.input.size), views, card.input))
    return np.stack(slices).astype(np.float32)


@pytest.fixture(scope="module")
def bundled_ready(tmp_path_factory):
    card = find_model()
    out = tmp_path_factory.mktemp("qnn") / "ready.onnx"
    differences = rewrite.make_qnn_ready(card.file, out)
    return card, out, differences


def test_bundled_model_becomes_qnn_ready(bundled_ready):
    card, out, differences = bundled_ready
    before, after = graph_facts(card.file), graph_facts(out)
    assert before["antialiased"], "the bundled model was expected to start with an antialiased Resize"
    assert after == {"batch": 1, "antialiased": [], "constant_left": []}
    assert set(differences) == {"batch 1", "antialiased Resize as MatMuls", "constant-left MatMuls transposed"}
    assert all(0 <= d <= rewrite.TOLERANCE for d in differences.values())


def test_qnn_ready_logits_match_the_plain_model_on_real_slices(bundled_ready, tmp_path):
    card, out, _ = bundled_ready
    ready_card = load_card(out)  # a bare .onnx: the official preprocessing, which the logits do not use
    batch = real_inputs(card)
    with OnnxBackend(card, threads=2) as plain, OnnxBackend(ready_card, threads=2) as ready:
        assert ready.max_batch == 1
        difference = np.abs(plain.predict(batch) - ready.predict(batch)).max()
    assert difference <= rewrite.TOLERANCE


def test_a_rewrite_that_changes_the_logits_is_refused(tmp_path, monkeypatch):
    exact = rewrite._resize_matrix
    monkeypatch.setattr(rewrite, "_resize_matrix", lambda *a: exact(*a) * np.float32(1.01))
    with pytest.raises(ModelError, match="antialiased Resize as MatMuls.*changed the logits"):
        rewrite.make_qnn_ready(find_model().file, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_constant_left_matmul_moves_the_constant_right(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    constant = rng.normal(size=(4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["c", "image"], ["logits"], name="left")],
        "left",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 5])],
        [numpy_helper.from_array(constant, "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "left.onnx"))
    differences = rewrite.make_qnn_ready(tmp_path / "left.onnx", tmp_path / "right.onnx")
    assert graph_facts(tmp_path / "right.onnx")["constant_left"] == []
    assert differences["constant-left MatMuls transposed"] <= rewrite.TOLERANCE
    import onnxruntime as ort

    x = rng.normal(size=(1, 3, 8, 5)).astype(np.float32)
    # Not a 352 px model, so no backend: the session directly.
    got = ort.InferenceSession(str(tmp_path / "right.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_allclose(got[0], constant @ x, atol=1e-5)


def test_cli_export_target_qnn(tmp_path):
    """`sam2unet export --target qnn` writes a batch-1, QNN-ready graph and says so in its card."""
    torch = pytest.importorskip("torch", reason="exporting needs the [export] extra (torch)")
    from napari_sam2unet.convert.export import add_export_parser
    from napari_sam2unet.modeling import build_sam2unet

    torch.manual_seed(0)
    model = build_sam2unet("compact_s").eval()
    checkpoint = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "q.onnx"
    args = parser.parse_args(["export", str(checkpoint), "--config", "compact_s", "--out", str(out), "--target", "qnn"])
    assert args.func(args) == 0
    card = load_card(out.with_suffix(".yaml"))
    card.verify()  # the card's sha256 is the rewritten file's
    assert card.input.shape == (1, 3, 352, 352)
    assert set(card.raw["architecture"]["qnn_ready"]) == {
        "batch 1",
        "antialiased Resize as MatMuls",
        "constant-left MatMuls transposed",
    }
    assert graph_facts(out) == {"batch": 1, "antialiased": [], "constant_left": []}
    image = np.random.default_rng(0).normal(size=(1, 3, 352, 352)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(image))[0].numpy()
    with OnnxBackend(card, threads=2) as backend:
        np.testing.assert_allclose(backend.predict(image), expected, atol=1e-3)
