"""Fine-tuning's models: the base to train, and the new model written beside it (ONNX + card).

The base is any model we can train: an exported SAM2-UNet (weights rebuilt from its ONNX file,
onnx_weights.py), a `sam2unet train` run's best.pt, or an official state dict. The ONNX file and
its card are written atomically: an interrupted run leaves no model behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelError, require_torch
from ..models import THRESHOLD, InputSpec
from .cards import export_model, input_fields, write_model_card


def _torch():
    return require_torch("fine-tuning", "train")  # one line saying what to install


@dataclass
class Base:
    """A trainable model and what its card says about feeding it."""

    model: object  # Sam2Unet
    config: str
    spec: InputSpec
    size: tuple[int, int]  # the model input (validation crops)
    name: str
    file: Path
    sha256: str
    raw: dict = field(default_factory=dict)  # the base card (empty for checkpoints)
    how: str = ""

    @property
    def train_size(self) -> tuple[int, int]:
        """Training crops: the work size of a model that resizes its input to one (as `train`
        trains the compact models), else the input size. Resampling the crop straight to the
        work size costs a quarter of the 352-px crop and its in-graph resize (loss included)."""
        work = self.model.config.work_size
        return (work, work) if work else self.size


def load_base(base: str | os.PathLike | None = None, config: str | None = None) -> Base:
    """The model to fine-tune: a model name / .onnx / .yaml, a run's best.pt or a state dict."""
    _torch()
    from ..models import find_model, sha256_file

    path = Path(str(base)) if base else None
    if path is not None and path.suffix in (".pt", ".pth"):
        return _base_from_checkpoint(path, config)
    from .onnx_weights import model_from_onnx

    card = find_model(base)
    model, difference = model_from_onnx(card)
    return Base(model, model.config.name, card.input, card.input.size, card.name, card.file,
                card.sha256 or sha256_file(card.file), dict(card.raw),
                f"weights rebuilt from the ONNX initialisers (max logit difference {difference:.1e})")


def _base_from_checkpoint(path: Path, config: str | None) -> Base:
    from ..models import sha256_file
    from .checkpoint_file import load_checkpoint

    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    state = load_checkpoint(path, "--base")  # weights only: a pickle cannot run code
    if "ema" in state and "args" in state:
        from .train_model import load_run_model

        model, saved = load_run_model(path, "cpu", "--base")
        if saved.get("arch") != "sam2unet":
            raise ModelError(f"{path} is a {saved.get('arch')} run; fine-tuning needs a SAM2-UNet")
        spec = InputSpec(channels=saved["channels"], crop=saved["crop"], margin=saved["margin"])
        return Base(model, saved["config"], spec, spec.size, path.stem, path, sha256_file(path),
                    {"input": input_fields(spec)}, "a `sam2unet train` run's EMA weights")
    from ..convert.checkpoints import load_sam2unet

    model = load_sam2unet(path, config or "large")
    spec = InputSpec()  # the official preprocessing (convert/export.py's card defaults)
    return Base(model, model.config.name, spec, spec.size, path.stem, path, sha256_file(path), {},
                "an official SAM2-UNet state dict")


def card_extra(base: Base, data, settings, before: float, after: float, seconds: float,
               command: str | None) -> dict:
    """What the new model's card says: the base, the data (a finetune_data.Labelled), the settings
    (a finetune.Settings) and the validation Dice before and after."""
    raw = base.raw
    spec = base.spec
    licence = raw.get("licence", "see the base checkpoint's licence")
    return {
        "input": input_fields(spec),
        "threshold": float(raw.get("threshold", THRESHOLD)),
        "flip_average": bool(raw.get("flip_average", False)),
        "propagation_prior": float(raw.get("propagation_prior", 1.0)),
        "licence": f"{licence}; fine-tuned on the data below, whose terms apply too",
        "task": raw.get("task", "box-steered segmentation of one structure per box"),
        "finetune": {
            "base": {"name": base.name, "file": base.file.name, "sha256": base.sha256, "weights": base.how,
                     **({"training": raw["training"]} if "training" in raw else {})},
            **({"command": command} if command else {}),
            "data": data.note,
            "steps": settings.steps, "batch": settings.batch, "lr": settings.lr, "trunk": settings.trunk,
            "deform": settings.deform, "exact": settings.exact, "seed": settings.seed,
            "crop_size": list(base.train_size),
            "seconds": round(seconds, 1),
            "loss": "weighted BCE + weighted IoU on the prediction head; BatchNorm statistics kept",
            "validation": {"what": f"per-crop Dice, box = outline + 10%, on {data.validation_what}",
                           "crops": len(data.validation), "dice_before": round(before, 4),
                           "dice_after": round(after, 4)},
        },
    }


def write_model(base: Base, out: Path, extra: dict, name: str | None, overwrite: bool = False,
                trunk: str = "frozen") -> Path:
    """Write ONNX + card into a temporary folder beside `out`, then move both in (card last):
    discovery reads cards, so a model appears whole or not at all. With a frozen trunk and an
    ONNX base, the new weights go into a copy of the base graph (0.3 CPU s, checked against
    torch); otherwise, or if that check fails, the model is exported again (~28 CPU s)."""
    out = Path(out)
    card_path = out.with_suffix(".yaml")
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".finetune-") as tmp:
        tmp_onnx = Path(tmp) / out.name
        written = trunk == "frozen" and base.file.suffix == ".onnx" and weights_into_graph(base, tmp_onnx)
        if written:
            _write_card(base, tmp_onnx, extra, name or out.stem, written)
        else:
            export_model(base.model, tmp_onnx, base.config, extra, name or out.stem)
        os.replace(tmp_onnx, out)
        os.replace(tmp_onnx.with_suffix(".yaml"), card_path)
    return card_path


def weights_into_graph(base: Base, out: Path) -> str | None:
    """The base ONNX graph with the fine-tuned weights written into its initialisers, in the
    forms onnx_weights.py reads them back from (linear weights transposed, BatchNorm folded into
    the convolution before it). The trunk's folded position embedding is left as it is, so this
    is only for a frozen trunk. Returns how it was checked, or None (export instead) when a
    weight has no place in the graph or torch and onnxruntime then disagree."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .onnx_weights import PREFIX, TOLERANCE, _conv_bn_pairs, check_against_onnx

    model = base.model.eval()
    proto = onnx.load(str(base.file))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: node for node in graph.node for o in node.output}
    conv_bias = {n.input[1]: n.input[2] for n in graph.node if n.op_type == "Conv" and len(n.input) > 2}
    linears: dict[str, str] = {}  # MatMul weight initialiser -> the Linear module it holds
    for node in graph.node:  # Linear: MatMul(x, W^T) then Add(bias), as onnx_weights reads it
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i in inits and i.endswith(".bias")), None)
        matmul = producer.get(next((i for i in node.input if i != bias), None)) if bias else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
            linears[matmul.input[1]] = bias[len(PREFIX):-len(".bias")]
    modules = dict(model.named_modules())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out_values: dict[str, np.ndarray] = {}
    for init_name, linear in linears.items():
        if not isinstance(modules.get(linear), torch.nn.Linear):
            return None
        out_values[init_name] = state[linear + ".weight"].T
    folded = set()
    for conv_name, bn_name in _conv_bn_pairs(model):
        key = PREFIX + conv_name + ".weight"
        if key in inits and key in conv_bias:
            bn = modules[bn_name]
            scale = state[bn_name + ".weight"] / np.sqrt(state[bn_name + ".running_var"] + bn.eps)
            out_values[key] = state[conv_name + ".weight"] * scale[:, None, None, None]
            out_values[conv_bias[key]] = state[bn_name + ".bias"] - state[bn_name + ".running_mean"] * scale
            folded.update({conv_name + ".weight", *(f"{bn_name}.{p}" for p in ("weight", "bias", "running_mean",
                                                                               "running_var"))})
    for key, value in state.items():
        if key not in folded and PREFIX + key in inits and PREFIX + key not in out_values:
            out_values[PREFIX + key] = value
    # every weight the graph holds is rewritten, trained or not: the values are the model's
    for init in graph.initializer:
        if init.name in out_values:
            value = np.ascontiguousarray(out_values[init.name], dtype=numpy_helper.to_array(init).dtype)
            if tuple(value.shape) != tuple(init.dims):
                return None
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(proto, str(out))
    difference, scale = check_against_onnx(model, out)
    if not difference <= TOLERANCE * max(1.0, scale):
        out.unlink()
        return None
    return f"weights written into the base graph (max logit difference to torch {difference:.1e})"


def _write_card(base: Base, onnx_path: Path, extra: dict, name: str, how: str) -> None:
    """The card an export would write, for a graph of the base's shape and layout."""
    spec = base.raw.get("input", {})
    shape = spec.get("shape") or [-1]
    extra = {**extra, "finetune": {**extra.get("finetune", {}), "written": how}}
    write_model_card(base.model, onnx_path, base.config, extra, name,
                     "dynamic" if shape[0] in (-1, None, "N") else "1", spec.get("layout", "nchw"))


def check_output(out: Path, overwrite: bool) -> None:
    """--out before any work: an .onnx whose card has room beside it, in a folder we can write."""
    from ..options import check_output_file

    if out.suffix != ".onnx":
        raise InputError(f"--out {out} must end in .onnx (its card is written beside it)")
    for path in (out, out.with_suffix(".yaml")):
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; choose another --out or pass --overwrite")
        check_output_file(path, "--out")

