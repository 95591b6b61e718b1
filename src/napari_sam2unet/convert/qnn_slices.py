"""Real slices prepared exactly as the engine prepares them, for calibration and parity.

Quantisation ranges come from what the model will see: the engine's window, its box crops
(brighter and more contrasted than a whole slice) and its resize. A scan with a label map gives
a box crop around each labelled structure; a scan without one gives whole slices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..backends.base import Backend
from ..engine import Engine, Prior
from ..errors import InputError
from ..io import read_volume
from ..preprocess import axis_plane, sample_crop, to_model_input
from ..prompts import Box
from ..training.prompt_sim import error_click

MIN_VOXELS = 20  # smaller structures are label noise, not what users box


@dataclass(frozen=True)
class Scan:
    image: Path
    labels: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Scan:
        """IMAGE or IMAGE:LABELS (paths to .nii/.nii.gz)."""
        image, _, labels = str(text).rpartition(":")
        if image.endswith((".nii", ".nii.gz")) and labels.endswith((".nii", ".nii.gz")):
            return cls(Path(image), Path(labels))
        return cls(Path(text))

    def describe(self) -> str:
        return self.image.name + (f" + {self.labels.name}" if self.labels else "")


def sample_scan() -> Scan:
    """The MRI and label map that ship with the package (its held-out test scan)."""
    folder = Path(__file__).resolve().parents[1] / "sample_data"
    return Scan(folder / "example_mr_sm.nii.gz", folder / "example_seg_mr.nii.gz")


def engine_inputs(backend: Backend, scans: list[Scan], count: int, axis: int = 2) -> np.ndarray:
    """`count` model inputs (N x 3 x H x W) spread evenly over the scans' box crops or slices."""
    per_scan = [count // len(scans) + (i < count % len(scans)) for i in range(len(scans))]
    inputs = []
    for scan, wanted in zip(scans, per_scan):
        if wanted:
            inputs += _scan_inputs(backend, scan, wanted, axis)
    return np.stack(inputs).astype(np.float32)


def _scan_inputs(backend: Backend, scan: Scan, wanted: int, axis: int) -> list[np.ndarray]:
    volume = read_volume(scan.image)
    engine = Engine(backend)
    engine.set_volume(volume.data, volume.spacing, axis=axis, window="auto")
    if scan.labels is None:
        tasks = [engine.whole_slice_task(k) for k in range(engine.shape[axis])]
    else:
        labels = np.rint(read_volume(scan.labels).data).astype(np.int64)
        if labels.shape != volume.data.shape:
            raise InputError(f"label map {scan.labels.name} is {labels.shape}, its image {volume.data.shape}")
        boxed = _label_boxes(labels, axis)
        if not boxed:
            raise InputError(f"label map {scan.labels.name} has no structure of {MIN_VOXELS}+ voxels on a slice")
        tasks = [engine.box_task(box) for box, _ in boxed]
    picks = np.linspace(0, len(tasks) - 1, min(wanted, len(tasks))).round().astype(int)
    if engine.prompted and scan.labels is not None:
        # Prompts as the engine draws them, in turn: a box alone, the neighbour's mask as the
        # prior (propagation), a flawed mask with a click on its error (a correction).
        return [engine._model_input(_with_prompts(engine, tasks[p], labels == boxed[p][1], turn))
                for turn, p in enumerate(picks)]
    return [
        to_model_input(sample_crop(engine.slice_image(tasks[p].slice), tasks[p].crop, engine.size), engine.views,
                       backend.card.input)
        for p in picks
    ]


def _with_prompts(engine: Engine, task, structure: np.ndarray, turn: int):
    """A box task with the prompts of one of three uses (see _scan_inputs)."""
    if turn % 3 == 0:
        return task
    truth = axis_plane(structure, task.slice, engine.axis)
    if turn % 3 == 1:
        neighbour = axis_plane(structure, min(task.slice + 1, engine.shape[engine.axis] - 1), engine.axis)
        # drawn at the card's weight, as the engine draws a propagated slice's prior
        return replace(task, prior=Prior.of(neighbour if neighbour.any() else truth, engine.card.propagation_prior))
    flawed = ndimage.binary_erosion(truth, iterations=2)
    click = error_click(flawed, truth)
    clicks = () if click is None else ((click[0] + 0.5, click[1] + 0.5, click[2]),)
    return replace(task, prior=Prior.of(flawed), clicks=clicks)


def _label_boxes(labels: np.ndarray, axis: int) -> list[tuple[Box, int]]:
    """A tight box around each label on each slice, as a user would draw it, and its label."""
    boxes = []
    moved = np.moveaxis(labels, axis, 0)
    for k, plane in enumerate(moved):
        for value in np.unique(plane[plane > 0]):
            rows, cols = np.nonzero(plane == value)
            if rows.size >= MIN_VOXELS:
                box = Box(k, float(rows.min()), float(cols.min()), float(rows.max() + 1), float(cols.max() + 1))
                boxes.append((box, int(value)))
    return boxes


def set_hash(inputs: np.ndarray) -> str:
    """sha256 of a set of inputs (float32, C order): names the exact calibration set in the card."""
    return hashlib.sha256(np.ascontiguousarray(inputs, dtype=np.float32).tobytes()).hexdigest()
