"""The widget's one state object, kept per viewer so that closing and reopening the widget keeps it.

Qt-free: the objects, the undo history, the opened backends (engines are per object: each
holds the probabilities of its own volume, so no result is refined from another's cache).
"""

from __future__ import annotations

import weakref

from .backends.pool import BackendPool
from .history import History
from .objects import ObjectList


class Session:
    def __init__(self) -> None:
        self.objects = ObjectList()
        self.history = History()
        self.backends = BackendPool()  # each model's backend, opened once for this viewer
        self.worker = None  # the run in flight (any widget of this viewer started it)
        self.viewed: set = set()  # images already put in the radiological view
        self.adapted: dict = {}  # image layer key -> card of the model adapted to it (this session only)

    @property
    def busy(self) -> bool:
        return self.worker is not None


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
