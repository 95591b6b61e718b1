"""The engine with real onnxruntime sessions: planning, caching, scopes, cancel, bad input."""

import threading

import numpy as np
import pytest
from conftest import build_brightness_model, sphere_volume, write_test_card

from napari_sam2unet.backends import open_backend
from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.engine import Engine, propagation_stop
from napari_sam2unet.errors import Cancelled, InputError, ModelError
from napari_sam2unet.models import find_model
from napari_sam2unet.prompts import Box, Point, Prompts


class CountingBackend(OnnxBackend):
    """The real ONNX backend, counting the slices it is asked for."""

    def __init__(self, card):
        super().__init__(card, threads=1)
        self.slices_seen = 0
        self.calls = 0

    def predict(self, batch):
        self.slices_seen += batch.shape[0]
        self.calls += 1
        return super().predict(batch)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def sphere_engine(card) -> Engine:
    """An engine on the bright-ball volume with a counting backend; `engine.truth` is the ball."""
    data, truth = sphere_volume()
    engine = Engine(CountingBackend(card))
    engine.set_volume(data, (1.0, 1.0, 2.0))
    engine.truth = truth
    return engine


@pytest.fixture
def engine(brightness_card):
    return sphere_engine(brightness_card)


def test_box_segments_its_slice_only(engine):
    result = engine.segment(Prompts([Box(6, 10, 8, 38, 32)]))
    assert sorted(result.slices) == [6]
    assert dice(result.slices[6].mask, engine.truth[:, :, 6]) > 0.95
    assert not result.mask[:, :, 5].any()


def test_no_prompt_segments_every_slice(engine):
    result = engine.segment()
    assert sorted(result.slices) == list(range(12))
    assert dice(result.mask, engine.truth) > 0.95


def test_boxes_on_two_slices_fill_the_slices_between(engine):
    result = engine.segment(Prompts([Box(3, 12, 10, 36, 30), Box(9, 12, 10, 36, 30)]))
    assert sorted(result.slices) == list(range(3, 10))


def test_propagation_follows_the_structure_until_it_vanishes(engine):
    result = engine.segment(Prompts([Box(6, 10, 8, 38, 32)]), scope="propagate")
    covered = sorted(result.slices)
    truth_slices = [k for k in range(12) if engine.truth[:, :, k].sum() >= 4]
    assert covered == truth_slices
    assert dice(result.mask, engine.truth) > 0.9


def test_threshold_and_point_edits_rerun_only_postprocessing(tmp_path):
    # gain 1: probabilities spread over (0, 1) so a threshold change changes the mask.
    card = write_test_card(build_brightness_model(tmp_path / "soft.onnx", gain=1.0))
    engine = Engine(CountingBackend(card))
    engine.set_volume(sphere_volume()[0])
    result = engine.segment(Prompts([Box(6, 4, 4, 44, 36)]))
    calls = engine.backend.slices_seen
    assert calls == 1
    before = result.slices[6].mask.sum()
    engine.refine(result, Prompts([Box(6, 4, 4, 44, 36)]), threshold=0.9)
    assert result.slices[6].mask.sum() < before
    engine.refine(result, Prompts([Box(6, 4, 4, 44, 36)], [Point(6, 2, 2, positive=False)]), threshold=0.5)
    assert result.slices[6].mask.sum() == before
    again = engine.segment(Prompts([Box(6, 4, 4, 44, 36)], [Point(6, 24, 20)]), threshold=0.3)
    assert again.slices[6].mask.any()
    assert engine.backend.slices_seen == calls  # same crop: served from the cache


def test_progress_is_reported_and_cancel_stops_without_a_result(engine):
    seen = []
    engine.segment(progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (12, 12) and len(seen) >= 3
    engine.clear_cache()
    stop = threading.Event()
    with pytest.raises(Cancelled, match="nothing was written"):
        engine.segment(progress=lambda done, total: stop.set(), cancel=stop.is_set)
    assert engine.backend.slices_seen < 2 * 12


def test_nan_and_constant_volumes_are_refused_with_advice(engine):
    data, _ = sphere_volume()
    data[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite voxels.*--replace-nonfinite"):
        engine.set_volume(data)
    engine.set_volume(data, replace_nonfinite=True)
    assert engine.segment(Prompts([Box(6, 10, 8, 38, 32)])).slices[6].mask.any()
    with pytest.raises(InputError, match="constant"):
        engine.set_volume(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="3D"):
        engine.set_volume(np.zeros((8, 8), np.float32))


def test_slice_axis_choice(engine):
    data, truth = sphere_volume()
    engine.set_volume(data, axis=0)
    result = engine.segment(Prompts([Box(24, 10, 0, 30, 12)]))
    assert dice(result.mask[24], truth[24]) > 0.9


def test_model_with_the_wrong_input_size_is_refused(tmp_path):
    path = build_brightness_model(tmp_path / "big.onnx", size=512)
    card = write_test_card(path)
    with pytest.raises(ModelError, match="takes input Nx3x512x512 but its card says Nx3x352x352"):
        OnnxBackend(card)


def test_corrupt_or_replaced_model_file_is_refused(tmp_path, brightness_card):
    brightness_card.file.write_bytes(b"garbage" * 100)
    with pytest.raises(ModelError, match="corrupt or was replaced"):
        find_model(brightness_card.card_path)
    unchecked = find_model(brightness_card.card_path, verify=False)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxBackend(unchecked)


def test_fixed_batch_models_are_fed_one_slice_at_a_time(tmp_path):
    card = write_test_card(build_brightness_model(tmp_path / "b1.onnx", batch=1), shape=[1, 3, 352, 352])
    backend, why = open_backend(card, "cpu")
    assert backend.max_batch == 1 and "CPU" in why
    data, truth = sphere_volume()
    engine = Engine(backend)
    engine.set_volume(data)
    assert dice(engine.segment().mask, truth) > 0.95


def test_nhwc_models_get_nhwc_input(tmp_path):
    """An NHWC model built so its output is only right if the engine transposes."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 352, 352, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 352, 352, 1])
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "gain"], ["logits"]),
    ]
    init = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [3]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "nhwc", [image], [logits], init),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nhwc.onnx"))
    card = write_test_card(tmp_path / "nhwc.onnx", shape=[-1, 352, 352, 3], layout="nhwc")
    data, truth = sphere_volume()
    engine = Engine(OnnxBackend(card))
    engine.set_volume(data)
    assert dice(engine.segment().mask, truth) > 0.95


def build_ramp_model(path, size=352, ramp=30.0):
    """Brightness logits plus a top-to-bottom ramp (-ramp..ramp): not invariant to flips."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    rows = np.linspace(-ramp, ramp, size, dtype=np.float32)[:, None] * np.ones((1, size), np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "gain"], ["bright"]),
        helper.make_node("Add", ["bright", "ramp"], ["logits"]),
    ]
    init = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(8.0, np.float32), "gain"),
            numpy_helper.from_array(rows[None, None], "ramp")]
    model = helper.make_model(helper.make_graph(nodes, "ramp", [image], [logits], init),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_flip_averaging_cancels_what_is_not_flip_invariant_in_one_call(tmp_path):
    card = write_test_card(build_ramp_model(tmp_path / "ramp.onnx"))
    data, truth = sphere_volume(shape=(48, 40, 12), centre=(12, 20, 6), radius=7)  # near the top
    plain = Engine(CountingBackend(card))
    plain.set_volume(data)
    biased = plain.segment(scope="volume").mask
    card.flip_average = True
    engine = Engine(CountingBackend(card))
    engine.set_volume(data)
    result = engine.segment(scope="volume")
    # the same backend calls, each with every slice and its three flips
    assert engine.backend_calls == plain.backend_calls
    assert engine.backend.slices_seen == 4 * plain.backend.slices_seen
    # the ramp averages out: the mask is the ball, where the plain run also took the bottom rows
    assert dice(result.mask, truth) > 0.9
    assert dice(biased, truth) < 0.5


def test_propagation_stops_when_the_mask_jumps_or_leaks_not_when_it_shrinks():
    previous = np.zeros((40, 40), bool)
    previous[10:30, 10:30] = True  # 400 pixels
    shrunk = np.zeros_like(previous)
    shrunk[14:26, 14:26] = True  # a structure narrowing towards its end: IoU 0.36, inside its neighbour
    assert propagation_stop(shrunk, previous) is None
    leaked = previous.copy()
    leaked[30:40, 10:30] = True  # 1.5x the area in one slice
    assert propagation_stop(leaked, previous).startswith("grew")
    elsewhere = np.zeros_like(previous)
    elsewhere[0:8, 30:40] = True
    assert propagation_stop(elsewhere, previous).startswith("jumped")
    assert propagation_stop(np.zeros_like(previous), previous) == "vanished"


def test_the_next_slices_box_hugs_the_previous_mask_so_a_walk_does_not_creep_outwards():
    """Propagation boxes the next slice on the previous mask's box and one voxel (the card's margin
    comes on top, as for a drawn box): a box grown by a share of its sides let masks grow slice
    after slice (docs/performance.md: 0.557 propagated on validation, 0.547 with 5%)."""
    from napari_sam2unet.propagation import neighbour_box

    previous = np.zeros((64, 64), bool)
    previous[10:20, 20:40] = True  # rows 10-19, columns 20-39
    assert neighbour_box(previous) == (9.0, 19.0, 21.0, 41.0)
    edge = np.zeros((64, 64), bool)
    edge[0:5, 60:64] = True  # at the slice's edge the box stops there
    assert neighbour_box(edge) == (0.0, 59.0, 6.0, 64.0)
    assert neighbour_box(np.zeros((64, 64), bool)) is None


def test_use_volume_keeps_views_and_cache_for_the_same_array_and_settings(engine):
    data = sphere_volume()[0]
    assert engine.use_volume(data, (1.0, 1.0, 2.0))  # first use: set
    engine.segment(Prompts([Box(6, 10, 8, 38, 32)]))
    entries, size = engine.cache_entries, engine.cache_bytes
    assert entries == 1 and size == engine.size[0] * engine.size[1] * 2  # one crop's probabilities, as uint16
    views = engine.views
    assert not engine.use_volume(data, [1, 1, 2], axis=2, window="auto")  # the same settings, spelled otherwise
    assert engine.views is views and engine.cache_entries == entries
    assert engine.use_volume(data, (1.0, 1.0, 2.0), window="mr")  # another window: set again
    assert engine.use_volume(data.copy(), (1.0, 1.0, 2.0), window="mr")  # another array: set again
    assert engine.cache_entries == 0
    with pytest.raises(TypeError):
        engine.use_volume(data, (1.0, 1.0, 2.0), windw="mr")
