"""SAM2-UNet configurations on this CPU: size, work, onnxruntime latency, memory, parity.

For each config (random weights: speed does not depend on them): parameters, GFLOP per
352x352 slice (torch's FLOP counter), ONNX size, onnxruntime latency at batch 1 and 4 of the
fp32 export, its dynamic int8 MatMuls (the two baselines) and `export --optimize`'s graph
(optimize.py), peak resident memory of a process that runs each, achieved fp32 GFLOP/s as a
share of this machine's onnxruntime matrix-multiply peak (measured in the same run), and
parity of each against fp32 torch on real MR slices through the engine's CPU backend (max
|logit difference|, Dice of the masks).

Run: nice -n 19 python benchmarks/bench_models.py [--configs compact large] [--threads 2]
The exports and calibration run at the script's priority; the timed processes (latencies and
the MatMul peak) are raised back to nice 0 where allowed (root), so a shared machine's other
nice-19 jobs take little from them (--inherit-priority: not). --rounds also times the three
graphs in turn in one process, where a changing load hits all alike. Needs the [export] extra (torch, onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_sam2unet.geometry import dice
from napari_sam2unet.models import INPUT_SIZE

# Runs in a fresh process; VmHWM (peak resident memory) starts anew at exec, unlike ru_maxrss.
_LATENCY = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, threads, batches, repeats = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
out = {}
for batch in batches:
    x = np.random.default_rng(0).standard_normal((batch, 3, 352, 352)).astype(np.float32)
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - began)
    out[str(batch)] = min(times) / batch  # the least disturbed run: the machine may be shared
status = open("/proc/self/status").read().split("VmHWM:")[1]
out["peak_mib"] = int(status.split()[0]) / 1024
print(json.dumps(out))
"""


_PEAK = r"""
import json, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
threads, n = int(sys.argv[1]), int(sys.argv[2])
a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
weight = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
node = helper.make_node("MatMul", ["a", "b"], ["c"])
graph = helper.make_graph([node], "gemm", [a], [c], [onnx.numpy_helper.from_array(weight, "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
session.run(None, {"a": x})
times = []
for _ in range(10):
    began = time.perf_counter()
    session.run(None, {"a": x})
    times.append(time.perf_counter() - began)
print(json.dumps({"gflops": 2 * n**3 / min(times) / 1e9}))
"""


# Graphs run in turn in one process (as `export --optimize` times its candidates), so a shared
# machine's changing load hits all alike.
_INTERLEAVED = r"""
import json, sys
import numpy as np
from napari_sam2unet.convert.optimize import interleaved_times, session
paths, threads, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
times = interleaved_times([session(p, threads) for p in paths], rounds)
print(json.dumps([{"median": float(np.median(t)), "min": min(t)} for t in times]))
"""


def interleaved(paths: list[Path], threads: int, rounds: int) -> list[dict]:
    """Batch-1 seconds (median and fastest of `rounds`) of graphs run in turn in one process."""
    return timed(_INTERLEAVED, json.dumps([str(p) for p in paths]), str(threads), str(rounds))


def matmul_peak(threads: int, n: int = 1536) -> float:
    """onnxruntime's fp32 GEMM rate on this machine, GFLOP/s (an n x n x n MatMul)."""
    return timed(_PEAK, str(threads), str(n))["gflops"]


def gflop(model) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    return counter.get_total_flops() / 1e9


def real_batch(count: int = 4) -> np.ndarray:
    """Whole slices of the bundled sample MRI (abdomen) through the engine's preprocessing, at
    other positions than the optimiser's parity slices. (BraTS brain slices, half empty
    background, put the median cut among near-equal background logits: docs/performance.md.)"""
    from napari_sam2unet._sample_data import SAMPLE_IMAGE
    from napari_sam2unet.io import read_volume
    from napari_sam2unet.models import InputSpec
    from napari_sam2unet.preprocess import crop_for_slice, plan_views, sample_crop, to_model_input

    volume = read_volume(SAMPLE_IMAGE)
    views = plan_views(volume.data, "auto", "replicate")
    spec = InputSpec()
    depth = volume.data.shape[2]
    out = []
    for k in np.linspace(depth // 4, 3 * depth // 4, count).astype(int):
        plane = volume.data[:, :, k]
        crop = crop_for_slice(plane.shape, volume.spacing[:2], spec.crop)
        out.append(to_model_input(sample_crop(plane, crop, (INPUT_SIZE, INPUT_SIZE)), views, spec))
    return np.stack(out).astype(np.float32)


def engine_logits(card_path: Path, batch: np.ndarray) -> np.ndarray:
    """Logits through the engine's CPU backend (its session options), one slice a call."""
    from napari_sam2unet.backends.onnx import OnnxBackend
    from napari_sam2unet.models import load_card

    backend = OnnxBackend(load_card(card_path))
    return np.concatenate([backend.predict(batch[i : i + 1]) for i in range(len(batch))])


RAISE_PRIORITY = {"on": True}


def _normal_priority() -> None:
    """In a timed child: back to nice 0 if this user may raise priority (and --inherit-priority
    was not given), else as inherited."""
    if not RAISE_PRIORITY["on"]:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass


def timed(code: str, *args: str) -> dict:
    """Run a timing snippet in a fresh process at normal priority; its JSON output."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, preexec_fn=_normal_priority
    )
    return json.loads(done.stdout)


def latency(path: Path, threads: int, repeats: int, batches: str = "[1, 4]") -> dict:
    """Per-slice seconds by batch and peak MiB, in a fresh process."""
    return timed(_LATENCY, str(path), str(threads), batches, str(repeats))


VARIANTS = ("fp32", "int8", "opt")


def bench(config: str, threads: int, repeats: int, workdir: Path, slices: np.ndarray, rounds: int = 0) -> dict:
    """fp32 export, its dynamic int8 MatMuls (the baselines), and `export --optimize`. Weights
    and graphs already in `workdir` (a --keep folder) are reused, not exported again; a graph
    missing there (say the opt graph, deleted to time a new --optimize) is exported anew."""
    import torch
    import yaml

    from napari_sam2unet.modeling import build_sam2unet, count_parameters

    torch.manual_seed(0)
    model = build_sam2unet(config)
    weights = workdir / f"{config}.pt"
    cards = {v: workdir / f"{config}{'' if v == 'fp32' else '_' + v}.yaml" for v in VARIANTS}
    present = [v for v, c in cards.items() if c.is_file() and c.with_suffix(".onnx").is_file()]
    if weights.is_file():
        model.load_state_dict(torch.load(weights))
        model.eval()
    else:
        model, present = calibrated(model, slices), []
        torch.save(model.state_dict(), weights)
    row = {"config": config, "params_m": count_parameters(model) / 1e6, "gflop": gflop(model), "reused": present}
    row.update(export_all(model, config, workdir, cards, skip=present))
    row["opt_chosen"] = yaml.safe_load(cards["opt"].read_text())["optimization"]["chosen"]
    with torch.no_grad():
        reference = model(torch.from_numpy(slices))[0].numpy()
    row["logit_std"] = float(reference.std())
    # Random weights put no object anywhere: threshold at the median so half the pixels count.
    cut = float(np.median(reference))
    for variant in VARIANTS:
        path = cards[variant].with_suffix(".onnx")
        row[f"{variant}_mb"] = path.stat().st_size / 1e6
        timing = latency(path, threads, repeats)
        row[f"{variant}_b1_ms"] = 1000 * timing["1"]
        row[f"{variant}_b4_ms"] = 1000 * timing["4"]
        row[f"{variant}_peak_mib"] = timing["peak_mib"]
        out = engine_logits(cards[variant], slices)
        row[f"{variant}_max_abs_diff"] = float(np.abs(out - reference).max())
        row[f"{variant}_dice"] = dice(out > cut, reference > cut)
    if rounds:
        paths = [cards[v].with_suffix(".onnx") for v in VARIANTS]
        for variant, t in zip(VARIANTS, interleaved(paths, threads, rounds)):
            row[f"{variant}_interleaved_ms"] = 1000 * t["median"]
    return row


def export_all(model, config: str, workdir: Path, cards: dict[str, Path], skip=()) -> dict:
    """The three graphs and their cards (but those in `skip`); the seconds each export took."""
    from napari_sam2unet.convert.export import export_onnx, quantize_int8

    began = time.perf_counter()
    if "fp32" not in skip:
        export_onnx(model, cards["fp32"].with_suffix(".onnx"), config)
    if "int8" not in skip or "fp32" not in skip:
        quantize_int8(cards["fp32"].with_suffix(".onnx"), cards["int8"].with_suffix(".onnx"))
        export_onnx_card(cards["fp32"], cards["int8"].with_suffix(".onnx"))
    middle = time.perf_counter()
    if "opt" not in skip:
        export_onnx(model, cards["opt"].with_suffix(".onnx"), config, optimize=True)
    return {"export_s": middle - began, "optimize_s": time.perf_counter() - middle}


def export_onnx_card(fp32_card: Path, onnx_path: Path) -> Path:
    """A card for the dynamic int8 file: the fp32 card with its file, hash and precision."""
    import yaml

    from napari_sam2unet.models import sha256_file, write_card

    card = yaml.safe_load(fp32_card.read_text())
    card.update(file=onnx_path.name, sha256=sha256_file(onnx_path))
    card["architecture"]["precision"] = "int8-dynamic (MatMul)"
    return write_card(card, onnx_path.with_suffix(".yaml"))


def calibrated(model, slices: np.ndarray):
    """Random weights with BatchNorm statistics measured on real slices (fresh statistics of 0
    and 1 leave the logits nearly constant, and parity on a constant proves nothing)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(slices))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["compact_s", "compact", "tiny", "small", "base_plus", "large"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=4, help="real slices for parity")
    parser.add_argument("--rounds", type=int, default=6,
                        help="also time fp32, int8 and opt in turn in one process, this many rounds (0: not)")
    parser.add_argument("--inherit-priority", action="store_true",
                        help="timed processes keep the script's priority (nice 19 beside others' jobs)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write weights and graphs here, and reuse those a previous run left (no re-export)")
    args = parser.parse_args()
    RAISE_PRIORITY["on"] = not args.inherit_priority

    peak = matmul_peak(args.threads)
    print(f"onnxruntime fp32 MatMul peak on this machine: {peak:.0f} GFLOP/s ({args.threads} threads)", flush=True)
    slices = real_batch(args.slices)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for config in args.configs:
            row = bench(config, args.threads, args.repeats, workdir, slices, args.rounds)
            row["fp32_share_of_peak"] = row["gflop"] / (row["fp32_b1_ms"] / 1000) / peak
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    # Again at the end: a peak that moved says the machine's load changed during the run.
    print_tables(rows, peak, matmul_peak(args.threads), args)


def print_tables(rows: list[dict], peak: float, end_peak: float, args) -> None:
    print(f"\nonnxruntime fp32 MatMul peak in this run: {peak:.0f} GFLOP/s at the start, {end_peak:.0f} at the end")
    print("\n| config | params (M) | GFLOP/slice | ONNX MB fp32 / int8 / opt | fp32 ms b1 / b4 | int8 ms b1 / b4 "
          "| opt ms b1 / b4 | opt graph | peak MiB fp32 / int8 / opt | fp32 GFLOP/s (share of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["gflop"] / (r["fp32_b1_ms"] / 1000)
        mb = " / ".join(f"{r[f'{v}_mb']:.0f}" for v in VARIANTS)
        ms = " | ".join(f"{r[f'{v}_b1_ms']:.0f} / {r[f'{v}_b4_ms']:.0f}" for v in VARIANTS)
        mib = " / ".join(f"{r[f'{v}_peak_mib']:.0f}" for v in VARIANTS)
        print(f"| {r['config']} | {r['params_m']:.1f} | {r['gflop']:.1f} | {mb} | {ms} | {r['opt_chosen']} | {mib} "
              f"| {rate:.0f} ({100 * r['fp32_share_of_peak']:.0f}%) |")
    if args.rounds:
        print(f"\ninterleaved, batch 1, median of {args.rounds} rounds (ms): "
              + "; ".join(f"{r['config']} " + " / ".join(f"{r[f'{v}_interleaved_ms']:.0f}" for v in VARIANTS)
                          for r in rows) + " (fp32 / int8 / opt)")
    print("\n| config | logit std | max abs logit diff vs torch: fp32 / int8 / opt "
          "| Dice vs torch: fp32 / int8 / opt |")
    print("|---|---|---|---|")
    for r in rows:
        diffs = " / ".join(f"{r[f'{v}_max_abs_diff']:.2g}" for v in VARIANTS)
        dices = " / ".join(f"{r[f'{v}_dice']:.4f}" for v in VARIANTS)
        print(f"| {r['config']} | {r['logit_std']:.3f} | {diffs} | {dices} |")
    print(f"\nlatency per slice, fastest of the repeats after a warm-up (batch 4: per slice of the batch); "
          f"{args.threads} onnxruntime threads; "
          f"parity through the engine's CPU backend on {args.slices} real MR slices (whole slices; random "
          f"weights with BatchNorm statistics measured on them; masks at the median logit)")


if __name__ == "__main__":
    main()
