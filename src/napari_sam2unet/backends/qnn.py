"""Qualcomm NPU backend through onnxruntime's QNN execution provider (the onnxruntime-qnn wheel).

It runs the same QNN context binary (.bin) the AidLite backend runs, wrapped in a one-node
EPContext model, as Snapdragon laptops and Linux boards with onnxruntime-qnn do. On x86_64 the
provider's HTP backend is Qualcomm's emulator: right numbers, slow, for tests; `auto` never
picks it. Before QNN sees a binary we check what QNN would refuse with a cryptic code: the
version rule (a runtime loads binaries of its own QNN version or older) and the SoC.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..models import ModelCard, NpuBinary
from . import qnn_runtime as runtime
from .base import Backend, checked_batch
from .qnn_binary import DOCS, chosen_binary, dequantise, detect_soc, quantise, same_soc, select_binary

_ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5}  # onnx.TensorProto


def build_facts(card: ModelCard, binary: NpuBinary) -> dict[str, Any]:
    """What `sam2unet npu build` recorded about a binary (card key `qnn`, by file name)."""
    return dict((card.raw.get("qnn") or {}).get(binary.file.name) or {})


def qnn_unavailable_reason(card: ModelCard, allow_emulator: bool = False) -> str | None:
    """None when the QNN backend can run this card here, else why not, in the user's terms."""
    if not runtime.installed():
        return f"Qualcomm's QNN runtime is not installed ({runtime.INSTALL_HINT})"
    if runtime.is_emulator() and not allow_emulator:
        return (
            "QNN's HTP on x86_64 is Qualcomm's emulator (for tests, far slower than the CPU); "
            "--backend qnn runs it"
        )
    if not card.npu:
        return f"model {card.name} has no QNN context binary (.bin) in its card ({DOCS})"
    binary, _ = select_binary(card)
    if not binary.file.is_file():
        return f"its QNN context binary {binary.file} is missing"
    return None


class QnnBackend(Backend):
    """Runs a card's QNN context binary with onnxruntime's QNN execution provider, a slice at a time."""

    name = "qnn"

    def __init__(self, card: ModelCard, binary: NpuBinary | None = None, soc: str | None = None):
        super().__init__(card)
        target = soc if soc is not None else detect_soc()
        binary, self.choice = chosen_binary(card, binary, target)
        self.binary = binary
        self.emulator = runtime.is_emulator()
        device = runtime.ep_device()
        self.facts = runtime.binary_facts(binary.file)
        self._check_version()
        if target and not same_soc(self.facts.soc, target):
            raise BackendError(
                f"{binary.file.name} was compiled for {self.facts.soc} (HTP v{self.facts.htp_arch}) but this device "
                f"is {target.strip()[:40]}: use the card's binary for this SoC, or build one with `sam2unet npu "
                f"build MODEL --soc ...` ({DOCS})"
            )
        recorded = build_facts(card, binary)
        self._graph = recorded.get("graph") or self.facts.graph
        if not self._graph:
            raise BackendError(
                f"the graph name inside {binary.file.name} is unknown (not built by `sam2unet npu build`); "
                "add it to the card's qnn entry as graph"
            )
        height, width = card.input.size
        self._size = (height, width)
        if binary.layout == "nhwc":
            self._in_shape, self._out_shape = [1, height, width, 3], [1, height, width, 1]
        else:
            self._in_shape, self._out_shape = [1, 3, height, width], [1, 1, height, width]
        self._session = self._open(device, recorded)
        self._lock = threading.Lock()

    def _check_version(self) -> None:
        built, here = self.facts.qnn_version, runtime.runtime_version()
        if runtime.version_tuple(built) > runtime.version_tuple(here):
            raise BackendError(
                f"{self.binary.file.name} was built with QNN {built}, newer than this runtime's QNN {here}: a QNN "
                "runtime loads only binaries of its own version or older; upgrade onnxruntime-qnn (or the "
                "device's QNN) or rebuild the binary with this one"
            )

    def _wrapper(self) -> bytes:
        """A one-node EPContext model around the bare .bin, named relative to the .bin's folder."""
        from onnx import helper

        binary = self.binary
        node = helper.make_node(
            "EPContext",
            ["image"],
            ["logits"],
            domain="com.microsoft",
            source=runtime.EP_NAME,
            partition_name=self._graph,
            embed_mode=0,
            ep_cache_context=binary.file.name,
            main_context=1,
        )
        graph = helper.make_graph(
            [node],
            "qnn_context",
            [helper.make_tensor_value_info("image", _ONNX_TYPES[binary.input_dtype], self._in_shape)],
            [helper.make_tensor_value_info("logits", _ONNX_TYPES[binary.output_dtype], self._out_shape)],
        )
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        return model.SerializeToString()

    def _open(self, device, recorded: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The whole graph must run on the HTP: a silent CPU fallback would hide a broken binary.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # ep_cache_context is resolved against this path's folder: the .bin's own.
        options.add_session_config_entry("ep.context_file_path", str(Path(self.binary.file).parent / "context.onnx"))
        provider = {"backend_type": "htp", "htp_arch": str(recorded.get("htp_arch") or self.facts.htp_arch)}
        if recorded.get("soc_model"):
            provider["soc_model"] = str(recorded["soc_model"])
        options.add_provider_for_devices([device], provider)
        try:
            with runtime.native_stdout_kept_clean():
                return ort.InferenceSession(self._wrapper(), options)
        except Exception as error:  # onnxruntime raises its own types
            text = str(error).replace("\n", " ")
            # QNN 2.47 refused a 2.51 binary with CONTEXT_ERROR_INVALID_ARGUMENT (measured); 5000 is
            # the code QNN documents for "newer context binary on old SDK".
            if "5000" in text or "newer" in text.lower() or "INVALID_ARGUMENT" in text:
                raise BackendError(
                    f"QNN refused {self.binary.file.name} as built by a newer QNN than this runtime's "
                    f"{runtime.runtime_version()}; upgrade onnxruntime-qnn or rebuild the binary with this one"
                ) from None
            raise BackendError(
                f"QNN could not load {self.binary.file.name} ({text[text.find('Failed'):][:120] or text[:120]}): "
                "it is corrupt or not a context binary for this graph; copy it again or rebuild it with "
                "`sam2unet npu build`"
            ) from None

    @property
    def max_batch(self) -> int:
        return 1  # a context binary has batch 1; bigger batches are looped

    @property
    def device(self) -> str:
        where = "x86_64 HTP emulator (slow: for tests)" if self.emulator else "NPU (HTP)"
        return (
            f"Qualcomm {where} via onnxruntime-qnn {runtime.wheel_version()} (QNN {runtime.runtime_version()}; "
            f"binary for {self.facts.soc}, HTP v{self.facts.htp_arch}, {self.binary.input_dtype} I/O)"
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise BackendError("the QNN backend was closed; open it again")
        batch = checked_batch(batch, self._size, "QNN")
        height, width = self._size
        out = np.empty((batch.shape[0], 1, height, width), dtype=np.float32)
        with self._lock:
            for index, image in enumerate(batch):
                if self.binary.layout == "nhwc":
                    image = image.transpose(1, 2, 0)
                codes = np.ascontiguousarray(quantise(image[None], self.binary))
                (raw,) = session.run(None, {"image": codes})
                out[index, 0] = dequantise(raw, self.binary).reshape(height, width)
        return out

    def close(self) -> None:
        self._session = None
