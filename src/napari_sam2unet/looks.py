"""The crops a prompted model sees a boxed slice in, whose probabilities the slice averages."""

from __future__ import annotations

from dataclasses import replace

from .models import InputSpec
from .preprocess import crop_for_box
from .slice_tasks import SliceTask

# A prompted model also sees each boxed slice (a box drawn, propagated or corrected in its box) in
# a wider crop, this margin around the box instead of the card's, and the slice's probability is
# the mean of the two looks: more of the surroundings tells the structure from its neighbours.
# Chosen on 81 validation structures (docs/performance.md): tight boxes / propagated / box + 3
# corrective rounds 0.660 / 0.539 / 0.748 with the card's crop alone; a second look at margin 0.3
# 0.670 / 0.547 / 0.756; at 0.4 0.675 / 0.539 / 0.758; at 0.6 0.677 / 0.511 (propagation drifts).
BOX_CONTEXT_MARGIN = 0.3


def box_looks(task: SliceTask, slice_spacing: tuple[float, float], spec: InputSpec,
              margin: float | None) -> list[SliceTask]:
    """The task and, for a boxed slice when a margin is given, the same box and prompts in a crop
    with that margin; a click's candidate crops and tasks without a box keep one look."""
    if margin is None or task.clip is None or task.choose or task.fused:
        return [task]
    wider = crop_for_box(task.clip, slice_spacing, spec.crop, margin)
    return [task] if wider.key() == task.crop.key() else [task, replace(task, crop=wider)]
