"""Which walk a scope takes, which slices it segments and the model calls each needs, and the walk
through planned slices in batches (propagation plans as it goes: see propagation). Drives the
engine through its public calls.
"""

from __future__ import annotations

from collections.abc import Iterator

from .clicks import single_box
from .errors import InputError
from .prompts import Box, Prompts, interpolate_boxes
from .propagation import fill_between, propagate
from .slice_tasks import SegmentationResult, SliceResult, SliceTask, WalkSteps

SCOPES = ("auto", "slices", "between", "propagate", "volume")


def resolve_scope(prompts: Prompts, scope: str) -> str:
    """The scope "auto" stands for with these prompts (others stay), after checking the name."""
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope != "auto":
        return scope
    if not prompts:
        return "volume"
    return "between" if len({b.slice for b in prompts.boxes}) >= 2 else "slices"


def walk(engine, prompts: Prompts, scope: str, threshold: float, result: SegmentationResult) -> WalkSteps:
    """The slices a resolved scope segments, into result: propagation and the chained walk between
    boxes (a prompted engine with chain_between) start from the prompted slices' own walk."""
    if scope == "propagate":
        return propagate(engine, prompts, threshold, result, planned(engine, prompts, "slices", threshold, result))
    if scope == "between" and engine.prompted and engine.chain_between:
        return fill_between(engine, prompts, threshold, result, planned(engine, prompts, "slices", threshold, result))
    return planned(engine, prompts, scope, threshold, result)


def plan(engine, prompts: Prompts, scope: str = "auto") -> dict[int, list[SliceTask]]:
    """The model calls each slice needs (propagation plans as it goes, so it is not here)."""
    scope = resolve_scope(prompts, scope)
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
        slices = set(range(engine.shape[engine.axis]))
    tasks = {}
    for k in sorted(slices):
        if k in boxes:
            tasks[k] = [engine.box_task(b) for b in boxes[k]]
        elif scope != "volume" and any(p.positive for p in prompts.points_on(k)):
            tasks[k] = engine.click_tasks(k, prompts.points_on(k))
        else:
            tasks[k] = [engine.whole_slice_task(k)]
    return tasks


def planned(engine, prompts: Prompts, scope: str, threshold: float, result: SegmentationResult) -> WalkSteps:
    """The scope's planned slices in batches; then a prompted model looks again at slices with
    points: the first mask as the prior, the points as clicks (box + clicks is a box, then
    corrections, as users work)."""
    tasks = plan(engine, prompts, scope)
    order = list(tasks)
    second = [k for k in order if engine.prompted and prompts.points_on(k)]
    total = len(order) + len(second)
    done = 0
    for group in _batched(engine, order, lambda k: tasks[k]):
        for k in group:
            result.slices[k] = engine.slice_result(k, tasks[k], prompts, threshold)
        done += len(group)
        yield done, total
    looks = {k: engine.correction_task(k, result.slices[k].mask, prompts.points_on(k),
                                       keep_clicked=not prompts.boxes_on(k), boxed=single_box(tasks[k]))
             for k in second}
    for group in _batched(engine, second, lambda k: [looks[k]]):
        for k in group:
            result.slices[k] = SliceResult([looks[k]], engine.postprocess(k, [looks[k]], prompts, threshold))
        done += len(group)
        yield done, total


def _batched(engine, slices: list[int], tasks_of) -> Iterator[list[int]]:
    """Slices in groups of the engine's batch size, each group's tasks run (one backend call a
    group); yields each group when its probabilities are cached."""
    size = engine.batch_size
    groups = [slices[start : start + size] for start in range(0, len(slices), size)]
    for index in engine.run_groups([[t for k in group for t in tasks_of(k)] for group in groups]):
        yield groups[index]
