"""A trainable PyTorch SAM2-UNet rebuilt from an exported ONNX file's initialisers.

Every model `sam2unet export` / `train` / `finetune` writes is the same graph: linear weights
stored transposed before a MatMul, BatchNorm folded into the convolution before it, and the
position embedding folded into one constant for the work grid. Each is undone here (the folded
BatchNorm becomes an identity one behind the folded convolution; the embedding is solved back by
least squares), and the result is only accepted when torch and onnxruntime agree on the same
inputs within TOLERANCE (relative to the logits' scale). The side heads (`side1`, `side2`) never
reach the first output, so they are not in the file: fine-tuning trains the prediction head only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError, require_torch

# Largest |logit difference| torch vs onnxruntime accepted for a rebuilt model, per unit of the
# largest |logit| (at least 1): two fp32 runtimes differ by ~1e-5 of it, a wrong weight by ~1.
TOLERANCE = 1e-4
PREFIX = "inner."  # convert/export.py wraps the model as `inner` (first logit map only)
NOT_IN_GRAPH = ("side1.", "side2.", "up4.")  # unused by the prediction: absent from the ONNX
PURPOSE = "rebuilding trainable weights from an ONNX file"  # what needs torch, for its message


def _no_weights(card, why: str) -> ModelError:
    return ModelError(
        f"{card.name} has no trainable weights ({why}); fine-tune an fp32 SAM2-UNet exported by "
        f"sam2unet export/train/finetune, or give its PyTorch checkpoint (.pt/.pth) as --base"
    )


def config_of(card):
    """The SAM2-UNet config named by a model card, or a clear refusal."""
    from ..modeling import get_config

    arch = card.raw.get("architecture") or {}
    if arch.get("family") != "sam2unet" or not arch.get("config"):
        raise _no_weights(card, "its card names no SAM2-UNet architecture config")
    if "fp32" not in str(arch.get("precision", "fp32")) or arch.get("qnn_ready"):
        raise _no_weights(card, f"its weights are {arch.get('qnn_ready') and 'QNN-rewritten' or arch['precision']}")
    try:
        return get_config(arch["config"])
    except ValueError as error:
        raise _no_weights(card, str(error)) from None


def model_from_onnx(card):
    """(Sam2Unet in eval mode, largest |logit difference| to the ONNX model) for a model card."""
    import onnx
    torch = require_torch(PURPOSE, "train")
    from onnx import numpy_helper

    from ..modeling import Sam2Unet

    config = config_of(card)
    try:
        graph = onnx.load(str(card.file)).graph
    except Exception as error:  # protobuf raises several kinds for broken files
        raise _no_weights(card, f"{card.file.name} cannot be read: {str(error).splitlines()[0][:80]}") from None
    inits = {t.name: t for t in graph.initializer}
    array = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    producer = {out: node for node in graph.node for out in node.output}
    conv_bias = {n.input[1]: n.input[2] for n in graph.node if n.op_type == "Conv" and len(n.input) > 2}
    linear_weight = {}  # Linear name -> initialiser of the MatMul before its bias Add
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i in inits and i.endswith(".bias")), None)
        other = next((i for i in node.input if i != bias), None)
        matmul = producer.get(other)
        if bias and matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
            linear_weight[bias[len(PREFIX):-len(".bias")]] = matmul.input[1]

    model = Sam2Unet(config).eval()
    state = model.state_dict()
    found: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear) and name in linear_weight:
            found[name + ".weight"] = array(linear_weight[name]).T
    for conv_name, bn_name in _conv_bn_pairs(model):
        key = PREFIX + conv_name + ".weight"
        if key in inits and key in conv_bias:
            found[conv_name + ".weight"] = array(key)
            bn = modules[bn_name]
            # An identity BatchNorm whose shift is the folded bias: y = x * 1 + b exactly.
            found[bn_name + ".weight"] = np.full(bn.num_features, np.sqrt(1 + bn.eps), np.float32)
            found[bn_name + ".bias"] = array(conv_bias[key])
            found[bn_name + ".running_mean"] = np.zeros(bn.num_features, np.float32)
            found[bn_name + ".running_var"] = np.ones(bn.num_features, np.float32)
    for key in state:
        if key not in found and PREFIX + key in inits:
            found[key] = array(PREFIX + key)
    fixed = PREFIX + "encoder._fixed_pos_embed"
    if fixed in inits:
        found.update(_solve_position_embedding(model.encoder, array(fixed)))
    missing = [k for k in state if k not in found and not k.endswith("num_batches_tracked")
               and not k.startswith(NOT_IN_GRAPH)]
    if missing:
        raise _no_weights(card, f"{len(missing)} weights not found in the ONNX file, e.g. {missing[0]}")
    for key, value in found.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise _no_weights(card, f"{key} is {list(value.shape)} in the file, {list(state[key].shape)} in "
                              f"config {config.name}")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
    model.load_state_dict(state)
    difference, scale = check_against_onnx(model, card.file)
    if not difference <= TOLERANCE * max(1.0, scale):
        raise _no_weights(card, f"the rebuilt model differs from the file by {difference:.2g} in logits of up to "
                          f"{scale:.3g}")
    return model, difference


def _conv_bn_pairs(model):
    """(conv, batch norm) module names where a bias-free Conv2d feeds a BatchNorm2d."""
    torch = require_torch(PURPOSE, "train")

    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, torch.nn.Conv2d) and a.bias is None and isinstance(b, torch.nn.BatchNorm2d):
                base = parent_name + "." if parent_name else ""
                pairs.append((base + a_name, base + b_name))
    return pairs


def _solve_position_embedding(encoder, constant: np.ndarray) -> dict[str, np.ndarray]:
    """pos_embed and pos_embed_window whose resized sum is the folded constant (BHWC).

    The embedding is linear in both (bicubic resize + tiling), so least squares recovers a pair
    that reproduces it; constants shared by the two are not identifiable and do not matter.
    """
    torch = require_torch(PURPOSE, "train")
    F = torch.nn.functional

    _, height, width, channels = constant.shape
    ph, pw = encoder.pos_embed.shape[-2:]
    wh, ww = encoder.pos_embed_window.shape[-2:]
    with torch.no_grad():
        eye = torch.eye(ph * pw, dtype=torch.float64).reshape(-1, 1, ph, pw)
        resized = F.interpolate(eye, size=(height, width), mode="bicubic").reshape(ph * pw, -1)
        tiles = torch.eye(wh * ww, dtype=torch.float64).reshape(-1, 1, wh, ww)
        tiled = tiles.tile(1, 1, height // wh, width // ww).reshape(wh * ww, -1)
    basis = torch.cat([resized, tiled]).numpy()  # (ph*pw + wh*ww) x (H*W)
    target = constant[0].reshape(-1, channels).astype(np.float64)  # (H*W) x C
    solution, *_ = np.linalg.lstsq(basis.T, target, rcond=None)
    pos = solution[: ph * pw].T.reshape(1, channels, ph, pw)
    window = solution[ph * pw:].T.reshape(1, channels, wh, ww)
    return {"encoder.pos_embed": pos.astype(np.float32), "encoder.pos_embed_window": window.astype(np.float32)}


def check_against_onnx(model, onnx_path: Path, seed: int = 0) -> tuple[float, float]:
    """(largest |logit difference|, largest |logit|) of the torch model against the ONNX file on
    two fixed inputs: random noise in the normalised range of images."""
    import onnxruntime as ort
    torch = require_torch(PURPOSE, "train")

    from ..models import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    # Blocks of random grey levels (0-255), normalised as the official preprocessing does.
    grey = np.kron(rng.uniform(0, 1, (2, 3, 22, 22)), np.ones((16, 16)))
    x = ((grey - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x))[0].numpy()
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())
