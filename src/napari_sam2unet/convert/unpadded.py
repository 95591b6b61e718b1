"""Exact graph changes at export: Hiera's windowed attention without the work on zero-padded
window tokens, optionally fused into one attention operator, then folded by onnxruntime.

`optimize.optimize_export` exports through `export_unpadded`; `unpadded_linears` leaves the model
as it was after the block. docs/performance.md section 2 has what each change gains.
"""

from __future__ import annotations

import contextlib
import tempfile
import types
from pathlib import Path

from .graph import export_fp32

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
