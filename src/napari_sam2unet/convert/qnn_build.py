"""`sam2unet npu build`: a model card's ONNX -> a QNN context binary for one SoC, with its card entry.

Steps: the QNN-ready graph (qnn_rewrite.py), Qualcomm's preprocessing (Erf -> Gelu), quantisation
calibrated on real slices the engine prepares, compilation by the QNN HTP compiler through
onnxruntime's QNN execution provider (EP context with the binary beside it), then parity of the
binary, run by the `qnn` backend, against the CPU model. The card gets an `npu` entry (what the
backends need) and a `qnn` entry by file name (how it was built and what it measured).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..backends import qnn_runtime as runtime
from ..errors import ModelError
from ..models import ModelCard, find_model, sha256_file, write_card
from .qnn_slices import Scan, engine_inputs, sample_scan, set_hash

# precision -> (activation bits, weight bits); None: float16 on the HTP, no quantisation.
PRECISIONS = {"a16w8": (16, 8), "a8w8": (8, 8), "fp16": None}
_DTYPE_NAMES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 1: "float32"}


def default_binary_path(card: ModelCard, soc: runtime.Soc) -> Path:
    return card.file.with_name(f"{card.file.stem}_{soc.name.lower()}.bin")


def _quantise(source: Path, out: Path, inputs: np.ndarray, precision: str, name: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    activations, weights = PRECISIONS[precision]
    types = {8: QuantType.QUInt8, 16: QuantType.QUInt16}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(inputs)

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {name: item[None]}

    config = get_qnn_qdq_config(str(source), Reader(), activation_type=types[activations], weight_type=types[weights])
    quantize(str(source), str(out), config)
    return out


def _compile(model: Path, folder: Path, soc: runtime.Soc, precision: str) -> Path:
    """Compile for the SoC's HTP; returns the EP context model (the .bin lies beside it)."""
    import onnxruntime as ort

    context = folder / "context.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(context))
    options.add_session_config_entry("ep.context_embed_mode", "0")
    provider = {"backend_type": "htp", "htp_arch": str(soc.htp_arch), "soc_model": str(soc.soc_model)}
    if precision == "fp16":
        provider["enable_htp_fp16_precision"] = "1"
    options.add_provider_for_devices([runtime.ep_device()], provider)
    try:
        with runtime.native_stdout_kept_clean():
            ort.InferenceSession(str(model), options)
    except Exception as error:  # onnxruntime raises its own types
        raise ModelError(
            f"the QNN compiler refused the model for {soc.name} ({str(error).splitlines()[0][:200]}); "
            "an operator QNN does not take is the usual cause: export with --target qnn"
        ) from None
    return context


def _context_io(context: Path) -> dict[str, Any]:
    """The EP context node's graph name and the quantisation of the binary's input and output."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(context))
    nodes = list(model.graph.node)
    contexts = [n for n in nodes if n.op_type == "EPContext"]
    if len(contexts) != 1 or len(nodes) > 3:
        boundary = ("EPContext", "QuantizeLinear", "DequantizeLinear")
        kinds = ", ".join(n.op_type for n in nodes if n.op_type not in boundary)
        raise ModelError(
            f"the QNN compiler did not take the whole graph (left on the CPU: {kinds or 'a second partition'}); "
            "export with --target qnn"
        )
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in contexts[0].attribute}
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    facts: dict[str, Any] = {
        "graph": attributes["partition_name"].decode(),
        "bin": attributes["ep_cache_context"].decode(),
    }
    for what, op in (("input", "QuantizeLinear"), ("output", "DequantizeLinear")):
        node = next((n for n in nodes if n.op_type == op), None)
        if node is None:
            facts[what] = {"dtype": "float32", "scale": 1.0, "offset": 0.0}
            continue
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        # QNN convention: real = (q + offset) * scale, so offset = -zero_point.
        facts[what] = {"dtype": str(zero_point.dtype), "scale": float(scale), "offset": -float(zero_point)}
    return facts


def build_npu_binary(
    card: ModelCard,
    soc_name: str,
    precision: str = "a16w8",
    calibration: list[Scan] | None = None,
    parity: list[Scan] | None = None,
    calibration_slices: int = 32,
    parity_slices: int = 8,
    out: Path | None = None,
    say=print,
) -> dict[str, Any]:
    """Build, record in the card, measure; returns the card's qnn entry for the binary."""
    from ..backends.onnx import OnnxBackend
    from ..backends.qnn import QnnBackend
    from ..models import load_card

    runtime.qnn_module()  # one line naming the extra, before any work
    soc = runtime.find_soc(soc_name)
    if precision not in PRECISIONS:
        raise ModelError(f"--precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and soc.htp_arch < 73:
        raise ModelError(f"{soc.name} (HTP v{soc.htp_arch}) has no float16 on its NPU; use a16w8 or a8w8")
    if card.card_path is None:
        raise ModelError(f"{card.file.name} has no model card; the build writes its npu entry there")
    out = Path(out) if out else default_binary_path(card, soc)
    calibration = calibration or [sample_scan()]
    parity = parity or [sample_scan()]
    began = time.perf_counter()
    cpu = OnnxBackend(card)
    inputs = engine_inputs(cpu, calibration, calibration_slices)
    say(f"calibration: {len(inputs)} slices from {', '.join(s.describe() for s in calibration)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

        from .qnn_rewrite import make_qnn_ready

        make_qnn_ready(card.file, folder / "ready.onnx")
        model = folder / "preprocessed.onnx"
        if not qnn_preprocess_model(str(folder / "ready.onnx"), str(model)):
            model = folder / "ready.onnx"
        if PRECISIONS[precision]:
            model = _quantise(model, folder / "qdq.onnx", inputs, precision, card.input.name or "image")
        (folder / "context").mkdir()
        context = _compile(model, folder / "context", soc, precision)
        io = _context_io(context)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        shutil.copyfile(context.parent / io["bin"], partial)
        os.replace(partial, out)
    facts = runtime.binary_facts(out)
    entry = {
        "file": os.path.relpath(out, card.card_path.parent),
        "soc": soc.name,
        "qnn_version": facts.qnn_version,
        "framework": "TYPE_QNN" + "".join(facts.qnn_version.split(".")[:2]),
        "layout": card.input.layout,  # the graph's own: the rewrite keeps it
        "input_dtype": io["input"]["dtype"],
        "input_scale": io["input"]["scale"],
        "input_offset": io["input"]["offset"],
        "output_dtype": io["output"]["dtype"],
        "output_scale": io["output"]["scale"],
        "output_offset": io["output"]["offset"],
        "sha256": sha256_file(out),
    }
    built = {
        "graph": io["graph"],
        "htp_arch": soc.htp_arch,
        "soc_model": soc.soc_model,
        "precision": precision,
        "built_with": f"onnxruntime-qnn {runtime.wheel_version()} (QNN {runtime.runtime_version()})",
        "bytes": out.stat().st_size,
        "calibration": {
            "slices": int(len(inputs)),
            "sha256": set_hash(inputs),
            "scans": [s.describe() for s in calibration],
        },
    }
    _record(card, entry, built)
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - began:.0f} s; measuring parity")
    card = load_card(card.card_path)
    binary = next(b for b in card.npu if b.file.resolve() == out.resolve())
    with QnnBackend(card, binary=binary, soc=soc.name) as npu:
        built["parity"] = measure_parity(cpu, npu, engine_inputs(cpu, parity, parity_slices), parity)
    _record(card, entry, built)
    say(f"parity with the CPU model: {built['parity']}")
    return built


def measure_parity(cpu, npu, inputs: np.ndarray, scans: list[Scan]) -> dict[str, Any]:
    """Dice of the masks at the card's threshold and the largest logit difference, NPU against CPU."""
    threshold = float(cpu.card.threshold)
    cut = np.log(threshold / (1 - threshold))  # prob > t  <=>  logit > logit(t)
    reference = cpu.predict(inputs)
    began = time.perf_counter()
    got = npu.predict(inputs)
    seconds = (time.perf_counter() - began) / len(inputs)
    a, b = reference > cut, got > cut
    total = int(a.sum() + b.sum())
    return {
        "dice": round(1.0 if total == 0 else float(2 * (a & b).sum() / total), 4),
        "max_abs_logit_difference": round(float(np.abs(reference - got).max()), 3),
        "slices": int(len(inputs)),
        "sha256": set_hash(inputs),
        "scans": [s.describe() for s in scans],
        "ms_per_slice": round(1000 * seconds),
        "on": "x86_64 HTP emulator" if npu.emulator else "HTP",
    }


def _record(card: ModelCard, entry: dict, built: dict) -> None:
    """Put the entry into the card (replacing one for the same file) and its build facts under qnn."""
    data = yaml.safe_load(card.card_path.read_text())
    data["npu"] = [e for e in data.get("npu") or [] if e.get("file") != entry["file"]] + [entry]
    data.setdefault("qnn", {})
    data["qnn"] = {**(data["qnn"] or {}), Path(entry["file"]).name: built}
    write_card(data, card.card_path)


def add_npu_parser(subparsers) -> None:
    """Add `npu build MODEL --soc ... --precision ...` to the CLI."""
    npu = subparsers.add_parser("npu", help="build QNN context binaries for Qualcomm NPUs (needs the [qnn] extra)")
    commands = npu.add_subparsers(dest="npu_command", required=True)
    build = commands.add_parser(
        "build",
        help="calibrate, quantise and compile a model for one SoC; write the .bin and the card's npu entry",
        description="Build a QNN context binary with Qualcomm's compiler (onnxruntime-qnn) and measure it "
        "against the CPU model on the HTP emulator (x86_64) or NPU.",
    )
    build.add_argument("model", help="model name or path to its .onnx/.yaml")
    build.add_argument("--soc", required=True, choices=sorted(runtime.SOCS), type=str.lower)
    build.add_argument("--precision", default="a16w8", choices=tuple(PRECISIONS))
    build.add_argument("--calibration", action="append", type=Scan.parse, metavar="IMAGE[:LABELS]",
                       help="scans to calibrate on (box crops around each label); default: the sample MRI")
    build.add_argument("--parity", action="append", type=Scan.parse, metavar="IMAGE[:LABELS]",
                       help="scans to measure parity on; default: the sample MRI")
    build.add_argument("--calibration-slices", type=int, default=32)
    build.add_argument("--parity-slices", type=int, default=8)
    build.add_argument("--out", type=Path, default=None, help="the .bin (default: beside the model)")
    build.set_defaults(func=run_npu_build)


def run_npu_build(args: argparse.Namespace) -> int:
    card = find_model(args.model)
    build_npu_binary(
        card,
        args.soc,
        args.precision,
        calibration=args.calibration,
        parity=args.parity,
        calibration_slices=args.calibration_slices,
        parity_slices=args.parity_slices,
        out=args.out,
    )
    return 0
