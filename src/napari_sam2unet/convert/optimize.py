"""A faster ONNX graph of a SAM2-UNet, kept only if its masks agree with fp32 torch.

`sam2unet export --optimize` calls `optimize_export`: it exports the fp32 graph without the
work on zero-padded attention windows (an exact rewrite), fuses bias + GELU, makes the
candidate graphs (fp32; dynamic int8 MatMuls; optionally static int8 QDQ calibrated on real
MR slices), times them in turn in one process, checks each against fp32 torch on other real slices with the CPU
backend's session options, and keeps the fastest that passes. The figures of the check go
into the model card. docs/performance.md section 2 has what each step gains.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..geometry import dice
from ..models import INPUT_SIZE
from .graph import export_fp32, quantize_int8

MIN_DICE = 0.97
EXACT = 1e-3  # a largest logit difference this share of the logits' spread is the same model
# Calibration and parity slices come from different positions of the same scans.
CALIBRATION_SLICES = 8
PARITY_SLICES = 4


# --- exact graph changes at export ---------------------------------------------------------


# Set within unpadded_linears(fused_attention=True): attention runs as one operator, exported
# as onnxruntime's com.microsoft.MultiHeadAttention (CPU kernel) instead of a Split, head
# Transposes, two MatMuls and a Softmax.
_FUSED = {"on": False}


def _mha_op():
    """torch.ops.sam2unet.mha(q, k, v, bias, num_heads), registered once: q (B, S, C), k and v
    (B, T, C), heads interleaved in C as Hiera's qkv Linear lays them out; `bias` (1, 1, S, T)
    is added to the scores (or None). Windows are part of B."""
    import torch
    import torch.nn.functional as F

    try:
        return torch.ops.sam2unet.mha.default
    except (AttributeError, RuntimeError):
        pass

    # An explicit schema: this module's annotations are strings (from __future__ import annotations).
    schema = "(Tensor q, Tensor k, Tensor v, Tensor? bias, int num_heads) -> Tensor"

    @torch.library.custom_op("sam2unet::mha", mutates_args=(), schema=schema)
    def mha(q, k, v, bias, num_heads):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)
        return y.transpose(1, 2).reshape(q.shape)

    @mha.register_fake
    def _(q, k, v, bias, num_heads):
        return torch.empty_like(q)

    return torch.ops.sam2unet.mha.default


def _mha_onnx(q, k, v, bias=None, num_heads: int = 1):
    """ONNX for sam2unet::mha: MultiHeadAttention (com.microsoft), scale 1/sqrt(head size) as
    SDPA's; `bias` is its attention_bias input (the sixth)."""
    import onnxscript

    _register_mha_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    if bias is None:
        return msft.MultiHeadAttention(q, k, v, num_heads=num_heads)
    return msft.MultiHeadAttention(q, k, v, None, None, bias, num_heads=num_heads)


def _register_mha_schema() -> None:
    """onnxscript builds only operators with a schema in onnx's registry, which lacks
    onnxruntime's contrib operators: register the inputs this module uses (no shape inference;
    onnxruntime checks the node itself at load)."""
    from onnx import defs

    if defs.has("MultiHeadAttention", "com.microsoft"):
        return
    optional = defs.OpSchema.FormalParameterOption.Optional
    names = ("query", "key", "value", "bias", "key_padding_mask", "attention_bias")
    inputs = [
        defs.OpSchema.FormalParameter(
            n, "T", param_option=optional if i > 2 else defs.OpSchema.FormalParameterOption.Single
        )
        for i, n in enumerate(names)
    ]
    schema = defs.OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=[defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[defs.OpSchema.Attribute("num_heads", defs.OpSchema.AttrType.INT, required=True)],
    )
    defs.register_schema(schema)


def translations() -> dict:
    """torch.onnx's custom_translation_table for the fused attention."""
    return {_mha_op(): _mha_onnx}


def _sdpa(q, k, v, heads: int, mask=None):
    """Attention of (B, S, heads, d) q and (B, T, heads, d) k, v -> (B, S, heads * d): SDPA, or
    the fused operator when exporting with fused_attention."""
    import torch.nn.functional as F

    batch, length = q.shape[0], q.shape[1]
    if _FUSED["on"]:
        flat = [t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v)]
        return _mha_op()(*flat, None if mask is None else mask[None, None], heads)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2).reshape(batch, length, -1)


def _attend(attn, qkv):
    """MultiScaleAttention.forward after its qkv Linear and before its proj Linear."""
    from ..modeling.hiera import pool_tokens

    batch, height, width, _ = qkv.shape
    q, k, v = qkv.reshape(batch, height * width, 3, attn.num_heads, -1).unbind(2)
    if attn.q_pool is not None:
        q = pool_tokens(q.reshape(batch, height, width, -1), attn.q_pool)
        height, width = q.shape[1], q.shape[2]
        q = q.reshape(batch, height * width, attn.num_heads, -1)
    return _sdpa(q, k, v, attn.num_heads).reshape(batch, height, width, -1)


def _region_attention(attn, qkv, rows: int, cols: int, padded: int):
    """Attention within the (rows x cols) windows of a region whose windows all lost `padded`
    tokens to the edge of the map (qkv: B x H x W x 3C of the region's real tokens).

    In the original every padded token's key and value are the qkv bias (the Linear of a zero
    token), so the `padded` identical keys act as one bias key whose softmax weight counts
    `padded` times: one extra key with log(padded) added to its score. Padded queries, whose
    outputs the original crops away, are never computed.
    """
    import math

    import torch

    batch, height, width, c3 = qkv.shape
    heads, dim = attn.num_heads, c3 // 3 // attn.num_heads
    win = qkv.reshape(batch, height // rows, rows, width // cols, cols, c3).permute(0, 1, 3, 2, 4, 5)
    q, k, v = win.reshape(-1, rows * cols, 3, heads, dim).unbind(2)
    mask = None
    if padded:
        count = q.shape[0]
        bias = attn.qkv.bias.reshape(3, 1, 1, heads, dim).expand(3, count, 1, heads, dim)
        k, v = torch.cat([k, bias[1]], dim=1), torch.cat([v, bias[2]], dim=1)
        mask = torch.zeros(rows * cols, rows * cols + 1, dtype=qkv.dtype)
        mask[:, -1] = math.log(padded)
    y = _sdpa(q, k, v, heads, mask)
    y = y.reshape(batch, height // rows, width // cols, rows, cols, c3 // 3)
    return y.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, c3 // 3)


def _edge_windows_attention(attn, qkv, window: int):
    """Windowed attention on a map that windows do not tile, without padding it: the map is cut
    into up to 2 x 2 regions (whole windows; the last rows; the last columns; the corner), each
    a grid of equal windows."""
    import torch

    height, width = qkv.shape[1], qkv.shape[2]
    cut_h, cut_w = height // window * window, width // window * window
    bands = []
    for r0, r1 in ((0, cut_h), (cut_h, height)):
        parts = []
        for c0, c1 in ((0, cut_w), (cut_w, width)):
            if r1 > r0 and c1 > c0:
                rows, cols = min(window, r1 - r0), min(window, c1 - c0)
                region = qkv[:, r0:r1, c0:c1]
                parts.append(_region_attention(attn, region, rows, cols, window * window - rows * cols))
        if parts:
            bands.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]


def _block_forward(self, x):
    """MultiScaleBlock.forward without work on padded window tokens, where the map is padded.

    Without query pooling, windows are cut at the map's edge (_edge_windows_attention). With
    it (one block per stage change), qkv runs without bias on the real tokens, the result is
    zero-padded and the bias added after (a padded token's q, k and v are exactly the bias,
    as in the original), and proj runs after the padded queries are cropped away. At 352 px
    Hiera-L's 16-token windows on the 22 x 22 map pad 484 tokens to 1024.
    """
    import torch.nn.functional as F

    from ..modeling.hiera import from_windows, pad_to_windows, pool_tokens, to_windows

    shortcut = x
    x = self.norm1(x)
    if self.dim != self.dim_out:
        shortcut = pool_tokens(self.proj(x), self.pool)
    out_h, out_w = shortcut.shape[1], shortcut.shape[2]
    window, attn = self.window_size, self.attn
    padded = window > 0 and (x.shape[1] % window or x.shape[2] % window)
    if padded and not self.q_stride:
        y = _edge_windows_attention(attn, attn.qkv(x), window)
    elif window > 0:
        if padded:
            qkv = pad_to_windows(F.linear(x, attn.qkv.weight), window) + attn.qkv.bias
        else:
            qkv = attn.qkv(x)
        y = _attend(attn, to_windows(qkv, window))
        if self.q_stride:
            window = window // self.q_stride
        grid = (-(-out_h // window) * window, -(-out_w // window) * window)
        y = from_windows(y, window, grid)[:, :out_h, :out_w]
    else:
        y = _attend(attn, attn.qkv(x))
    x = shortcut + attn.proj(y)
    return x + self.mlp(self.norm2(x))


@contextlib.contextmanager
def unpadded_linears(model, fused_attention: bool = False):
    """Within the block, every Hiera block runs `_block_forward` (the model is left as it was);
    `fused_attention`: its attention as one operator (sam2unet::mha, see translations)."""
    from ..modeling.hiera import MultiScaleBlock

    blocks = [m for m in model.modules() if isinstance(m, MultiScaleBlock)]
    for block in blocks:
        block.forward = types.MethodType(_block_forward, block)
    _FUSED["on"] = fused_attention
    try:
        yield model
    finally:
        _FUSED["on"] = False
        for block in blocks:
            del block.forward


def export_unpadded(
    model, out_path: Path, batch: str = "dynamic", layout: str = "nchw", fused_attention: bool = False
) -> Path:
    """The fp32 export (graph.export_fp32) with padded windows skipped in the Linears
    (`fused_attention`: and attention as com.microsoft.MultiHeadAttention).

    Without torch.onnx's graph optimiser (fold=False): on Hiera-L's cut windows it took most of
    an eleven-minute export. onnxruntime's basic optimiser folds the constants instead (ort_fold)."""
    table = translations() if fused_attention else None
    with unpadded_linears(model, fused_attention):
        export_fp32(model, out_path, batch, layout, fold=False, custom_translation_table=table)
    return ort_fold(out_path, out_path)


def ort_fold(onnx_path: Path, out_path: Path) -> Path:
    """onnxruntime's basic, device-independent graph optimisation (constant folding, redundant
    nodes), saved. The unfolded export's value_info contradicts shape inference in places
    (which quantize_dynamic runs), so it is dropped too."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmp:
        folded = Path(tmp) / "folded.onnx"
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(folded))
    del graph.graph.value_info[:]
    onnx.save(graph, str(out_path))
    return Path(out_path)


# --- real slices -----------------------------------------------------------------------------


def real_slices(paths=None, count: int = CALIBRATION_SLICES + PARITY_SLICES) -> np.ndarray:
    """`count` whole axial slices (N x 3 x 352 x 352) from the middle 60% of each scan, made
    model inputs by the engine's own preprocessing (window, square crop, resize, normalise).
    Default: the bundled sample MRI."""
    from .._sample_data import SAMPLE_IMAGE
    from ..io import read_volume
    from ..models import InputSpec
    from ..preprocess import crop_for_slice, plan_views, sample_crop, to_model_input

    paths = [Path(p) for p in (paths or [SAMPLE_IMAGE])]
    spec, out = InputSpec(), []
    for index, path in enumerate(paths):
        volume = read_volume(path)
        views = plan_views(volume.data, "auto", "replicate")
        depth = volume.data.shape[2]
        share = count // len(paths) + (index < count % len(paths))
        for k in np.linspace(0.2 * depth, 0.8 * (depth - 1), share).astype(int):
            plane = volume.data[:, :, k]
            crop = crop_for_slice(plane.shape, volume.spacing[:2], spec.crop)
            out.append(to_model_input(sample_crop(plane, crop, (INPUT_SIZE, INPUT_SIZE)), views, spec))
    return np.stack(out).astype(np.float32)


def split_slices(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, parity): every third slice is held out for the parity check."""
    held = np.arange(len(slices)) % 3 == 1
    return slices[~held], slices[held]


# --- candidate graphs ----------------------------------------------------------------------


def activation_matmuls(onnx_path: Path) -> list[str]:
    """MatMul nodes with no constant input: attention's scores and weighted sum."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not constants & set(n.input)]


class _Slices:
    """onnxruntime's calibration reader over an N x 3 x H x W array, one slice a batch."""

    def __init__(self, slices: np.ndarray, name: str = "image", layout: str = "nchw"):
        self.items = iter([{name: _layout(s[None], layout)} for s in slices])

    def get_next(self):
        return next(self.items, None)


def quantize_qdq(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    conv: bool = False,
    attention: bool = False,
    layout: str = "nchw",
) -> Path:
    """Static int8 (QDQ): uint8 activations (asymmetric, min/max over the calibration slices),
    int8 weights per output channel, no reduced range (VNNI has no overflow to avoid).
    `attention`: also the activation x activation MatMuls; `conv`: also the convolutions."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ops = ["MatMul", "Conv"] if conv else ["MatMul"]
    quantize_static(
        str(fp32_path),
        str(out_path),
        _Slices(calibration, layout=layout),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[] if attention else activation_matmuls(fp32_path),
        # MinMax keeps only each tensor's min and max per slice (small even for Hiera-L).
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


# --- timing and parity ---------------------------------------------------------------------


def _layout(batch: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(batch.transpose(0, 2, 3, 1)) if layout == "nhwc" else batch


def session(onnx_path: Path, threads: int = 2):
    """A CPU session with the CPU backend's options (backends/onnx.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def logits(sess, slices: np.ndarray, layout: str = "nchw") -> np.ndarray:
    """N x 1 x H x W logits, one slice a run (as the engine runs a batch-1 model)."""
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: _layout(s[None], layout)})[0] for s in slices]
    return np.concatenate(out).reshape(len(slices), 1, INPUT_SIZE, INPUT_SIZE)


# Each round runs every candidate once, in turn.
TIMING_ROUNDS = 5


def interleaved_times(sessions, rounds: int = TIMING_ROUNDS, layout: str = "nchw") -> list[list[float]]:
    """Seconds of `rounds` batch-1 runs of each session, after a warm-up run of each. The
    sessions run in turn, round after round, so a shared machine's changing load hits all
    alike (timed one after another, each would be timed at the load of its turn)."""
    x = np.random.default_rng(0).standard_normal((1, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    for sess in sessions:
        logits(sess, x, layout)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for sess, took in zip(sessions, times):
            began = time.perf_counter()
            logits(sess, x, layout)
            took.append(time.perf_counter() - began)
    return times


def parity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """A candidate's logits against the reference's. `relative_logit_diff`: the largest
    difference over the logits' spread (1st to 99th percentile), so that a graph computing the
    same numbers passes even when a checkpoint's logits are nearly constant (its own fp32 graph,
    5.6e-9 apart, once failed every Dice). Masks at the card's threshold (logit 0) and at the
    reference's median (half the pixels: a model with random weights puts no object anywhere),
    scored only where the reference's mask is defined: pixels further from the cut than float32
    noise. `dice` is the lower; NaN where neither cut shows an object."""
    diff = float(np.abs(candidate - reference).max())
    low, high = np.percentile(reference, [1, 99])
    noise = 1e-5 * (1.0 + float(np.abs(reference).max()))  # float32 rounding through a deep graph
    scores = [_defined_dice(candidate, reference, cut, noise) for cut in (0.0, float(np.median(reference)))]
    known = [d for d in scores if d == d]
    return {
        "dice": min(known) if known else float("nan"),
        "dice_at_threshold": scores[0],
        "dice_at_median": scores[1],
        "max_abs_logit_diff": diff,
        # the spread, but never below what float32 rounding explains (noise / EXACT)
        "relative_logit_diff": diff / max(float(high - low), noise / EXACT),
    }


def _defined_dice(candidate: np.ndarray, reference: np.ndarray, cut: float, noise: float) -> float:
    defined = np.abs(reference - cut) > noise
    a, b = candidate[defined] > cut, reference[defined] > cut
    if not (a.any() or b.any()):  # two empty masks prove nothing
        return float("nan")
    return dice(a, b)


def passes(check: dict[str, float], min_dice: float = MIN_DICE) -> bool:
    """Exact (logits within EXACT of their spread), or masks agreeing at Dice >= min_dice."""
    dice_ = check["dice"]
    return check["relative_logit_diff"] <= EXACT or (dice_ is not None and dice_ >= min_dice)


# --- the whole step ------------------------------------------------------------------------


def reference_logits(model, slices: np.ndarray) -> np.ndarray:
    """fp32 torch logits of the model as trained (its own forward), one slice at a time."""
    import torch

    model = model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(s[None]))[0].numpy() for s in slices])


def fuse(fp32_path: Path, out_path: Path) -> Path:
    """onnxruntime's transformer fusions: bias + erf GELU into one BiasGelu (the CPU session's
    own optimiser leaves the exporter's five-operator GELU as it is)."""
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(fp32_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    fused.save_model_to_file(str(out_path))
    return out_path


PLAIN = "int8-dynamic (MatMul), graph as exported"


def candidates(
    fp32: Path, workdir: Path, calibration: np.ndarray, layout: str, static: bool = False, plain: Path | None = None
) -> dict:
    """The graphs to try, by card precision name. Static QDQ (`static`) is off by default: on
    Hiera-L it was slower than dynamic int8 and failed the parity check (docs/performance.md).
    `plain`: the export without the rewrites, quantised as `--int8` does, so that --optimize
    is never slower than --int8 (on tiny the edge windows' extra operators cost more than
    they save)."""
    fused = fuse(fp32, workdir / "fused.onnx")
    out = {"fp32": fused, "int8-dynamic (MatMul)": quantize_int8(fused, workdir / "dynamic.onnx")}
    if plain is not None:
        out[PLAIN] = quantize_int8(plain, workdir / "plain_int8.onnx")
    if static:
        out["int8-qdq (MatMul)"] = quantize_qdq(fused, workdir / "qdq.onnx", calibration, layout=layout)
    return out


def optimize_export(
    model,
    out_path: Path,
    batch: str = "dynamic",
    layout: str = "nchw",
    volumes=None,
    threads: int = 2,
    min_dice: float = MIN_DICE,
    static: bool = False,
    fused_attention: bool = True,
) -> dict[str, Any]:
    """Write the fastest candidate graph that passes the parity check to `out_path`; return
    what the card records (precision, the check's figures, every candidate's time and Dice).
    `fused_attention`: the rewritten graph's attention as MultiHeadAttention (export_unpadded)."""
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        fp32 = export_unpadded(model, Path(tmp) / "fp32.onnx", batch, layout, fused_attention)
        plain = export_fp32(model, Path(tmp) / "plain.onnx", batch, layout)
        return optimize_graph(model, fp32, out_path, layout, volumes, threads, min_dice, static, plain)


def optimize_graph(
    model,
    fp32: Path,
    out_path: Path,
    layout: str = "nchw",
    volumes=None,
    threads: int = 2,
    min_dice: float = MIN_DICE,
    static: bool = False,
    plain: Path | None = None,
    rounds: int = TIMING_ROUNDS,
) -> dict[str, Any]:
    """optimize_export from an fp32 graph of `model` already exported (by export_unpadded);
    `plain`: its export without the rewrites (graph.export_fp32), a candidate too. The
    candidates' ms are medians of `rounds` batch-1 runs, timed in turn (interleaved_times)."""
    calibration, held_out = split_slices(real_slices(volumes))
    reference = reference_logits(model, held_out)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        graphs = candidates(fp32, Path(tmp), calibration, layout, static, plain)
        sessions = {name: session(path, threads) for name, path in graphs.items()}
        checks = {name: _rounded(parity(logits(sess, held_out, layout), reference)) for name, sess in sessions.items()}
        times = interleaved_times(list(sessions.values()), rounds, layout)
        del sessions  # before the chosen file is moved
        tried = {
            name: {"ms_per_slice": round(1000 * float(np.median(took)), 1), **checks[name]}
            for name, took in zip(graphs, times)
        }
        passing = [n for n in graphs if passes(tried[n], min_dice)]
        if not passing:
            raise ModelError(f"no optimised graph agrees with fp32 torch (Dice {tried}); export without --optimize")
        best = min(passing, key=lambda n: tried[n]["ms_per_slice"])
        shutil.move(str(graphs[best]), out_path)
    return {
        "architecture": {"precision": best},
        "optimization": {
            "chosen": best,
            "threads": threads,
            "timing": {"batch": 1, "rounds": rounds, "statistic": "median", "interleaved": True},
            "parity": {"against": "fp32 torch", "slices": int(len(held_out)), "min_dice": min_dice, **tried[best]},
            "candidates": tried,
        },
    }


def _rounded(values: dict[str, float]) -> dict[str, float | None]:
    """4 significant digits; NaN (no pixel where a mask is defined) as None, valid in any card."""
    return {k: float(f"{v:.4g}") if v == v else None for k, v in values.items()}
