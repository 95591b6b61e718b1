"""Training data: real scans and their label maps, synthetic contrasts, synthetic lesions, box crops.

Every crop is made with the engine's own functions (`plan_views`, `crop_for_box`, `sample_crop`,
`to_model_input`), so the model is trained on exactly what it sees at inference. numpy only:
the crop generator runs in a second process and never imports torch.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..models import InputSpec
from ..preprocess import View, crop_for_box, guess_modality, plan_views, sample_crop, to_model_input
from .datasets import CaseSpec, LabelSpec, check_splits

MIN_AREA = 12  # pixels of a structure on a slice for it to be a training target
AXIAL_WEIGHT = 0.6  # share of crops from the last (superior-inferior) axis
# Training crops vary the framing a user's box gives: margin around the box, and the smallest
# crop a tiny box is enlarged to (the engine's MIN_CROP_PIXELS is chosen on validation).
MARGIN_RANGE = (0.0, 0.5)
MIN_CROP_CHOICES = (12, 16, 24)


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


def load_case(case: CaseSpec) -> Source:
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


def load_sources(cases: list[CaseSpec]) -> list[Source]:
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


def split_cases(cases: list[CaseSpec]) -> dict[str, list[CaseSpec]]:
    """Cases by split, after checking no patient sits in two splits."""
    check_splits(cases)
    return {split: [c for c in cases if c.split == split] for split in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------
# Per-sample augmentation (2D)


def random_field(rng: np.random.Generator, shape, scale: int = 8) -> np.ndarray:
    """A smooth random field in about [-1, 1], upsampled from a coarse grid."""
    coarse = rng.standard_normal((max(2, shape[0] // scale), max(2, shape[1] // scale)))
    zoom = (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1])
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1]]


def deform(rng, arrays_nearest: list[np.ndarray], strength: float = 1.0) -> list[np.ndarray]:
    """Random affine + elastic warp of 2D label arrays (nearest neighbour)."""
    h, w = arrays_nearest[0].shape
    angle = rng.uniform(-0.25, 0.25) * strength
    scale = np.exp(rng.uniform(-0.12, 0.12, 2) * strength)
    shear = rng.uniform(-0.08, 0.08) * strength
    c, s = np.cos(angle), np.sin(angle)
    mat = np.array([[c, -s], [s, c]]) @ np.array([[scale[0], shear], [0, scale[1]]])
    centre = np.array([h / 2, w / 2])
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([rr - centre[0], cc - centre[1]]).reshape(2, -1)
    coords = (mat @ coords).reshape(2, h, w)
    amp = rng.uniform(0, 3.0) * strength
    coords[0] += centre[0] + amp * random_field(rng, (h, w), 16)
    coords[1] += centre[1] + amp * random_field(rng, (h, w), 16)
    return [ndimage.map_coordinates(a, coords, order=0, mode="nearest") for a in arrays_nearest]


def synth_image(rng, labels: np.ndarray) -> np.ndarray:
    """A random contrast from a label map: intensity per label, texture, bias, blur, noise, gamma."""
    top = int(labels.max()) + 1
    means = rng.uniform(0, 1000, top).astype(np.float32)
    if rng.random() < 0.5:
        means[0] = rng.uniform(0, 100)  # background often dark, as in scans
    stds = rng.uniform(0, 60, top).astype(np.float32)
    img = means[labels] + stds[labels] * rng.standard_normal(labels.shape).astype(np.float32)
    if rng.random() < 0.7:
        img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.5))
    if rng.random() < 0.7:
        img *= np.exp(rng.uniform(0.1, 0.5) * random_field(rng, img.shape, 32)).astype(np.float32)
    img += rng.uniform(0, 30) * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0, None)
    if rng.random() < 0.5:
        hi = max(float(img.max()), 1e-3)
        img = hi * (img / hi) ** np.exp(rng.uniform(-0.4, 0.4))
    return img.astype(np.float32)


def remap_intensity(rng, img: np.ndarray) -> np.ndarray:
    """A random smooth, possibly non-monotonic intensity mapping: a real scan with a new contrast."""
    lo, hi = np.percentile(img[:: max(1, img.size // 20000)], [0.5, 99.5])
    x = np.clip((img - lo) / max(hi - lo, 1e-3), 0, 1)
    knots = np.sort(rng.uniform(0, 1, 4))
    values = rng.uniform(0, 1000, 6)
    xp = np.concatenate([[0], knots, [1]])
    noise = rng.uniform(0, 15) * rng.standard_normal(x.shape).astype(np.float32)
    return np.interp(x, xp, values).astype(np.float32) + noise


def add_lesion(rng, img: np.ndarray, spacing, width: float, fg: np.ndarray | None = None):
    """Paint a smooth random blob with its own intensity and texture; returns (image, mask)."""
    h, w = img.shape
    cand = np.flatnonzero(fg.ravel()) if fg is not None and fg.any() else None
    if cand is not None:
        idx = cand[rng.integers(cand.size)]
        cr, cc = divmod(int(idx), w)
    else:
        cr, cc = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    radius_mm = float(np.exp(rng.uniform(np.log(2.5), np.log(30))))
    rr = radius_mm / spacing[0] * np.exp(rng.uniform(-0.3, 0.3))
    rc = radius_mm / spacing[1] * np.exp(rng.uniform(-0.3, 0.3))
    rr, rc = max(rr, 2.0), max(rc, 2.0)
    r0, r1 = max(0, int(cr - 2 * rr) - 2), min(h, int(cr + 2 * rr) + 3)
    c0, c1 = max(0, int(cc - 2 * rc) - 2), min(w, int(cc + 2 * rc) + 3)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cr, xx - cc
    u = (dy * np.cos(ang) + dx * np.sin(ang)) / rr
    v = (-dy * np.sin(ang) + dx * np.cos(ang)) / rc
    dist = np.sqrt(u * u + v * v)
    dist = dist + rng.uniform(0, 0.35) * random_field(rng, dist.shape, max(2, int(min(rr, rc))))
    inside = dist < 1.0
    if inside.sum() < 6:
        return img, None
    mask = np.zeros((h, w), bool)
    mask[r0:r1, c0:c1] = inside
    patch = img[r0:r1, c0:c1]
    local = float(np.median(patch))
    # Contrast relative to the window width; small blobs are sometimes very faint.
    contrast = np.exp(rng.uniform(np.log(0.06), np.log(0.7))) * width * rng.choice([-1, 1])
    tex = rng.uniform(0, 0.25) * abs(contrast) * random_field(rng, patch.shape, 3)
    value = local + contrast + tex
    edge = rng.uniform(0.0, 1.2)
    alpha = inside.astype(np.float32)
    if edge > 0.2:
        alpha = ndimage.gaussian_filter(alpha, edge)
    if rng.random() < 0.3:  # a ring-enhancing rim
        rim = (dist > 0.75) & (dist < 1.0)
        value = value + rim * 0.5 * contrast
    out = img.copy()
    out[r0:r1, c0:c1] = patch * (1 - alpha) + value * alpha
    return out, mask


# ---------------------------------------------------------------------------------------------
# Crops


def jitter_box(rng, box, shape) -> tuple[float, float, float, float]:
    """A box as a person draws it: tight, generous or a bit off-centre."""
    r0, c0, r1, c1 = box
    h, w = r1 - r0, c1 - c0
    u = rng.random()
    if u < 0.15:
        out = [r0, c0, r1, c1]
    elif u < 0.35:  # the evaluation's 10% enlargement
        out = [r0 - 0.05 * h, c0 - 0.05 * w, r1 + 0.05 * h, c1 + 0.05 * w]
    else:
        grow = rng.uniform(-0.05, 0.2, 4)
        shift = rng.normal(0, 0.06, 4)
        out = [r0 - (grow[0] + shift[0]) * h, c0 - (grow[1] + shift[1]) * w,
               r1 + (grow[2] + shift[2]) * h, c1 + (grow[3] + shift[3]) * w]
    out = [round(v) for v in out]
    out[0], out[1] = max(0, out[0]), max(0, out[1])
    out[2], out[3] = min(shape[0], max(out[2], out[0] + 1)), min(shape[1], max(out[3], out[1] + 1))
    return tuple(float(v) for v in out)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def make_crop(image2d, mask2d, spacing2d, views, spec: InputSpec, size, rng=None, box=None):
    """(3xSxS model input, SxS bool target) for a box around mask2d.

    With rng the box is jittered as people draw it and the framing varies (margin, smallest
    crop), so the model does not learn one framing of its targets.
    """
    if box is None:
        box = bbox(mask2d)
        if rng is not None:
            box = jitter_box(rng, box, mask2d.shape)
    margin, min_pixels = spec.margin, None
    if rng is not None:
        margin = float(rng.uniform(*MARGIN_RANGE))
        min_pixels = int(rng.choice(MIN_CROP_CHOICES))
    crop = crop_for_box(box, spacing2d, spec.crop, margin, min_pixels)
    raw = sample_crop(image2d, crop, size)
    target = sample_crop(mask2d.astype(np.float32), crop, size, fill=0.0) > 0.5
    return to_model_input(raw, views, spec), target


def _jitter_views(rng, views, modality):
    if rng.random() < 0.5:
        return views
    out = []
    for v in views:
        width = v.high - v.low
        d = rng.normal(0, 0.05 if modality == "mr" else 0.03, 2) * width
        out.append(View(v.low + d[0], v.high + d[1], v.gamma, v.label))
    return tuple(out)


def _pick_structure(rng, src: Source) -> tuple[int, int, int]:
    """A layer first, then one of its structures: a brain mask beside 116 atlas regions still
    gets its share, and large structures are not drowned by many small ones."""
    keys = list(src.slices)
    layers = sorted({k[1] for k in keys})
    li = layers[rng.integers(len(layers))]
    keys = [k for k in keys if k[1] == li]
    axis_p = np.array([AXIAL_WEIGHT if k[0] == 2 else (1 - AXIAL_WEIGHT) / 2 for k in keys])
    return keys[rng.choice(len(keys), p=axis_p / axis_p.sum())]


def _paint_lesion(rng, img, views, spacing2d):
    """A synthetic lesion whose contrast shows in one of the three views (not always the first):
    on CT a lesion may be visible only in the lung window, as subsolid margins are."""
    view = views[0] if rng.random() < 0.6 else views[int(rng.integers(1, 3))]
    width = view.high - view.low
    scaled = (img - view.low) / max(width, 1e-6)
    fg = (scaled > 0.1) & (scaled < 0.95)
    fg = ndimage.binary_erosion(fg, iterations=3) if fg.sum() > 500 else fg
    return add_lesion(rng, img, spacing2d, width, fg)


def sample(rng, sources: list[Source], spec: InputSpec, size, synth_share=0.4, lesion_share=0.25):
    """One training crop: (x 3xSxS float32, target SxS bool, kind)."""
    weights = np.array([s.weight for s in sources], float)
    src = sources[rng.choice(len(sources), p=weights / weights.sum())]
    axis, li, lid = key = _pick_structure(rng, src)
    k = int(rng.choice(src.slices[key]))
    take = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    spacing2d = tuple(s for i, s in enumerate(src.spacing) if i != axis)
    mask = take(src.layers[li].labels) == lid
    u = rng.random()
    kind = "real"
    if u < synth_share and src.synth_labels is not None:
        kind = "synth"
        lab = take(src.synth_labels).astype(np.int32)
        lab, m = deform(rng, [lab, mask.astype(np.uint8)])
        mask = m.astype(bool)
        img = synth_image(rng, lab)
        views = plan_views(img, "mr", "multiview")
    elif u < synth_share + 0.15:
        kind = "remap"
        img = remap_intensity(rng, take(src.image))
        views = plan_views(img, "mr", "multiview")
    else:
        img = take(src.image).astype(np.float32)
        views = _jitter_views(rng, src.views, src.modality)
    if rng.random() < lesion_share:
        img2, lesion = _paint_lesion(rng, img, views, spacing2d)
        if lesion is not None:
            img, mask, kind = img2, lesion, kind + "+lesion"
    if mask.sum() < 4:
        return None
    # Flips and transposes, as slices come in any orientation.
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.3:
        img, mask, spacing2d = img.T, mask.T, spacing2d[::-1]
    # People outline tightly or generously: grow or shrink the target by a voxel sometimes.
    t = rng.random()
    if t < 0.12:
        mask = ndimage.binary_dilation(mask)
    elif t < 0.24:
        shrunk = ndimage.binary_erosion(mask)
        if shrunk.sum() >= 4:
            mask = shrunk
    x, y = make_crop(np.ascontiguousarray(img), np.ascontiguousarray(mask), spacing2d, views, spec, size, rng)
    if y.sum() < 2:
        return None
    return x, y, kind


def batch(rng, sources, spec, size, n):
    xs, ys = [], []
    while len(xs) < n:
        out = sample(rng, sources, spec, size)
        if out is None:
            continue
        xs.append(out[0])
        ys.append(out[1])
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)


def _producer(queue, seed, spec_dict, size, batch_size, cases):
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(seed)
    sources = load_sources(cases)
    spec = InputSpec(**spec_dict)
    while True:
        queue.put(batch(rng, sources, spec, size, batch_size))


class CropStream:
    """Batches generated continuously in a second process (a queue a few batches deep)."""

    def __init__(self, seed: int, spec: InputSpec, size, batch_size: int, cases: list[CaseSpec], depth=6):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue(maxsize=depth)
        spec_dict = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
        self.proc = ctx.Process(
            target=_producer, args=(self.queue, seed, spec_dict, tuple(size), batch_size, list(cases)),
            daemon=True,
        )
        self.proc.start()

    def get(self, timeout=600):
        return self.queue.get(timeout=timeout)

    def close(self):
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=5)


def validation_set(spec: InputSpec, size, cases: list[CaseSpec], n: int = 160, seed: int = 1234):
    """Fixed crops of the validation patients' structures (real images, no lesions, framing as
    users vary it): for checkpoint choice."""
    rng = np.random.default_rng(seed)
    sources = load_sources(cases)
    xs, ys = [], []
    while len(xs) < n:
        out = sample(rng, sources, spec, size, synth_share=0.0, lesion_share=0.0)
        if out is None or out[2] != "real":
            continue
        xs.append(out[0])
        ys.append(out[1])
    return np.stack(xs), np.stack(ys)[:, None].astype(np.float32)
