"""Training crops: a structure of a case (sources.py), augmented (augment.py), boxed and cropped.

Every crop is made with the engine's own functions (`plan_views`, `crop_for_box`, `sample_crop`,
`to_model_input`), so the model is trained on exactly what it sees at inference. numpy only:
the crop generator runs in a second process and never imports torch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile

import numpy as np
from scipy import ndimage

from ..geometry import mask_bbox
from ..models import InputSpec
from ..preprocess import Crop, axis_plane, crop_for_box, plan_views, sample_crop, to_model_input
from ..prompt_maps import click_map, is_prompted, prior_in_crop, write_prompts
from . import prompt_sim
from .augment import deform, jitter_views, paint_lesion, remap_intensity, synth_image
from .datasets import TrainingCase
from .sources import Source, load_sources

AXIAL_WEIGHT = 0.6  # share of crops from the last (superior-inferior) axis
# Training crops vary the framing a user's box gives: margin around the box, and the smallest
# crop a tiny box is enlarged to (the engine's MIN_CROP_PIXELS is chosen on validation).
MARGIN_RANGE = (0.0, 0.5)
MIN_CROP_CHOICES = (12, 16, 24)
# Prompted models: what a crop's prompts simulate, and how often (prompt_sim.py). "box": a box
# alone; "propagate": the box and prior from a slice 1-3 away, as propagation and interpolation
# give them; "correct": a flawed prior and 0-3 clicks on its errors; "clicks": clicks alone in a
# loosely framed crop. The training loop adds rounds of clicks on the model's own errors.
PROMPT_MODES = ("box", "propagate", "correct", "clicks")
PROMPT_MODE_SHARES = (0.25, 0.3, 0.25, 0.2)
# Share of propagation crops past the structure's end: the model learns to stop. 0.12 left
# propagation running to the volume's edge on validation at step 500 (the prior was copied).
PAST_END_SHARE = 0.3
# A click's training crop spans this many times the structure's extent (log-uniform). The engine
# sees a click in fixed crops of 16-121 mm, smaller than a large structure and many times a small
# one, and keeps the smallest whose mask does not reach its edge (clicks.CLICK_CHOICE): that works
# only if a structure cut by the crop runs to the crop's edge. (0.7, 4) is the bundled recipe;
# 800 more steps at (0.3, 6) from the bundled weights raised one click per slice on validation
# from 0.588 to 0.600 (left atrium 0.32 -> 0.58, hippocampus down 0.01-0.03), the other protocols
# within 0.006; 800 steps beyond that lost propagation (docs/performance.md, 2026-12-04). For a
# from-scratch run: `sam2unet train --click-crop-extent 0.3 6`.
CLICK_CROP_EXTENT = (0.7, 4.0)
# Share of "correct" crops whose prior is another structure of the label map beside the target
# (with part of the target or not) and whose clicks say so: a model that picked the wrong tissue
# (the blood pool for the myocardium, a ventricle for the caudate) must follow a negative click
# in it and a positive one in the target; a ring's flawed prior is then its hole as often.
# 0 is the bundled recipe; 1600 steps at 0.6 from the bundled weights moved validation by
# +0.001-0.008 and the myocardium 0.09 -> 0.12 (docs/performance.md, 2026-12-05). `--wrong-object-share`.
WRONG_OBJECT_SHARE = 0.0


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


def make_crop(image2d, mask2d, spacing2d, views, spec: InputSpec, size, rng=None, box=None, crop=None):
    """(3xSxS model input, SxS bool target) for a box around mask2d (or a given crop).

    With rng the box is jittered as people draw it and the framing varies (margin, smallest
    crop), so the model does not learn one framing of its targets.
    """
    if crop is None:
        crop = framed_crop(rng, mask2d, spacing2d, spec, box)
    raw = sample_crop(image2d, crop, size)
    target = sample_crop(mask2d.astype(np.float32), crop, size, fill=0.0) > 0.5
    return to_model_input(raw, views, spec), target


def framed_crop(rng, mask2d, spacing2d, spec: InputSpec, box=None) -> Crop:
    """The crop of a box around mask2d (or the given box); with rng, jittered as people draw boxes
    and framed with a random margin and smallest crop."""
    if box is None:
        (r0, r1), (c0, c1) = mask_bbox(mask2d)
        box = (r0, c0, r1, c1)
        if rng is not None:
            box = jitter_box(rng, box, mask2d.shape)
    margin, min_pixels = spec.margin, None
    if rng is not None:
        margin = float(rng.uniform(*MARGIN_RANGE))
        min_pixels = int(rng.choice(MIN_CROP_CHOICES))
    return crop_for_box(box, spacing2d, spec.crop, margin, min_pixels)


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
    """One training crop: (x 3xSxS float32, target SxS bool, kind).

    Random draws for prompts happen only for prompted models, so the crops of the other
    channel modes are the same as before prompts existed."""
    prompted = is_prompted(spec)
    mode = PROMPT_MODES[rng.choice(len(PROMPT_MODES), p=PROMPT_MODE_SHARES)] if prompted else None
    weights = np.array([s.weight for s in sources], float)
    src = sources[rng.choice(len(sources), p=weights / weights.sum())]
    axis, li, lid = key = _pick_structure(rng, src)
    k = int(rng.choice(src.slices[key]))
    neighbour_k = None
    if mode == "propagate":
        k, neighbour_k = _propagation_pair(rng, src.slices[key], k, src.image.shape[axis])
    # The slice alone, C-ordered as np.take gave it (which copied the whole volume: 90% of a crop's time).
    take = lambda a, at=k: np.ascontiguousarray(axis_plane(a, at, axis))  # noqa: E731
    spacing2d = tuple(s for i, s in enumerate(src.spacing) if i != axis)
    labels = take(src.layers[li].labels)
    mask = labels == lid
    # `neighbour` is a second mask carried through the augmentation: the neighbouring slice's
    # (propagate), or a structure beside the target that a model took for it (correct).
    neighbour = None if neighbour_k is None else take(src.layers[li].labels, neighbour_k) == lid
    if mode == "correct" and rng.random() < WRONG_OBJECT_SHARE:
        neighbour = structure_beside(rng, labels, lid)
    u = rng.random()
    kind = "real"
    if u < synth_share and src.synth_labels is not None:
        kind = "synth"
        lab = take(src.synth_labels).astype(np.int32)
        masks = [mask.astype(np.uint8)] + ([] if neighbour is None else [neighbour.astype(np.uint8)])
        lab, *masks = deform(rng, [lab, *masks])
        mask = masks[0].astype(bool)
        neighbour = None if neighbour is None else masks[1].astype(bool)
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
            # A painted lesion has no neighbouring slice: its own outline, moved, stands in.
            neighbour = None if neighbour is None or mode != "propagate" else prompt_sim.perturb(rng, lesion, 3.0, 3)
    if mask.sum() < 4 and not (mode == "propagate" and neighbour is not None and neighbour.sum() >= 4):
        return None
    # Flips and transposes, as slices come in any orientation.
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
        neighbour = None if neighbour is None else neighbour[::-1]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
        neighbour = None if neighbour is None else neighbour[:, ::-1]
    if rng.random() < 0.3:
        img, mask, spacing2d = img.T, mask.T, spacing2d[::-1]
        neighbour = None if neighbour is None else neighbour.T
    # People outline tightly or generously: grow or shrink the target by a voxel sometimes.
    t = rng.random()
    if t < 0.12:
        mask = ndimage.binary_dilation(mask)
    elif t < 0.24:
        shrunk = ndimage.binary_erosion(mask)
        if shrunk.sum() >= 4:
            mask = shrunk
    img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
    if prompted:
        return _prompted_crop(rng, mode, img, mask, neighbour, spacing2d, views, spec, size, kind)
    x, y = make_crop(img, mask, spacing2d, views, spec, size, rng)
    if y.sum() < 2:
        return None
    return x, y, kind


def _propagation_pair(rng, slices, k: int, depth: int) -> tuple[int, int | None]:
    """(target slice, prior slice) for a propagation crop: the prior 1-3 slices away, or, now
    and then, a prior on or near the structure's last slice with the target 1-2 slices past it,
    where it has ended: propagation must learn to stop, not to copy its prior."""
    if rng.random() < PAST_END_SHARE:
        first, last = min(slices), max(slices)
        edge, step = (first, -1) if rng.random() < 0.5 else (last, 1)
        target, prior = edge + step * int(rng.integers(1, 3)), edge - step * int(rng.integers(0, 2))
        if 0 <= target < depth and prior in slices:
            return target, prior
    neighbour = k + int(rng.choice([-3, -2, -1, 1, 2, 3], p=[0.1, 0.2, 0.2, 0.2, 0.2, 0.1]))
    return k, neighbour if 0 <= neighbour < depth else None


def _prompted_crop(rng, mode, img, mask, neighbour, spacing2d, views, spec, size, kind):
    """A crop with its prompts drawn into channels 1 and 2, as the engine draws them."""
    from ..propagation import neighbour_box

    if mode == "propagate" and (neighbour is None or neighbour.sum() < 4):
        mode = "box"
    if mode != "propagate" and mask.sum() < 4:
        return None
    prior_crop, clicks = None, []
    if mode == "propagate":
        prior = np.ascontiguousarray(prompt_sim.perturb(rng, neighbour))
        if prior.sum() < 4:
            return None
        box = neighbour_box(prior)  # as the engine boxes a propagated slice
        margin = float(np.clip(spec.margin + rng.normal(0, 0.05), 0.0, 0.5))
        crop = crop_for_box(box, spacing2d, spec.crop, margin)
        x, y = make_crop(img, mask, spacing2d, views, spec, size, crop=crop)
        prior_crop = prior_in_crop(prior, crop, size)
    elif mode == "clicks":
        click = prompt_sim.interior_click(rng, mask)
        crop = _click_crop(rng, mask, click, spacing2d)
        x, y = make_crop(img, mask, spacing2d, views, spec, size, crop=crop)
        if y.sum() < 2:
            return None
        scale = size[0] / (crop.r1 - crop.r0), size[1] / (crop.c1 - crop.c0)
        clicks.append(((click[0] + 0.5 - crop.r0) * scale[0] - 0.5, (click[1] + 0.5 - crop.c0) * scale[1] - 0.5, True))
        for _ in range(int(rng.choice(3, p=[0.6, 0.25, 0.15]))):
            clicks.append((*prompt_sim.interior_click(rng, y), True))
        for _ in range(int(rng.choice(3, p=[0.6, 0.25, 0.15]))):
            where = prompt_sim.outside_click(rng, y, int(rng.integers(3, max(4, size[0] // 6))))
            if where is not None:
                clicks.append((*where, False))
    else:
        crop = framed_crop(rng, mask, spacing2d, spec)
        x, y = make_crop(img, mask, spacing2d, views, spec, size, crop=crop)
        if y.sum() < 2:
            return None
        if mode == "correct":
            wrong = None if neighbour is None else sample_crop(neighbour.astype(np.float32), crop, size, fill=0.0) > 0.5
            if wrong is not None and wrong.sum() >= 4:
                prior_crop, clicks = wrong_object_prior(rng, y, wrong)
            else:
                prior_crop, clicks = flawed_prior(rng, y)
    if prior_crop is None:
        prior_crop = np.zeros(size, dtype=np.float32)
    write_prompts(x, prior_crop, click_map(clicks, size), spec)
    return x, y, f"{kind}/{mode}"


def structure_beside(rng, labels: np.ndarray, label: int) -> np.ndarray | None:
    """Another structure of the label map that touches (or nearly touches) `label`, or None."""
    near = ndimage.binary_dilation(labels == label, iterations=3)
    ids = np.unique(labels[near])
    ids = ids[(ids != label) & (ids != 0)]
    return None if ids.size == 0 else labels == ids[rng.integers(ids.size)]


def wrong_object_prior(rng, target: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, list]:
    """A prior on the wrong structure (now and then with a part of the target) and 1-3 clicks on
    its errors, deepest first: the negative one in the wrong structure, the positive in the target."""
    prior = wrong & ~target
    if rng.random() < 0.4:  # and the target's core
        prior |= ndimage.binary_erosion(target, iterations=int(rng.integers(1, 4)))
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    return prior.astype(np.float32), prompt_sim.clicks_on_errors(prior, target, count)


def flawed_prior(rng, target: np.ndarray) -> tuple[np.ndarray, list]:
    """A flawed mask of a crop's target and 0-3 clicks on its errors: a correction to make."""
    prior = prompt_sim.corrupt(rng, target, WRONG_OBJECT_SHARE)
    count = int(rng.choice(4, p=[0.15, 0.4, 0.25, 0.2]))
    return prior.astype(np.float32), prompt_sim.clicks_on_errors(prior, target, count)


def box_crop_prompts(rng, x: np.ndarray, target: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Prompts for a box-framed crop whose neighbouring slices are unknown (fine-tuning): none,
    the target shifted and grown as a neighbour's mask would be, or a flawed mask with clicks."""
    u = rng.random()
    prior, clicks = np.zeros(target.shape, np.float32), []
    if u < 0.3:
        prior = prompt_sim.perturb(rng, target).astype(np.float32)
    elif u < 0.65:
        prior, clicks = flawed_prior(rng, target)
    return write_prompts(x, prior, click_map(clicks, target.shape), spec)


def _click_crop(rng, mask, click, spacing2d) -> Crop:
    """A physically square crop around a click, CLICK_CROP_EXTENT times the structure's extent,
    off-centre as the engine's fixed-size crops around a click are."""
    (r0, r1), (c0, c1) = mask_bbox(mask)
    extent_mm = max((r1 - r0) * spacing2d[0], (c1 - c0) * spacing2d[1])
    side_mm = max(extent_mm * float(np.exp(rng.uniform(*np.log(CLICK_CROP_EXTENT)))), 12 * min(spacing2d))
    centre = np.array([(r0 + r1) / 2, (c0 + c1) / 2])
    point = np.array(click) + 0.5
    middle = point + (centre - point) * rng.uniform(0, 1)
    half = side_mm / np.array(spacing2d) / 2
    # Keep the click inside the crop, with a few pixels to spare.
    middle = np.clip(middle, point - 0.9 * half, point + 0.9 * half)
    return Crop(float(middle[0] - half[0]), float(middle[1] - half[1]), float(middle[0] + half[0]),
                float(middle[1] + half[1]))


def batch(rng, sources, spec, size, n):
    xs, ys = [], []
    while len(xs) < n:
        out = sample(rng, sources, spec, size)
        if out is None:
            continue
        xs.append(out[0])
        ys.append(out[1])
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)


def _producer(queue, seed, spec_dict, size, batch_size, cases, click_crop_extent=CLICK_CROP_EXTENT,
              wrong_object_share=WRONG_OBJECT_SHARE):
    global CLICK_CROP_EXTENT, WRONG_OBJECT_SHARE
    # Each worker is a process of its own: it takes the run's recipe (--click-crop-extent, --wrong-object-share).
    CLICK_CROP_EXTENT, WRONG_OBJECT_SHARE = tuple(click_crop_extent), float(wrong_object_share)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(seed)
    if isinstance(cases, str):  # the parent's scans, read once (CropStream)
        with open(cases, "rb") as file:
            sources = pickle.load(file)
    else:
        sources = load_sources(cases)
    spec = InputSpec(**spec_dict)
    while True:
        queue.put(batch(rng, sources, spec, size, batch_size))


class CropStream:
    """Batches generated continuously in worker processes (each a queue a few batches deep).

    Batches are taken from the workers in turn, so a stream is reproducible whatever their
    speed; worker 0 draws exactly what a one-worker stream draws. More workers keep a GPU fed
    (one makes ~85 crops/s at 192 px on one core)."""

    def __init__(self, seed: int, spec: InputSpec, size, batch_size: int, cases: list[TrainingCase], depth=6,
                 workers: int = 1, click_crop_extent=CLICK_CROP_EXTENT, wrong_object_share=WRONG_OBJECT_SHARE):
        ctx = mp.get_context("spawn")
        spec_dict = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
        self.queues, self.procs, self.turn = [], [], 0
        self.shared = None
        scans = list(cases)
        if workers > 1:
            # 14 workers each reading and indexing every scan took 74 s at once on a 16-core GPU
            # machine: the scans are read here once, and each worker loads this process's copy.
            handle, self.shared = tempfile.mkstemp(prefix="sam2unet-scans-", suffix=".pickle")
            with os.fdopen(handle, "wb") as file:
                pickle.dump(load_sources(scans), file, protocol=pickle.HIGHEST_PROTOCOL)
            scans = self.shared
        for index in range(max(1, workers)):
            queue = ctx.Queue(maxsize=depth)
            # Worker i > 0 gets a stream of its own: (seed, i) seeds an independent generator.
            worker_seed = seed if index == 0 else [seed, index]
            proc = ctx.Process(target=_producer, daemon=True,
                               args=(queue, worker_seed, spec_dict, tuple(size), batch_size, scans,
                                     click_crop_extent, wrong_object_share))
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
        if self.shared:
            os.unlink(self.shared)
            self.shared = None


def validation_set(spec: InputSpec, size, cases: list[TrainingCase], n: int = 160, seed: int = 1234):
    """Fixed crops of the validation patients' structures (real images, no lesions, framing as
    users vary it): for checkpoint choice."""
    rng = np.random.default_rng(seed)
    sources = load_sources(cases)
    xs, ys = [], []
    while len(xs) < n:
        out = sample(rng, sources, spec, size, synth_share=0.0, lesion_share=0.0)
        if out is None or out[2].split("/")[0] != "real":
            continue
        xs.append(out[0])
        ys.append(out[1])
    return np.stack(xs), np.stack(ys)[:, None].astype(np.float32)
