"""Opened backends, each model and kind opened once and shared by the runs that follow.

Opening a model costs seconds (onnxruntime builds its graph, the NPU loads its binary), so the
widget's session, a batch worker and `sam2unet eval` keep one pool and reuse what it opened.
"""

from __future__ import annotations

import threading

from ..errors import ModelError
from ..models import ModelCard, find_model, sha256_file
from . import open_backend
from .base import Backend


def model_sha256(card: ModelCard) -> str:
    """The model file's sha256: the card's when it has one, else hashed from the file."""
    return card.sha256 or sha256_file(card.file)


class BackendPool:
    """(card, backend, why) by model and backend kind; thread-safe; closes them all on close()."""

    def __init__(self) -> None:
        self._opened: dict[tuple, tuple[ModelCard, Backend, str]] = {}
        self._lock = threading.Lock()

    def get(self, model: str | None, kind: str = "auto", threads: int | None = None,
            sha256: str | None = None) -> tuple[ModelCard, Backend, str]:
        """The model's backend, opened on first use.

        Without `sha256` the model is looked up (and its file checked) on every call, so a file
        replaced since is noticed. With it the model is pinned: looked up once, and refused when
        its file no longer has that hash (a batch's cases all run the model it started with).
        """
        with self._lock:
            pinned = ("pinned", model, sha256, kind, threads)
            if sha256 is not None and pinned in self._opened:
                return self._opened[pinned]
            card = find_model(model)  # verifies the file against its card's sha256
            if sha256 is not None and model_sha256(card) != sha256:
                raise ModelError(f"model {card.file.name} changed since the batch started; run the batch again")
            key = (str(card.file), card.sha256, kind, threads)
            if key not in self._opened:
                backend, why = open_backend(card, kind, threads=threads)
                self._opened[key] = (card, backend, why)
            if sha256 is not None:
                self._opened[pinned] = self._opened[key]
            return self._opened[key]

    def close(self) -> None:
        with self._lock:
            backends = {id(backend): backend for _, backend, _ in self._opened.values()}
            self._opened.clear()
        for backend in backends.values():
            backend.close()

    def __enter__(self) -> BackendPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
