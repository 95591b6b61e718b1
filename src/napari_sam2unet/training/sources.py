"""Training cases in memory: each scan's image, its label layers as targets, the slices where
each structure is large enough, and a dense label map for synthetic contrasts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..preprocess import View, guess_modality, plan_views
from .datasets import LabelSpec, TrainingCase, check_splits

MIN_AREA = 12  # pixels of a structure on a slice for it to be a training target


@dataclass
class Layer:
    """A label map whose ids are segmentation targets (ids in `ids`)."""

    labels: np.ndarray
    ids: tuple[int, ...]


@dataclass
class Source:
    """One real scan: image, target layers, a dense label map for synthetic contrasts."""

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    layers: list[Layer]
    synth_labels: np.ndarray | None = None
    weight: float = 1.0
    views: tuple[View, View, View] | None = None
    modality: str = "mr"
    patient: str = ""
    # (axis, layer index, id) -> slice indices where the structure covers >= MIN_AREA pixels
    slices: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)


def check_pair(image: np.ndarray, labels: np.ndarray, what: str) -> None:
    """Stop with a clear message when a label map cannot train anything."""
    if labels is None:
        raise InputError(f"{what}: no label map given; training needs a label map beside each image")
    if image.shape != labels.shape:
        raise InputError(
            f"{what}: image is {'x'.join(map(str, image.shape))} but its label map is "
            f"{'x'.join(map(str, labels.shape))}; they must be on the same voxel grid"
        )
    if image.ndim != 3:
        raise InputError(f"{what}: expected a 3D volume, got {image.ndim}D")
    if not np.any(labels):
        raise InputError(f"{what}: the label map is empty (all zero); nothing to learn from it")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise InputError(f"{what}: the label map has fractional values; give integer labels")


def index_slices(source: Source, min_area: int = MIN_AREA) -> None:
    """Find, per axis and target structure, the slices where it is large enough to box."""
    for li, layer in enumerate(source.layers):
        labels = layer.labels
        top = int(labels.max()) + 1
        wanted = np.zeros(top, bool)
        wanted[[i for i in layer.ids if i < top]] = True
        for axis in range(3):
            n = labels.shape[axis]
            moved = np.moveaxis(labels, axis, 0).reshape(n, -1)
            counts = np.stack([np.bincount(row, minlength=top) for row in moved.astype(np.int64)])
            for lid in np.flatnonzero(wanted):
                good = np.flatnonzero(counts[:, lid] >= min_area)
                if good.size:
                    source.slices[(axis, li, int(lid))] = good
    if not source.slices:
        raise InputError(
            f"{source.name}: no structure covers {min_area} pixels on any slice; "
            f"the label map is empty or too small to train on"
        )


def _load(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{path} does not exist; see shared/data/README.md for the training data")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as error:  # nibabel raises several kinds for unreadable files
        raise InputError(f"{path} cannot be read as NIfTI ({str(error).splitlines()[0]})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


def load_layer(spec: LabelSpec, image: np.ndarray, what: str) -> Layer:
    """A label map as targets: its ids, their union, or a mask image's voxels above a value."""
    data, _ = _load(spec.file)
    what = f"{what}: {spec.file}"
    if spec.above is not None:
        data = (data > spec.above).astype(np.uint8)
    check_pair(image, data, what)
    labels = data.astype(np.int32)
    present = tuple(int(i) for i in np.unique(labels) if i > 0)
    ids = present if spec.ids is None else tuple(i for i in spec.ids if i in present)
    if not ids:
        raise InputError(f"{what}: none of the ids {list(spec.ids)} occur in the label map")
    if spec.union:
        return Layer(np.isin(labels, ids).astype(np.uint8), (1,))
    # int16 halves the memory of int32; ids beyond its range are rare in label maps.
    return Layer(labels.astype(np.int16) if labels.max() < 32767 else labels, ids)


def load_case(case: TrainingCase) -> Source:
    """A case's image and label layers, checked, with the slices each structure covers."""
    image, spacing = _load(case.image)
    if np.iscomplexobj(image) or image.ndim != 3:
        raise InputError(f"{case.name}: {case.image} must be a 3D real-valued volume, got {image.ndim}D {image.dtype}")
    image = image.astype(np.float32)
    layers = [load_layer(spec, image, case.name) for spec in case.labels]
    modality = guess_modality(image) if case.modality == "auto" else case.modality
    source = Source(case.name, image, spacing, layers, weight=case.weight, modality=modality, patient=case.patient)
    source.synth_labels = synthetic_label_map(image, layers, modality)
    source.views = plan_views(image, "soft_tissue" if modality == "ct" else "mr", "multiview")
    index_slices(source)
    return source


def load_sources(cases: list[TrainingCase]) -> list[Source]:
    return [load_case(case) for case in cases]


def synthetic_label_map(image: np.ndarray, layers: list[Layer], modality: str) -> np.ndarray:
    """Every labelled structure under an id of its own, the rest as coarse intensity classes.

    Synthetic contrasts paint one random intensity per id, so the map needs the whole scene:
    structures from every layer (earlier layers win), then tissue classes by intensity.
    """
    synth = np.zeros(image.shape, np.int16)
    next_id = 1
    for layer in layers:
        lut = np.zeros(int(layer.labels.max()) + 1, np.int16)
        lut[list(layer.ids)] = np.arange(next_id, next_id + len(layer.ids))
        next_id += len(layer.ids)
        free = (synth == 0) & (layer.labels > 0)
        synth[free] = lut[layer.labels[free]]
    free = synth == 0
    if modality == "ct":
        body = ndimage.binary_fill_holes(image > -500)
        edges = [-400, -30, 250]
    else:
        sample = image[:: 3, :: 3, :: 3]
        low, high = np.percentile(sample, [1, 99])
        body = image > low + 0.05 * (high - low)
        inside = sample[sample > low + 0.05 * (high - low)]
        edges = list(np.percentile(inside, [33, 66])) if inside.size else []
    classes = np.digitize(image, edges).astype(np.int16) + next_id
    synth[free & body] = classes[free & body]
    return synth


def split_cases(cases: list[TrainingCase]) -> dict[str, list[TrainingCase]]:
    """Cases by split, after checking no patient sits in two splits."""
    check_splits(cases)
    return {split: [c for c in cases if c.split == split] for split in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------
# Per-sample augmentation (2D)


