"""Slice-by-slice segmentation: plan the slices, batch them through a backend, cache, post-process.

The engine is the one place with segmentation logic; the CLI, the napari widget and the Python
API all drive it. It is numpy in, numpy out, and never imports Qt.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .backends.base import Backend
from .errors import Cancelled, InputError
from .geometry import mask_bbox
from .postprocess import box_mask, select_regions
from .preprocess import (
    Crop,
    View,
    axis_plane,
    crop_for_box,
    crop_for_slice,
    paste_back,
    plan_views,
    sample_crop,
    to_model_input,
)
from .prompt_maps import click_map, is_prompted, prior_in_crop, to_crop_coords, write_prompts
from .prompts import Box, Prompts, interpolate_boxes

SCOPES = ("auto", "slices", "between", "propagate", "volume")
# Propagation stops when a slice's mask has fewer pixels than this.
MIN_PROPAGATE_PIXELS = 4
# The next slice's box: the previous mask's box grown by this share of its sides and a voxel, as
# a user would draw it (the crop adds the model card's margin around the box on top of this).
# Propagation also stops when less than PROPAGATE_MIN_OVERLAP of the smaller of a slice's mask and
# its neighbour's lies in the other (it jumped to another structure; a structure that shrinks
# towards its end still lies inside its neighbour), or when the mask grew by more than
# PROPAGATE_MAX_GROWTH times its neighbour's area (it leaked). Chosen on held-out validation
# structures (docs/performance.md): IoU 0.7 without a growth limit scored 0.424, this 0.466.
PROPAGATE_GROWTH = 0.05
PROPAGATE_MIN_OVERLAP = 0.8
PROPAGATE_MAX_GROWTH = 1.3
# A prompted model propagating from its neighbour's mask can copy that mask past the structure's
# end. The same crop without the prior shows what the image alone supports: propagation stops
# when less than this share of the mask is in that look (0 switches the check off). Chosen on the
# validation split (102 structures, 35 scans; docs/performance.md): 0.5 scored 0.487 / 0.421
# (propagated / one click propagated), 0.6 0.517 / 0.449, 0.7 0.540 / 0.459, 0.8 0.473 / 0.406.
PROPAGATE_CHECK = 0.7
# True: a prompted model fills the slices between boxed slices from each neighbour's mask (the
# prior) in the interpolated box. False (shipped): every slice gets its interpolated box alone, as
# other models do. On six validation scans the bundled prompted model scored 0.544 chained and
# 0.562 with boxes alone (docs/performance.md), as the previous model had with its own chaining.
CHAIN_BETWEEN = False
# A positive point without a box: the model sees square crops of these sides (mm) around it and
# the slice keeps the one chosen by CLICK_CHOICE ("stability": the mask that changes least when
# the threshold moves by CLICK_STABILITY_DELTA, as SAM scores its masks; "border": the smallest
# crop whose mask does not touch its edge; "confidence": the highest mean probability). Chosen
# on validation structures (docs/performance.md).
CLICK_SIDES_MM = (16.0, 24.0, 36.0, 54.0, 81.0, 121.0)
CLICK_CHOICE = "border"
CLICK_STABILITY_DELTA = 0.15
# Slices per backend call; on 2 cores batch 4 is no faster than 1, but amortises Python overhead.
DEFAULT_BATCH = 4
MAX_PREPARED = 16  # tasks prepared as one input array (the backend splits it into its batches)
_PROB_SCALE = 65535.0


@dataclass(frozen=True, eq=False)
class Prior:
    """A slice's mask given to a prompted model (the neighbour's when propagating, the current
    one when correcting); the digest keys the cache without hashing the array each time."""

    mask: np.ndarray
    digest: str

    @classmethod
    def of(cls, mask: np.ndarray) -> Prior:
        mask = np.ascontiguousarray(mask, dtype=bool)
        digest = hashlib.blake2b(np.packbits(mask).tobytes() + repr(mask.shape).encode(), digest_size=16).hexdigest()
        return cls(mask, digest)


@dataclass(frozen=True)
class SliceTask:
    """One model call's worth of work: a slice, the region the model sees, the box results keep to."""

    slice: int
    crop: Crop
    clip: tuple[float, float, float, float] | None = None
    # One of several candidate crops around a click: the slice keeps the best one, not their union.
    choose: bool = False
    # What a prompted model sees besides the image: a prior mask and clicks (i, j, positive).
    prior: Prior | None = None
    clicks: tuple[tuple[float, float, bool], ...] = ()
    # A mask from clicks alone keeps only the regions under its positive clicks.
    keep_clicked: bool = False


@dataclass
class SliceResult:
    tasks: list[SliceTask]
    mask: np.ndarray


@dataclass
class SegmentationResult:
    """Masks per slice, in the engine's volume and slice axis."""

    shape: tuple[int, int, int]
    axis: int
    threshold: float
    slices: dict[int, SliceResult] = field(default_factory=dict)
    # The engine key (volume, views, axis, model) the probabilities belong to: refine checks it.
    key: tuple | None = None
    # Why propagation stopped, per direction (-1, +1): 'vanished', 'jumped ...', 'edge of the volume'.
    stops: dict[int, str] = field(default_factory=dict)
    cancelled: bool = False
    total_seconds: float = 0.0
    backend_seconds: float = 0.0
    backend_calls: int = 0

    @property
    def mask(self) -> np.ndarray:
        """The whole volume's mask (False on slices that were not segmented)."""
        volume = np.zeros(self.shape, dtype=bool)
        for k, result in self.slices.items():
            index = [slice(None)] * 3
            index[self.axis] = k
            volume[tuple(index)] = result.mask
        return volume

    def labels(self, label: int = 1) -> np.ndarray:
        return self.mask.astype(np.uint16 if label > 255 else np.uint8) * label

    @property
    def seconds_per_slice(self) -> float:
        return self.total_seconds / max(1, len(self.slices))


ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class Engine:
    """Segments a volume with one backend; caches model outputs so edits re-run only post-processing."""

    def __init__(self, backend: Backend, batch_size: int = DEFAULT_BATCH):
        self.backend = backend
        self.card = backend.card
        self.batch_size = max(1, min(batch_size, backend.max_batch))
        self.size = self.card.input.size
        self.flip_average = self.card.flip_average
        # The card decides: a prompted model gets clicks and prior masks in its input channels.
        self.prompted = is_prompted(self.card.input)
        self._cache: dict[tuple, np.ndarray] = {}
        self._data: np.ndarray | None = None
        self._volume_token = object()
        self._source = None  # the array and settings of the last use_volume
        self.propagate_min_overlap = PROPAGATE_MIN_OVERLAP
        self.propagate_check = PROPAGATE_CHECK
        self.chain_between = CHAIN_BETWEEN
        self.click_sides_mm = CLICK_SIDES_MM
        self.click_choice = CLICK_CHOICE
        self.backend_calls = 0
        self.backend_seconds = 0.0

    # --- the volume -------------------------------------------------------------------------

    def set_volume(
        self,
        data: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        axis: int = 2,
        window: str = "auto",
        replace_nonfinite: bool = False,
    ) -> None:
        """Choose the volume, its voxel sizes, the slice axis and the intensity window (once per volume)."""
        self._source = None
        _check_spacing(spacing)
        data = np.asarray(data)
        if data.ndim != 3:
            raise InputError(f"the engine segments 3D volumes; this array has shape {data.shape}")
        if axis not in (0, 1, 2):
            raise InputError(f"slice axis {axis} does not exist; use 0, 1 or 2")
        data, self.replaced_voxels = _finite(data, replace_nonfinite)
        low, high = float(data.min()), float(data.max())
        if low == high:
            raise InputError(f"the image is constant (every voxel is {low:g}): there is nothing to segment")
        same_volume = data is self._data or (self._data is not None and data.base is self._data)
        if not same_volume:
            self._cache.clear()
            self._volume_token = object()  # results of the previous volume no longer refine here
        self._data = data
        self.spacing = tuple(float(s) for s in spacing)
        self.axis = axis
        self.views: tuple[View, View, View] = plan_views(data, window, self.card.input.channels)

    def use_volume(
        self,
        data: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        axis: int = 2,
        window: str = "auto",
        replace_nonfinite: bool = False,
    ) -> bool:
        """``set_volume`` unless this very array is already set the same way (its views and the
        cache stay); True when the volume was (re)set."""
        settings = (tuple(float(s) for s in spacing), axis, window, replace_nonfinite)
        source = self._source
        if source is not None and source[0] is data and source[1] == settings:
            return False
        self.set_volume(data, spacing=spacing, axis=axis, window=window, replace_nonfinite=replace_nonfinite)
        self._source = (data, settings)
        return True

    @property
    def key(self) -> tuple:
        """What a result's probabilities depend on: this volume, its views, the axis, the model."""
        return (self._volume_token, self.views, self.axis, self.card.id, self.flip_average)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._data.shape

    @property
    def slice_spacing(self) -> tuple[float, float]:
        return tuple(s for a, s in enumerate(self.spacing) if a != self.axis)

    def slice_image(self, k: int) -> np.ndarray:
        return axis_plane(self._data, k, self.axis)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(n for a, n in enumerate(self.shape) if a != self.axis)

    # --- planning ----------------------------------------------------------------------------

    def box_task(self, box: Box) -> SliceTask:
        spec = self.card.input
        crop = crop_for_box(box.rect, self.slice_spacing, spec.crop, spec.margin)
        return SliceTask(box.slice, crop, box.rect)

    def click_tasks(self, k: int, points) -> list[SliceTask]:
        """Candidate crops of several sizes around a slice's positive points (no box drawn)."""
        positive = [p for p in points if p.positive]
        rows, cols = self.slice_shape
        i0, i1 = min(p.i for p in positive), max(p.i for p in positive)
        j0, j1 = min(p.j for p in positive), max(p.j for p in positive)
        spacing_i, spacing_j = self.slice_spacing
        tasks, seen = [], set()
        for side in self.click_sides_mm:
            half_i, half_j = side / spacing_i / 2, side / spacing_j / 2
            box = Box(k, max(0.0, i0 - half_i), max(0.0, j0 - half_j), min(rows, i1 + half_i), min(cols, j1 + half_j))
            task = replace(self.box_task(box), choose=True, clicks=self._clicks(points))
            if task.crop.key() not in seen:
                seen.add(task.crop.key())
                tasks.append(task)
        return tasks

    def _clicks(self, points) -> tuple[tuple[float, float, bool], ...]:
        """Points as a prompted model's clicks (other models steer by points after the model)."""
        return tuple((p.i, p.j, p.positive) for p in points) if self.prompted else ()

    def correction_task(self, k: int, mask: np.ndarray, points, keep_clicked: bool = False,
                        boxed: SliceTask | None = None) -> SliceTask:
        """A prompted model's second look at a slice: its current mask as the prior and the
        slice's points as clicks. A boxed slice keeps its box's crop and clip while every
        positive click lies in the box (the box says where the object is); otherwise the crop
        frames the mask and every positive click (a click outside must be in view to add)."""
        positive = [(p.i, p.j) for p in points if p.positive]
        if boxed is not None and boxed.clip is not None and all(_inside(boxed.clip, i, j) for i, j in positive):
            return replace(boxed, prior=Prior.of(mask), clicks=self._clicks(points), keep_clicked=keep_clicked,
                           choose=False)
        rows, cols = self.slice_shape
        box = mask_box(mask, PROPAGATE_GROWTH) if mask.any() else None
        reach = positive or ([] if box else [(p.i, p.j) for p in points])
        if reach:
            pad = 2.0
            i0, j0 = min(i for i, _ in reach) - pad, min(j for _, j in reach) - pad
            i1, j1 = max(i for i, _ in reach) + pad, max(j for _, j in reach) + pad
            box = (i0, j0, i1, j1) if box is None else (min(box[0], i0), min(box[1], j0), max(box[2], i1),
                                                         max(box[3], j1))
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(rows), box[2]), min(float(cols), box[3]))
        task = self.box_task(Box(k, *box))
        return replace(task, clip=None, prior=Prior.of(mask), clicks=self._clicks(points), keep_clicked=keep_clicked)

    def whole_slice_task(self, k: int) -> SliceTask:
        return SliceTask(k, crop_for_slice(self.slice_shape, self.slice_spacing, self.card.input.crop), None)

    def resolve_scope(self, prompts: Prompts, scope: str) -> str:
        if scope not in SCOPES:
            raise InputError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        if scope != "auto":
            return scope
        if not prompts:
            return "volume"
        return "between" if len({b.slice for b in prompts.boxes}) >= 2 else "slices"

    def plan(self, prompts: Prompts, scope: str = "auto") -> dict[int, list[SliceTask]]:
        """The model calls each slice needs (propagation plans as it goes, so it is not here)."""
        scope = self.resolve_scope(prompts, scope)
        if scope == "propagate":
            raise InputError("propagation is planned slice by slice; call segment()")
        boxes: dict[int, list[Box]] = {}
        for box in prompts.boxes:
            boxes.setdefault(box.slice, []).append(box)
        if scope == "between":
            for k, box in interpolate_boxes(prompts.boxes).items():
                boxes.setdefault(k, [box])
        slices = set(boxes) | {p.slice for p in prompts.points}
        if scope == "volume":
            slices = set(range(self.shape[self.axis]))
        plan = {}
        for k in sorted(slices):
            if k in boxes:
                plan[k] = [self.box_task(b) for b in boxes[k]]
            elif scope != "volume" and any(p.positive for p in prompts.points_on(k)):
                plan[k] = self.click_tasks(k, prompts.points_on(k))
            else:
                plan[k] = [self.whole_slice_task(k)]
        return plan

    # --- running -----------------------------------------------------------------------------

    def _cache_key(self, task: SliceTask) -> tuple:
        prompts = (task.prior.digest if task.prior else None, task.clicks) if self.prompted else ()
        return (self.card.id, self.flip_average, self.views, self.axis, task.slice, task.crop.key(), *prompts)

    def _model_input(self, task: SliceTask, out: np.ndarray | None = None) -> np.ndarray:
        raw = sample_crop(self.slice_image(task.slice), task.crop, self.size)
        x = to_model_input(raw, self.views, self.card.input, out)
        if self.prompted:
            prior = prior_in_crop(task.prior.mask if task.prior else None, task.crop, self.size)
            clicks = [(*to_crop_coords(i, j, task.crop, self.size), positive) for i, j, positive in task.clicks]
            write_prompts(x, prior, click_map(clicks, self.size), self.card.input)
        return x

    def _prepare(self, tasks: list[SliceTask]) -> np.ndarray:
        batch = np.empty((len(tasks), 3, *self.size), dtype=np.float32)
        for index, task in enumerate(tasks):
            self._model_input(task, batch[index])
        return batch

    def _predict(self, tasks: list[SliceTask], batch: np.ndarray) -> None:
        began = time.perf_counter()
        if self.flip_average:
            logits = _flip_averaged(self.backend.predict, batch)
        else:
            logits = self.backend.predict(batch)
        self.backend_seconds += time.perf_counter() - began
        self.backend_calls += 1
        if not np.all(np.isfinite(logits)):
            raise InputError(f"the model {self.card.name} returned NaN or Inf; the model file may be broken")
        for task, logit in zip(tasks, logits):
            # Probabilities kept as uint16 (1/65535 steps): half the memory of float32, and
            # converting is ~10x faster than to float16.
            self._cache[self._cache_key(task)] = (_sigmoid(logit[0]) * _PROB_SCALE + 0.5).astype(np.uint16)

    def _run_tasks(self, tasks: list[SliceTask]) -> None:
        """Fill the cache for tasks that are not in it."""
        for _ in self._run_groups([tasks]):
            pass

    def _run_groups(self, groups: list[list[SliceTask]]) -> Iterator[int]:
        """Run groups of tasks through the backend, yielding each group's index when it is cached.

        The next group's input is prepared in a second thread while the backend works on the
        current one (onnxruntime releases the GIL), which hides most of the preprocessing.
        """
        pending = []  # (group index, at most MAX_PREPARED tasks): 1000 boxes on one slice, prepared as
        for index, group in enumerate(groups):  # one array (1.5 MiB a box), peaked at 2.3 GB
            todo = list({self._cache_key(t): t for t in group if self._cache_key(t) not in self._cache}.values())
            pending += [(index, todo[start:start + MAX_PREPARED]) for start in range(0, len(todo), MAX_PREPARED)]
        if not pending:
            yield from range(len(groups))
            return
        done = -1
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._prepare, pending[0][1])
            for number, (index, todo) in enumerate(pending):
                batch = future.result()
                if number + 1 < len(pending):
                    future = pool.submit(self._prepare, pending[number + 1][1])
                self._predict(todo, batch)
                del batch
                last_of_group = number + 1 == len(pending) or pending[number + 1][0] != index
                if last_of_group:
                    yield from range(done + 1, index + 1)  # groups with nothing to run are done too
                    done = index
        yield from range(done + 1, len(groups))

    def probability(self, task: SliceTask) -> np.ndarray:
        """The model's probability for a task, in the slice's frame (zero outside the crop)."""
        stored = self._cache[self._cache_key(task)].astype(np.float32) * np.float32(1 / _PROB_SCALE)
        return paste_back(stored, task.crop, self.slice_shape)

    def postprocess(self, k: int, tasks: list[SliceTask], prompts: Prompts, threshold: float) -> np.ndarray:
        """A slice's mask from cached probabilities: never calls the backend."""
        positive = [(p.i, p.j) for p in prompts.points_on(k) if p.positive]
        negative = [(p.i, p.j) for p in prompts.points_on(k) if not p.positive]
        if self.prompted:
            negative = []  # the model saw them
        if tasks and tasks[0].choose:
            return self._choose(tasks, threshold, positive, negative)[1]
        mask = np.zeros(self.slice_shape, dtype=bool)
        for task in tasks:
            if task.prior is not None or (self.prompted and task.clicks):
                # The model saw the clicks: its mask is the answer. Only a mask from clicks alone
                # keeps to the regions under its positive clicks (a stray blob is not the object).
                keep = [(i, j) for i, j, sign in task.clicks if sign] if task.keep_clicked else []
                mask |= select_regions(self.probability(task), threshold, task.clip, keep, [])
            else:
                mask |= select_regions(self.probability(task), threshold, task.clip, positive, negative)
        return mask

    def slice_result(self, k: int, tasks: list[SliceTask], prompts: Prompts, threshold: float) -> SliceResult:
        """A slice's result; of candidate crops around a click only the chosen one is kept, so edits stay on it."""
        if tasks and tasks[0].choose:
            positive = [(p.i, p.j) for p in prompts.points_on(k) if p.positive]
            negative = [(p.i, p.j) for p in prompts.points_on(k) if not p.positive]
            task, mask = self._choose(tasks, threshold, positive, [] if self.prompted else negative)
            return SliceResult([replace(task, choose=False, keep_clicked=self.prompted)], mask)
        return SliceResult(tasks, self.postprocess(k, tasks, prompts, threshold))

    def _choose(self, tasks, threshold, positive, negative) -> tuple[SliceTask, np.ndarray]:
        """The best candidate crop around a click and its mask (see CLICK_CHOICE)."""
        best, best_score, best_task = np.zeros(self.slice_shape, dtype=bool), -np.inf, tasks[0]
        for order, task in enumerate(tasks):
            probability = self.probability(task)
            mask = select_regions(probability, threshold, task.clip, positive, negative)
            if not mask.any():
                continue
            score = _click_score(self.click_choice, mask, probability, task, threshold, positive, negative, order)
            if score > best_score:
                best, best_score, best_task = mask, score, task
        return best_task, best

    def iter_segment(
        self,
        prompts: Prompts,
        scope: str = "auto",
        threshold: float | None = None,
    ) -> Iterator[tuple[int, int, SegmentationResult]]:
        """Segment slice by slice, yielding (done, total, result so far) after each batch."""
        self._require_volume()
        threshold = self.card.threshold if threshold is None else threshold
        prompts = prompts.validate(self.shape, self.axis)
        scope = self.resolve_scope(prompts, scope)
        result = SegmentationResult(self.shape, self.axis, threshold, key=self.key)
        began, backend_before, calls_before = time.perf_counter(), self.backend_seconds, self.backend_calls

        def account():
            result.total_seconds = time.perf_counter() - began
            result.backend_seconds = self.backend_seconds - backend_before
            result.backend_calls = self.backend_calls - calls_before

        if scope == "propagate":
            steps = self._propagate(prompts, threshold, result)
        elif scope == "between" and self.prompted and self.chain_between:
            steps = self._between_chained(prompts, threshold, result)
        else:
            steps = self._planned(prompts, scope, threshold, result)
        for done, total in steps:
            account()
            yield done, total, result
        account()

    def _planned(self, prompts, scope, threshold, result):
        plan = self.plan(prompts, scope)
        order = list(plan)
        # A prompted model looks again at slices with points: the first mask as the prior,
        # the points as clicks (box + clicks is a box, then corrections, as users work).
        second = [k for k in order if self.prompted and prompts.points_on(k)]
        total = len(order) + len(second)
        done = 0
        for group in self._batched(order, lambda k: plan[k]):
            for k in group:
                result.slices[k] = self.slice_result(k, plan[k], prompts, threshold)
            done += len(group)
            yield done, total
        looks = {k: self.correction_task(k, result.slices[k].mask, prompts.points_on(k),
                                         keep_clicked=not prompts.boxes_on(k), boxed=_single(plan[k]))
                 for k in second}
        for group in self._batched(second, lambda k: [looks[k]]):
            for k in group:
                result.slices[k] = SliceResult([looks[k]], self.postprocess(k, [looks[k]], prompts, threshold))
            done += len(group)
            yield done, total

    def _batched(self, slices: list[int], tasks_of) -> Iterator[list[int]]:
        """Slices in groups of the batch size, each group's tasks run (one backend call a group);
        yields each group when its probabilities are cached."""
        groups = [slices[start : start + self.batch_size] for start in range(0, len(slices), self.batch_size)]
        for index in self._run_groups([[t for k in group for t in tasks_of(k)] for group in groups]):
            yield groups[index]

    def _next_task(self, k: int, previous: np.ndarray, box: tuple | None = None) -> SliceTask | None:
        """The task for slice k from its neighbour's mask: the mask's box (or a given one), and,
        for a prompted model, the mask itself as the prior."""
        box = box or mask_box(previous, PROPAGATE_GROWTH)
        if box is None:
            return None
        task = self.box_task(Box(k, *box))
        return replace(task, prior=Prior.of(previous)) if self.prompted else task

    def _propagate(self, prompts, threshold, result):
        """From each prompted slice outwards, each slice cropped around its neighbour's mask."""
        depth = self.shape[self.axis]
        done = 0
        for done, _ in self._planned(prompts, "slices", threshold, result):
            yield done, depth
        seeds = sorted(result.slices)
        for k in seeds:
            for step in (-1, 1):
                previous, current = result.slices[k].mask, k + step
                while True:
                    if not 0 <= current < depth:
                        result.stops[step] = "edge of the volume"
                        break
                    if current in result.slices:
                        result.stops[step] = f"met slice {current}, segmented from another prompt"
                        break
                    task = self._next_task(current, previous)
                    if task is None:
                        result.stops[step] = f"vanished at slice {current}"
                        break
                    check = replace(task, prior=None) if task.prior is not None and self.propagate_check else None
                    self._run_tasks([task] + ([check] if check else []))
                    mask = self.postprocess(current, [task], prompts, threshold)
                    stop = propagation_stop(mask, previous, self.propagate_min_overlap)
                    if check and not stop:
                        stop = image_disagrees(mask, self.postprocess(current, [check], prompts, threshold),
                                               self.propagate_check)
                    if stop:
                        result.stops[step] = f"{stop} at slice {current}"
                        break
                    result.slices[current] = SliceResult([task], mask)
                    done += 1
                    yield done, depth
                    previous, current = mask, current + step

    def _between_chained(self, prompts, threshold, result):
        """Boxes on some slices, a prompted model: the boxed slices first, then each slice between
        two of them from its neighbour's mask (the prior) in its interpolated box, walking in from
        both ends so that neither end's errors carry across the whole gap."""
        boxes = interpolate_boxes(prompts.boxes)
        steps = list(self._planned(prompts, "slices", threshold, result))
        done = steps[-1][0] if steps else 0
        order = []  # (slice, the neighbour it follows)
        keys = sorted(k for k in boxes if k in result.slices)
        for a, b in zip(keys, keys[1:]):
            if any(k not in boxes for k in range(a + 1, b)):
                continue  # a slice with several boxes between: nothing was interpolated there
            low, high = a + 1, b - 1
            while low <= high:
                order.append((low, low - 1))
                if high != low:
                    order.append((high, high + 1))
                low, high = low + 1, high - 1
        total = done + len(order)
        yield done, total
        for k, follows in order:
            task = self._next_task(k, result.slices[follows].mask, boxes[k].rect)
            self._run_tasks([task])
            result.slices[k] = SliceResult([task], self.postprocess(k, [task], prompts, threshold))
            done += 1
            yield done, total

    def segment(
        self,
        prompts: Prompts | None = None,
        scope: str = "auto",
        threshold: float | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> SegmentationResult:
        """Run to the end (or until cancel() is true, which raises Cancelled)."""
        result = None
        for done, total, partial in self.iter_segment(prompts or Prompts(), scope, threshold):
            result = partial
            if progress:
                progress(done, total)
            if cancel and cancel():
                raise Cancelled(f"cancelled after {done} of {total} slices; nothing was written")
        if result is None:  # nothing planned: an empty result still carries the geometry
            result = SegmentationResult(self.shape, self.axis, self.card.threshold if threshold is None else threshold)
        return result

    def refine(self, result: SegmentationResult, prompts: Prompts, threshold: float | None = None,
               slices: list[int] | None = None) -> SegmentationResult:
        """Re-apply threshold and points to segmented slices from the cache: no model call."""
        self._require_editable(result)
        prompts = prompts.validate(self.shape, self.axis)
        if threshold is not None:
            result.threshold = threshold
        for k in slices if slices is not None else list(result.slices):
            tasks = result.slices[k].tasks
            if not tasks:
                continue  # a mask made elsewhere (result_from_mask): nothing cached to redo
            result.slices[k] = SliceResult(tasks, self.postprocess(k, tasks, prompts, result.threshold))
        return result

    def result_from_mask(self, mask: np.ndarray, threshold: float | None = None) -> SegmentationResult:
        """A result holding a mask made elsewhere (a saved label map, the user's painting), so that
        clicks can correct it slice by slice; its slices have no model call behind them yet."""
        self._require_volume()
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise InputError(f"the mask is {mask.shape}, the volume {self.shape}: they must share the grid")
        threshold = self.card.threshold if threshold is None else threshold
        result = SegmentationResult(self.shape, self.axis, threshold, key=self.key)
        for k in np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != self.axis))):
            result.slices[int(k)] = SliceResult([], np.array(axis_plane(mask, int(k), self.axis)))
        return result

    def correct(self, result: SegmentationResult, k: int, prompts: Prompts,
                threshold: float | None = None) -> SegmentationResult:
        """Slice k after the user clicked on it. A prompted model looks again, in one call, with
        the slice's current mask as the prior and every point on the slice as a click, so a click
        moves the boundary; other models re-apply the points to the cached probabilities. A slice
        without a mask yet is segmented from its prompts."""
        self._require_editable(result)
        prompts = prompts.validate(self.shape, self.axis)
        threshold = result.threshold if threshold is None else threshold
        result.threshold = threshold
        if k not in result.slices:
            on_slice = Prompts(prompts.boxes_on(k), prompts.points_on(k))
            # Negative points alone on an empty slice ask for nothing.
            if on_slice.boxes or any(p.positive for p in on_slice.points):
                result.slices.update(self.segment(on_slice, "slices", threshold).slices)
            return result
        if not self.prompted:
            return self.refine(result, prompts, threshold, slices=[k])
        current = result.slices[k]
        keep_clicked = any(t.keep_clicked for t in current.tasks)
        task = self.correction_task(k, current.mask, prompts.points_on(k), keep_clicked, _single(current.tasks))
        self._run_tasks([task])
        result.slices[k] = SliceResult([task], self.postprocess(k, [task], prompts, threshold))
        return result

    def _require_editable(self, result: SegmentationResult) -> None:
        """A result can be edited only on the volume, axis and model its probabilities came from."""
        self._require_volume()
        if result.key is not None and result.key != self.key:
            raise InputError(
                "this result was computed on another volume, slice axis or model than the engine holds now; "
                "segment it again to edit it"
            )

    def _require_volume(self) -> None:
        if self._data is None:
            raise InputError("no volume set: call set_volume() first")

    def clear_cache(self) -> None:
        self._cache.clear()


def _single(tasks: list[SliceTask]) -> SliceTask | None:
    """A slice's one boxed task, whose box a correction keeps (several boxes: none)."""
    return tasks[0] if len(tasks) == 1 and tasks[0].clip is not None else None


def _inside(box, i: float, j: float) -> bool:
    return box[0] <= i < box[2] and box[1] <= j < box[3]


def _check_spacing(spacing) -> None:
    """Voxel sizes in mm: NaN, zero or negative ones would end in a KeyError, a division by zero or bad crops."""
    sizes = tuple(float(s) for s in spacing)
    if len(sizes) != 3 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise InputError(f"voxel spacing {'x'.join(f'{s:g}' for s in sizes)} must be three positive sizes in mm; "
                         f"check the image header's voxel sizes (pixdim)")


def _click_score(choice, mask, probability, task, threshold, positive, negative, order) -> float:
    """How much a candidate crop's mask looks like the structure under the click (higher is better)."""
    if choice == "confidence":
        return float(probability[mask].mean())
    touches = _touches_edge(mask, task.clip)
    if choice == "border":
        return -order - (100 if touches else 0)  # the smallest crop that holds the whole mask
    if choice != "stability":
        raise InputError(f"unknown click choice {choice!r}; use stability, border or confidence")
    low = select_regions(probability, max(0.01, threshold - CLICK_STABILITY_DELTA), task.clip, positive, negative)
    high = select_regions(probability, min(0.99, threshold + CLICK_STABILITY_DELTA), task.clip, positive, negative)
    return float((low & high).sum() / max(1, (low | high).sum())) - (0.5 if touches else 0.0)


def _touches_edge(mask: np.ndarray, clip) -> bool:
    """Whether a mask reaches its crop's edge where the crop is inside the slice (it is cut off there)."""
    inside = box_mask(mask.shape, clip)
    (r0, r1), (c0, c1) = mask_bbox(inside)
    edge = np.zeros_like(inside)
    if r0 > 0:
        edge[r0, :] = True
    if r1 < mask.shape[0]:
        edge[r1 - 1, :] = True
    if c0 > 0:
        edge[:, c0] = True
    if c1 < mask.shape[1]:
        edge[:, c1 - 1] = True
    return bool((mask & edge & inside).any())


def _finite(data: np.ndarray, replace: bool) -> tuple[np.ndarray, int]:
    """The data with NaN/Inf replaced by the lowest finite value (if allowed), and how many there were."""
    if np.issubdtype(data.dtype, np.integer):
        return data, 0
    finite = np.isfinite(data)
    if finite.all():
        return data, 0
    bad = int(finite.size - finite.sum())
    if not replace:
        raise InputError(
            f"the image has {bad} NaN or infinite voxels; fix the file or use --replace-nonfinite "
            f"to treat them as the lowest intensity"
        )
    if not finite.any():
        raise InputError("every voxel of the image is NaN or infinite: there is nothing to segment")
    return np.where(finite, data, data[finite].min()), bad


def _flip_averaged(predict, batch: np.ndarray) -> np.ndarray:
    """Mean logits over the batch and its row, column and row+column flips, in one backend call."""
    n = batch.shape[0]
    flips = ((), (2,), (3,), (2, 3))
    stacked = np.concatenate([np.flip(batch, axis) if axis else batch for axis in flips])
    logits = predict(np.ascontiguousarray(stacked))
    parts = [np.flip(logits[i * n : (i + 1) * n], axis) if axis else logits[i * n : (i + 1) * n]
             for i, axis in enumerate(flips)]
    return np.mean(parts, axis=0)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def propagation_continues(mask: np.ndarray, previous: np.ndarray, min_overlap: float | None = None) -> bool:
    """Whether a propagated slice's mask is still the structure: not vanished, not jumped away."""
    return propagation_stop(mask, previous, min_overlap) is None


def propagation_stop(mask: np.ndarray, previous: np.ndarray, min_overlap: float | None = None,
                     max_growth: float | None = None) -> str | None:
    """Why propagation stops at this mask ('vanished', 'jumped ...', 'grew ...'), or None.

    Unset limits are the module's at call time, so a benchmark that changes them reaches every caller."""
    min_overlap = PROPAGATE_MIN_OVERLAP if min_overlap is None else min_overlap
    max_growth = PROPAGATE_MAX_GROWTH if max_growth is None else max_growth
    area, before = int(mask.sum()), int(previous.sum())
    if area < MIN_PROPAGATE_PIXELS:
        return "vanished"
    # The share of the smaller mask inside the larger: 1 while the structure only shrinks or grows.
    overlap = int(np.logical_and(mask, previous).sum()) / max(1, min(area, before))
    if overlap < min_overlap:
        return f"jumped to another structure (overlap {overlap:.2f} < {min_overlap:.2f})"
    if area > max_growth * before:
        return f"grew {area / max(1, before):.1f}x in one slice (leaking into a neighbour?)"
    return None


def image_disagrees(mask: np.ndarray, without_prior: np.ndarray, min_share: float) -> str | None:
    """Why propagation stops when the image alone no longer shows the mask, or None."""
    share = int(np.logical_and(mask, without_prior).sum()) / max(1, int(mask.sum()))
    if share < min_share:
        return f"the image alone shows {share:.0%} of the mask (< {min_share:.0%}): the structure ended?"
    return None


def mask_box(mask: np.ndarray, margin: float) -> tuple[float, float, float, float] | None:
    """The mask's bounding box grown by the margin (and a voxel), to box the next slice."""
    bbox = mask_bbox(mask)
    if bbox is None:
        return None
    (r0, r1), (c0, c1) = bbox
    grow_r, grow_c = (r1 - r0) * margin + 1, (c1 - c0) * margin + 1
    return (max(0.0, r0 - grow_r), max(0.0, c0 - grow_c),
            min(mask.shape[0], r1 + grow_r), min(mask.shape[1], c1 + grow_c))
