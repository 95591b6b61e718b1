"""Fine-tuning's labelled data: the structures on a volume's labelled slices, and their crops.

Crops are made as the engine makes them for the base model (its card's crop mode, margin and
channels, the volume's own intensity views), from a box around the label outline on each
labelled slice, jittered as people draw boxes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models import InputSpec

MIN_PIXELS = 4  # a structure smaller than this on a slice gives no training box
MAX_VALIDATION = 48  # held-out slices scored before and after (evenly spread)


@dataclass
class Item:
    """One structure on one slice: what a box on that slice shows the model."""

    image: np.ndarray  # 2D raw intensities
    mask: np.ndarray  # 2D bool
    spacing: tuple[float, float]
    views: tuple


@dataclass
class Labelled:
    train: list[Item]
    validation: list[Item]
    validation_what: str
    note: dict  # for the card: files, slices, hashes


def volume_data(image: np.ndarray, labels: np.ndarray, spacing, channels: str, axis: int = 2,
                slices=None, label_ids=None, window: str = "auto", what: str = "the label map",
                files=()) -> Labelled:
    """Training items from the labelled slices of one volume.

    slices: train only on these (others that hold labels validate); label_ids: only these ids.
    """
    from ..models import sha256_file
    from ..preprocess import axis_plane, plan_views

    image = np.asarray(image, dtype=np.float32)
    labels, ids, per_slice, train_slices = select_slices(image, labels, axis, slices, label_ids, what)
    held_out = [k for k in sorted(per_slice) if k not in train_slices]
    views = plan_views(image, window, channels)
    spacing2d = tuple(float(s) for a, s in enumerate(spacing) if a != axis)

    def items(ks):
        out = []
        for k in ks:
            plane, lab = axis_plane(image, k, axis), axis_plane(labels, k, axis)
            out += [Item(plane, lab == i, spacing2d, views) for i in per_slice[k]]
        return out

    if len(held_out) > MAX_VALIDATION:
        held_out = [held_out[i] for i in np.linspace(0, len(held_out) - 1, MAX_VALIDATION).round().astype(int)]
    train = items(train_slices)
    digest = hashlib.sha256()
    for item in train:
        digest.update(np.ascontiguousarray(item.image).tobytes())
        digest.update(np.packbits(item.mask).tobytes())
    note = {
        "files": [{"file": str(f), "sha256": sha256_file(Path(f))} for f in files],
        "axis": axis, "slices": train_slices, "labels": ids, "structures": len(train),
        "window": window, "data_sha256": digest.hexdigest(),
    }
    if held_out:
        return Labelled(train, items(held_out), f"{len(held_out)} labelled slices not trained on", note)
    return Labelled(train, train, "the training slices themselves (no other slice is labelled)", note)


def select_slices(image: np.ndarray, labels: np.ndarray, axis: int = 2, slices=None, label_ids=None,
                  what: str = "the label map"):
    """(integer labels, ids, {slice: ids on it}, training slices), or one line saying what is wrong."""
    from .sources import check_pair

    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise InputError(f"{what} is {'x'.join(map(str, labels.shape))} but the image is "
                         f"{'x'.join(map(str, image.shape))}; they must be on the same voxel grid")
    if np.any(labels):
        check_pair(image, labels, what)  # 3D, whole numbers
    labels = labels.astype(np.int64)
    ids = sorted(int(i) for i in np.unique(labels) if i > 0)
    if label_ids:
        ids = [i for i in ids if i in set(label_ids)]
    per_slice = _labelled_slices(labels, ids, axis)
    if not per_slice:
        raise InputError(f"{what} has no labelled slice (no structure of {MIN_PIXELS}+ voxels on any slice of "
                         f"axis {axis}); label the object on a few slices first")
    chosen = sorted(per_slice) if slices is None else sorted(set(slices))
    train_slices = [k for k in chosen if k in per_slice]
    if not train_slices:
        raise InputError(f"none of the slices {chosen} holds a label on axis {axis}; labelled slices: "
                         f"{_ranges(sorted(per_slice))}")
    return labels, ids, per_slice, train_slices


def _labelled_slices(labels: np.ndarray, ids, axis: int) -> dict[int, list[int]]:
    others = tuple(a for a in range(labels.ndim) if a != axis)
    counts = {i: np.count_nonzero(labels == i, axis=others) for i in ids}  # one pass per id
    out: dict[int, list[int]] = {}
    for k in range(labels.shape[axis]):
        present = [i for i in ids if counts[i][k] >= MIN_PIXELS]
        if present:
            out[k] = present
    return out


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:12]) + (" ..." if len(values) > 12 else "")


def read_pair(image: Path, labels: Path, axis: int = 2, slices=None, label_ids=None):
    """An image file and its label map, checked (same grid and affine, labelled slices) before any
    model is loaded: a bad input costs no time."""
    from ..io import read_volume

    volume, label_volume = read_volume(image), read_volume(labels)
    if label_volume.data.shape == volume.data.shape and not np.allclose(label_volume.affine, volume.affine,
                                                                           atol=1e-3):
        raise InputError(f"{labels} is on another grid than {image} (their affines differ); resample the "
                         f"label map onto the image")
    select_slices(volume.data, label_volume.data, axis, slices, label_ids, str(labels))
    return volume, label_volume


def file_data(image: Path, labels: Path, channels: str, axis: int = 2, slices=None, label_ids=None,
              window: str = "auto", pair=None) -> Labelled:
    """volume_data for an image file and its label map file (same voxel grid, same affine)."""
    volume, label_volume = pair or read_pair(image, labels, axis, slices, label_ids)
    return volume_data(volume.data, label_volume.data, volume.spacing, channels, axis, slices, label_ids, window,
                       what=str(labels), files=(image, labels))


def cases_data(paths, channels: str, root=None, axis: int = 2, window: str = "auto") -> Labelled:
    """Every labelled slice of the train cases (datasets.py layouts); validation cases score."""
    from .datasets import find_cases

    return specs_data(find_cases(paths, "train", root), channels, axis, window)


def specs_data(cases, channels: str, axis: int = 2, window: str = "auto") -> Labelled:
    """cases_data for TrainingCase objects (datasets.py): train cases train, validation cases score."""
    from ..io import read_volume
    from ..models import sha256_file
    from .sources import load_layer, split_cases

    splits = split_cases(cases)
    if not splits["train"]:
        raise InputError("no training cases: give --data with cases in the train split")
    parts: dict[str, list[Labelled]] = {"train": [], "validation": []}
    for split in parts:
        for case in splits[split]:
            volume = read_volume(case.image)
            for spec in case.labels:
                layer = load_layer(spec, np.asarray(volume.data), case.name)
                labels = np.isin(layer.labels, layer.ids) * layer.labels
                parts[split].append(volume_data(volume.data, labels, volume.spacing, channels, axis,
                                                window=window, what=f"{case.name}: {spec.file}"))
    train = [i for p in parts["train"] for i in p.train]
    validation = [i for p in parts["validation"] for i in p.train]
    files = sorted({str(f) for c in splits["train"] for f in c.files()})
    note = {"cases": [c.name for c in splits["train"]], "files": [{"file": f, "sha256": sha256_file(Path(f))}
                                                                  for f in files],
            "axis": axis, "structures": len(train), "window": window}
    if validation:
        return Labelled(train, validation, f"the validation cases ({', '.join(c.name for c in splits['validation'])})",
                        note)
    return Labelled(train, train, "the training slices themselves (no validation case)", note)



def deformed(rng, img: np.ndarray, mask: np.ndarray, degrees: float = 15, scale: float = 0.15):
    """The slice and its mask rotated and rescaled about the structure: the neighbouring slices
    of a structure differ from the labelled ones in outline and size, not only in framing."""
    from scipy import ndimage

    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    zoom = np.exp(rng.uniform(np.log(1 - scale), np.log(1 + scale), 2))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.diag(1 / zoom)  # output -> input coordinates
    centre = np.argwhere(mask).mean(0)
    offset = centre - matrix @ centre
    img = ndimage.affine_transform(img, matrix, offset, order=1, mode="nearest")
    mask = ndimage.affine_transform(mask.astype(np.float32), matrix, offset, order=1) > 0.5
    return img, mask


def training_batch(rng, items: list[Item], spec: InputSpec, size, n: int, deform: float = 0.0,
                   exact: float = 0.0):
    """n crops of random items: box jittered as drawn, framing varied, flips, window jitter,
    (with probability deform) a small rotation and rescaling, and (with probability exact) the
    box and framing the evaluation uses (outline + 10%, the card's margin)."""
    from ..geometry import BOX_GROWTH, enlarged_box, mask_bbox
    from ..preprocess import View
    from ..prompt_maps import is_prompted
    from .data import box_crop_prompts, make_crop

    xs, ys = [], []
    while len(xs) < n:
        item = items[int(rng.integers(len(items)))]
        img, mask, spacing, views = item.image, item.mask, item.spacing, item.views
        if deform and rng.random() < deform:
            img, mask = deformed(rng, img, mask)
            if mask.sum() < MIN_PIXELS:
                continue
        if rng.random() < 0.5:
            img, mask = img[::-1], mask[::-1]
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:  # the window a scan gets varies a little with what is in it
            d = rng.normal(0, 0.04, 2)
            views = tuple(View(v.low + d[0] * (v.high - v.low), v.high + d[1] * (v.high - v.low), v.gamma, v.label)
                          for v in views)
        img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
        if exact and rng.random() < exact:
            box = enlarged_box(*mask_bbox(mask), mask.shape, BOX_GROWTH)
            x, y = make_crop(img, mask, spacing, views, spec, size, box=box)
        else:
            x, y = make_crop(img, mask, spacing, views, spec, size, rng)
        if y.sum() >= 1:
            if is_prompted(spec):  # the same simulated prompts the base model learnt from
                box_crop_prompts(rng, x, y, spec)
            xs.append(x)
            ys.append(y)
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)


def validation_crops(items: list[Item], spec: InputSpec, size):
    """One fixed crop per item: the outline's box enlarged by 10% (eval's tight protocol)."""
    from ..geometry import BOX_GROWTH, enlarged_box, mask_bbox
    from .data import make_crop

    xs, ys = [], []
    for item in items:
        box = enlarged_box(*mask_bbox(item.mask), item.mask.shape, BOX_GROWTH)
        x, y = make_crop(item.image, item.mask, item.spacing, item.views, spec, size, box=box)
        xs.append(x)
        ys.append(y)
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)

