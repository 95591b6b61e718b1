"""The widget's one state object, kept per viewer so that closing and reopening the widget keeps it.

Qt-free: the objects, the undo history, the opened backends (engines are per object: each
holds the probabilities of its own volume, so no result is refined from another's cache).
"""

from __future__ import annotations

import weakref

from .backends import open_backend
from .history import History
from .models import find_model
from .objects import ObjectList


class Session:
    def __init__(self) -> None:
        self.objects = ObjectList()
        self.history = History()
        self._backends: dict[tuple, tuple] = {}
        self.worker = None  # the run in flight (any widget of this viewer started it)
        self.viewed: set = set()  # images already put in the radiological view

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def backend(self, spec: str, kind: str):
        """(card, backend, why) for a model and backend kind, opened once (runs in the worker thread)."""
        card = find_model(spec)
        key = (str(card.file), card.sha256, kind)
        if key not in self._backends:
            backend, why = open_backend(card, kind)
            self._backends[key] = (card, backend, why)
        return self._backends[key]


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer) -> Session:
    """The session of a viewer (napari may hand the widget a proxy: key by the viewer itself)."""
    try:
        real = viewer.__wrapped__
    except AttributeError:
        real = viewer
    if real not in _SESSIONS:
        _SESSIONS[real] = Session()
    return _SESSIONS[real]
