"""segment_case: the one way a case is segmented (CLI, batch, eval and the widget's worker)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from conftest import sphere_volume

from napari_sam2unet.backends.pool import BackendPool
from napari_sam2unet.prompts import Box, Prompts
from napari_sam2unet.segment_case import Opened, Segmented, SegmentOptions, iter_segment_volume, segment_volume


def _case(brightness_card):
    data, _ = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    volume = SimpleNamespace(data=data, spacing=(1.0, 1.0, 1.0))  # the widget's job is such a volume
    prompts = Prompts([Box(4, 14, 12, 34, 28), Box(8, 14, 12, 34, 28)], [])
    return volume, prompts, SegmentOptions(scope="between", label=3, model=str(brightness_card.card_path))


def test_without_labels_the_steps_and_result_are_those_of_a_full_run(brightness_card):
    """The widget's worker (labels=False) sees the same events and result, without the label map
    and record it builds itself."""
    volume, prompts, options = _case(brightness_card)
    with BackendPool() as pool:
        labels, full, record = segment_volume(volume, prompts, options, pool, source="ball")
        steps = iter_segment_volume(volume, prompts, options, pool, labels=False)
        events = []
        while True:
            try:
                events.append(next(steps))
            except StopIteration as finished:
                none_labels, result, none_record = finished.value
                break
    assert none_labels is None and none_record is None
    assert isinstance(events[0], Opened)
    progress = [(e.done, e.total) for e in events if isinstance(e, Segmented)]
    assert progress and progress[-1] == (5, 5) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert sorted(result.slices) == record["slices"] == [4, 5, 6, 7, 8]
    np.testing.assert_array_equal(result.mask, full.mask)
    assert labels.max() == 3 and np.array_equal(labels == 3, full.mask)


def test_an_engine_on_the_same_backend_is_reused_with_its_cache(brightness_card):
    volume, prompts, options = _case(brightness_card)
    with BackendPool() as pool:
        first = []
        segment_volume(volume, prompts, options, pool, on_event=first.append)
        engine = first[0].engine
        again = []
        segment_volume(volume, prompts, options, pool, engine=engine, on_event=again.append)
    assert again[0].engine is engine
