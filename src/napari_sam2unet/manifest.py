"""Cohort manifests: one row a case (an image and its prompts), from CSV or JSON.

Reading checks only the manifest's shape (columns, paths, unique case names), so a typo stops a
run before it starts. A row's values are resolved where the case runs (`resolve_case`): one bad
row fails its own case, and the rest of the cohort goes on.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, PromptError
from .geometry import BOX_GROWTH, enlarged_box, mask_bbox
from .paths import nifti_stem
from .preprocess import axis_plane
from .prompts import Box, Point, Prompts, parse_box, parse_point
from .provenance import read_replay
from .segment_case import SegmentOptions

COLUMNS = ("case", "image", "box", "point", "prompts", "boxes_from", "label", "name", "scope", "axis",
           "window", "threshold", "reference", "volume_index", "replace_nonfinite")
PATH_COLUMNS = ("image", "prompts", "boxes_from", "reference")
# Case names become file names in the output folder.
_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CaseSpec:
    """One manifest row as written (values are strings until resolve_case), paths made absolute."""

    case: str
    image: Path
    values: dict[str, Any] = field(default_factory=dict)

    def path(self, column: str) -> Path | None:
        value = self.values.get(column)
        return Path(value) if value else None


@dataclass(frozen=True)
class ResolvedCase:
    spec: CaseSpec
    prompts: Prompts
    settings: SegmentOptions

    def identity(self) -> dict[str, Any]:
        """Everything besides the image and model that decides the output: what a resume compares."""
        return {
            "boxes": [vars(b) for b in self.prompts.boxes],
            "points": [vars(p) for p in self.prompts.points],
            "settings": self.settings.identity(),
        }


# --- reading -------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[CaseSpec]:
    """The cases of a .csv or .json manifest; paths in it are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; check the path")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path)
    if not rows:
        raise InputError(f"manifest {path.name} lists no cases; add a row per image")
    cases = [_case(row, number, path.parent) for number, row in enumerate(rows, start=1)]
    _check_unique(cases, path)
    return cases


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() != ".csv":
        raise InputError(f"manifest {path.name} must be a .csv or .json file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []  # read while open: an empty file has none
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read manifest {path.name} ({error}); save it as UTF-8 CSV") from None
    _check_columns(columns, path)
    for number, row in enumerate(rows, start=1):
        if None in row:  # DictReader's key for cells beyond the header
            raise InputError(f"manifest {path.name} row {number} has more cells than columns; quote cells that "
                             f"hold commas, e.g. \"10:40,52,80,96\"")
    # Several boxes or points share one cell, separated by ';' or spaces.
    for row in rows:
        for column in ("box", "point"):
            row[column] = [p for p in re.split(r"[;\s]+", row.get(column) or "") if p]
    return rows


def _json_rows(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read manifest {path.name} as JSON ({error}); check its syntax") from None
    except RecursionError:
        raise InputError(f"manifest {path.name} nests its JSON too deeply; give a list of cases") from None
    rows = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InputError(f"manifest {path.name} must hold a list of cases (objects), or {{\"cases\": [...]}}")
    _check_columns(sorted({key for row in rows for key in row}), path)
    for number, row in enumerate(rows, start=1):
        for column in ("box", "point"):
            value = row.get(column) or []
            if not isinstance(value, (str, list)) or not all(isinstance(v, str) for v in value):
                raise InputError(f"manifest {path.name} case {number}: \"{column}\" must be text like "
                                 f"\"10:40,52,80,96\" or a list of such texts, not {json.dumps(value)[:40]}")
            row[column] = [value] if isinstance(value, str) else list(value)
    return rows


def _check_columns(columns: list[str], path: Path) -> None:
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise InputError(f"manifest {path.name} has unknown column(s) {', '.join(unknown)}; "
                         f"known: {', '.join(COLUMNS)}")
    if "image" not in columns:
        raise InputError(f"manifest {path.name} has no 'image' column; add one with each case's NIfTI file")


def _case(row: dict[str, Any], number: int, base: Path) -> CaseSpec:
    values = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if v not in (None, "", [])}
    if "image" not in values:
        raise InputError(f"manifest row {number} has no image; fill in its image column")
    for column in PATH_COLUMNS:
        if column in values:
            values[column] = str((base / str(values[column])).expanduser().resolve())
    image = Path(values.pop("image"))
    name = str(values.pop("case", "") or nifti_stem(image))
    if not _CASE_NAME.match(name):
        raise InputError(f"manifest row {number}: case name {name!r} cannot be a file name; "
                         f"use letters, digits, '.', '_' and '-'")
    return CaseSpec(name, image, values)


def _check_unique(cases: list[CaseSpec], path: Path) -> None:
    seen: dict[str, int] = {}
    for number, case in enumerate(cases, start=1):
        if case.case in seen:
            raise InputError(f"manifest {path.name}: rows {seen[case.case]} and {number} are both case "
                             f"{case.case!r}; add a 'case' column with a unique name per row")
        seen[case.case] = number


# --- resolving one row (where the case runs) -----------------------------------------------


def resolve_case(spec: CaseSpec) -> ResolvedCase:
    """A row's prompts and settings: defaults, then a prompts file's, then the row's own columns."""
    values = spec.values
    settings, prompts = SegmentOptions(), Prompts()
    if spec.path("prompts"):
        settings, prompts = _from_prompts_file(spec.path("prompts"), values.get("label"))
    settings = replace(settings, **_row_settings(values))
    prompts = Prompts(prompts.boxes + [_finite(parse_box(b), b) for b in values.get("box", [])],
                      prompts.points + [_finite(parse_point(p), p) for p in values.get("point", [])])
    if spec.path("boxes_from"):
        prompts.boxes.extend(boxes_from_labels(spec.path("boxes_from"), settings.label, settings.axis))
    return ResolvedCase(spec, prompts, settings)


def _finite(prompt: Box | Point, text: str) -> Box | Point:
    numbers = prompt.rect if isinstance(prompt, Box) else (prompt.i, prompt.j)
    if not all(math.isfinite(v) for v in numbers):
        raise PromptError(f"prompt {text!r}: coordinates must be numbers (voxel indices), not nan or inf")
    return prompt


def _row_settings(values: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "label" in values:
        found["label"] = _int(values["label"], "label", 1, 65535)
    if "axis" in values:
        found["axis"] = _int(values["axis"], "axis", 0, 2)
    if "volume_index" in values:
        found["volume_index"] = _int(values["volume_index"], "volume_index", 0, None)
    if "threshold" in values:
        found["threshold"] = _threshold(values["threshold"])
    if "replace_nonfinite" in values:
        found["replace_nonfinite"] = _bool(values["replace_nonfinite"], "replace_nonfinite")
    for column in ("scope", "window", "name"):
        if column in values:
            found[column] = str(values[column])
    return found


def _int(value: Any, column: str, low: int, high: int | None) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", text) or int(text) < low or (high is not None and int(text) > high):
        span = f"{low} to {high}" if high is not None else f"{low} or more"
        raise InputError(f"{column} {value!r} must be a whole number from {span}")
    return int(text)


def _threshold(value: Any) -> float:
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not 0 < threshold < 1:
        raise InputError(f"threshold {value!r} must be a number between 0 and 1")
    return threshold


def _bool(value: Any, column: str) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise InputError(f"{column} {value!r} must be true or false")
    return text in ("true", "1", "yes")


def _from_prompts_file(path: Path, label: Any) -> tuple[SegmentOptions, Prompts]:
    """Prompts and options of an earlier run: a `sam2unet segment` or batch sidecar, or a napari
    writer's (read by provenance.read_replay). The threshold is not taken over."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read prompts file {path.name} ({error}); point to a sidecar .json") from None
    options, prompts = read_replay(record, path.name, label)
    return SegmentOptions(**options), prompts


def boxes_from_labels(path: Path, label: int, axis: int) -> list[Box]:
    """A box on every slice where `label` occurs in a label map, grown as `sam2unet eval` grows them."""
    from .io import read_volume

    mask = np.rint(read_volume(path).data) == label
    boxes = []
    for k in range(mask.shape[axis]):
        plane = axis_plane(mask, k, axis)
        if plane.any():
            boxes.append(Box(k, *enlarged_box(*mask_bbox(plane), plane.shape, BOX_GROWTH)))
    if not boxes:
        raise PromptError(f"label {label} does not occur in {path.name}; check the label column")
    return boxes
