"""The model's probabilities for slice tasks: run through the backend in batches, kept for edits.

Kept as uint16 (1/65535 steps): half the memory of float32, and converting is ~10x faster than to
float16. The engine names each task's probabilities (a key) and writes its model input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends.base import Backend
from .errors import InputError

MAX_PREPARED = 16  # tasks prepared as one input array (the backend splits it into its batches)
_PROB_SCALE = 65535.0


class ProbabilityCache:
    """Probabilities by task key, filled through one backend; counts its calls and their time."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.entries: dict[Hashable, np.ndarray] = {}
        self.calls = 0
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.entries.values())

    def probability(self, key: Hashable) -> np.ndarray:
        """A task's probabilities in its crop's frame, as float32."""
        return self.entries[key].astype(np.float32) * np.float32(1 / _PROB_SCALE)

    def run_groups(self, groups: list[list], key: Callable, model_input: Callable,
                   flip_average: bool = False) -> Iterator[int]:
        """Run the tasks not kept yet, yielding each group's index when all its tasks are kept.

        key(task) names a task's probabilities, model_input(task, out) writes its input into out.
        The next array's input is prepared in a second thread while the backend works on the
        current one (onnxruntime releases the GIL), which hides most of the preprocessing.
        """
        pending = []  # (group index, at most MAX_PREPARED tasks): 1000 boxes on one slice, prepared as
        for index, group in enumerate(groups):  # one array (1.5 MiB a box), peaked at 2.3 GB
            todo = list({key(t): t for t in group if key(t) not in self.entries}.items())
            pending += [(index, todo[start:start + MAX_PREPARED]) for start in range(0, len(todo), MAX_PREPARED)]
        if not pending:
            yield from range(len(groups))
            return
        done = -1
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._prepare, pending[0][1], model_input)
            for number, (index, todo) in enumerate(pending):
                batch = future.result()
                if number + 1 < len(pending):
                    future = pool.submit(self._prepare, pending[number + 1][1], model_input)
                self._predict([k for k, _ in todo], batch, flip_average)
                del batch
                last_of_group = number + 1 == len(pending) or pending[number + 1][0] != index
                if last_of_group:
                    yield from range(done + 1, index + 1)  # groups with nothing to run are done too
                    done = index
        yield from range(done + 1, len(groups))

    def _prepare(self, todo: list, model_input: Callable) -> np.ndarray:
        batch = np.empty((len(todo), 3, *self.backend.card.input.size), dtype=np.float32)
        for index, (_, task) in enumerate(todo):
            model_input(task, batch[index])
        return batch

    def _predict(self, keys: list, batch: np.ndarray, flip_average: bool) -> None:
        began = time.perf_counter()
        logits = _flip_averaged(self.backend.predict, batch) if flip_average else self.backend.predict(batch)
        self.seconds += time.perf_counter() - began
        self.calls += 1
        if not np.all(np.isfinite(logits)):
            raise InputError(f"the model {self.backend.card.name} returned NaN or Inf; the model file may be broken")
        for key, logit in zip(keys, logits):
            self.entries[key] = (_sigmoid(logit[0]) * _PROB_SCALE + 0.5).astype(np.uint16)


def _flip_averaged(predict, batch: np.ndarray) -> np.ndarray:
    """Mean logits over the batch and its row, column and row+column flips, in one backend call."""
    n = batch.shape[0]
    flips = ((), (2,), (3,), (2, 3))
    stacked = np.concatenate([np.flip(batch, axis) if axis else batch for axis in flips])
    logits = predict(np.ascontiguousarray(stacked))
    parts = [np.flip(logits[i * n : (i + 1) * n], axis) if axis else logits[i * n : (i + 1) * n]
             for i, axis in enumerate(flips)]
    return np.mean(parts, axis=0)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
