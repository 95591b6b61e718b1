"""CPU (or any onnxruntime provider) backend."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError, ModelError
from ..models import ModelCard
from .base import MAX_DYNAMIC_BATCH, Backend

THREADS_ENV = "SAM2UNET_THREADS"


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
        options.intra_op_num_threads = cpu_threads(threads)
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
        name = self.card.file.name
        if len(inputs) != 1:
            raise ModelError(f"model {name} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             f"a SAM2-UNet model takes one image: re-export it with only the image input")
        model_input = inputs[0]
        if spec.name and model_input.name != spec.name:
            raise ModelError(f"model {name}'s input is called {model_input.name!r} but its card says "
                             f"{spec.name!r}; fix input.name in the card")
        for what, tensor in (("input", model_input), ("output", outputs[0])):
            if tensor.type != "tensor(float)":
                raise ModelError(f"model {name}'s {what} is {tensor.type}, not float32; re-export it with "
                                 f"float32 {what}s (quantised models belong on the NPU)")
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
        return self._fixed_batch or MAX_DYNAMIC_BATCH

    @property
    def device(self) -> str:
        return self._device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for any number of slices, run max_batch at a time: onnxruntime's memory grows
        with the batch (about 4 MB a slice), so 1000 boxes must not go in one call."""
        count = batch.shape[0]
        logits = np.empty((count, 1, *self.card.input.size), dtype=np.float32)
        step = self.max_batch
        for start in range(0, count, step):
            logits[start : start + step] = self._run(batch[start : start + step])
        return logits

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        count = chunk.shape[0]
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if self._fixed_batch and count < self._fixed_batch:  # a fixed-batch model: pad the last chunk
            padding = np.zeros((self._fixed_batch - count, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, padding])
        if self.card.input.layout == "nhwc":
            chunk = np.ascontiguousarray(chunk.transpose(0, 2, 3, 1))
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: chunk})
        except Exception as error:  # onnxruntime's own error types
            raise BackendError(f"model {self.card.file.name} failed on the CPU ({_first_line(error)}); "
                               f"check that it matches its card, or re-export it") from None
        expected = chunk.shape[0] * int(np.prod(self.card.input.size))
        if logits.size != expected:
            height, width = self.card.input.size
            raise ModelError(f"model {self.card.file.name} returned {_fmt(logits.shape)} for {chunk.shape[0]} "
                             f"slices, not {height}x{width} logits each as its card says; fix output.shape or "
                             f"re-export it")
        # 1 channel: NCHW and NHWC outputs share one memory order.
        return logits.reshape(chunk.shape[0], 1, *self.card.input.size)[:count]

    def close(self) -> None:
        self.session = None


def cpu_threads(threads: int | None = None) -> int:
    """Threads for onnxruntime: the argument, else $SAM2UNET_THREADS, else all cores; at most the cores."""
    cores = os.cpu_count() or 1
    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        try:
            threads = int(text) if text else cores
        except ValueError:
            raise BackendError(f"{THREADS_ENV}={text!r} is not a number; set it to 1 to {cores}") from None
    if not 1 <= threads <= cores:
        raise BackendError(f"{threads} CPU threads asked for; use 1 to {cores} (this machine has {cores} cores): "
                           f"more only makes onnxruntime threads fight for the cores")
    return threads


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _fmt(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape)
