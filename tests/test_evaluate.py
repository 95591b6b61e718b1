"""`sam2unet eval` and the training data checks: real NIfTI files, a real ONNX model."""

import json
import os

import numpy as np
import pytest
from conftest import sphere_volume, write_nifti

from napari_sam2unet.cli import main
from napari_sam2unet.errors import InputError
from napari_sam2unet.honoured_clicks import otsu_split
from napari_sam2unet.models import load_card
from napari_sam2unet.training.evaluate import dice, make_cases, otsu_in_box
from napari_sam2unet.training.sources import check_pair


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 500), rng.normal(50, 2, 500)])
    assert 15 < otsu_split(values, bins=256)[0] < 45


@pytest.mark.parametrize("polarity", [1, -1])
def test_otsu_in_box_keeps_the_structure_under_the_centre(polarity):
    data, truth = sphere_volume(shape=(40, 40, 1), centre=(20, 20, 0), radius=8)
    image = polarity * data[:, :, 0]
    # a second bright blob inside the box but away from the centre must not be kept
    image[2:5, 2:5] = image[20, 20]
    mask = otsu_in_box(image, (1.0, 1.0, 33.0, 33.0))
    assert dice(mask, truth[:, :, 0]) > 0.95
    assert not mask[2:5, 2:5].any()


def test_cases_get_one_box_per_touched_slice_enlarged_by_ten_percent():
    labels = np.zeros((30, 30, 6), np.int32)
    labels[10:20, 5:25, 1:4] = 3  # 600 voxels
    labels[0:2, 0:2, 0] = 7  # 4 voxels: below the minimum, not a case
    (case,) = make_cases("scan", labels, axis=2, seed=0, min_voxels=50)
    assert case.label == 3 and case.voxels == 600
    assert [b.slice for b in case.boxes["tight"]] == [1, 2, 3]
    box = case.boxes["tight"][0]
    assert box.rect == pytest.approx((9.5, 4.0, 20.5, 26.0))
    assert case.boxes["propagated"] == [box]  # one box, on the largest slice (the first of equals)
    # first, middle and last slice, for the engine to interpolate between
    assert case.boxes["interpolated"] == [case.boxes["tight"][i] for i in (0, 1, 2)]
    jittered = case.boxes["jittered"][0]
    assert jittered.rect != box.rect and jittered.i0 <= 10.5 and jittered.i1 >= 19.5


def test_eval_command_scores_models_and_baseline_on_the_same_boxes(tmp_path, brightness_card, capsys):
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_labels.nii.gz", truth.astype(np.uint8) * 2)
    report_path = tmp_path / "report.json"
    code = main(["eval", "--model", str(brightness_card.file), "--scan", f"{image}:{labels}",
                 "--json", str(report_path), "--threads", "1"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["cases"] == [{"scan": "ball.nii.gz", "label": 2, "voxels": int(truth.sum())}]
    assert set(report["methods"]) == {"otsu-in-box", "brightness"}
    # a bright ball in a box: both the model and Otsu find it
    assert report["summary"]["brightness"]["tight"]["mean"] > 0.9
    assert report["summary"]["otsu-in-box"]["tight"]["mean"] > 0.9
    assert "| brightness |" in capsys.readouterr().out


def test_eval_can_record_its_summary_in_the_model_card(tmp_path, brightness_card):
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_labels.nii.gz", truth.astype(np.uint8))
    sha = brightness_card.sha256
    assert main(["eval", "--model", str(brightness_card.file), "--scan", f"{image}:{labels}", "--update-card"]) == 0
    card = load_card(brightness_card.card_path)
    metrics = card.raw["metrics"]["held_out_test"]
    assert metrics["scans"] == ["ball.nii.gz"] and metrics["cases"] == 1
    assert list(metrics["mean_dice"]) == ["brightness", "otsu-in-box"]
    assert metrics["mean_dice"]["brightness"]["tight"]["mean"] > 0.9
    assert card.sha256 == sha  # the model file is untouched


def test_eval_refuses_a_label_map_on_another_grid(tmp_path, brightness_card):
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "small.nii.gz", truth[:20].astype(np.uint8))
    assert main(["eval", "--model", str(brightness_card.file), "--scan", f"{image}:{labels}"]) == 2


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "no label map"),
        (np.zeros((4, 4, 3), np.int16), "same voxel grid"),
        (np.zeros((4, 4, 4), np.int16), "empty"),
        (np.full((4, 4, 4), 0.5, np.float32), "fractional"),
    ],
)
def test_bad_training_pairs_stop_with_a_clear_message(labels, message):
    with pytest.raises(InputError, match=message):
        check_pair(np.zeros((4, 4, 4), np.float32), labels, "case")


def test_eval_outputs_that_cannot_be_written_are_refused_before_the_evaluation(tmp_path, brightness_card, capsys):
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_labels.nii.gz", truth.astype(np.uint8))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "gone" / "r.json")
    for option, target, says in (("--json", "folder", "is a folder"), ("--markdown", "file/r.md", "is a file"),
                                 ("--json", "dangling.json", "link to nothing")):
        code = main(["eval", "--model", str(brightness_card.file), "--scan", f"{image}:{labels}",
                     option, str(tmp_path / target)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out  # no table: the evaluation did not run
        assert option in err and says in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "mine" and not list((tmp_path / "folder").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; test_unprivileged.py runs this as nobody")
def test_eval_json_into_a_read_only_folder_is_refused_before_the_evaluation(tmp_path, brightness_card, capsys):
    data, truth = sphere_volume()
    image = write_nifti(tmp_path / "ball.nii.gz", data)
    labels = write_nifti(tmp_path / "ball_labels.nii.gz", truth.astype(np.uint8))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code = main(["eval", "--model", str(brightness_card.file), "--scan", f"{image}:{labels}",
                 "--json", str(locked / "report.json")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "permission denied" in err and err.count("\n") == 1, err
