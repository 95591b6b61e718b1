"""The widget's Qt-free parts: undo history of label edits, objects, prompts <-> layers, provenance."""

import numpy as np
import pytest

from napari_sam2unet.history import History, Step, slice_index
from napari_sam2unet.objects import ObjectList, SegObject
from napari_sam2unet.prompts import Box, Point, Prompts
from napari_sam2unet.provenance import prompts_record


class Layer:
    """Anything with .data is a target: the history needs no napari."""

    def __init__(self, shape=(6, 5, 4)):
        self.data = np.zeros(shape, np.uint8)


def run_step(layer, obj, masks, axis=2):
    step = Step("run", layer, axis, obj=obj, state_before=obj.state())
    for k, mask in masks.items():
        step.write(k, obj.new_slice_values(k, layer.data[slice_index(axis, k)], mask, axis))
    step.close()
    step.state_after = obj.state()
    return step


def test_undo_puts_back_only_the_voxels_the_step_changed_and_redo_restores_them():
    layer, history, obj = Layer(), History(), SegObject(label=3)
    mask = np.zeros((6, 5), bool)
    mask[1:4, 1:4] = True
    history.push(run_step(layer, obj, {2: mask}))
    assert (layer.data[:, :, 2] == 3).sum() == 9
    layer.data[5, 4, 0] = 9  # the user paints elsewhere afterwards
    history.undo()
    assert not (layer.data == 3).any() and layer.data[5, 4, 0] == 9
    history.redo()
    assert (layer.data[:, :, 2] == 3).sum() == 9 and layer.data[5, 4, 0] == 9
    assert history.redo() is None  # nothing left to redo


def test_an_object_never_overwrites_another_label_and_shrinks_back_to_free_voxels():
    layer = Layer()
    layer.data[2, 2, 1] = 7  # another structure
    obj = SegObject(label=1)
    full = np.ones((6, 5), bool)
    run_step(layer, obj, {1: full})
    assert layer.data[2, 2, 1] == 7 and (layer.data[:, :, 1] == 1).sum() == 29
    small = np.zeros((6, 5), bool)
    small[0, 0] = True
    run_step(layer, obj, {1: small})  # a threshold raised: the object shrinks
    assert (layer.data[:, :, 1] == 1).sum() == 1 and layer.data[2, 2, 1] == 7


def test_undo_restores_the_objects_prompts_and_result_too():
    layer, history, obj = Layer(), History(), SegObject(label=1)
    obj.prompts = Prompts([Box(2, 0, 0, 3, 3)])
    step = Step("run", layer, 2, obj=obj, state_before=obj.state())
    obj.prompts = Prompts([Box(2, 0, 0, 3, 3), Box(3, 1, 1, 4, 4)])
    step.close()
    step.state_after = obj.state()
    history.push(step)
    history.undo()
    assert obj.prompts.boxes == [Box(2, 0, 0, 3, 3)]
    history.redo()
    assert len(obj.prompts.boxes) == 2


def test_a_run_adds_slices_to_a_result_of_the_same_volume_and_replaces_one_of_another():
    from types import SimpleNamespace

    from napari_sam2unet.engine import SegmentationResult, SliceResult

    def result(key, slices, threshold=0.5):
        return SegmentationResult((6, 5, 4), 2, threshold, {k: SliceResult([], np.ones((6, 5), bool)) for k in slices},
                                  key=key)

    obj = SegObject(label=1)
    obj.add_result(result("volume a", [0, 1]))
    obj.add_result(result("volume a", [3], threshold=0.3))
    assert sorted(obj.result.slices) == [0, 1, 3] and obj.result.threshold == 0.3
    other = result("volume b", [2])
    obj.add_result(other)
    assert obj.result is other and sorted(obj.result.slices) == [2]
    # a point needs the model unless it lies in a crop the model saw on its slice
    crop = SimpleNamespace(r0=1, r1=4, c0=0, c1=3)
    other.slices[2].tasks = [SimpleNamespace(crop=crop)]
    assert obj.covers(Point(2, 1, 2)) and not obj.covers(Point(2, 4, 2))


def test_next_object_takes_the_next_free_label():
    objects = ObjectList()
    first = objects.new(label=1, name="liver")
    assert objects.current is first and first.title == "1: liver"
    second = objects.new(used={0, 1, 5})  # label 5 is already painted in the layer
    assert second.label == 6 and objects.current is second
    objects.select(0)
    assert objects.current is first
    with pytest.raises(IndexError):
        objects.select(4)


def test_the_cli_and_the_widget_record_prompts_alike():
    record = prompts_record(Prompts([Box(4, 1, 2, 3, 5)], [Point(4, 1.5, 2.5, False)]))
    assert record == {"boxes": [{"slice": 4, "i0": 1, "j0": 2, "i1": 3, "j1": 5}],
                      "points": [{"slice": 4, "i": 1.5, "j": 2.5, "positive": False}]}


def test_prompts_go_into_layers_and_come_back_unchanged():
    """napari layers without a viewer: an object's prompts survive the trip (half-voxel shift included)."""
    napari = pytest.importorskip("napari", reason="napari is in the [napari] extra")
    import pandas as pd

    from napari_sam2unet.layer_prompts import layer_prompts, show_prompts

    image = napari.layers.Image(np.zeros((20, 16, 8), np.float32), scale=(0.8, 0.8, 3.0), translate=(5, -3, 10))
    points = napari.layers.Points(ndim=3, scale=image.scale, translate=image.translate,
                                  features={"sign": pd.Categorical([], categories=["positive", "negative"])})
    shapes = napari.layers.Shapes(ndim=3, scale=image.scale, translate=image.translate)
    for axis in (2, 0):
        prompts = Prompts([Box(3, 2.5, 3.5, 10.5, 12.5)], [Point(3, 4.5, 6.5, True), Point(5, 7.5, 2.5, False)])
        show_prompts(prompts, image, points, shapes, axis)
        back = layer_prompts(image, points, shapes, axis)
        assert [p.positive for p in back.points] == [True, False]
        for got, want in zip(back.points, prompts.points):
            assert (got.slice, got.i, got.j) == pytest.approx((want.slice, want.i, want.j))
        assert back.boxes[0].slice == 3 and back.boxes[0].rect == pytest.approx(prompts.boxes[0].rect)
    show_prompts(Prompts(), image, points, shapes, 2)
    assert len(points.data) == 0 and len(shapes.data) == 0
