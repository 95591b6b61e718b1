"""CPU (or any onnxruntime provider) backend."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError, ModelError
from ..models import ModelCard
from .base import Backend


def _dim_matches(actual, expected: int) -> bool:
    # onnxruntime reports dynamic dimensions as strings or None.
    return not isinstance(actual, int) or expected in (-1, 0) or actual == expected


class OnnxBackend(Backend):
    name = "cpu"

    def __init__(self, card: ModelCard, threads: int | None = None, providers=None):
        super().__init__(card)
        try:
            import onnxruntime as ort
        except ImportError as error:  # a dependency, but say so plainly if it is broken
            raise BackendError(f"onnxruntime cannot be imported ({error}); pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("SAM2UNET_THREADS", 0)) or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(card.file), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own types for corrupt files
            raise ModelError(
                f"{card.file.name} is not a loadable ONNX model ({str(error).splitlines()[0][:200]}); "
                f"re-export it with `sam2unet export`"
            ) from None
        self._check_contract()
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "")
        self._device = f"onnxruntime {provider}, {options.intra_op_num_threads} threads"

    def _check_contract(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        spec = self.card.input
        model_input = next((i for i in inputs if i.name == spec.name), inputs[0]) if spec.name else inputs[0]
        self.input_name = model_input.name
        self.output_name = outputs[0].name
        shape = list(model_input.shape)
        if len(shape) != 4 or not all(_dim_matches(a, e) for a, e in zip(shape[1:], spec.shape[1:])):
            raise ModelError(
                f"model {self.card.file.name} takes input {_fmt(shape)} but its card says "
                f"{_fmt(spec.shape)}; a SAM2-UNet model expects 1x3x352x352: fix the card or re-export"
            )
        out_shape = list(outputs[0].shape)
        expected = self.card.output_shape
        # NHWC models may return N x H x W x 1: the same single map in the same memory order.
        as_nchw = out_shape if len(out_shape) != 4 or out_shape[-1] != 1 else [out_shape[0], 1, *out_shape[1:3]]
        if len(out_shape) != 4 or not all(_dim_matches(a, e) for a, e in zip(as_nchw[1:], expected[1:])):
            raise ModelError(
                f"model {self.card.file.name} returns {_fmt(out_shape)} but its card says "
                f"{_fmt(expected)}; export only the first logit map (1x1xHxW)"
            )
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    @property
    def max_batch(self) -> int:
        return self._fixed_batch or 8

    @property
    def device(self) -> str:
        return self._device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.card.input.layout == "nhwc":
            batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
        if self._fixed_batch and batch.shape[0] != self._fixed_batch:
            parts = [self._run(batch[i : i + 1]) for i in range(batch.shape[0])]
            return np.concatenate(parts, axis=0)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        # 1 channel: NCHW and NHWC outputs share one memory order.
        return logits.reshape(batch.shape[0], 1, *self.card.input.size)

    def close(self) -> None:
        self.session = None


def _fmt(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape)
