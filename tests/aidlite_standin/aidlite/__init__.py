"""A stand-in for APLUX AidLite's Python module `aidlite`: tests only, never installed.

It follows the documented API surface (Config, Model, InterpreterBuilder, Interpreter and the
ImplementType / FrameworkType / AccelerateType / DataType enums) and behaves like the device
where our backend could go wrong:

* return codes, not exceptions: init(), load_model(), set_input_tensor() and invoke() return
  0 or a negative code; Model.create_instance and the builder return None on failure;
* strict checks: the config must be TYPE_LOCAL + DSP with the framework type the binary was
  built for (and whose runtime is "installed"); the model properties must give exactly the
  binary's input/output shapes and data types; set_input_tensor wants the declared dtype and
  element count, and reads the array's memory as is (a non-contiguous view is read in memory
  order, as a C binding would);
* a quantised binary takes and returns integer codes in QNN's convention,
  real = (q + offset) * scale;
* both spellings of two methods, chosen by `reset()`: build_interpretper_/build_interpreter_
  from_model_and_config and destory()/destroy().

A "context binary" here is either a small JSON file written by `write_bin()`, naming the ONNX
model that onnxruntime runs behind the API plus the layout and quantisation a converter would
have baked in; or a real QNN context binary, which invoke() hands to a session of Qualcomm's
HTP emulator (onnxruntime-qnn) running that same .bin: then the numerics are Qualcomm's, and
the codes in and out are the binary's own. Calls are recorded in `CALLS`; `reset(fail={step: code})`
makes a step fail (steps: create_model, build, init, load_model, set_input_tensor, invoke).
Enum values are arbitrary here: code must use the names, never the numbers.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import numpy as np

STANDIN = True
CALLS: list[tuple] = []
_STATE: dict[str, Any] = {}
_DTYPES = {
    "float32": np.float32,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
}


class ImplementType(enum.IntEnum):
    TYPE_FAST = 1
    TYPE_MMKV = 2
    TYPE_LOCAL = 3


class FrameworkType(enum.IntEnum):
    TYPE_TFLITE = 1
    TYPE_SNPE2 = 2
    TYPE_QNN = 6
    TYPE_QNN216 = 101
    TYPE_QNN223 = 103
    TYPE_QNN229 = 104
    TYPE_QNN231 = 105
    TYPE_QNN236 = 107
    TYPE_QNN240 = 109
    TYPE_QNN251 = 111


class AccelerateType(enum.IntEnum):
    TYPE_CPU = 1
    TYPE_GPU = 2
    TYPE_DSP = 3


class DataType(enum.IntEnum):
    TYPE_UINT8 = 1
    TYPE_INT8 = 2
    TYPE_UINT16 = 3
    TYPE_INT16 = 4
    TYPE_INT32 = 5
    TYPE_FLOAT32 = 7


def reset(
    builder: str = "both",
    release: str = "both",
    fail: dict[str, int] | None = None,
    runtimes: set[str] | None = None,
    soc: str | None = None,
) -> None:
    """Fresh device state. builder/release: 'old', 'new' or 'both' spellings offered; fail: steps
    that fail with the given code; runtimes: installed FrameworkType names (None: all);
    soc: this device's SoC (None: accept any binary)."""
    CALLS.clear()
    _STATE.update(fail=dict(fail or {}), runtimes=runtimes, soc=soc)
    for name in (
        "build_interpretper_from_model_and_config",
        "build_interpreter_from_model_and_config",
    ):
        if hasattr(InterpreterBuilder, name):
            delattr(InterpreterBuilder, name)
    for name in ("destory", "destroy"):
        if hasattr(Interpreter, name):
            delattr(Interpreter, name)
    if builder in ("old", "both"):
        InterpreterBuilder.build_interpretper_from_model_and_config = staticmethod(
            _builder("build_interpretper_from_model_and_config")
        )
    if builder in ("new", "both"):
        InterpreterBuilder.build_interpreter_from_model_and_config = staticmethod(
            _builder("build_interpreter_from_model_and_config")
        )
    if release in ("old", "both"):
        Interpreter.destory = _releaser("destory")
    if release in ("new", "both"):
        Interpreter.destroy = _releaser("destroy")


def write_bin(
    path: Path,
    onnx: Path,
    *,
    layout: str = "nhwc",
    size: tuple[int, int] = (352, 352),
    soc: str = "QCS8550",
    framework: str = "TYPE_QNN223",
    input_dtype: str = "float32",
    input_scale: float = 1.0,
    input_offset: int = 0,
    output_dtype: str = "float32",
    output_scale: float = 1.0,
    output_offset: int = 0,
) -> Path:
    """A stand-in context binary: what a converter would have built from `onnx`."""
    data = {
        "aidlite_standin": 1,
        "onnx": str(Path(onnx).resolve()),
        "layout": layout,
        "size": list(size),
        "soc": soc,
        "framework": framework,
        "input": {"dtype": input_dtype, "scale": input_scale, "offset": input_offset},
        "output": {"dtype": output_dtype, "scale": output_scale, "offset": output_offset},
    }
    Path(path).write_text(json.dumps(data, indent=1))
    return Path(path)


def get_library_version() -> str:
    return "2.3.0-standin"


def get_py_library_version() -> str:
    return "2.3.0-standin"


def _failing(step: str) -> int:
    return int(_STATE.get("fail", {}).get(step, 0))


class Config:
    # A pybind11 object takes only its known attributes: a misspelt one is an AttributeError.
    __slots__ = (
        "implement_type",
        "framework_type",
        "accelerate_type",
        "is_quantify_model",
        "number_of_threads",
        "qnn_shared_buffer",
        "fast_timeout",
    )

    def __init__(self) -> None:
        self.implement_type = ImplementType.TYPE_FAST
        self.framework_type = FrameworkType.TYPE_TFLITE
        self.accelerate_type = AccelerateType.TYPE_CPU
        self.is_quantify_model = 0
        self.number_of_threads = -1
        self.qnn_shared_buffer = 0
        self.fast_timeout = -1

    @staticmethod
    def create_instance() -> Config:
        CALLS.append(("Config.create_instance",))
        return Config()


class Model:
    __slots__ = ("path", "properties")

    def __init__(self, path: str) -> None:
        self.path = path
        self.properties: tuple | None = None

    @staticmethod
    def create_instance(model_path: str) -> Model | None:
        CALLS.append(("Model.create_instance", str(model_path)))
        if _failing("create_model") or not Path(model_path).is_file():
            return None
        return Model(str(model_path))

    def set_model_properties(self, input_shapes, input_data_type, output_shapes, output_data_type) -> None:
        if not isinstance(input_data_type, DataType) or not isinstance(output_data_type, DataType):
            raise TypeError("set_model_properties: data types must be aidlite.DataType members")
        in_shapes = [[int(d) for d in shape] for shape in input_shapes]
        out_shapes = [[int(d) for d in shape] for shape in output_shapes]
        CALLS.append(
            (
                "Model.set_model_properties",
                in_shapes,
                input_data_type.name,
                out_shapes,
                output_data_type.name,
            )
        )
        self.properties = (in_shapes, input_data_type, out_shapes, output_data_type)


class InterpreterBuilder:
    """Its build method(s) are attached by reset(), in the spelling(s) under test."""


def _builder(name: str):
    def build(model: Model, config: Config) -> Interpreter | None:
        CALLS.append((f"InterpreterBuilder.{name}",))
        if _failing("build") or not isinstance(model, Model) or not isinstance(config, Config):
            return None
        return Interpreter(model, config)

    return build


def _releaser(name: str):
    def release(self: Interpreter) -> int:
        CALLS.append((name,))
        self._released = True
        self._session = None
        return 0

    return release


class Interpreter:
    def __init__(self, model: Model, config: Config) -> None:
        self._model, self._config = model, config
        self._initialised = self._loaded = self._released = False
        self._bin: dict[str, Any] = {}
        self._session: Any = None
        self._input: np.ndarray | None = None
        self._output: np.ndarray | None = None

    def init(self) -> int:
        CALLS.append(("init",))
        if self._released or _failing("init"):
            return _failing("init") or -1
        config = self._config
        if config.implement_type != ImplementType.TYPE_LOCAL:
            return -2
        if config.accelerate_type != AccelerateType.TYPE_DSP:
            return -3
        runtimes = _STATE.get("runtimes")
        framework = FrameworkType(config.framework_type).name
        if runtimes is not None and framework not in runtimes:
            return -4  # the aidlite-qnnXXX runtime for this framework type is not installed
        self._initialised = True
        return 0

    def load_model(self) -> int:
        CALLS.append(("load_model",))
        if not self._initialised or self._released:
            return -1
        if _failing("load_model"):
            return _failing("load_model")
        try:
            raw = Path(self._model.path).read_bytes()
        except OSError:
            return -5
        if not raw.startswith(b"{"):
            return self._load_qnn_binary(raw)
        try:
            spec = json.loads(raw.decode())
            assert spec.get("aidlite_standin") == 1
        except (ValueError, AssertionError, UnicodeDecodeError):
            return -5  # not a context binary
        if FrameworkType(self._config.framework_type).name != spec["framework"]:
            return -6  # built with another QNN version
        soc = _STATE.get("soc")
        if soc and soc.lower() != spec["soc"].lower():
            return -7  # built for another SoC
        height, width = spec["size"]
        if spec["layout"] == "nhwc":
            in_shape, out_shape = [1, height, width, 3], [1, height, width, 1]
        else:
            in_shape, out_shape = [1, 3, height, width], [1, 1, height, width]
        expected = (
            [in_shape],
            DataType[f"TYPE_{spec['input']['dtype'].upper()}"],
            [out_shape],
            DataType[f"TYPE_{spec['output']['dtype'].upper()}"],
        )
        if self._model.properties != expected:
            return -8  # the model properties do not describe this binary's tensors
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        self._bin, self._in_shape, self._out_shape = spec, in_shape, out_shape
        self._loaded = True
        return 0

    def _load_qnn_binary(self, raw: bytes) -> int:
        """A real QNN context binary: an emulator session of it, with the tensors the properties give."""
        import re

        import onnxruntime as ort
        import onnxruntime_qnn
        from onnx import helper

        graph = re.search(rb"QNNExecutionProvider_[A-Za-z0-9_]+", raw)
        built_for = re.search(rb"soc_type=([A-Za-z0-9]+);arch=(\d+)", raw)
        if graph is None or built_for is None:
            return -5  # not a context binary
        soc = _STATE.get("soc")
        if soc and soc.lower() != built_for.group(1).decode().lower():
            return -7  # built for another SoC
        (in_shape,), in_type, (out_shape,), out_type = self._model.properties
        onnx_type = {"UINT8": 2, "INT8": 3, "UINT16": 4, "INT16": 5, "FLOAT32": 1}
        node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", source="QNNExecutionProvider",
                                partition_name=graph.group(0).decode(), embed_mode=0, main_context=1,
                                ep_cache_context=Path(self._model.path).name)
        x = helper.make_tensor_value_info("x", onnx_type[in_type.name[5:]], in_shape)
        y = helper.make_tensor_value_info("y", onnx_type[out_type.name[5:]], out_shape)
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(helper.make_graph([node], "device", [x], [y]), opset_imports=opsets)
        model.ir_version = 10
        if not [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]:
            ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("ep.context_file_path", str(Path(self._model.path).with_name("device.onnx")))
        device = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
        options.add_provider_for_devices(device, {"backend_type": "htp", "htp_arch": built_for.group(2).decode()})
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options)
        except Exception:  # QNN refused the binary: a device reports a code, never a message
            return -11
        dtypes = {"input": in_type.name[5:].lower(), "output": out_type.name[5:].lower()}
        self._bin = {"qnn": True, **{k: {"dtype": v} for k, v in dtypes.items()}}
        self._in_shape, self._out_shape = in_shape, out_shape
        self._loaded = True
        return 0

    def set_input_tensor(self, in_tensor_idx: int = 0, input_data: Any = None) -> int:
        array = np.asarray(input_data)
        CALLS.append(("set_input_tensor", in_tensor_idx, str(array.dtype), tuple(array.shape)))
        if not self._loaded or self._released or in_tensor_idx != 0:
            return -1
        if _failing("set_input_tensor"):
            return _failing("set_input_tensor")
        dtype = np.dtype(_DTYPES[self._bin["input"]["dtype"]])
        if array.dtype != dtype or array.size != int(np.prod(self._in_shape)):
            return -9
        if array.ndim > 1 and list(array.shape) != self._in_shape:
            return -10
        # A C binding copies the buffer's bytes: memory order, whatever the strides say.
        self._input = array.ravel(order="K").copy()
        return 0

    def invoke(self) -> int:
        CALLS.append(("invoke",))
        if not self._loaded or self._released or self._input is None:
            return -1
        if _failing("invoke"):
            return _failing("invoke")
        if self._bin.get("qnn"):  # the binary's own codes in and out, as on the device
            codes = self._input.reshape(self._in_shape)
            (out,) = self._session.run(None, {"x": codes})
            self._output = np.ascontiguousarray(out).reshape(-1)
            return 0
        quant = self._bin["input"]
        values = self._input.astype(np.float32)
        if quant["dtype"] != "float32":
            values = (values + np.float32(quant["offset"])) * np.float32(quant["scale"])
        values = values.reshape(self._in_shape)
        # The ONNX model may take NCHW or NHWC (exported with --layout nhwc) whatever the
        # binary's layout: the converter would have folded the transpose into the graph.
        model_input = self._session.get_inputs()[0]
        onnx_nhwc = model_input.shape[-1] == 3 and model_input.shape[1] != 3
        if self._bin["layout"] == "nhwc" and not onnx_nhwc:
            values = values.transpose(0, 3, 1, 2)
        elif self._bin["layout"] == "nchw" and onnx_nhwc:
            values = values.transpose(0, 2, 3, 1)
        (logits,) = self._session.run(None, {model_input.name: np.ascontiguousarray(values)})
        # One output channel: NCHW and NHWC logits share one memory order.
        logits = logits.reshape(self._out_shape)
        quant = self._bin["output"]
        dtype = np.dtype(_DTYPES[quant["dtype"]])
        if dtype != np.float32:
            info = np.iinfo(dtype)
            codes = np.rint(logits / np.float32(quant["scale"]) - np.float32(quant["offset"]))
            logits = np.clip(codes, info.min, info.max)
        self._output = np.ascontiguousarray(logits).reshape(-1).astype(dtype)
        return 0

    def get_output_tensor(self, out_tensor_idx: int = 0) -> np.ndarray | None:
        CALLS.append(("get_output_tensor", out_tensor_idx))
        if self._released or out_tensor_idx != 0 or self._output is None:
            return None
        return self._output.copy()


reset()
