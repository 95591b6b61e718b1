"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import BackendError
from ..models import ModelCard

# The largest batch of a dynamic-batch model in one call: onnxruntime needs about 4 MB a slice
# at 352 px, and batches above a few slices are no faster on a CPU.
MAX_DYNAMIC_BATCH = 8


class Backend(ABC):
    """Runs a model card's model: N x 3 x H x W float32 (NCHW) in, N x 1 x H x W logits out.

    Callers always pass NCHW; a backend whose model wants NHWC transposes inside.
    """

    name: str = "base"

    def __init__(self, card: ModelCard):
        self.card = card

    @property
    def max_batch(self) -> int:
        """The largest batch one call accepts (1 for models exported with batch 1)."""
        return 1 if not self.card.input.dynamic_batch else MAX_DYNAMIC_BATCH

    @property
    @abstractmethod
    def device(self) -> str:
        """Human-readable description of where the model runs."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch of preprocessed slices."""

    def close(self) -> None:
        """Release the runtime's resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def checked_batch(batch: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    """The batch as float32 N x 3 x H x W, or one line saying what the model takes instead."""
    batch = np.asarray(batch, dtype=np.float32)
    height, width = size
    if batch.ndim != 4 or batch.shape[1:] != (3, height, width):
        raise BackendError(
            f"the {what} model takes Nx3x{height}x{width} slices, got {'x'.join(map(str, batch.shape))}"
        )
    return batch
