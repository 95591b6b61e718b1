"""Segment one case, the same way for `sam2unet segment`, a batch, the widget and `sam2unet eval`.

`SegmentOptions` says how (filled from CLI flags, a manifest row or the widget's controls), a
`BackendPool` opens each model once, and `segment_volume` runs the engine on a volume and
returns the label map, the engine's result and the provenance record. Qt-free.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends.pool import BackendPool
from .engine import Engine, SegmentationResult
from .errors import Sam2UnetError
from .prompts import Prompts
from .provenance import run_record

__all__ = ["BackendPool", "Opened", "NonFinite", "Segmented", "SegmentOptions", "iter_segment_volume",
           "segment_volume"]

# The options that decide a case's voxels (a batch's resume key); the model is keyed by its hash.
_CASE_FIELDS = ("axis", "scope", "window", "threshold", "label", "volume_index", "replace_nonfinite")


@dataclass(frozen=True)
class SegmentOptions:
    """How a case is segmented: the options of `sam2unet segment`, with their defaults."""

    axis: int = 2
    scope: str = "auto"
    window: str = "auto"
    threshold: float | None = None  # None: the model card's
    label: int = 1
    name: str = ""  # the label's name (a manifest's name column, the widget's object)
    volume_index: int | None = None  # which volume of a 4D image (None: the first)
    replace_nonfinite: bool = False
    min_overlap: float | None = None  # propagation's overlap rule (None: the engine's)
    # What runs it: the model (name or path, None: bundled), the backend kind and CPU threads;
    # model_sha256 pins the model file (a batch refuses one replaced since it started).
    model: str | None = None
    backend: str = "auto"
    threads: int | None = None
    model_sha256: str | None = None

    def identity(self) -> dict[str, Any]:
        """The options that decide the output besides the image and model: what a resume compares."""
        found = {name: getattr(self, name) for name in _CASE_FIELDS}
        if self.min_overlap is not None:
            found["min_overlap"] = self.min_overlap
        return found


# What iter_segment_volume yields on the way.
@dataclass(frozen=True)
class Opened:
    """The engine is ready on the model's backend; `why` says why that backend."""

    engine: Engine
    why: str


@dataclass(frozen=True)
class NonFinite:
    """This many NaN/Inf voxels were read as the volume's lowest intensity."""

    voxels: int


@dataclass(frozen=True)
class Segmented:
    """`done` of `total` slices are segmented; `result` holds them so far."""

    done: int
    total: int
    result: SegmentationResult


Event = Opened | NonFinite | Segmented
Steps = Generator[Event, None, tuple[np.ndarray | None, SegmentationResult, dict | None]]


def segment_volume(
    volume, prompts: Prompts, options: SegmentOptions, pool: BackendPool, *,
    on_event: Callable[[Event], None] | None = None, **how: Any,
) -> tuple[np.ndarray, SegmentationResult, dict[str, Any]]:
    """Segment `volume` (anything with .data and .spacing, e.g. an io.Volume) with `prompts`.

    Returns (labels, result, record): the label map holding options.label, the engine's result
    and the provenance record. `how`: iter_segment_volume's keywords (engine, source, prior,
    record_extra). `on_event` sees each Opened, NonFinite and Segmented step.
    """
    steps = iter_segment_volume(volume, prompts, options, pool, **how)
    while True:
        try:
            event = next(steps)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)


def iter_segment_volume(
    volume,
    prompts: Prompts,
    options: SegmentOptions,
    pool: BackendPool,
    *,
    engine: Engine | None = None,
    source: str | Path | None = None,
    prior: np.ndarray | None = None,
    record_extra: dict[str, Any] | None = None,
    labels: bool = True,
) -> Steps:
    """segment_volume step by step: yields Opened, NonFinite and Segmented (after each batch of
    slices) and returns (labels, result, record), e.g. `labels, result, record = yield from ...`.

    `engine`: reuse this engine and its cache when it runs on the same backend. `source`: the
    image the record names (default volume.path). `prior`: a mask to correct instead of
    segmenting: every slice with points is looked at again with its mask there as the prior (a
    prompted model only). `record_extra`: added to the record. `labels=False`: neither the
    full-volume label map nor the record is built, (None, result, None), for a caller that
    writes the result's slices and its own record (the widget).
    """
    card, backend, why = pool.get(options.model, options.backend, options.threads, options.model_sha256)
    if engine is None or engine.backend is not backend:
        engine = Engine(backend)  # a new engine: a new cache
    yield Opened(engine, why)
    if engine.use_volume(volume.data, volume.spacing, options.axis, options.window,
                         options.replace_nonfinite) and engine.replaced_voxels:
        yield NonFinite(engine.replaced_voxels)
    if options.min_overlap is not None:
        engine.propagate_min_overlap = options.min_overlap
    if prior is None:
        result = None
        for done, total, result in engine.iter_segment(prompts, options.scope, options.threshold):
            yield Segmented(done, total, result)
        if result is None:  # nothing planned: an empty result still carries the geometry
            threshold = engine.card.threshold if options.threshold is None else options.threshold
            result = SegmentationResult(engine.shape, engine.axis, threshold)
    else:
        result = _correct(engine, prior, prompts, options.threshold)
    if not labels:
        return None, result, None
    image = source if source is not None else (getattr(volume, "path", None) or "")
    record = _record(image, card, backend, why, engine, result, prompts, options, record_extra or {})
    return result.labels(options.label), result, record


def _correct(engine: Engine, prior: np.ndarray, prompts: Prompts, threshold: float | None) -> SegmentationResult:
    """The prior kept, and each slice with points looked at again with its mask as the prior."""
    if not engine.prompted:
        raise Sam2UnetError(f"--prior needs a model that sees prompts (model card `channels: prompted`); "
                            f"{engine.card.name} has channels {engine.card.input.channels}")
    result = engine.result_from_mask(prior, threshold)
    for k in sorted({p.slice for p in prompts.points}):
        engine.correct(result, k, prompts)
    return result


def _record(image, card, backend, why, engine, result, prompts, options, extra) -> dict[str, Any]:
    return run_record(image, label=options.label, axis=options.axis, scope=options.scope, window=options.window,
                      card=card, backend=backend, why=why, engine=engine, result=result, prompts=prompts, **extra)

