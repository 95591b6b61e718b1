"""The GEMM floor: how fast a config's Linear layers can run in int8 on this CPU, at best.

    python benchmarks/gemm_floor.py [--configs large base_plus] [--threads 2]

Counts the multiply-adds of the config's Linear layers at 352 px (forward hooks, with
`--optimize`'s rewrite: qkv on real tokens only) and times onnxruntime's fp32 MatMul and
u8 x s8 MatMulInteger on 1536^3 (the fastest of 8 runs). Linear work / int8 rate is the time
the int8 MatMuls of the optimised graph need before any other operator runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

N = 1536


def gemm_rate(op: str, a: np.ndarray, b: np.ndarray, out_type: int, threads: int) -> float:
    """Operations per second (2 per multiply-add) of one onnxruntime MatMul node, fastest of 8."""
    types = {np.float32: TensorProto.FLOAT, np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    inputs = [helper.make_tensor_value_info(name, types[x.dtype.type], list(x.shape))
              for name, x in (("a", a), ("b", b))]
    out = helper.make_tensor_value_info("y", out_type, [a.shape[0], b.shape[1]])
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": a, "b": b}
    session.run(None, feed)
    best = min(_seconds(session, feed) for _ in range(8))
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def _seconds(session, feed) -> float:
    began = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - began


def linear_ops(config: str) -> tuple[float, float]:
    """(Linear, Conv2d) operations of one 352-px slice through the config, as --optimize runs it."""
    import torch

    from napari_sam2unet.convert.unpadded import unpadded_linears
    from napari_sam2unet.modeling.sam2unet import build_sam2unet
    from napari_sam2unet.models import INPUT_SIZE

    model = build_sam2unet(config).eval()
    ops = {"linear": 0, "conv": 0}

    def on_linear(module, inputs, output):
        ops["linear"] += 2 * (inputs[0].numel() // module.in_features) * module.in_features * module.out_features

    def on_conv(module, inputs, output):
        ops["conv"] += 2 * output.numel() * module.weight[0].numel()

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(on_linear)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(on_conv)
    with torch.no_grad(), unpadded_linears(model):
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    return ops["linear"], ops["conv"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["large"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((N, N), dtype=np.float32)
    u8, s8 = rng.integers(0, 255, (N, N), dtype=np.uint8), rng.integers(-127, 127, (N, N), dtype=np.int8)
    fp32 = gemm_rate("MatMul", f32, f32, TensorProto.FLOAT, args.threads)
    int8 = gemm_rate("MatMulInteger", u8, s8, TensorProto.INT32, args.threads)
    print(f"fp32 MatMul {fp32 / 1e9:.0f} GFLOP/s, u8 x s8 MatMulInteger {int8 / 1e9:.0f} GOP/s "
          f"({args.threads} threads)")
    for config in args.configs:
        linear, conv = linear_ops(config)
        print(f"{config}: Linear {linear / 1e9:.1f} GOP, Conv2d {conv / 1e9:.1f} GOP per slice; "
              f"int8 Linear floor {linear / int8 * 1e3:.0f} ms, fp32 {linear / fp32 * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
