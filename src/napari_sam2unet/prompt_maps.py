"""Prompts drawn into the model input for models that see them (card `channels: prompted`).

Such a model keeps the 1x3xSxS contract: channel 0 is the intensity window, channel 1 a prior
mask (0..1: the neighbouring slice's mask when propagating, the current mask when correcting)
and channel 2 the clicks (0.5 where there is none, up to 1 at a positive click, down to 0 at a
negative one; each a Gaussian). All three are then scaled, centred and divided by the card's
mean and std like an image, so the NPU graph and its quantisation see ordinary inputs.
The training crops (training/data.py) and the engine draw prompts with these same functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .models import InputSpec
from .preprocess import Crop, sample_crop

PROMPTED = "prompted"
# A click's Gaussian sigma as a share of the input side: ~7 px at 352, ~4 px at the compact
# model's 192 px work size; as wide as a fingertip on a structure filling the crop.
CLICK_SIGMA = 0.02
PRIOR_CHANNEL, CLICK_CHANNEL = 1, 2


def is_prompted(spec: InputSpec) -> bool:
    return spec.channels == PROMPTED


def click_map(clicks: Iterable[tuple[float, float, bool]], size: tuple[int, int]) -> np.ndarray:
    """Signed click map in -1..1 (positive clicks up, negative down) at model pixel coordinates
    (u, v, positive): u, v index the SxS input, pixel centres at integers."""
    positive = np.zeros(size, dtype=np.float32)
    negative = np.zeros(size, dtype=np.float32)
    sigma = CLICK_SIGMA * max(size)
    rows = np.arange(size[0], dtype=np.float32)
    cols = np.arange(size[1], dtype=np.float32)
    for u, v, sign in clicks:
        gauss = np.exp(-((rows - u) ** 2) / (2 * sigma**2))[:, None] * np.exp(-((cols - v) ** 2) / (2 * sigma**2))[None]
        target = positive if sign else negative
        np.maximum(target, gauss, out=target)
    return positive - negative


def to_crop_coords(i: float, j: float, crop: Crop, size: tuple[int, int]) -> tuple[float, float]:
    """A slice position (pixel i covers [i, i+1)) in the model input's pixel coordinates."""
    u = (i - crop.r0) * size[0] / (crop.r1 - crop.r0) - 0.5
    v = (j - crop.c0) * size[1] / (crop.c1 - crop.c0) - 0.5
    return u, v


def prior_in_crop(prior: np.ndarray | None, crop: Crop, size: tuple[int, int]) -> np.ndarray:
    """A slice's prior mask resampled into the crop's frame, 0..1."""
    if prior is None:
        return np.zeros(size, dtype=np.float32)
    return np.clip(sample_crop(prior.astype(np.float32), crop, size, fill=0.0), 0.0, 1.0)


def write_prompts(x: np.ndarray, prior: np.ndarray, signed_clicks: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Fill a 3xSxS input's prompt channels in place (normalised like image channels)."""
    for channel, values in ((PRIOR_CHANNEL, prior), (CLICK_CHANNEL, 0.5 + 0.5 * signed_clicks)):
        # The card's scale maps 0..255 to 0..1, so a 0..1 map is already scaled.
        np.subtract(values, np.float32(spec.mean[channel]), out=x[channel])
        x[channel] *= np.float32(1 / spec.std[channel])
    return x


def read_clicks(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The signed click map back from normalised input(s) (..., 3, S, S) -> (..., S, S)."""
    values = x[..., CLICK_CHANNEL, :, :] * spec.std[CLICK_CHANNEL] + spec.mean[CLICK_CHANNEL]
    return (values - 0.5) * 2.0


def draw_task_prompts(x: np.ndarray, task, spec: InputSpec, size: tuple[int, int]) -> np.ndarray:
    """A slice task's prior (at its weight) and clicks drawn into its model input x, in its crop."""
    prior = prior_in_crop(task.prior.mask if task.prior else None, task.crop, size)
    if task.prior:
        prior *= np.float32(task.prior.weight)  # a propagated prior at the card's propagation_prior
    clicks = [(*to_crop_coords(i, j, task.crop, size), positive) for i, j, positive in task.clicks]
    return write_prompts(x, prior, click_map(clicks, size), spec)
