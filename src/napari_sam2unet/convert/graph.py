"""The ONNX graph of a torch model with one image input and one logit output, shared by
`sam2unet export` (export.py), `export --optimize` (optimize.py) and training's exports.

Torch and onnx are imported only when a graph is written, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, require_torch
from ..models import INPUT_SIZE, LAYOUTS

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 18
BATCH_CHOICES = ("dynamic", "1")


def first_logits_module(model, layout: str):
    """Wrap a Sam2Unet so the graph has one output and optionally NHWC input/output."""
    torch = require_torch("exporting")

    class FirstLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            if layout == "nhwc":
                image = image.permute(0, 3, 1, 2)
            logits = self.inner(image)[0]
            if layout == "nhwc":
                logits = logits.permute(0, 2, 3, 1)
            return logits

    return FirstLogits(model)


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ModelError(f"--{what} is {value!r}; use one of {', '.join(allowed)}")


def export_fp32(
    model, out_path: Path, batch: str = "dynamic", layout: str = "nchw", fold: bool = True, **trace_options
) -> Path:
    """Write the fp32 ONNX graph of `model` (a Sam2Unet) at 352x352.

    `fold`: run torch.onnx's own graph optimiser (constant folding, dead code). False skips it:
    onnxruntime folds the graph at load anyway, and on the edge-window rewrite of Hiera-L
    (optimize.py) that optimiser takes most of the export's ten minutes. `trace_options` go to
    trace_onnx (optimize.py's custom attention translation)."""
    require_torch("exporting")
    _check_choice(batch, BATCH_CHOICES, "batch")
    _check_choice(layout, LAYOUTS, "layout")
    model = model.eval()
    encoder = model.encoder
    grid = (model.config.work_size or INPUT_SIZE) // model.config.patch_stride
    # Fold the bicubic resize of the position embedding into one constant for this grid.
    encoder.fix_position_embedding(grid, grid)
    try:
        trace_onnx(first_logits_module(model, layout).eval(), out_path, batch, layout, fold, **trace_options)
    finally:
        encoder.release_position_embedding()
    return out_path


def trace_onnx(
    wrapper,
    out_path: Path,
    batch: str = "dynamic",
    layout: str = "nchw",
    fold: bool = True,
    custom_translation_table: dict | None = None,
) -> Path:
    """Trace a module with one image input and one logit output to ONNX at 352x352 (`fold`:
    torch.onnx's graph optimiser, see export_fp32)."""
    torch = require_torch("exporting")
    # The dynamo exporter fails with a batch-1 example and a dynamic batch ("Invalid
    # ranges"); a batch-2 example traces the same graph.
    example_batch = 2 if batch == "dynamic" else 1
    shape = (example_batch, 3, INPUT_SIZE, INPUT_SIZE)
    if layout == "nhwc":
        shape = (example_batch, INPUT_SIZE, INPUT_SIZE, 3)
    dynamic = None
    if batch == "dynamic":
        dynamic = {"image": {0: torch.export.Dim("batch", min=1, max=64)}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros(shape),),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=dynamic,
            optimize=fold,
            custom_translation_table=custom_translation_table,
        )
    return out_path


def quantize_int8(fp32_path: Path, out_path: Path, op_types: tuple[str, ...] = ("MatMul",)) -> Path:
    """Dynamic int8 quantisation of the weights of `op_types` (MatMul only by default:
    quantising the convolutions too is slower than fp32 on CPU, see docs/performance-models.md)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_path),
        str(out_path),
        op_types_to_quantize=list(op_types),
        weight_type=QuantType.QInt8,
        # onnx's shape inference gives contrib operators' outputs (MultiHeadAttention) no type.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    return out_path
