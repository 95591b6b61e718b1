"""Training crops: a structure of a case (sources.py), augmented (augment.py), boxed and cropped.

Every crop is made with the engine's own functions (`plan_views`, `crop_for_box`, `sample_crop`,
`to_model_input`), so the model is trained on exactly what it sees at inference. numpy only:
the crop generator runs in a second process and never imports torch.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
from scipy import ndimage

from ..models import InputSpec
from ..preprocess import axis_plane, crop_for_box, plan_views, sample_crop, to_model_input
from .augment import deform, jitter_views, paint_lesion, remap_intensity, synth_image
from .datasets import CaseSpec
from .sources import Source, load_sources

AXIAL_WEIGHT = 0.6  # share of crops from the last (superior-inferior) axis
# Training crops vary the framing a user's box gives: margin around the box, and the smallest
# crop a tiny box is enlarged to (the engine's MIN_CROP_PIXELS is chosen on validation).
MARGIN_RANGE = (0.0, 0.5)
MIN_CROP_CHOICES = (12, 16, 24)


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


def _pick_structure(rng, src: Source) -> tuple[int, int, int]:
    """A layer first, then one of its structures: a brain mask beside 116 atlas regions still
    gets its share, and large structures are not drowned by many small ones."""
    keys = list(src.slices)
    layers = sorted({k[1] for k in keys})
    li = layers[rng.integers(len(layers))]
    keys = [k for k in keys if k[1] == li]
    axis_p = np.array([AXIAL_WEIGHT if k[0] == 2 else (1 - AXIAL_WEIGHT) / 2 for k in keys])
    return keys[rng.choice(len(keys), p=axis_p / axis_p.sum())]


def sample(rng, sources: list[Source], spec: InputSpec, size, synth_share=0.4, lesion_share=0.25):
    """One training crop: (x 3xSxS float32, target SxS bool, kind)."""
    weights = np.array([s.weight for s in sources], float)
    src = sources[rng.choice(len(sources), p=weights / weights.sum())]
    axis, li, lid = key = _pick_structure(rng, src)
    k = int(rng.choice(src.slices[key]))
    # The slice alone, C-ordered as np.take gave it (which copied the whole volume: 90% of a crop's time).
    take = lambda a: np.ascontiguousarray(axis_plane(a, k, axis))  # noqa: E731
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
        views = jitter_views(rng, src.views, src.modality)
    if rng.random() < lesion_share:
        img2, lesion = paint_lesion(rng, img, views, spacing2d)
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
    """Batches generated continuously in worker processes (each a queue a few batches deep).

    Batches are taken from the workers in turn, so a stream is reproducible whatever their
    speed; worker 0 draws exactly what a one-worker stream draws. More workers keep a GPU fed
    (one makes ~85 crops/s at 192 px on one core)."""

    def __init__(self, seed: int, spec: InputSpec, size, batch_size: int, cases: list[CaseSpec], depth=6,
                 workers: int = 1):
        ctx = mp.get_context("spawn")
        spec_dict = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
        self.queues, self.procs, self.turn = [], [], 0
        for index in range(max(1, workers)):
            queue = ctx.Queue(maxsize=depth)
            # Worker i > 0 gets a stream of its own: (seed, i) seeds an independent generator.
            worker_seed = seed if index == 0 else [seed, index]
            proc = ctx.Process(target=_producer, daemon=True,
                               args=(queue, worker_seed, spec_dict, tuple(size), batch_size, list(cases)))
            proc.start()
            self.queues.append(queue)
            self.procs.append(proc)

    def get(self, timeout=600):
        queue = self.queues[self.turn % len(self.queues)]
        self.turn += 1
        return queue.get(timeout=timeout)

    def close(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)


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
