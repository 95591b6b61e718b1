"""One provenance record for every way labels are made (CLI, widget), and the layer metadata keys.

A record says what made the labels: model and its hash, backend, prompts (voxel indices), window,
threshold, slices, time. The CLI writes one into its sidecar; the widget keeps one per operation
with the labels layer, and the writer saves them all.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__
from .prompts import Prompts

# What a napari layer carries in .metadata (the reader, the widget and the writer use these).
META_KEY = "sam2unet"  # the source file's geometry
RUNS_KEY = "sam2unet_runs"  # provenance records, one per operation
NAMES_KEY = "sam2unet_label_names"  # {label: name}
COLOURS_KEY = "sam2unet_label_colours"  # {label: (r, g, b)} 0..255


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def prompts_record(prompts: Prompts) -> dict[str, list[dict]]:
    """Boxes as {slice, i0, j0, i1, j1}, points as {slice, i, j, positive}: voxel indices."""
    return {"boxes": [asdict(b) for b in prompts.boxes], "points": [asdict(p) for p in prompts.points]}


def run_record(
    image,
    *,
    card,
    backend,
    engine,
    result,
    prompts: Prompts,
    scope: str,
    axis: int,
    window: str,
    label: int,
    why: str | None = None,
    operation: str = "run",
    **extra: Any,
) -> dict[str, Any]:
    """The record of one segmentation run; `image` is a path (resolved) or a layer name."""
    source = str(Path(image).resolve()) if isinstance(image, Path) or Path(str(image)).exists() else str(image)
    backend_record = {"name": backend.name, "device": backend.device}
    if why:
        backend_record["why"] = why
    record: dict[str, Any] = {
        "operation": operation,
        "generator": f"napari-sam2unet {__version__}",
        "created": now(),
        "source_image": source,
        "label": label,
        "model": {"name": card.name, "file": str(card.file), "sha256": card.sha256},
        "backend": backend_record,
        "axis": axis,
        "scope": engine.resolve_scope(prompts, scope),
        "threshold": result.threshold,
        "window": window,
        "views": [view.label for view in engine.views],
        "prompts": prompts_record(prompts),
        "slices": sorted(int(k) for k in result.slices),
        "seconds": round(result.total_seconds, 3),
    }
    record.update(extra)
    return record


def edit_record(operation: str, label: int, **extra: Any) -> dict[str, Any]:
    """The record of an operation without the model (refine, commit, undo of a run is not one)."""
    return {"operation": operation, "created": now(), "label": label, **extra}
