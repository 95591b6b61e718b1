"""Inference backends behind one interface; `open_backend` picks one and says why."""

from __future__ import annotations

from ..errors import BackendError, ModelError
from ..models import ModelCard
from .base import Backend

BACKEND_CHOICES = ("auto", "cpu", "npu", "qnn")


def open_backend(
    card: ModelCard, kind: str = "auto", threads: int | None = None
) -> tuple[Backend, str]:
    """Open the backend for a model card; returns it with a one-line reason for the choice.

    auto: the NPU through AidLite when `aidlite` imports and the card offers a QNN binary; else
    the NPU through onnxruntime's QNN execution provider (never its x86_64 emulator); else CPU.
    npu: AidLite only. qnn: the QNN execution provider (on x86_64 its HTP emulator, for tests).
    """
    if kind not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {kind!r}; use one of {', '.join(BACKEND_CHOICES)}")
    skipped = []
    if kind in ("auto", "npu"):
        backend, reason = _try_aidlite(card, strict=kind == "npu")
        if backend is not None:
            return backend, reason
        if kind == "npu":
            raise BackendError(f"the NPU backend cannot run: {reason}")
        skipped.append(reason)
    if kind in ("auto", "qnn"):
        backend, reason = _try_qnn(card, strict=kind == "qnn")
        if backend is not None:
            return backend, reason
        if kind == "qnn":
            raise BackendError(f"the QNN backend cannot run: {reason}")
        skipped.append(f"QNN: {reason}")
    from .onnx import OnnxBackend

    why = f"CPU (NPU not used: {'; '.join(skipped)})" if skipped else "CPU (asked for)"
    return OnnxBackend(card, threads=threads), why


def _try_aidlite(card: ModelCard, strict: bool) -> tuple[Backend | None, str]:
    from .aidlite import AidliteBackend, npu_unavailable_reason

    reason = npu_unavailable_reason(card)
    if reason is not None:
        return None, reason
    try:
        backend = AidliteBackend(card)
    except (BackendError, ModelError) as error:
        if strict:
            raise
        # A device that cannot run this binary still segments, on the CPU.
        return None, f"it failed to start: {error}"
    return backend, f"NPU: {backend.binary.file.name} through AidLite ({backend.choice})"


def _try_qnn(card: ModelCard, strict: bool) -> tuple[Backend | None, str]:
    from .qnn import QnnBackend, qnn_unavailable_reason

    reason = qnn_unavailable_reason(card, allow_emulator=strict)
    if reason is not None:
        return None, reason
    try:
        backend = QnnBackend(card)
    except (BackendError, ModelError) as error:
        if strict:
            raise
        return None, f"it failed to start: {error}"
    where = "Qualcomm's x86_64 HTP emulator (slow: for tests)" if backend.emulator else "NPU"
    return backend, f"{where}: {backend.binary.file.name} through onnxruntime's QNN EP ({backend.choice})"


def explain_auto(card: ModelCard) -> str:
    """What `auto` would run for this card and why, without opening anything."""
    from .aidlite import npu_unavailable_reason
    from .qnn import qnn_unavailable_reason

    aidlite = npu_unavailable_reason(card)
    if aidlite is None:
        return "NPU (AidLite)"
    qnn = qnn_unavailable_reason(card)
    if qnn is None:
        return "NPU (onnxruntime QNN EP)"
    return f"CPU; NPU not used: {aidlite}; QNN: {qnn}"
