"""Export a SAM2-UNet checkpoint to the model contract: one ONNX file and its model card.

The ONNX graph takes `image` (N x 3 x 352 x 352, or NHWC) and returns only the first
logit map `logits`, the official prediction. Torch is imported lazily so this module (and the
CLI's argument parser) works without the [export] extra.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelError, require_torch
from ..models import INPUT_SIZE, LAYOUTS, InputSpec, card_fields, sha256_file, write_card
from .graph import BATCH_CHOICES, INPUT_NAME, OPSET, OUTPUT_NAME, export_fp32, quantize_int8

LICENCES = {
    "official": "SAM2-UNet weights: see the checkpoint's licence (SAM2 trunk: Apache-2.0)",
}


def _import_torch():
    return require_torch("exporting")


def card_dict(
    name: str,
    onnx_path: Path,
    config_name: str,
    parameters: int,
    batch: str,
    layout: str,
    int8: bool,
    checkpoint: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card contents for an exported file (see models.py for the format)."""
    n = -1 if batch == "dynamic" else 1
    size = INPUT_SIZE
    shape = (n, 3, size, size) if layout == "nchw" else (n, size, size, 3)
    # The official preprocessing (InputSpec's defaults); the card's output is NCHW for either layout.
    card = card_fields(onnx_path, InputSpec(shape=shape, layout=layout, name=INPUT_NAME), name, OUTPUT_NAME)
    card["architecture"] = {
        "family": "sam2unet",
        "config": config_name,
        "parameters": int(parameters),
        "precision": "int8-dynamic (MatMul)" if int8 else "fp32",
        "opset": OPSET,
    }
    if checkpoint is not None:
        card["source"] = {
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": sha256_file(checkpoint),
        }
    card["licence"] = LICENCES["official"]
    merge_card(card, extra or {})
    return card


def merge_card(base: dict, extra: dict) -> None:
    """Recursive update: nested dicts (input, architecture, ...) are merged, not replaced."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_card(base[key], value)
        else:
            base[key] = value


def export_onnx(
    model,
    out_path: str | os.PathLike,
    config_name: str,
    batch: str = "dynamic",
    layout: str = "nchw",
    int8: bool = False,
    card_extra: dict[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    optimize: bool = False,
    calibration: list[Path] | None = None,
) -> Path:
    """Export `model` to `out_path` (.onnx), write its model card beside it; return the card path.

    `card_extra` is merged into the card (e.g. training data, metrics, channels: multiview).
    `optimize`: the fastest graph that passes the parity check (optimize.py), calibrated and
    checked on the `calibration` scans (default: the bundled sample MRI).
    """
    from ..modeling import count_parameters

    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ModelError(f"the output {out_path} must end in .onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if optimize:
        from .optimize import optimize_export

        if int8:
            raise ModelError("--optimize chooses the precision itself; drop --int8")
        found = optimize_export(model, out_path, batch, layout, volumes=calibration)
        merge_card(found, card_extra or {})
        card_extra = found
    elif int8:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            fp32 = export_fp32(model, Path(tmp) / "fp32.onnx", batch, layout)
            quantize_int8(fp32, out_path)
    else:
        export_fp32(model, out_path, batch, layout)
    card = card_dict(
        name or out_path.stem,
        out_path,
        config_name,
        count_parameters(model),
        batch,
        layout,
        int8,
        Path(checkpoint) if checkpoint else None,
        card_extra,
    )
    return write_card(card, out_path.with_suffix(".yaml"))


def export_qnn_ready(model, out_path: str | os.PathLike, config_name: str, **options) -> Path:
    """Export for the QNN HTP compiler: batch 1, only operators QNN takes (see qnn_rewrite.py).

    The plain export is rewritten in place, each rewrite checked against it within 1e-4; the
    card records the differences measured. Returns the card path.
    """
    import yaml

    from .qnn_rewrite import make_qnn_ready

    if options.get("int8") or options.get("optimize"):
        raise ModelError("--target qnn quantises with calibration data in `sam2unet npu build`; drop --int8")
    out_path = Path(out_path)
    card_path = export_onnx(model, out_path, config_name, **{**options, "batch": "1"})
    differences = make_qnn_ready(out_path, out_path)
    card = yaml.safe_load(card_path.read_text())
    card["sha256"] = sha256_file(out_path)
    card["architecture"]["qnn_ready"] = {what: float(f"{d:.3g}") for what, d in differences.items()}
    return write_card(card, card_path)


def add_export_parser(subparsers) -> None:
    """Add `export CHECKPOINT --config NAME --out model.onnx [...]` to the CLI."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="convert a SAM2-UNet PyTorch checkpoint to ONNX with a model card",
        description="Export a SAM2-UNet checkpoint (official layout, or wrapped under 'model' / "
        "'state_dict') to ONNX: one input 'image', one output (the first logit map).",
    )
    parser.add_argument("checkpoint", type=Path, help="the .pth / .pt state dict")
    parser.add_argument(
        "--config",
        default="large",
        help="architecture: large, base_plus, small, tiny, compact, ...",
    )
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation (MatMul)")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="the fastest CPU graph whose masks agree with fp32 torch (Dice >= 0.97; the card records the check)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        default=None,
        help="--optimize: NIfTI scans to calibrate and check on (default: the bundled sample MRI)",
    )
    parser.add_argument("--batch", choices=BATCH_CHOICES, default="dynamic")
    parser.add_argument("--layout", choices=LAYOUTS, default="nchw")
    parser.add_argument("--name", default=None, help="model name in the card (default: file stem)")
    parser.add_argument(
        "--target",
        choices=("onnx", "qnn"),
        default="onnx",
        help="qnn: batch 1 and only operators the QNN HTP compiler takes, for `sam2unet npu build`",
    )
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    """The `sam2unet export` command: load strictly, export, write the card."""
    _import_torch()
    from ..modeling import get_config
    from .checkpoints import load_sam2unet

    try:
        config = get_config(args.config)
    except ValueError as error:
        raise ModelError(str(error)) from None
    model = load_sam2unet(args.checkpoint, config)
    export = export_qnn_ready if getattr(args, "target", "onnx") == "qnn" else export_onnx
    card_path = export(
        model,
        args.out,
        config.name,
        batch=args.batch,
        layout=args.layout,
        int8=args.int8,
        checkpoint=args.checkpoint,
        name=args.name,
        optimize=getattr(args, "optimize", False),
        calibration=getattr(args, "calibration", None),
    )
    print(f"wrote {args.out} and its model card {card_path}")
    return 0
