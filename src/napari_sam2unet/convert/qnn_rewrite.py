"""A QNN-ready ONNX graph: the plain export rewritten into operators the QNN HTP compiler takes.

Three rewrites, each checked against the graph before it (max |logit difference| <= 1e-4 on
a real-looking input), because a rewrite that changes the numbers would be blamed on the NPU:

1. batch fixed to 1, shapes folded: QNN graphs are static.
2. an antialiased Resize (the compact model's 352 -> 192 entry) becomes two MatMuls with the
   exact interpolation matrices: QNN has no antialiased Resize. The matrices are what
   onnxruntime's own Resize computes (it is separable), so the rewrite is exact to rounding.
3. a MatMul whose left operand is a constant, C @ X, becomes (X^T @ C^T)^T: the HTP (v68 with
   16-bit activations) refuses a constant left operand.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ModelError

TOLERANCE = 1e-4


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ModelError(
            'the QNN-ready export needs the onnx package: pip install "napari-sam2unet[qnn]"'
        ) from None
    return onnx


def fix_batch(model):
    """Batch 1 on every graph input and output, and the shape arithmetic folded to constants."""
    onnx = _onnx()
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed, optimize_model

    model = _copy(model)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        shape = [1] + [d.dim_value for d in dims[1:]]
        if any(n <= 0 for n in shape):
            raise ModelError(f"input {graph_input.name} has a dynamic size besides the batch; export at 352x352")
        make_input_shape_fixed(model.graph, graph_input.name, shape)
    fix_output_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        source, folded = Path(tmp) / "fixed.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(source))
        # onnxruntime's basic level: constant folding and Shape folding, standard operators only.
        optimize_model(source, folded)
        return onnx.load(str(folded))


def _resize_matrix(length: int, out_length: int, attributes: dict) -> np.ndarray:
    """The out_length x length matrix onnxruntime's Resize applies along one axis."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    # Resizing the unit vectors (a batch of them) gives the matrix's columns.
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attributes)
    graph = helper.make_graph(
        [node],
        "axis",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [length, 1, length, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [length, 1, out_length, 1])],
        [helper.make_tensor("sizes", TensorProto.INT64, [4], [length, 1, out_length, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    units = np.eye(length, dtype=np.float32).reshape(length, 1, length, 1)
    return session.run(None, {"x": units})[0].reshape(length, out_length).T


def _static_shape(model, name: str) -> list[int] | None:
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if info.name == name:
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            return dims if dims and all(n > 0 for n in dims) else None
    return None


def _rewrite(model, replace: Callable):
    """The model with each node that replace(model, node, initializers) answers with a list of new
    nodes (adding their initializers) swapped for them; a None answer keeps the node."""
    onnx = _onnx()
    model = onnx.shape_inference.infer_shapes(_copy(model))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        new = replace(model, node, initializers)
        nodes += [node] if new is None else new
    return _with_nodes(model, nodes, initializers)


def replace_antialiased_resize(model):
    """Each antialiased 4-D Resize -> C_h @ X @ C_w^T with onnxruntime's own interpolation weights."""
    _onnx()
    from onnx import helper, numpy_helper

    def replace(model, node, initializers):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Resize" or not attributes.get("antialias"):
            return None
        in_shape, out_shape = _static_shape(model, node.input[0]), _static_shape(model, node.output[0])
        if in_shape is None or out_shape is None or len(in_shape) != 4 or in_shape[:2] != out_shape[:2]:
            raise ModelError(
                f"Resize {node.name} has no static 4-D shape with only H and W resized; "
                "fix the batch first (fix_batch)"
            )
        attributes = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attributes.items()}
        rows = _resize_matrix(in_shape[2], out_shape[2], attributes)
        cols = _resize_matrix(in_shape[3], out_shape[3], attributes)
        prefix = f"{node.name or node.output[0]}_as_matmul"
        for name, value in ((f"{prefix}_rows", rows), (f"{prefix}_cols_t", np.ascontiguousarray(cols.T))):
            initializers[name] = numpy_helper.from_array(value.astype(np.float32), name)
        return [
            helper.make_node("MatMul", [node.input[0], f"{prefix}_cols_t"], [f"{prefix}_w"], name=f"{prefix}_w"),
            helper.make_node("MatMul", [f"{prefix}_rows", f"{prefix}_w"], [node.output[0]], name=f"{prefix}_h"),
        ]

    return _rewrite(model, replace)


def transpose_constant_left_matmuls(model):
    """C @ X -> Transpose(Transpose(X) @ C^T): the constant moves to the right operand."""
    _onnx()
    from onnx import helper, numpy_helper

    def replace(model, node, initializers):
        left = initializers.get(node.input[0]) if node.op_type == "MatMul" else None
        rank = len(_static_shape(model, node.input[1]) or []) if left is not None else 0
        if left is None or len(left.dims) != 2 or rank < 2:
            return None
        swap = list(range(rank - 2)) + [rank - 1, rank - 2]
        name = node.name or node.output[0]
        constant_t = f"{name}_const_t"
        initializers[constant_t] = numpy_helper.from_array(
            np.ascontiguousarray(numpy_helper.to_array(left).T), constant_t
        )
        return [
            helper.make_node("Transpose", [node.input[1]], [f"{name}_xt"], perm=swap, name=f"{name}_xt"),
            helper.make_node("MatMul", [f"{name}_xt", constant_t], [f"{name}_yt"], name=f"{name}_right"),
            helper.make_node("Transpose", [f"{name}_yt"], [node.output[0]], perm=swap, name=f"{name}_yt"),
        ]

    return _rewrite(model, replace)


def _with_nodes(model, nodes, initializers):
    """The model with a new node list; initializers no node reads any more are dropped."""
    graph = model.graph
    used = {name for node in nodes for name in node.input}
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(t for name, t in initializers.items() if name in used)
    del graph.value_info[:]  # stale after a rewrite; inferred again where needed
    return model


def _copy(model):
    onnx = _onnx()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _probe_input(model) -> np.ndarray:
    """A smooth, image-like input (not noise: the rewrites must hold where real slices live)."""
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    coarse = rng.normal(0.0, 1.0, (*shape[:-2], 12, 12)).astype(np.float32)
    rows = np.linspace(0, 11, shape[-2]).round().astype(int)
    cols = np.linspace(0, 11, shape[-1]).round().astype(int)
    return np.ascontiguousarray(coarse[..., rows, :][..., :, cols])


def _run(model, image: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: image})[0]


def _checked(step: Callable, model, reference: np.ndarray, image: np.ndarray, what: str):
    rewritten = step(model)
    _onnx().checker.check_model(rewritten)
    difference = float(np.max(np.abs(_run(rewritten, image) - reference)))
    if not difference <= TOLERANCE:
        raise ModelError(
            f"the QNN rewrite '{what}' changed the logits by up to {difference:.2g} (> {TOLERANCE:g}); "
            "report this with the model file"
        )
    return rewritten, difference


def make_qnn_ready(source: str | Path, out_path: str | Path) -> dict[str, float]:
    """Write the QNN-ready graph of an exported model; returns each rewrite's max |logit difference|."""
    onnx = _onnx()
    model = onnx.load(str(source))
    image = _probe_input(model)
    reference = _run(model, image)
    steps = (
        (fix_batch, "batch 1"),
        (replace_antialiased_resize, "antialiased Resize as MatMuls"),
        (transpose_constant_left_matmuls, "constant-left MatMuls transposed"),
    )
    differences, current = {}, model
    for step, what in steps:
        current, differences[what] = _checked(step, current, reference, image, what)
    remaining = [n.name for n in current.graph.node if n.op_type == "Resize" and _antialiased(n)]
    if remaining:
        raise ModelError(f"antialiased Resize nodes remain ({', '.join(remaining)}); report this with the model")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(current, str(out_path))
    return differences


def _antialiased(node) -> bool:
    return any(a.name == "antialias" and a.i for a in node.attribute)
