"""The model card of a model that training made: one builder for `train` and `finetune`.

The card starts as convert/export.py's (a SAM2-UNet) or models.card_fields' (the plain U-Net);
what training adds (input, data, steps, validation) is merged in from `extra`.
"""

from __future__ import annotations

from pathlib import Path

from ..models import INPUT_SIZE, InputSpec, write_card


def input_fields(spec) -> dict:
    """How a trained model is fed, for its card (the rest of the input is the official preprocessing)."""
    return {"channels": spec.channels, "crop": spec.crop, "margin": spec.margin}


def export_model(model, onnx_path: Path, config: str | None, extra: dict, name: str | None) -> Path:
    """The model's first logit map as ONNX at onnx_path, its card beside it; returns the card path.

    config: the model's SAM2-UNet config, or None for the plain U-Net."""
    if config is not None:
        from ..convert.export import export_onnx

        return export_onnx(model, onnx_path, config, card_extra=extra, name=name)
    from ..convert.graph import first_logits_module, trace_onnx

    trace_onnx(first_logits_module(model, "nchw").eval(), onnx_path)
    return write_model_card(model, onnx_path, None, extra, name)


def write_model_card(model, onnx_path: Path, config: str | None, extra: dict, name: str | None,
                     batch: str = "dynamic", layout: str = "nchw") -> Path:
    """The card of onnx_path, a graph of `model` (config None: the plain U-Net), `extra` merged in."""
    from ..convert.export import card_dict, merge_card
    from ..convert.graph import INPUT_NAME, OUTPUT_NAME
    from ..models import card_fields

    parameters = sum(p.numel() for p in model.parameters())
    if config is None:
        spec = InputSpec(shape=(-1, 3, INPUT_SIZE, INPUT_SIZE), name=INPUT_NAME)
        card = card_fields(onnx_path, spec, name, OUTPUT_NAME)
        card["architecture"] = {"family": "plain-unet", "parameters": parameters}
        merge_card(card, extra)
    else:
        card = card_dict(name or onnx_path.stem, onnx_path, config, parameters, batch, layout, False, None, extra)
    return write_card(card, onnx_path.with_suffix(".yaml"))
