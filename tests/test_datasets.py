"""Training data from the layouts users have: case folders, MSD / nnU-Net datasets, manifests."""

import json
import os

import numpy as np
import pytest
from conftest import write_nifti

from napari_sam2unet.errors import InputError
from napari_sam2unet.training import sources as tsources
from napari_sam2unet.training.datasets import DATA_ENV, find_cases


def _pair(folder, image_name="image.nii.gz", label_name="label.nii.gz", value=1):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).normal(100, 10, (24, 20, 6)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 4:12, 1:5] = value
    image[labels > 0] += 80
    write_nifti(folder / image_name, image)
    (folder / label_name).parent.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / label_name, labels)
    return folder


def test_a_folder_of_case_folders_with_optional_case_json(tmp_path):
    _pair(tmp_path / "a")
    _pair(tmp_path / "b", value=3)
    (tmp_path / "b" / "case.json").write_text(json.dumps(
        {"patient": "P7", "modality": "MR", "labels": {"3": "lesion"}, "licence": "CC-BY-4.0"}))
    a, b = find_cases([tmp_path])
    assert (a.name, a.patient, a.split) == ("a", "a", "train")
    assert (b.patient, b.modality, b.label_names, b.licence) == ("P7", "mr", {3: "lesion"}, "CC-BY-4.0")
    source = tsources.load_case(b)
    assert source.layers[0].ids == (3,) and source.slices  # the structure is found on its slices


def test_a_decathlon_dataset_json_and_an_nnunet_v2_folder(tmp_path):
    msd = tmp_path / "Task09_Spleen"
    _pair(msd / "imagesTr", "spleen_1.nii.gz", "../labelsTr/spleen_1.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}],
    }))
    (case,) = find_cases([msd])
    assert case.modality == "ct" and case.label_names == {1: "spleen"} and case.patient.endswith("spleen_1")
    v2 = tmp_path / "Dataset001_Liver"
    _pair(v2 / "imagesTr", "liver_003_0000.nii.gz", "../labelsTr/liver_003.nii.gz")
    (v2 / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    (case,) = find_cases([v2])
    assert case.image.name == "liver_003_0000.nii.gz" and case.label_names == {1: "liver"}
    assert case.modality == "mr"


def test_a_dataset_json_that_lists_a_missing_file_is_named(tmp_path):
    msd = tmp_path / "Task01"
    msd.mkdir()
    (msd / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(InputError, match="lists .*x.nii.gz, which does not exist"):
        find_cases([msd])


def test_a_manifest_reads_its_scans_under_the_data_folder_and_keeps_splits(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _pair(data / "one")
    _pair(data / "two")
    manifest = tmp_path / "recipe.yaml"
    manifest.write_text(
        "root: ${SAM2UNET_DATA}\n"
        "cases:\n"
        "  - {name: one, patient: p1, split: train, image: one/image.nii.gz,\n"
        "     labels: [one/label.nii.gz, {file: one/label.nii.gz, union: true}]}\n"
        "  - {name: two, patient: p2, split: validation, image: two/image.nii.gz, labels: [two/label.nii.gz]}\n"
    )
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(InputError, match="set SAM2UNET_DATA"):
        find_cases([manifest])
    monkeypatch.setenv(DATA_ENV, str(data))
    one, two = find_cases([manifest])
    assert (one.split, two.split) == ("train", "validation") and one.labels[1].union
    assert one.image == data / "one" / "image.nii.gz"
    assert len(tsources.load_case(one).layers) == 2


def test_one_patient_in_two_splits_is_refused(tmp_path):
    _pair(tmp_path / "train" / "scan_t1")
    _pair(tmp_path / "val" / "scan_t1")  # the same patient (folder name) again, for validation
    cases = find_cases([tmp_path / "train"]) + find_cases([tmp_path / "val"], split="validation")
    with pytest.raises(InputError, match="patient 'scan_t1' is in two splits"):
        tsources.split_cases(cases)


def test_a_folder_without_cases_says_which_layouts_it_reads(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no case folders"):
        find_cases([tmp_path / "empty"])


def test_a_crop_stream_with_several_workers_is_reproducible_and_extends_the_one_worker_stream(tmp_path):
    from napari_sam2unet.models import InputSpec
    from napari_sam2unet.training.data import CropStream

    _pair(tmp_path / "a")
    cases = find_cases([tmp_path])
    spec = InputSpec(channels="multiview", crop="box_aspect", margin=0.15)

    def draw(workers, n):
        stream = CropStream(7, spec, (32, 32), 2, cases, workers=workers)
        shared = stream.shared  # several workers load the scans this process read once
        assert (shared is not None) == (workers > 1)
        try:
            return [stream.get(timeout=120)[0] for _ in range(n)]
        finally:
            stream.close()
            assert shared is None or not os.path.exists(shared)  # the copy goes with the stream

    one = draw(1, 2)
    two, again = draw(2, 4), draw(2, 4)
    assert all(np.array_equal(a, b) for a, b in zip(two, again))  # the same run twice: the same batches
    # Worker 0 draws the one-worker stream; worker 1 draws other crops.
    assert np.array_equal(two[0], one[0]) and np.array_equal(two[2], one[1])
    assert not np.array_equal(two[1], two[0])
