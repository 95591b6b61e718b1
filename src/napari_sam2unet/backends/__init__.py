"""Inference backends behind one interface; `open_backend` picks one and says why."""

from __future__ import annotations

from ..errors import BackendError, ModelError
from ..models import ModelCard
from .base import Backend

BACKEND_CHOICES = ("auto", "cpu", "npu")


def open_backend(
    card: ModelCard, kind: str = "auto", threads: int | None = None
) -> tuple[Backend, str]:
    """Open the backend for a model card; returns it with a one-line reason for the choice.

    auto: the NPU when the `aidlite` module imports and the card offers a QNN binary, else CPU.
    """
    if kind not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {kind!r}; use one of {', '.join(BACKEND_CHOICES)}")
    if kind in ("auto", "npu"):
        from .aidlite import AidliteBackend, npu_unavailable_reason

        reason = npu_unavailable_reason(card)
        if reason is None:
            try:
                backend = AidliteBackend(card)
            except (BackendError, ModelError) as error:
                if kind == "npu":
                    raise
                # auto: a device that cannot run this binary still segments, on the CPU.
                reason = f"it failed to start: {error}"
            else:
                binary = backend.binary.file.name
                return backend, f"NPU: {binary} through AidLite ({backend.choice})"
        if kind == "npu":
            raise BackendError(f"the NPU backend cannot run: {reason}")
        why = f"CPU (NPU not used: {reason})"
    else:
        why = "CPU (asked for)"
    from .onnx import OnnxBackend

    return OnnxBackend(card, threads=threads), why
