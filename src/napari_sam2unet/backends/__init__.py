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
    # The NPU routes, in the order auto tries them: (kind, its name in messages, how to start it).
    for route, label, start in (("npu", "NPU", _try_aidlite), ("qnn", "QNN", _try_qnn)):
        if kind not in ("auto", route):
            continue
        backend, reason = start(card, strict=kind == route)
        if backend is not None:
            return backend, reason
        if kind == route:
            raise BackendError(f"the {label} backend cannot run: {reason}")
        skipped.append(reason if route == "npu" else f"{label}: {reason}")
    from .onnx import OnnxBackend

    why = f"CPU (NPU not used: {'; '.join(skipped)})" if skipped else "CPU (asked for)"
    return OnnxBackend(card, threads=threads), why


def _try_aidlite(card: ModelCard, strict: bool) -> tuple[Backend | None, str]:
    from .aidlite import AidliteBackend, npu_unavailable_reason

    backend, reason = _attempt(npu_unavailable_reason(card), lambda: AidliteBackend(card), strict)
    if backend is None:
        return None, reason
    return backend, f"NPU: {backend.binary.file.name} through AidLite ({backend.choice})"


def _try_qnn(card: ModelCard, strict: bool) -> tuple[Backend | None, str]:
    from .qnn import QnnBackend, qnn_unavailable_reason

    backend, reason = _attempt(qnn_unavailable_reason(card, allow_emulator=strict), lambda: QnnBackend(card), strict)
    if backend is None:
        return None, reason
    where = "Qualcomm's x86_64 HTP emulator (slow: for tests)" if backend.emulator else "NPU"
    return backend, f"{where}: {backend.binary.file.name} through onnxruntime's QNN EP ({backend.choice})"


def _attempt(unavailable: str | None, start, strict: bool) -> tuple[Backend | None, str]:
    """An NPU backend started, or why not: the reason it is unavailable, or its start's error
    (raised when `strict`; otherwise a device that cannot run the binary still segments, on the CPU)."""
    if unavailable is not None:
        return None, unavailable
    try:
        return start(), ""
    except (BackendError, ModelError) as error:
        if strict:
            raise
        return None, f"it failed to start: {error}"


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
