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
from ..preprocess import View, crop_for_box, plan_views, sample_crop, to_model_input

DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
MIN_AREA = 12  # pixels of a structure on a slice for it to be a training target
AXIAL_WEIGHT = 0.6  # share of crops from the last (superior-inferior) axis

# Held out of training for checkpoint choice (validation): structures, by (source, layer, id).
VAL_AAL = tuple(range(8, 117, 8))  # every 8th AAL region
VAL_CT_ORGANS = (1, 7, 86)  # TotalSegmentator ids in example_seg
VAL_VERTEBRAE = (30,)

ATTRIBUTION = {
    "colin27": "Colin27 T1 (ch2), brain (ch2bet) and AAL atlas, Debian package mricron-data, BSD-3-Clause",
    "totalseg": "TotalSegmentator 2.18.0 tests/reference_files (example CT/MR and label maps), Apache-2.0",
    "mni152": "MNI152 2009 template and masks shipped by nilearn "
    "(BSD-3-Clause package; template (c) McConnell Brain Imaging Centre)",
}


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
    img = nib.load(str(path))
    return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def load_sources(data_dir: Path = DATA_DIR, include_val: bool = False) -> list[Source]:
    """The training scans; structures held out for validation are excluded unless include_val."""
    d = Path(data_dir)
    sources = []

    def ids(all_ids, held):
        return tuple(int(i) for i in all_ids if i != 0 and (include_val or i not in held))

    # Colin27: T1 with skull, AAL regions and the brain mask.
    t1, sp = _load(d / "colin27" / "ch2.nii.gz")
    aal, _ = _load(d / "colin27" / "aal.nii.gz")
    bet, _ = _load(d / "colin27" / "ch2bet.nii.gz")
    t1 = t1.astype(np.float32)
    aal = aal.astype(np.int16)
    check_pair(t1, aal, "colin27/aal")
    brain = (bet > 0).astype(np.uint8)
    synth = aal.copy()
    synth[(synth == 0) & (brain > 0)] = 117
    head = (synth == 0) & (t1 > 20)
    bins = np.digitize(t1, [60, 120])
    synth[head] = (118 + bins[head]).astype(np.int16)
    sources.append(
        Source("colin27", t1, sp, [Layer(aal, ids(range(1, 117), VAL_AAL)), Layer(brain, (1,))],
               synth_labels=synth, weight=1.0)
    )
    # Abdominal CT with organs and tissue types.
    ct, sp = _load(d / "totalseg" / "example_ct_sm.nii.gz")
    seg, _ = _load(d / "totalseg" / "example_seg.nii.gz")
    ct = ct.astype(np.float32)
    seg = seg.astype(np.int16)
    check_pair(ct, seg, "totalseg/example_seg")
    layers = [Layer(seg, ids(np.unique(seg), VAL_CT_ORGANS))]
    synth = seg.copy()
    for k, name in enumerate(("skeletal_muscle", "subcutaneous_fat", "torso_fat")):
        tissue, _ = _load(d / "totalseg" / "tissue_types" / f"{name}.nii.gz")
        check_pair(ct, tissue, f"tissue_types/{name}")
        tissue = (tissue > 0).astype(np.uint8)
        layers.append(Layer(tissue, (1,)))
        synth[(synth == 0) & (tissue > 0)] = 200 + k
    _threshold_classes(ct, synth)
    sources.append(Source("ct_sm", ct, sp, layers, synth_labels=synth, weight=1.2))
    # Longer CT with vertebrae.
    ct2, sp = _load(d / "totalseg" / "example_ct.nii.gz")
    vert, _ = _load(d / "totalseg" / "example_ct_vertebrae.nii.gz")
    ct2 = ct2.astype(np.float32)
    vert = vert.astype(np.int16)
    check_pair(ct2, vert, "totalseg/example_ct_vertebrae")
    synth = vert.copy()
    _threshold_classes(ct2, synth)
    sources.append(Source("ct_vert", ct2, sp, [Layer(vert, ids(np.unique(vert), VAL_VERTEBRAE))],
                          synth_labels=synth, weight=0.6))
    for s in sources:
        s.modality = "ct" if s.name.startswith("ct") else "mr"
        s.views = plan_views(s.image, "auto", "multiview")
        index_slices(s)
    return sources


def _threshold_classes(ct: np.ndarray, synth: np.ndarray) -> None:
    """Fill unlabelled voxels of a CT label map with coarse intensity classes (for synthesis)."""
    free = synth == 0
    body = ndimage.binary_fill_holes(ct > -500) if ct.ndim == 3 else ct > -500
    for lo, hi, lab in ((-1e9, -400, 205), (-400, -30, 201), (-30, 250, 203), (250, 1e9, 204)):
        sel = free & body & (ct >= lo) & (ct < hi)
        synth[sel] = lab


def validation_sources(data_dir: Path = DATA_DIR) -> list[Source]:
    """The same scans restricted to the held-out validation structures."""
    sources = load_sources(data_dir, include_val=True)
    keep = {"colin27": {0: VAL_AAL}, "ct_sm": {0: VAL_CT_ORGANS}, "ct_vert": {0: VAL_VERTEBRAE}}
    for s in sources:
        allowed = keep[s.name]
        s.slices = {k: v for k, v in s.slices.items() if k[1] in allowed and k[2] in allowed[k[1]]}
    return sources


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
    """(3xSxS model input, SxS bool target) for a box around mask2d (jittered when rng)."""
    if box is None:
        box = bbox(mask2d)
        if rng is not None:
            box = jitter_box(rng, box, mask2d.shape)
    crop = crop_for_box(box, spacing2d, spec.crop, spec.margin)
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


def sample(rng, sources: list[Source], spec: InputSpec, size, synth_share=0.4, lesion_share=0.25):
    """One training crop: (x 3xSxS float32, target SxS bool, kind)."""
    weights = np.array([s.weight for s in sources], float)
    src = sources[rng.choice(len(sources), p=weights / weights.sum())]
    axes = [k for k in src.slices]
    axis_p = np.array([AXIAL_WEIGHT if k[0] == 2 else (1 - AXIAL_WEIGHT) / 2 for k in axes])
    key = axes[rng.choice(len(axes), p=axis_p / axis_p.sum())]
    axis, li, lid = key
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
        width = views[0].high - views[0].low
        fg = img > views[0].low + 0.1 * width
        fg = ndimage.binary_erosion(fg, iterations=3) if fg.sum() > 500 else fg
        img2, lesion = add_lesion(rng, img, spacing2d, width, fg)
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


def _producer(queue, seed, spec_dict, size, batch_size, data_dir):
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(seed)
    sources = load_sources(Path(data_dir))
    spec = InputSpec(**spec_dict)
    while True:
        queue.put(batch(rng, sources, spec, size, batch_size))


class CropStream:
    """Batches generated continuously in a second process (a queue a few batches deep)."""

    def __init__(self, seed: int, spec: InputSpec, size, batch_size: int, data_dir=DATA_DIR, depth=6):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue(maxsize=depth)
        spec_dict = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
        self.proc = ctx.Process(
            target=_producer, args=(self.queue, seed, spec_dict, tuple(size), batch_size, str(data_dir)),
            daemon=True,
        )
        self.proc.start()

    def get(self, timeout=600):
        return self.queue.get(timeout=timeout)

    def close(self):
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=5)


def validation_set(spec: InputSpec, size, n: int = 160, seed: int = 1234, data_dir=DATA_DIR):
    """Fixed crops of held-out structures from real scans (no lesions): for checkpoint choice."""
    rng = np.random.default_rng(seed)
    sources = validation_sources(Path(data_dir))
    xs, ys = [], []
    while len(xs) < n:
        out = sample(rng, sources, spec, size, synth_share=0.0, lesion_share=0.0)
        if out is None or out[2] != "real":
            continue
        xs.append(out[0])
        ys.append(out[1])
    return np.stack(xs), np.stack(ys)[:, None].astype(np.float32)
