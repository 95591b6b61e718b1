"""Slice-by-slice segmentation: plan the slices, batch them through a backend, cache, post-process.

The engine is what the CLI, the napari widget and the Python API drive: numpy in, numpy out,
never Qt. It holds the state (the volume, the model's probabilities) and the calls; the jobs
behind them live beside it: the data it works with (slice_tasks), the model calls and their
cache (probabilities), which slices a scope segments (planning), clicks (clicks), and the walks
from a neighbour's mask with their stop rule (propagation). Names that callers import from here
but that live in those modules are imported `as` themselves (re-exported).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from . import propagation
from .backends.base import Backend
from .clicks import (
    CLICK_CHOICE,
    CLICK_FUSE_REACH,
    CLICK_SIDES_MM,
    choose_crop,
    click_boxes,
    correction_box,
    fused_mask,
    keeps_box,
    kept_crops,
    model_clicks,
    point_pixels,
    single_box,
)
from .errors import Cancelled, InputError
from .honoured_clicks import honour_negative_clicks
from .looks import BOX_CONTEXT_MARGIN, box_looks
from .planning import SCOPES as SCOPES
from .planning import plan, resolve_scope, walk
from .postprocess import select_regions
from .preprocess import (
    View,
    axis_plane,
    crop_for_box,
    crop_for_slice,
    paste_back,
    plan_views,
    sample_crop,
    to_model_input,
)
from .probabilities import MAX_PREPARED as MAX_PREPARED
from .probabilities import ProbabilityCache
from .prompt_maps import draw_task_prompts, is_prompted
from .prompts import Box, Prompts
from .propagation import PROPAGATE_MIN_OVERLAP as PROPAGATE_MIN_OVERLAP
from .propagation import neighbour_box
from .propagation import propagation_continues as propagation_continues
from .propagation import propagation_stop as propagation_stop
from .slice_tasks import Prior, SegmentationResult, SliceResult, SliceTask

# Slices per backend call; on 2 cores batch 4 is no faster than 1, but amortises Python overhead.
DEFAULT_BATCH = 4

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
        self._probabilities = ProbabilityCache(backend)
        self._cache = self._probabilities.entries  # the probabilities by task key
        self._data: np.ndarray | None = None
        self._volume_token = object()
        self._source = None  # the array and settings of the last use_volume
        # Read from their modules now, so that a benchmark that changes those reaches new engines.
        self.propagate_min_overlap = propagation.PROPAGATE_MIN_OVERLAP
        self.propagate_check = propagation.PROPAGATE_CHECK
        self.chain_between = propagation.CHAIN_BETWEEN
        self.click_sides_mm = CLICK_SIDES_MM
        self.click_choice = CLICK_CHOICE
        # Measured for prompted models only; other models keep the chosen crop's mask and one look.
        self.click_fuse_reach = CLICK_FUSE_REACH if self.prompted else 0
        self.context_margin = BOX_CONTEXT_MARGIN if self.prompted else None

    # --- the volume -------------------------------------------------------------------------

    def set_volume(self, data: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), axis: int = 2,
                   window: str = "auto", replace_nonfinite: bool = False) -> None:
        """Choose the volume, its voxel sizes, the slice axis and the intensity window (once per volume)."""
        self._source = None
        data, self.replaced_voxels = _checked_volume(data, spacing, axis, replace_nonfinite)
        same_volume = data is self._data or (self._data is not None and data.base is self._data)
        if not same_volume:
            self._cache.clear()
            self._volume_token = object()  # results of the previous volume no longer refine here
        self._data = data
        self.spacing = tuple(float(s) for s in spacing)
        self.axis = axis
        self.views: tuple[View, View, View] = plan_views(data, window, self.card.input.channels)

    def use_volume(self, data: np.ndarray, *args, **kwargs) -> bool:
        """``set_volume`` with the same arguments unless this very array is already set the same
        way (its views and the cache stay); True when the volume was (re)set."""
        bound = inspect.signature(self.set_volume).bind(data, *args, **kwargs)
        bound.apply_defaults()
        settings = {**bound.arguments, "data": None, "spacing": tuple(float(s) for s in bound.arguments["spacing"])}
        source = self._source
        if source is not None and source[0] is data and source[1] == settings:
            return False
        self.set_volume(data, *args, **kwargs)
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
        tasks = {}
        for box in click_boxes(k, points, self.slice_shape, self.slice_spacing, self.click_sides_mm):
            task = replace(self.box_task(box), choose=True, clicks=model_clicks(points, self.prompted))
            tasks.setdefault(task.crop.key(), task)
        return list(tasks.values())

    def correction_task(self, k: int, mask: np.ndarray, points, keep_clicked: bool = False,
                        boxed: SliceTask | None = None) -> SliceTask:
        """A prompted model's second look at a slice: its current mask as the prior and the
        slice's points as clicks, in the boxed slice's crop while the clicks are in its box,
        else in a crop around the mask and the clicks (clicks.correction_box)."""
        prompts = {"prior": Prior.of(mask), "clicks": model_clicks(points, self.prompted), "keep_clicked": keep_clicked}
        if keeps_box(boxed, points):
            return replace(boxed, choose=False, **prompts)
        task = self.box_task(Box(k, *correction_box(mask, points, self.slice_shape)))
        return replace(task, clip=None, **prompts)

    def propagation_task(self, k: int, previous: np.ndarray, box: tuple | None = None) -> SliceTask | None:
        """The task for slice k from its neighbour's mask: the mask's box grown (or a given box)
        and, for a prompted model, the mask itself as the prior; None when the mask is empty."""
        box = box or neighbour_box(previous)
        if box is None:
            return None
        task = self.box_task(Box(k, *box))
        return replace(task, prior=Prior.of(previous, self.card.propagation_prior)) if self.prompted else task

    def whole_slice_task(self, k: int) -> SliceTask:
        return SliceTask(k, crop_for_slice(self.slice_shape, self.slice_spacing, self.card.input.crop), None)

    def resolve_scope(self, prompts: Prompts, scope: str) -> str:
        return resolve_scope(prompts, scope)

    def plan(self, prompts: Prompts, scope: str = "auto") -> dict[int, list[SliceTask]]:
        """The model calls each slice needs (propagation plans as it goes, so it is not here)."""
        return plan(self, prompts, scope)

    # --- the model's probabilities -----------------------------------------------------------

    def run_tasks(self, tasks: list[SliceTask]) -> None:
        """Compute and keep the model's probabilities for the tasks that are not kept yet."""
        for _ in self.run_groups([tasks]):
            pass

    def run_groups(self, groups: list[list[SliceTask]]) -> Iterator[int]:
        """run_tasks for groups of tasks, yielding each group's index once its tasks are kept."""
        groups = [[look for task in group for look in self.looks(task)] for group in groups]
        return self._probabilities.run_groups(groups, self._cache_key, self._model_input, self.flip_average)

    def looks(self, task: SliceTask) -> list[SliceTask]:
        """The crops a task's probability averages (looks.box_looks)."""
        return box_looks(task, self.slice_spacing, self.card.input, self.context_margin)

    def probability(self, task: SliceTask) -> np.ndarray:
        """The model's probability for a task, in the slice's frame (zero outside the crop)."""
        looks = [paste_back(self._probabilities.probability(self._cache_key(look)), look.crop, self.slice_shape)
                 for look in self.looks(task)]
        return looks[0] if len(looks) == 1 else np.mean(looks, axis=0, dtype=np.float32)

    def _cache_key(self, task: SliceTask) -> tuple:
        prompts = (task.prior.digest if task.prior else None, task.clicks) if self.prompted else ()
        return (self.card.id, self.flip_average, self.views, self.axis, task.slice, task.crop.key(), *prompts)

    def _model_input(self, task: SliceTask, out: np.ndarray | None = None) -> np.ndarray:
        raw = sample_crop(self.slice_image(task.slice), task.crop, self.size)
        x = to_model_input(raw, self.views, self.card.input, out)
        return draw_task_prompts(x, task, self.card.input, self.size) if self.prompted else x

    @property
    def cache_entries(self) -> int:
        """How many tasks' probabilities are kept."""
        return len(self._cache)

    @property
    def cache_bytes(self) -> int:
        """The memory the kept probabilities take."""
        return self._probabilities.nbytes

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def backend_calls(self) -> int:
        return self._probabilities.calls

    @property
    def backend_seconds(self) -> float:
        return self._probabilities.seconds

    # --- masks from probabilities ------------------------------------------------------------

    def postprocess(self, k: int, tasks: list[SliceTask], prompts: Prompts, threshold: float) -> np.ndarray:
        """A slice's mask from cached probabilities: never calls the backend."""
        positive, negative = point_pixels(prompts.points_on(k), self.prompted)
        if tasks and tasks[0].choose:
            return choose_crop(tasks, self.probability, threshold, positive, negative, self.click_choice)[1]
        if tasks and tasks[0].fused:
            return fused_mask(tasks, self.probability, threshold, positive, negative)
        mask = np.zeros(self.slice_shape, dtype=bool)
        for task in tasks:
            mask |= _task_mask(task, self.probability(task), threshold, self.prompted, positive, negative)
        task = tasks[0] if len(tasks) == 1 else None
        if self.prompted and task is not None and task.prior is not None and task.clicks:
            # A correction: a negative click takes out the clicked tissue if the model kept it.
            mask = honour_negative_clicks(mask, task.prior.mask, self.slice_image(k), task.clicks, task.crop)
        return mask

    def slice_result(self, k: int, tasks: list[SliceTask], prompts: Prompts, threshold: float) -> SliceResult:
        """A slice's result; of candidate crops around a click only the chosen one is kept, so edits stay on it."""
        if tasks and tasks[0].choose:
            positive, negative = point_pixels(prompts.points_on(k), self.prompted)
            task, mask = choose_crop(tasks, self.probability, threshold, positive, negative, self.click_choice)
            return SliceResult(*kept_crops(tasks, task, mask, self.probability, threshold, positive, negative,
                                           self.click_fuse_reach, self.prompted))
        return SliceResult(tasks, self.postprocess(k, tasks, prompts, threshold))

    # --- segmenting --------------------------------------------------------------------------

    def iter_segment(self, prompts: Prompts, scope: str = "auto",
                     threshold: float | None = None) -> Iterator[tuple[int, int, SegmentationResult]]:
        """Segment slice by slice, yielding (done, total, result so far) after each batch."""
        self._require_volume()
        threshold = self.card.threshold if threshold is None else threshold
        prompts = prompts.validate(self.shape, self.axis)
        scope = self.resolve_scope(prompts, scope)
        result = SegmentationResult(self.shape, self.axis, threshold, key=self.key)
        began, backend_before, calls_before = time.perf_counter(), self.backend_seconds, self.backend_calls
        steps = walk(self, prompts, scope, threshold, result)

        def account():
            result.total_seconds = time.perf_counter() - began
            result.backend_seconds = self.backend_seconds - backend_before
            result.backend_calls = self.backend_calls - calls_before

        for done, total in steps:
            account()
            yield done, total, result
        account()

    def segment(self, prompts: Prompts | None = None, scope: str = "auto", threshold: float | None = None,
                progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> SegmentationResult:
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
        task = self.correction_task(k, current.mask, prompts.points_on(k), keep_clicked, single_box(current.tasks))
        self.run_tasks([task])
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


def _task_mask(task: SliceTask, probability: np.ndarray, threshold: float, prompted: bool,
               positive: list, negative: list) -> np.ndarray:
    """One task's mask in the slice's frame, from its probability."""
    if task.prior is not None or (prompted and task.clicks):
        # The model saw the clicks: its mask is the answer. Only a mask from clicks alone
        # keeps to the regions under its positive clicks (a stray blob is not the object).
        keep = [(i, j) for i, j, sign in task.clicks if sign] if task.keep_clicked else []
        opened = [(i, j) for i, j, sign in task.clicks if not sign]  # holes the user asked for
        return select_regions(probability, threshold, task.clip, keep, [], open_at=opened)
    return select_regions(probability, threshold, task.clip, positive, negative)


def _checked_volume(data, spacing, axis: int, replace_nonfinite: bool) -> tuple[np.ndarray, int]:
    """The volume as an array the engine can segment, and how many non-finite voxels it replaced."""
    _check_spacing(spacing)
    data = np.asarray(data)
    if data.ndim != 3:
        raise InputError(f"the engine segments 3D volumes; this array has shape {data.shape}")
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis {axis} does not exist; use 0, 1 or 2")
    data, replaced = _finite(data, replace_nonfinite)
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputError(f"the image is constant (every voxel is {low:g}): there is nothing to segment")
    return data, replaced


def _check_spacing(spacing) -> None:
    """Voxel sizes in mm: NaN, zero or negative ones would end in a KeyError, a division by zero or bad crops."""
    sizes = tuple(float(s) for s in spacing)
    if len(sizes) != 3 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise InputError(f"voxel spacing {'x'.join(f'{s:g}' for s in sizes)} must be three positive sizes in mm; "
                         f"check the image header's voxel sizes (pixdim)")


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
