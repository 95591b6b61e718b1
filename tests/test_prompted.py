"""Models that see prompts (card `channels: prompted`): drawing prompts, the engine's use of
them (corrections, propagation, interpolation, clicks alone), and the training crops."""

import json

import numpy as np
import pytest
from conftest import sphere_volume
from scipy import ndimage
from test_engine import CountingBackend, sphere_engine

from napari_sam2unet.engine import Engine
from napari_sam2unet.models import InputSpec
from napari_sam2unet.preprocess import Crop
from napari_sam2unet.prompt_maps import click_map, prior_in_crop, read_clicks, to_crop_coords, write_prompts
from napari_sam2unet.prompts import Box, Point, Prompts
from napari_sam2unet.training import prompt_sim

SPEC = InputSpec(channels="prompted")


@pytest.fixture
def engine(prompted_card):
    return sphere_engine(prompted_card)


def test_clicks_are_drawn_where_they_are_and_read_back():
    crop = Crop(10.0, 20.0, 30.0, 40.0)
    u, v = to_crop_coords(15.5, 35.5, crop, (100, 100))
    assert (u, v) == pytest.approx((27.0, 77.0))
    signed = click_map([(u, v, True), (80.0, 10.0, False)], (100, 100))
    assert np.unravel_index(np.argmax(signed), signed.shape) == (27, 77)
    assert np.unravel_index(np.argmin(signed), signed.shape) == (80, 10)
    assert signed.max() == pytest.approx(1.0, abs=0.01) and signed.min() == pytest.approx(-1.0, abs=0.01)
    assert abs(signed[0, 50]) < 1e-3  # far from both clicks: no click
    x = np.zeros((3, 100, 100), np.float32)
    write_prompts(x, np.ones((100, 100), np.float32), signed, SPEC)
    assert np.allclose(read_clicks(x, SPEC), signed, atol=1e-5)
    assert np.allclose(x[1] * SPEC.std[1] + SPEC.mean[1], 1.0, atol=1e-5)


def test_prior_lands_on_the_same_pixels_of_the_crop():
    prior = np.zeros((40, 40), bool)
    prior[10:20, 10:20] = True
    crop = Crop(10.0, 10.0, 30.0, 30.0)
    drawn = prior_in_crop(prior, crop, (40, 40)) > 0.5
    assert drawn[:20, :20].all() and not drawn[22:, :].any() and not drawn[:, 22:].any()


def test_a_positive_click_adds_where_it_is_and_nowhere_else(engine):
    box = Box(6, 12, 8, 37, 33)
    result = engine.segment(Prompts([box]))
    before = result.slices[6].mask.copy()
    assert before[24, 20] and not before[24, 30]
    click = Point(6, 24.5, 30.5)
    calls = engine.backend.calls
    engine.correct(result, 6, Prompts([box], [click]))
    after = result.slices[6].mask
    assert engine.backend.calls == calls + 1  # one model call per correction (both looks in one batch)
    assert after[24, 30]
    changed = np.argwhere(after != before)
    assert len(changed) and np.all(np.hypot(changed[:, 0] - 24, changed[:, 1] - 30) <= 3)


def test_a_boxed_slice_is_seen_in_the_cards_crop_and_a_wider_one_in_one_model_call(engine, brightness_card):
    box = Box(6, 12, 8, 37, 33)
    calls, seen = engine.backend.calls, engine.backend.slices_seen
    result = engine.segment(Prompts([box]))
    assert (engine.backend.calls, engine.backend.slices_seen) == (calls + 1, seen + 2)
    card_crop, wider = (look.crop for look in engine.looks(result.slices[6].tasks[0]))
    assert wider.r0 < card_crop.r0 and wider.c0 < card_crop.c0 and wider.r1 > card_crop.r1 and wider.c1 > card_crop.c1
    mask, truth = result.slices[6].mask, engine.truth[:, :, 6]
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    plain = sphere_engine(brightness_card)
    task = plain.segment(Prompts([box])).slices[6].tasks[0]
    assert plain.looks(task) == [task]  # a model that does not see prompts: one look, as before


def test_a_negative_click_trims_where_it_is(engine):
    box = Box(6, 12, 8, 37, 33)
    result = engine.segment(Prompts([box]))
    before = result.slices[6].mask.copy()
    engine.correct(result, 6, Prompts([box], [Point(6, 24.5, 28.5, positive=False)]))  # on the edge
    after = result.slices[6].mask
    assert before[24, 28] and not after[24, 28]
    changed = np.argwhere(after != before)
    assert len(changed) and np.all(np.hypot(changed[:, 0] - 24, changed[:, 1] - 28) <= 3)
    assert after[24, 16]  # the rest of the object stays


def test_corrections_accumulate_and_refine_stays_in_the_cache(engine):
    box = Box(6, 12, 8, 37, 33)
    prompts = Prompts([box], [Point(6, 24.5, 30.5)])
    result = engine.segment(Prompts([box]))
    engine.correct(result, 6, prompts)
    prompts.points.append(Point(6, 24.5, 12.5, positive=False))  # on the far edge
    engine.correct(result, 6, prompts)
    mask = result.slices[6].mask
    assert mask[24, 30] and not mask[24, 12]  # the second look kept the first click's gain
    task = result.slices[6].tasks[0]
    assert len(task.clicks) == 2 and task.prior is not None
    calls = engine.backend.slices_seen
    engine.refine(result, prompts, threshold=0.9)
    assert engine.backend.slices_seen == calls


def test_points_with_a_box_are_a_box_then_a_correction(engine):
    box = Box(6, 12, 8, 37, 33)
    result = engine.segment(Prompts([box], [Point(6, 24.5, 30.5)]))
    assert result.slices[6].mask[24, 30]
    assert result.slices[6].tasks[0].prior is not None


def test_a_click_alone_segments_the_object_under_it(engine):
    result = engine.segment(Prompts(points=[Point(6, 24.5, 20.5)]))
    truth = engine.truth[:, :, 6]
    mask = result.slices[6].mask
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9


def test_a_click_mask_averages_the_chosen_crop_with_the_sizes_beside_it():
    from napari_sam2unet.clicks import fused_mask
    from napari_sam2unet.slice_tasks import SliceTask

    # The structure is rows and columns 10-29. The small crop (rows 5-14) sees only its top and
    # leaks above it (rows 5-9); the large crop sees it whole.
    small = SliceTask(0, Crop(5.0, 15.0, 15.0, 25.0), (5.0, 15.0, 15.0, 25.0), fused=True)
    large = SliceTask(0, Crop(0.0, 0.0, 40.0, 40.0), (0.0, 0.0, 40.0, 40.0), fused=True)
    seen = {small: np.zeros((40, 40), np.float32), large: np.zeros((40, 40), np.float32)}
    seen[small][5:15, 15:25] = 0.9
    seen[large][10:30, 10:30] = 0.8
    mask = fused_mask([small, large], seen.__getitem__, 0.5, [(20.0, 20.0)], [])
    expected = np.zeros((40, 40), bool)
    expected[10:30, 10:30] = True  # where only the large crop looks, it decides; the leak is outvoted
    assert (mask == expected).all()


def test_a_click_alone_starts_its_second_look_from_the_averaged_crops(engine, brightness_card):
    from napari_sam2unet.slice_tasks import Prior

    points = [Point(6, 24.5, 20.5)]
    candidates = engine.click_tasks(6, points)
    engine.run_tasks(candidates)
    first = engine.slice_result(6, candidates, Prompts(points=points), 0.5)
    assert len(first.tasks) > 1 and all(t.fused for t in first.tasks)
    assert first.tasks[0].crop.r1 - first.tasks[0].crop.r0 < first.tasks[-1].crop.r1 - first.tasks[-1].crop.r0
    calls = engine.backend.slices_seen
    assert (engine.postprocess(6, first.tasks, Prompts(points=points), 0.5) == first.mask).all()
    assert engine.backend.slices_seen == calls  # re-thresholding the average needs no model call
    result = engine.segment(Prompts(points=points))
    assert result.slices[6].tasks[0].prior.digest == Prior.of(first.mask).digest
    # A model that does not see prompts keeps its one chosen crop, as before.
    plain = sphere_engine(brightness_card)
    candidates = plain.click_tasks(6, points)
    plain.run_tasks(candidates)
    kept = plain.slice_result(6, candidates, Prompts(points=points), 0.5).tasks
    assert len(kept) == 1 and not kept[0].fused


def test_propagation_gives_each_slice_its_neighbours_mask_and_stops_at_the_end(engine):
    result = engine.segment(Prompts([Box(6, 12, 8, 37, 33)]), scope="propagate")
    assert set(result.slices) <= set(np.flatnonzero(engine.truth.any((0, 1))))
    for k in result.slices:
        if k == 6:
            continue
        neighbour = k - 1 if k > 6 else k + 1
        assert np.array_equal(result.slices[k].tasks[0].prior.mask, result.slices[neighbour].mask)
    assert all("edge" in why or "vanished" in why for why in result.stops.values())


def test_interpolation_can_walk_in_from_both_boxes(engine):
    engine.chain_between = True  # off by default: boxes alone scored higher on validation
    boxes = [Box(2, 12, 8, 37, 33), Box(10, 12, 8, 37, 33)]
    result = engine.segment(Prompts(boxes), scope="between")
    assert sorted(result.slices) == list(range(2, 11))
    assert result.slices[3].tasks[0].prior.mask is not None
    assert np.array_equal(result.slices[3].tasks[0].prior.mask, result.slices[2].mask)
    assert np.array_equal(result.slices[9].tasks[0].prior.mask, result.slices[10].mask)


def test_the_card_decides_whether_prompts_reach_the_model(engine, brightness_card):
    plain = sphere_engine(brightness_card)
    mask = np.zeros((48, 40), bool)
    mask[20:28, 16:24] = True
    for which, expect_prompts in ((engine, True), (plain, False)):
        task = which.correction_task(6, mask, [Point(6, 24.5, 30.5)])
        x = which._model_input(task)
        if expect_prompts:
            assert not np.allclose(x[1], x[0]) and read_clicks(x, which.card.input).max() > 0.9
        else:
            assert np.allclose(x[1] * 0.224 + 0.456, x[0] * 0.229 + 0.485, atol=1e-4)  # the image, thrice


def test_error_clicks_go_to_the_middle_of_the_largest_error():
    target = np.zeros((40, 40), bool)
    target[5:35, 5:35] = True
    prediction = target.copy()
    prediction[5:35, 5:15] = False  # a 30x10 miss
    prediction[36:39, 36:39] = True  # a small leak
    r, c, positive = prompt_sim.error_click(prediction, target)
    assert positive and 8 <= c <= 11 and 9 <= r <= 30  # mid-width of the miss, away from its ends
    assert prompt_sim.error_click(target, target) is None
    clicks = prompt_sim.clicks_on_errors(prediction, target, 3)
    assert [c[2] for c in clicks] == [True, False]


def test_training_paints_rings_whose_core_is_not_the_target_and_flaws_them_filled(monkeypatch):
    """A myocardium or a tumour rim is a wall around other tissue: the model must see such rings
    (painted with a core of its own intensity) and the filled-in disc a ring-blind model draws."""
    from napari_sam2unet.training import augment

    def rings(share):
        monkeypatch.setattr(augment, "RING_SHARE", share)
        rng = np.random.default_rng(0)
        found, contrasts = 0, []
        for _ in range(150):
            img = np.full((96, 96), 300.0, np.float32)
            out, mask = augment.add_lesion(rng, img, (1.0, 1.0), 400.0)
            hole = np.zeros((96, 96), bool) if mask is None else ndimage.binary_fill_holes(mask) & ~mask
            core = ndimage.binary_erosion(hole, iterations=2)
            if core.sum() < 4:
                continue
            found += 1
            wall = ndimage.binary_erosion(mask) & ~ndimage.binary_dilation(hole, iterations=2)
            if wall.any():
                contrasts.append(abs(np.median(out[core]) - np.median(out[wall])))
        return found, contrasts

    without, _ = rings(0.0)
    found, contrasts = rings(1.0)
    assert without <= 5 and found >= 40  # large lesions become rings; few are hollow by chance
    assert np.median(contrasts) > 0.15 * 400.0  # the image shows where the wall ends inside
    ring = np.zeros((60, 60), bool)
    ring[10:50, 10:50] = True
    ring[20:40, 20:40] = False
    flawed = [prompt_sim.corrupt(np.random.default_rng(s), ring) for s in range(40)]
    filled = ndimage.binary_fill_holes(ring)
    assert sum(np.array_equal(f, filled) for f in flawed) >= 10
    # The click that corrects a filled ring is a negative one in its hole.
    r, c, positive = prompt_sim.error_click(filled, ring)
    assert not positive and ring[int(r), int(c)] == 0 and filled[int(r), int(c)]


def test_wrong_object_training_priors_sit_on_a_neighbouring_structure_with_clicks_that_say_so():
    """--wrong-object-share: a prior on the structure beside the target (the blood pool for the
    myocardium), a negative click in it or a positive one in the target; a ring's hole alike."""
    from napari_sam2unet.training import data

    labels = np.zeros((80, 80), np.int32)
    labels[10:40, 10:70] = 3  # the target
    labels[40:70, 10:70] = 5  # touching it
    labels[74:78, 74:78] = 7  # far from it
    rng = np.random.default_rng(0)
    beside = [data.structure_beside(rng, labels, 3) for _ in range(10)]
    assert all(np.array_equal(b, labels == 5) for b in beside)
    assert data.structure_beside(rng, labels, 7) is None  # nothing near

    target = labels == 3
    for seed in range(20):
        prior, clicks = data.wrong_object_prior(np.random.default_rng(seed), target, labels == 5)
        assert prior[labels == 5].all() and not prior[target & ~ndimage.binary_erosion(target)].any()
        assert 1 <= len(clicks) <= 3
        r, c, positive = clicks[0]
        assert (target if positive else labels == 5)[int(r), int(c)]

    ring = np.zeros((60, 60), bool)
    ring[10:50, 10:50] = True
    ring[20:40, 20:40] = False
    hole = ndimage.binary_fill_holes(ring) & ~ring
    flawed = [prompt_sim.corrupt(np.random.default_rng(s), ring, hole_share=1.0) for s in range(40)]
    assert sum(np.array_equal(f, hole) for f in flawed) >= 10
    assert not any(np.array_equal(prompt_sim.corrupt(np.random.default_rng(s), ring), hole) for s in range(40))


def test_training_crops_carry_prompts_drawn_like_the_engines(shared_data, monkeypatch):
    from napari_sam2unet.training import data
    from napari_sam2unet.training.datasets import default_manifest, find_cases
    from napari_sam2unet.training.sources import load_sources

    monkeypatch.setenv("SAM2UNET_DATA", str(shared_data))
    cases = [c for c in find_cases([default_manifest()], "train") if c.name == "totalseg_ct_sm"]
    sources = load_sources(cases)
    rng = np.random.default_rng(3)
    modes = {}
    while sum(modes.values()) < 40:
        out = data.sample(rng, sources, SPEC, (96, 96))
        if out is None:
            continue
        x, y, kind = out
        mode = kind.split("/")[1]
        modes[mode] = modes.get(mode, 0) + 1
        prior = x[1] * SPEC.std[1] + SPEC.mean[1]
        clicks = read_clicks(x, SPEC)
        if mode == "box":
            assert np.allclose(prior, 0, atol=1e-5) and np.allclose(clicks, 0, atol=1e-5)
        if mode == "propagate" and y.any():
            assert (prior > 0.5).sum() > 0
        if mode == "clicks":
            peak = np.unravel_index(np.argmax(clicks), clicks.shape)
            assert clicks.max() > 0.9 and y[peak]  # the first click is on the structure
    assert set(modes) == set(data.PROMPT_MODES)


@pytest.mark.parametrize("extent", [(0.7, 4.0), (0.3, 6.0)])
def test_a_clicks_training_crop_spans_the_set_share_of_the_structure_and_holds_the_click(monkeypatch, extent):
    from napari_sam2unet.training import data

    monkeypatch.setattr(data, "CLICK_CROP_EXTENT", extent)
    rng = np.random.default_rng(0)
    mask = np.zeros((200, 200), dtype=bool)
    mask[60:100, 70:130] = True  # 40 x 60 pixels of 0.5 x 1 mm: a 60 mm extent
    sides = []
    for _ in range(200):
        click = prompt_sim.interior_click(rng, mask)
        crop = data._click_crop(rng, mask, click, (0.5, 1.0))
        sides.append((crop.c1 - crop.c0) * 1.0)
        assert (crop.r1 - crop.r0) * 0.5 == pytest.approx(sides[-1])  # square in mm
        assert crop.r0 <= click[0] + 0.5 <= crop.r1 and crop.c0 <= click[1] + 0.5 <= crop.c1
    low, high = extent[0] * 60, extent[1] * 60
    assert low - 1e-6 <= min(sides) < low * 1.5 and high / 1.5 < max(sides) <= high + 1e-6


def test_the_click_crop_extent_flag_reaches_the_crop_workers_and_rejects_bad_sizes(monkeypatch, tmp_path):
    from napari_sam2unet.cli import build_parser
    from napari_sam2unet.errors import InputError
    from napari_sam2unet.training import data
    from napari_sam2unet.training.train_settings import TrainSettings

    args = build_parser().parse_args(["train", "--out-dir", str(tmp_path), "--click-crop-extent", "0.3", "6"])
    settings = TrainSettings.from_args(args)
    assert tuple(settings.click_crop_extent) == (0.3, 6.0)
    assert TrainSettings().click_crop_extent == data.CLICK_CROP_EXTENT  # the bundled recipe by default

    # A crop worker runs in a process of its own: it takes the run's extent before drawing a crop.
    class Stop(Exception):
        pass

    class OneBatch:
        def put(self, item):
            raise Stop

    monkeypatch.setattr(data, "CLICK_CROP_EXTENT", data.CLICK_CROP_EXTENT)  # restored after the test
    monkeypatch.setattr(data, "WRONG_OBJECT_SHARE", data.WRONG_OBJECT_SHARE)
    monkeypatch.setattr(data, "load_sources", lambda cases: [])
    monkeypatch.setattr(data, "batch", lambda *a: None)
    with pytest.raises(Stop):
        data._producer(OneBatch(), 0, {}, (32, 32), 1, [], (0.3, 6.0), 0.6)
    assert data.CLICK_CROP_EXTENT == (0.3, 6.0) and data.WRONG_OBJECT_SHARE == 0.6

    for bad in ((6.0, 0.3), (0.0, 4.0), (0.5, 50.0), (float("nan"), 4.0)):
        with pytest.raises(InputError, match="--click-crop-extent"):
            TrainSettings(out_dir=str(tmp_path), click_crop_extent=bad).check()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="--wrong-object-share"):
            TrainSettings(out_dir=str(tmp_path), wrong_object_share=bad).check()


def test_training_rounds_click_on_the_models_own_errors():
    torch = pytest.importorskip("torch")
    from napari_sam2unet.training.train import click_rounds

    class Nothing(torch.nn.Module):  # segments nothing: every target pixel is a miss
        def forward(self, x):
            return (torch.full((x.shape[0], 1, *x.shape[2:]), -5.0),)

    y = np.zeros((2, 1, 64, 64), np.float32)
    y[0, 0, 10:30, 10:30] = 1
    y[1, 0, 40:60, 30:50] = 1
    x = np.zeros((2, 3, 64, 64), np.float32)
    for b in range(2):
        write_prompts(x[b], np.ones((64, 64), np.float32), np.zeros((64, 64), np.float32), SPEC)
    out = click_rounds(torch, Nothing(), torch.from_numpy(x), torch.from_numpy(y), SPEC,
                       np.random.default_rng(0), rounds=1, share=1.0).numpy()
    clicks = read_clicks(out, SPEC)
    for b, (r, c) in enumerate(((19.5, 19.5), (49.5, 39.5))):
        peak = np.unravel_index(np.argmax(clicks[b]), (64, 64))
        assert abs(peak[0] - r) <= 1 and abs(peak[1] - c) <= 1
    assert np.allclose(out[:, 1] * SPEC.std[1] + SPEC.mean[1], 0, atol=1e-5)  # the prior: its empty mask


def test_cli_corrects_a_saved_label_map_where_the_user_clicks(tmp_path, prompted_card, brightness_card, capsys):
    import nibabel as nib
    from conftest import write_nifti

    from napari_sam2unet.cli import main

    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    prior = truth.astype(np.uint8) * 3
    prior[:, :, 6][24:, :] = 0  # the lower half of slice 6 is missing
    saved = write_nifti(tmp_path / "ball_seg.nii.gz", prior)
    out = tmp_path / "corrected.nii.gz"
    code = main(["segment", str(image), "--prior", str(saved), "--point", "6:29.5,20.5", "--out", str(out),
                 "--model", str(prompted_card.card_path), "--label", "3", "--quiet"])
    assert code == 0
    corrected = np.asarray(nib.load(str(out)).dataobj)
    untouched = [k for k in range(12) if k != 6]
    assert np.array_equal(corrected[:, :, untouched], prior[:, :, untouched])
    assert corrected[29, 20, 6] == 3  # the click added the part under it
    assert corrected[:, :, 6].sum() > prior[:, :, 6].sum()
    for refused, why in (([], "needs at least one --point"),
                         (["--point", "6:29.5,20.5", "--model", str(brightness_card.card_path)], "sees prompts")):
        code = main(["segment", str(image), "--prior", str(saved), "--out", str(tmp_path / "x.nii.gz"), *refused,
                     *(["--model", str(prompted_card.card_path)] if "--model" not in refused else [])])
        assert code != 0 and why in capsys.readouterr().err
        assert not (tmp_path / "x.nii.gz").exists()


def test_cli_a_negative_click_in_a_pool_takes_the_pool_out_and_keeps_the_wall_the_model_dropped(tmp_path,
                                                                                                 prompted_card):
    """`segment --prior --point K:I,J:neg` on a ring: the test model keeps the bright pool and drops
    the dim wall; the click said the pool was wrong, so the corrected slice is the wall."""
    import nibabel as nib
    from conftest import write_nifti

    from napari_sam2unet.cli import main

    rows, cols = np.indices((48, 40))
    radius = np.hypot(rows - 24, cols - 20)
    plane = np.where(radius < 6, 900.0, np.where(radius < 13, 300.0, 100.0))
    data = np.repeat(plane[:, :, None], 12, axis=2) + np.random.default_rng(0).normal(0, 5, (48, 40, 12))
    image = write_nifti(tmp_path / "ring.nii.gz", data.astype(np.float32))
    prior = np.zeros((48, 40, 12), np.uint8)
    prior[:, :, 6] = radius < 13  # the user's mask: pool and wall
    saved = write_nifti(tmp_path / "ring_seg.nii.gz", prior)
    out = tmp_path / "corrected.nii.gz"
    code = main(["segment", str(image), "--prior", str(saved), "--point", "6:24.5,20.5:neg", "--out", str(out),
                 "--model", str(prompted_card.card_path), "--quiet"])
    assert code == 0
    corrected = np.asarray(nib.load(str(out)).dataobj)[:, :, 6] > 0
    assert not corrected[radius < 5].any()  # the pool is out
    assert corrected[(radius > 8) & (radius < 12)].all()  # the wall stays
    assert not corrected[radius > 14].any()


def test_eval_scores_the_click_protocols_through_the_engine(tmp_path, prompted_card):
    from conftest import write_nifti

    from napari_sam2unet.training.evaluate import BOX_PROTOCOLS, PROTOCOLS, evaluate

    data, truth = sphere_volume()
    reference = truth.copy()
    reference[22:27, 28:31, 4:9] = True  # a dim part of the structure: only clicks can add it
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_seg.nii.gz", reference.astype(np.uint8))
    report = evaluate([(image, labels)], [str(prompted_card.card_path)])
    scores = report["summary"][prompted_card.name]
    assert set(scores) == set(PROTOCOLS)
    assert set(report["summary"]["otsu-in-box"]) == set(BOX_PROTOCOLS)  # Otsu has no clicks
    assert scores["corrected"]["mean"] > scores["tight"]["mean"]  # the clicks added the dim part
    assert scores["clicks"]["mean"] > 0.8


def test_eval_of_click_protocols_alone_writes_its_tables(tmp_path, prompted_card):
    """`sam2unet eval --protocol corrected` ran to the end and then failed writing its tables:
    the Otsu baseline has no click protocol to put beside the model's."""
    from conftest import write_nifti

    from napari_sam2unet.cli import main

    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_seg.nii.gz", truth.astype(np.uint8))
    out = tmp_path / "report.json"
    code = main(["eval", "--scan", f"{image}:{labels}", "--model", str(prompted_card.card_path),
                 "--protocol", "corrected", "--json", str(out), "--markdown", str(tmp_path / "report.md")])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == [prompted_card.name]
    assert report["summary"][prompted_card.name]["corrected"]["mean"] > 0.8
    assert "corrected" in (tmp_path / "report.md").read_text()


def test_fine_tuning_crops_of_a_prompted_model_carry_prompts_and_its_validation_none():
    from napari_sam2unet.preprocess import plan_views
    from napari_sam2unet.training.finetune import Item, training_batch, validation_crops

    data, truth = sphere_volume()
    views = plan_views(data, "mr", "prompted")
    items = [Item(data[:, :, k], truth[:, :, k], (1.0, 1.0), views) for k in (4, 6, 8)]
    x, y = training_batch(np.random.default_rng(0), items, SPEC, (64, 64), 24)
    priors = x[:, 1] * SPEC.std[1] + SPEC.mean[1]
    clicks = read_clicks(x, SPEC)
    assert (priors.max((1, 2)) > 0.5).sum() >= 6  # many crops have a prior ...
    assert (np.abs(clicks).max((1, 2)) > 0.5).sum() >= 3  # ... some have clicks
    assert (priors.max((1, 2)) < 1e-4).sum() >= 3  # ... and some a box alone
    vx, _ = validation_crops(items, SPEC, (64, 64))
    assert np.allclose(vx[:, 1] * SPEC.std[1] + SPEC.mean[1], 0, atol=1e-5)  # scored as a box alone
    assert np.allclose(read_clicks(vx, SPEC), 0, atol=1e-5)


def test_npu_calibration_inputs_carry_prompts_as_the_engine_draws_them(tmp_path, prompted_card):
    from conftest import write_nifti

    from napari_sam2unet.backends.onnx import OnnxBackend
    from napari_sam2unet.convert.qnn_slices import Scan, engine_inputs

    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_seg.nii.gz", truth.astype(np.uint8))
    inputs = engine_inputs(OnnxBackend(prompted_card, threads=1), [Scan(image, labels)], 9)
    priors = (inputs[:, 1] * SPEC.std[1] + SPEC.mean[1]).max((1, 2))
    clicks = np.abs(read_clicks(inputs, SPEC)).max((1, 2))
    assert (priors < 1e-4).sum() == 3 and (priors > 0.5).sum() == 6  # a box alone, then a prior
    assert (clicks > 0.5).sum() == 3  # the corrections' clicks


def test_propagation_stops_where_only_the_prior_still_shows_the_structure(prompted_card):
    data, truth = sphere_volume(shape=(48, 40, 14), centre=(24, 20, 2), radius=6.0)  # slices 0-8
    faint = np.zeros_like(truth)
    faint[16:33, 12:29, 7:14] = True  # from the ball's end on: a faint patch a prior alone could carry on
    data = np.where(faint & ~truth, 420.0, data).astype(np.float32)  # 40% of the window
    runs = {}
    for check in (0.5, 0.0):
        engine = Engine(CountingBackend(prompted_card))
        engine.set_volume(data, (1.0, 1.0, 2.0))
        engine.propagate_check = check
        runs[check] = engine.segment(Prompts([Box(2, 16, 12, 33, 29)]), scope="propagate")
    assert max(runs[0.0].slices) == 13  # without the check the prior walks into the faint patch
    assert max(runs[0.5].slices) <= 9 and "image alone" in runs[0.5].stops[1]


def test_cli_refuses_a_prior_it_cannot_use_in_one_line(tmp_path, prompted_card, capsys):
    from conftest import write_nifti

    from napari_sam2unet.cli import main

    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    smaller = write_nifti(tmp_path / "small.nii.gz", truth[:, :, :6].astype(np.uint8))
    moved = np.eye(4)
    moved[0, 3] = 5.0
    shifted = write_nifti(tmp_path / "shifted.nii.gz", truth.astype(np.uint8), moved)
    out = tmp_path / "x.nii.gz"
    model = ["--model", str(prompted_card.card_path)]
    for args, why in (
        (["--prior", str(smaller), "--point", "6:24,20"], "on the image's grid"),
        (["--prior", str(shifted), "--point", "6:24,20"], "not aligned"),
        (["--prior-label", "2", "--point", "6:24,20"], "needs --prior"),
    ):
        assert main(["segment", str(image), "--out", str(out), *model, *args]) != 0
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_init_keeps_the_stems_views_in_channel_0_and_refuses_another_config(tmp_path):
    torch = pytest.importorskip("torch")
    from napari_sam2unet.errors import InputError
    from napari_sam2unet.modeling import build_sam2unet
    from napari_sam2unet.modeling.configs import tiny_test_config
    from napari_sam2unet.training.train import load_initial_weights

    old = build_sam2unet(tiny_test_config())
    best = tmp_path / "best.pt"
    torch.save({"ema": old.state_dict(), "args": {"channels": "multiview"}}, best)
    new = build_sam2unet(tiny_test_config())
    load_initial_weights(torch, new, best, "prompted")
    stem_old, stem_new = old.encoder.patch_embed.proj.weight, new.encoder.patch_embed.proj.weight
    assert torch.allclose(stem_new[:, 0], stem_old.sum(1)) and not stem_new[:, 1:].any()
    other = build_sam2unet(tiny_test_config(embed_dim=24))
    with pytest.raises(InputError, match="another SAM2-UNet config"):
        load_initial_weights(torch, other, best, "prompted")
    best.write_text("not a checkpoint")
    with pytest.raises(InputError, match="--init"):
        load_initial_weights(torch, new, best, "prompted")


def test_a_negative_click_inside_the_object_opens_a_hole_there_whatever_its_size(engine):
    """Post-processing fills specks, but never the hole the user clicked negative in."""
    box = Box(6, 12, 8, 37, 33)
    result = engine.segment(Prompts([box]))
    engine.correct(result, 6, Prompts([box], [Point(6, 24.5, 20.5, positive=False)]))  # the middle
    after = result.slices[6].mask
    assert not after[24, 20]
    assert after[24, 16] and after[24, 24] and after[20, 20] and after[28, 20]  # the rest stays


def test_a_cards_propagation_prior_weighs_the_neighbours_mask_and_only_when_propagating(prompted_card):
    """`propagation_prior: 0.25` draws a propagated slice's prior at a quarter; a correction's
    prior (the user's current mask) stays whole. A weight outside 0..1 is refused in one line."""
    import yaml

    from napari_sam2unet.errors import ModelError
    from napari_sam2unet.models import load_card

    path = prompted_card.card_path
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "propagation_prior": 0.25}))
    engine = sphere_engine(load_card(path))
    spec = engine.card.input
    result = engine.segment(Prompts([Box(6, 12, 8, 37, 33)]), scope="propagate")
    neighbour = result.slices[6].mask
    drawn = {}
    for name, task in (("propagated", engine.propagation_task(7, neighbour)),
                       ("corrected", engine.correction_task(7, neighbour, [Point(7, 24.5, 20.5)]))):
        x = engine._model_input(task)
        drawn[name] = float((x[1] * spec.std[1] + spec.mean[1]).max())
    assert drawn == pytest.approx({"propagated": 0.25, "corrected": 1.0}, abs=0.01)
    assert 7 in result.slices and result.slices[7].mask.any()  # a quarter of a prior still propagates
    for bad in (1.5, -0.1, "strong"):
        path.write_text(yaml.safe_dump({**raw, "propagation_prior": bad}))
        with pytest.raises(ModelError, match="propagation_prior"):
            load_card(path)


def test_npu_calibration_draws_a_propagated_prior_at_the_cards_weight(tmp_path, prompted_card):
    """Calibration inputs carry prompts as the engine draws them, so also the card's propagation_prior."""
    import yaml
    from conftest import write_nifti

    from napari_sam2unet.backends.onnx import OnnxBackend
    from napari_sam2unet.convert.qnn_slices import Scan, engine_inputs
    from napari_sam2unet.models import load_card

    path = prompted_card.card_path
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "propagation_prior": 0.25}))
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_seg.nii.gz", truth.astype(np.uint8))
    inputs = engine_inputs(OnnxBackend(load_card(path), threads=1), [Scan(image, labels)], 9)
    priors = np.round((inputs[:, 1] * SPEC.std[1] + SPEC.mean[1]).max((1, 2)), 2)
    assert sorted(priors) == [0.0] * 3 + [0.25] * 3 + [1.0] * 3  # box alone, propagated, corrected


def test_a_negative_click_in_a_blood_pool_the_model_kept_takes_the_pool_out_and_keeps_the_wall():
    from napari_sam2unet.honoured_clicks import honour_negative_clicks

    rows, cols = np.mgrid[:80, :80]
    radius = np.hypot(rows - 40, cols - 40)
    image = np.where(radius < 12, 200.0, np.where(radius < 20, 60.0, 110.0))  # pool, wall, the rest
    image += np.random.default_rng(0).normal(0, 5, image.shape)
    prior = radius < 20  # the model drew the pool with the wall
    kept = prior & ~(np.hypot(rows - 40, cols - 40) < 2)  # ... and opened only a speck at the click
    crop = Crop(10.0, 10.0, 70.0, 70.0)
    after = honour_negative_clicks(kept, prior, image, [(40.5, 40.5, False)], crop)
    assert not after[radius < 10].any()  # the pool is out
    assert after[(radius > 13) & (radius < 19)].all()  # the wall stays
    assert not after[radius >= 20].any()  # nothing added
    # The model took a bite of the wall out with the pool: the click meant the pool, the wall comes back.
    bitten = kept & ~((rows > 40) & (rows < 58) & (np.abs(cols - 40) < 3))
    after = honour_negative_clicks(bitten, prior, image, [(40.5, 40.5, False)], crop)
    assert not after[radius < 10].any() and after[(radius > 14) & (radius < 19)].all()
    # A positive click, or a negative one the prior already follows, changes nothing.
    assert np.array_equal(honour_negative_clicks(kept, prior, image, [(40.5, 40.5, True)], crop), kept)
    assert np.array_equal(honour_negative_clicks(kept, prior, image, [(5.5, 5.5, False)], crop), kept)
    assert kept[prior].sum() > 0 and kept is not after  # the model's mask itself is left as it was


def test_a_negative_click_in_a_uniform_object_whose_mask_has_a_rim_of_background_stays_a_hole():
    """Every mask takes in some partial-volume pixels at its edge; they split the mask's
    intensities in two, but they are no wall: the click's own hole is all that opens."""
    from napari_sam2unet.honoured_clicks import honour_negative_clicks

    rows, cols = np.mgrid[:80, :80]
    radius = np.hypot(rows - 40, cols - 40)
    image = np.where(radius < 15, 200.0, 40.0) + np.random.default_rng(1).normal(0, 5, (80, 80))
    prior = radius < 17  # the object and a 2-px rim of background
    kept = prior & ~(radius < 3)
    crop = Crop(10.0, 10.0, 70.0, 70.0)
    assert np.array_equal(honour_negative_clicks(kept, prior, image, [(40.5, 40.5, False)], crop), kept)
    # The same object inside a real wall (8 px of the darker class) loses the clicked tissue.
    walled = radius < 23
    after = honour_negative_clicks(walled & ~(radius < 3), walled, image, [(40.5, 40.5, False)], crop)
    assert not after[radius < 13].any() and after[(radius > 16) & (radius < 22)].all()
