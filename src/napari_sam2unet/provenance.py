"""The provenance record, written and read here only: what made a label map, and how to replay it.

A record says what made the labels: model and its hash, backend, prompts (voxel indices), window,
threshold, slices, time. The CLI and a batch write one into their sidecar; the widget keeps one
per operation with the labels layer, and the napari writer saves them all (`layer_sidecar`).
`read_replay` reads any of these back as the options and prompts to segment the case again.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError, PromptError
from .prompts import Box, Point, Prompts

# The shape of the records written here; bump it when a field changes meaning. Records without
# one are schema 0 (napari sidecars then wrote "slice_axis" and prompts as positional lists).
SCHEMA = 1

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
        "schema": SCHEMA,
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


def layer_sidecar(meta: dict, volume, note: str | None = None) -> dict[str, Any]:
    """The napari writer's sidecar: source image, label names and colours, and every widget run
    (the layer's RUNS_KEY records) that made these labels. `meta`: napari's layer attributes."""
    metadata = meta.get("metadata") or {}
    record = {
        "schema": SCHEMA,
        "tool": "napari-sam2unet",
        "version": __version__,
        "written": now(),
        "layer": meta.get("name"),
        "source_image": str(volume.path) if volume.path else None,
        "orientation": volume.orientation,
        "spacing_mm": [float(z) for z in volume.header.get_zooms()[:3]],
        "label_names": {str(k): v for k, v in metadata.get(NAMES_KEY, {}).items()},
        "label_colours": {str(k): list(v) for k, v in (metadata.get(COLOURS_KEY) or {}).items()},
        "runs": list(metadata.get(RUNS_KEY, [])),
    }
    if note:
        record["note"] = note
    return record


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The record in a sidecar file, or None when there is none or it is not a JSON object."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


# --- reading a record back: an earlier run's options and prompts, to segment again ---------


def check_schema(record: dict, name: str) -> None:
    """Refuse a record written by a newer version, whose fields this one may misread."""
    schema = record.get("schema", 0)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise InputError(f"{name} was written by a newer napari-sam2unet (record schema {schema!r}, this "
                         f"version reads up to {SCHEMA}); update napari-sam2unet to replay it")


def read_replay(record: Any, name: str, label: Any = None) -> tuple[dict[str, Any], Prompts]:
    """The options (axis, scope, window, label, name) and prompts of an earlier run, to run again.

    `record`: a `sam2unet segment` or batch sidecar (one run), or a napari writer's (its runs:
    the only one, or the only one with `label`). The threshold is not taken over: a replay with
    another model uses that model's own.
    """
    if isinstance(record, dict) and isinstance(record.get("prompts"), dict):
        check_schema(record, name)
        return _run_options(record), _prompts(record["prompts"], name, "write the file again from a run")
    if isinstance(record, dict) and isinstance(record.get("runs"), list):
        check_schema(record, name)
        run = _chosen_run(record["runs"], name, label)
        options = {**_run_options(run), "name": str(run.get("label_name") or "")}
        return options, _prompts(run.get("prompts"), name, "save the labels again from napari")
    raise InputError(f"{name} is not a sidecar of a sam2unet or napari run (no 'prompts' or 'runs')")


def _chosen_run(runs: list, name: str, label: Any) -> dict:
    """The one model run (edits such as refine and commit carry no prompts) with the row's label."""
    model_runs = [r for r in runs if isinstance(r, dict) and r.get("operation", "run") == "run"]
    chosen = [r for r in model_runs if label is None or str(r.get("label")) == str(label).strip()]
    if len(chosen) != 1:
        labels = ", ".join(str(r.get("label")) for r in model_runs) or "none"
        raise PromptError(f"{name} holds {len(chosen)} matching runs (labels {labels}); "
                          f"set the label column to choose one run")
    return chosen[0]


def _run_options(run: dict) -> dict[str, Any]:
    # "slice_axis": the axis as napari sidecars named it before records had one shape (schema 0).
    axis = run.get("axis", run.get("slice_axis", 2))
    try:
        return {"axis": int(axis), "scope": str(run.get("scope", "auto")), "window": str(run.get("window", "auto")),
                "label": int(run.get("label", 1))}
    except (TypeError, ValueError):
        raise InputError(f"the axis or label of this run ({axis!r}, {run.get('label')!r}) is not a number") from None


def _prompts(prompts: Any, name: str, fix: str) -> Prompts:
    """Prompts as prompts_record writes them, or as positional lists (napari sidecars of schema 0:
    boxes [i0, j0, i1, j1, slice], points [slice, i, j, positive])."""
    try:
        boxes = [_box(b) for b in prompts.get("boxes", [])]
        points = [_point(p) for p in prompts.get("points", [])]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise PromptError(f"the prompts in {name} are malformed; {fix}") from None
    return Prompts(boxes, points)


def _box(entry: Any) -> Box:
    if isinstance(entry, dict):
        return Box(int(entry["slice"]), entry["i0"], entry["j0"], entry["i1"], entry["j1"])
    return Box(int(entry[4]), entry[0], entry[1], entry[2], entry[3])


def _point(entry: Any) -> Point:
    if isinstance(entry, dict):
        return Point(int(entry["slice"]), entry["i"], entry["j"], bool(entry.get("positive", True)))
    return Point(int(entry[0]), entry[1], entry[2], bool(entry[3]))
