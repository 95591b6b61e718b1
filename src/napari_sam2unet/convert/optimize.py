"""A faster ONNX graph of a SAM2-UNet, kept only if its masks agree with fp32 torch.

`sam2unet export --optimize` calls `optimize_export`: it exports the fp32 graph without the
work on zero-padded attention windows (an exact rewrite: unpadded.py), fuses bias + GELU,
makes the candidate graphs (fp32; dynamic int8 MatMuls; optionally static int8 QDQ calibrated
on real MR slices), times them in turn in one process, checks each against fp32 torch on other
real slices with the CPU backend's session options, and keeps the fastest that passes. The
figures of the check go into the model card. docs/performance.md section 2 has what each step
gains.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..geometry import dice
from ..models import INPUT_SIZE
from .graph import export_fp32, quantize_int8
from .unpadded import export_unpadded

MIN_DICE = 0.97
EXACT = 1e-3  # a largest logit difference this share of the logits' spread is the same model
# Calibration and parity slices come from different positions of the same scans.
CALIBRATION_SLICES = 8
PARITY_SLICES = 4


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
