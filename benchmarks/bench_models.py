"""SAM2-UNet configurations on this CPU: size, work, onnxruntime latency, memory, parity.

For each config (random weights: speed does not depend on them): parameters, GFLOP per
352x352 slice (torch's FLOP counter), ONNX size, onnxruntime fp32 and int8 (dynamic, MatMul)
latency at batch 1 and 4, peak resident memory of a process that runs the session, achieved
GFLOP/s as a share of this machine's onnxruntime matrix-multiply peak (measured in the same
run), and parity on real MR slices: fp32 onnxruntime vs torch (max |logit difference|, Dice of
the masks) and int8 vs fp32 (Dice).

Run: python benchmarks/bench_models.py [--configs compact large] [--threads 2]
Needs the [export] extra (torch, onnx).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 352
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

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
    out[str(batch)] = float(np.median(times)) / batch
status = open("/proc/self/status").read().split("VmHWM:")[1]
out["peak_mib"] = int(status.split()[0]) / 1024
print(json.dumps(out))
"""


def matmul_peak(threads: int, n: int = 1536) -> float:
    """onnxruntime's fp32 GEMM rate on this machine, GFLOP/s (an n x n x n MatMul)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

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
    return 2 * n**3 / min(times) / 1e9


def gflop(model) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 1e9


def real_batch(count: int = 4) -> np.ndarray:
    """MR slices through the middle of the test scan, windowed and normalised as the engine does."""
    from napari_sam2unet.io import read_volume
    from napari_sam2unet.models import InputSpec
    from napari_sam2unet.preprocess import crop_for_slice, plan_views, sample_crop, to_model_input

    volume = read_volume(SHARED / "totalseg" / "example_mr_sm.nii.gz")
    views = plan_views(volume.data, "auto", "replicate")
    spec = InputSpec()
    depth = volume.data.shape[2]
    out = []
    for k in np.linspace(depth // 4, 3 * depth // 4, count).astype(int):
        plane = volume.data[:, :, k]
        crop = crop_for_slice(plane.shape, volume.spacing[:2], spec.crop)
        out.append(to_model_input(sample_crop(plane, crop, (SIZE, SIZE)), views, spec))
    return np.stack(out).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def run_onnx(path: Path, batch: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": batch[i : i + 1]})[0] for i in range(len(batch))])


def bench(config: str, threads: int, repeats: int, workdir: Path, slices: np.ndarray) -> dict:
    import torch

    from napari_sam2unet.export import export_onnx
    from napari_sam2unet.modeling import build_sam2unet, count_parameters

    torch.manual_seed(0)
    model = calibrated(build_sam2unet(config), slices)
    row = {"config": config, "params_m": count_parameters(model) / 1e6, "gflop": gflop(model)}
    began = time.perf_counter()
    fp32 = workdir / f"{config}.onnx"
    export_onnx(model, fp32, config)
    int8 = workdir / f"{config}_int8.onnx"
    export_onnx(model, int8, config, int8=True)
    row["export_s"] = time.perf_counter() - began
    row["fp32_mb"], row["int8_mb"] = fp32.stat().st_size / 1e6, int8.stat().st_size / 1e6
    for precision, path in (("fp32", fp32), ("int8", int8)):
        done = subprocess.run(
            [sys.executable, "-c", _LATENCY, str(path), str(threads), "[1, 4]", str(repeats)],
            capture_output=True, text=True, check=True,
        )
        timing = json.loads(done.stdout)
        row[f"{precision}_b1_ms"] = 1000 * timing["1"]
        row[f"{precision}_b4_ms"] = 1000 * timing["4"]
        row[f"{precision}_peak_mib"] = timing["peak_mib"]
    # Parity on real slices (torch eager is slow for large: a few slices are enough).
    with torch.no_grad():
        reference = model(torch.from_numpy(slices))[0].numpy()
    fp32_logits = run_onnx(fp32, slices, threads)
    int8_logits = run_onnx(int8, slices, threads)
    row["fp32_max_abs_diff"] = float(np.abs(fp32_logits - reference).max())
    row["logit_std"] = float(reference.std())
    # Random weights put no object anywhere: threshold at the median so half the pixels count.
    cut = float(np.median(reference))
    row["fp32_dice"] = dice(fp32_logits > cut, reference > cut)
    row["int8_dice_vs_fp32"] = dice(int8_logits > cut, fp32_logits > cut)
    return row


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
    args = parser.parse_args()

    peak = matmul_peak(args.threads)
    print(f"onnxruntime fp32 MatMul peak on this machine: {peak:.0f} GFLOP/s ({args.threads} threads)", flush=True)
    slices = real_batch(args.slices)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            row = bench(config, args.threads, args.repeats, Path(tmp), slices)
            row["fp32_share_of_peak"] = row["gflop"] / (row["fp32_b1_ms"] / 1000) / peak
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print("\n| config | params (M) | GFLOP/slice | ONNX fp32 / int8 MB | fp32 ms b1 / b4 | int8 ms b1 / b4 "
          "| peak MiB fp32 / int8 | fp32 GFLOP/s (share of peak) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["gflop"] / (r["fp32_b1_ms"] / 1000)
        print(f"| {r['config']} | {r['params_m']:.1f} | {r['gflop']:.1f} | {r['fp32_mb']:.0f} / {r['int8_mb']:.0f} "
              f"| {r['fp32_b1_ms']:.0f} / {r['fp32_b4_ms']:.0f} | {r['int8_b1_ms']:.0f} / {r['int8_b4_ms']:.0f} "
              f"| {r['fp32_peak_mib']:.0f} / {r['int8_peak_mib']:.0f} "
              f"| {rate:.0f} ({100 * r['fp32_share_of_peak']:.0f}%) |")
    print("\n| config | logit std | fp32 vs torch: max abs logit diff | fp32 vs torch: Dice | int8 vs fp32: Dice |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['logit_std']:.3f} | {r['fp32_max_abs_diff']:.2e} | {r['fp32_dice']:.4f} "
              f"| {r['int8_dice_vs_fp32']:.4f} |")
    print(f"\nlatency per slice (batch 4: per slice of the batch); {args.threads} onnxruntime threads; "
          f"parity on {args.slices} real MR slices (whole slices; random weights with BatchNorm statistics "
          f"measured on them; masks at the median logit)")


if __name__ == "__main__":
    main()
