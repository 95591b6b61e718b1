"""NIfTI reading and writing: geometry survives, bad files get clear messages, nothing is lost."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_nifti

from napari_sam2unet import atomic, io, paths
from napari_sam2unet.errors import InputError
from napari_sam2unet.io import read_volume, write_labels


def _all_volumes(shared_data):
    return sorted(shared_data.rglob("*.nii.gz"))


def test_every_shared_volume_round_trips_with_itk_geometry(shared_data, tmp_path):
    """A label map saved for any scan opens in ITK (Slicer, ITK-SNAP) exactly on that scan."""
    paths = _all_volumes(shared_data)
    assert len(paths) >= 10
    for path in paths:
        volume = read_volume(path)
        labels = (volume.data > np.median(volume.data)).astype(np.uint8)
        name = "-".join(path.relative_to(shared_data).parts)  # cases/*/image.nii.gz share a name
        out = write_labels(tmp_path / f"{name}-labels.nii.gz", labels, volume)
        source, written = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
        assert written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-5)
        back = nib.load(str(out))
        assert back.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)
        assert back.header["sform_code"] == volume.header["sform_code"]
        assert back.header["qform_code"] == volume.header["qform_code"]


def test_reading_keeps_intensities_and_orientation(real_data):
    volume = read_volume(real_data / "totalseg" / "example_mr_sm.nii.gz")
    raw = nib.load(str(real_data / "totalseg" / "example_mr_sm.nii.gz"))
    np.testing.assert_allclose(volume.data, raw.get_fdata(), rtol=1e-6)
    assert volume.orientation == "".join(nib.aff2axcodes(raw.affine)) == "LPS"
    assert volume.spacing == (3.0, 3.0, 3.0)


def test_many_labels_are_written_as_uint16(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "img.nii.gz", np.random.rand(8, 8, 4).astype(np.float32)))
    labels = np.zeros((8, 8, 4), dtype=np.int32)
    labels[0, 0, 0] = 300
    out = write_labels(tmp_path / "labels.nii.gz", labels, volume)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint16
    assert int(np.asarray(back.dataobj).max()) == 300


def test_2d_image_is_one_slice_and_written_back_2d(tmp_path):
    path = write_nifti(tmp_path / "slice.nii.gz", np.random.rand(20, 16).astype(np.float32))
    volume = read_volume(path)
    assert volume.data.shape == (20, 16, 1)
    assert "2D" in volume.notes[0]
    out = write_labels(tmp_path / "labels.nii.gz", np.ones((20, 16, 1), np.uint8), volume)
    assert nib.load(str(out)).shape == (20, 16)


def test_4d_image_uses_the_chosen_volume_and_says_so(tmp_path):
    data = np.stack([np.full((6, 5, 4), float(i)) for i in range(3)], axis=-1).astype(np.float32)
    path = write_nifti(tmp_path / "series.nii.gz", data)
    first = read_volume(path)
    assert first.data.shape == (6, 5, 4) and first.data.max() == 0
    assert "4D with 3 volumes: using volume 0" in first.notes[0]
    assert read_volume(path, volume_index=2).data.max() == 2
    with pytest.raises(InputError, match="choose a volume index from 0 to 2"):
        read_volume(path, volume_index=3)
    labels = np.ones((6, 5, 4), np.uint8)
    out = write_labels(tmp_path / "labels.nii.gz", labels, first)
    assert nib.load(str(out)).shape == (6, 5, 4)


def test_trailing_singleton_dimensions_are_dropped(tmp_path):
    path = write_nifti(tmp_path / "img5d.nii.gz", np.random.rand(6, 5, 4, 1, 1).astype(np.float32))
    assert read_volume(path).data.shape == (6, 5, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not an image at all" * 20), "cannot read"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00" * 10)), "cannot read"),
    ],
)
def test_unreadable_files_get_a_clear_message(tmp_path, make, message):
    path = tmp_path / "broken.nii.gz"
    make(path)
    with pytest.raises(InputError, match=message):
        read_volume(path)


def test_truncated_file_is_reported_as_truncated(real_data, tmp_path):
    whole = (real_data / "totalseg" / "example_mr_sm.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated or corrupt|cannot read"):
        read_volume(path)


def test_wrong_extension_and_missing_file(tmp_path):
    other = tmp_path / "scan.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="not a NIfTI file"):
        read_volume(other)
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")


def test_writing_never_replaces_the_source_or_an_existing_file(tmp_path):
    path = write_nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4).astype(np.float32))
    volume = read_volume(path)
    before = path.read_bytes()
    labels = np.ones((6, 5, 4), np.uint8)
    with pytest.raises(InputError, match="is the input image"):
        write_labels(path, labels, volume, overwrite=True)
    assert path.read_bytes() == before
    out = write_labels(tmp_path / "labels.nii.gz", labels, volume)
    kept = out.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_labels(out, labels * 2, volume)
    assert out.read_bytes() == kept
    write_labels(out, labels * 2, volume, overwrite=True)
    assert int(np.asarray(nib.load(str(out)).dataobj).max()) == 2


def test_sidecar_and_no_leftover_temporary_files(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4).astype(np.float32)))
    write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"model": "x"})
    assert (tmp_path / "seg.json").read_text().count('"model": "x"') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "seg.json", "seg.nii.gz"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4).astype(np.float32)))
    with pytest.raises(InputError, match="does not match"):
        write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 3), np.uint8), volume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz"]


def test_nifti2_keeps_its_format(tmp_path):
    image = nib.Nifti2Image(np.random.rand(6, 5, 4).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    nib.save(image, str(tmp_path / "img2.nii"))
    volume = read_volume(tmp_path / "img2.nii")
    out = write_labels(tmp_path / "seg.nii", np.ones((6, 5, 4), np.uint8), volume)
    back = nib.load(str(out))
    assert isinstance(back, nib.Nifti2Image)
    np.testing.assert_allclose(back.header.get_zooms(), (2.0, 2.0, 3.0))


def _small_volume(tmp_path, name="img.nii.gz"):
    return read_volume(write_nifti(tmp_path / name, np.random.rand(6, 5, 4).astype(np.float32)))


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# --- defect 1: the sidecar follows the no-overwrite rule --------------------------------------


def test_an_existing_json_is_kept_without_overwrite(tmp_path):
    volume = _small_volume(tmp_path)
    (tmp_path / "seg.json").write_text("the user's notes")
    with pytest.raises(InputError, match="seg.json already exists"):
        write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"model": "x"})
    assert (tmp_path / "seg.json").read_text() == "the user's notes"
    assert not (tmp_path / "seg.nii.gz").exists()


def test_the_inputs_own_bids_json_is_never_replaced_even_with_overwrite(tmp_path):
    volume = _small_volume(tmp_path, "sub-01_T2w.nii.gz")
    bids = tmp_path / "sub-01_T2w.json"
    bids.write_text('{"RepetitionTime": 2.5}')
    with pytest.raises(InputError, match="would also describe sub-01_T2w.nii.gz"):
        write_labels(tmp_path / "sub-01_T2w.nii", np.ones((6, 5, 4), np.uint8), volume, sidecar={"m": 1},
                     overwrite=True)
    assert json.loads(bids.read_text()) == {"RepetitionTime": 2.5}
    assert _names(tmp_path) == ["sub-01_T2w.json", "sub-01_T2w.nii.gz"]
    # Without a sidecar nothing is in the way.
    write_labels(tmp_path / "sub-01_T2w.nii", np.ones((6, 5, 4), np.uint8), volume)
    assert json.loads(bids.read_text()) == {"RepetitionTime": 2.5}


def test_the_bids_json_of_an_upper_case_input_is_kept(tmp_path):
    # issue 25: sub-01_T1w.NII.GZ + sub-01_T1w.json, --out sub-01_T1w.nii.gz --overwrite replaced the JSON
    volume = _small_volume(tmp_path, "sub-01_T1w.NII.GZ")
    bids = tmp_path / "sub-01_T1w.json"
    bids.write_text('{"RepetitionTime": 2.5}')
    with pytest.raises(InputError, match="would also describe sub-01_T1w.NII.GZ"):
        write_labels(tmp_path / "sub-01_T1w.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"m": 1},
                     overwrite=True)
    assert json.loads(bids.read_text()) == {"RepetitionTime": 2.5}
    assert _names(tmp_path) == ["sub-01_T1w.NII.GZ", "sub-01_T1w.json"]


def test_pair_nii_and_nii_gz_do_not_share_one_sidecar(tmp_path):
    volume = _small_volume(tmp_path)
    labels = np.ones((6, 5, 4), np.uint8)
    write_labels(tmp_path / "pair.nii", labels, volume, sidecar={"run": "first"})
    with pytest.raises(InputError, match="would also describe pair.nii"):
        write_labels(tmp_path / "pair.nii.gz", labels, volume, sidecar={"run": "second"}, overwrite=True)
    assert json.loads((tmp_path / "pair.json").read_text())["run"] == "first"
    assert not (tmp_path / "pair.nii.gz").exists()


# --- defect 2: a second run to the same output never replaces the first one ------------------


def test_a_file_that_appears_during_the_write_is_kept(tmp_path, monkeypatch):
    """Two runs without --overwrite: the one that finishes second must not replace the first."""
    volume = _small_volume(tmp_path)
    out = tmp_path / "seg.nii.gz"
    real_save = nib.save

    def other_run_finishes_first(image, filename):
        out.write_bytes(b"the other run's labels")  # after our check, before our publish
        real_save(image, filename)

    monkeypatch.setattr(io.nib, "save", other_run_finishes_first)
    with pytest.raises(InputError, match="appeared while this run was writing"):
        write_labels(out, np.ones((6, 5, 4), np.uint8), volume, sidecar={"m": 1})
    assert out.read_bytes() == b"the other run's labels"
    assert _names(tmp_path) == ["img.nii.gz", "seg.nii.gz"]  # no sidecar, no temporary file


# --- defect 3: both files or neither -----------------------------------------------------------


_SIDECAR_DISK_FULL = """
import resource, signal, sys, numpy as np
from napari_sam2unet.io import read_volume, write_labels
from napari_sam2unet.errors import InputError
volume = read_volume(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with an error
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    write_labels(sys.argv[2], np.zeros(volume.data.shape, np.uint8), volume, sidecar={"notes": "x" * 100000})
except InputError as error:
    print(error)
    sys.exit(2)
"""


def test_a_sidecar_that_cannot_be_written_leaves_no_label_map(tmp_path):
    source = write_nifti(tmp_path / "img.nii.gz", np.random.rand(16, 16, 8).astype(np.float32))
    out = tmp_path / "seg.nii.gz"
    run = subprocess.run([sys.executable, "-c", _SIDECAR_DISK_FULL, str(source), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "cannot write seg.json" in run.stdout and "nothing was written" in run.stdout
    assert _names(tmp_path) == ["img.nii.gz"]  # a rerun needs no --overwrite


def test_a_sidecar_path_that_is_a_folder_is_refused_before_anything_is_written(tmp_path):
    volume = _small_volume(tmp_path)
    (tmp_path / "seg.json").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"m": 1})
    assert _names(tmp_path) == ["img.nii.gz", "seg.json"]


# --- defects 11, 12 and issue 12: words, modes, strict JSON, available memory -------------------


def test_rgb_and_overflowing_images_are_named_for_what_they_are(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii"))
    with pytest.raises(InputError, match="rgb.nii is a colour \\(RGB\\) image"):
        read_volume(tmp_path / "rgb.nii")
    huge = np.ones((4, 4, 3), np.float64)
    huge[0, 0, 0] = 1e300
    nib.save(nib.Nifti1Image(huge, np.eye(4)), str(tmp_path / "huge.nii"))
    with pytest.raises(InputError, match="huge.nii has intensities up to 1e\\+300, beyond float32"):
        read_volume(tmp_path / "huge.nii")


def test_a_header_promising_more_voxels_than_the_gz_holds_names_the_file(tmp_path):
    whole = nib.Nifti1Image(np.random.rand(40, 40, 40).astype(np.float32), np.eye(4)).to_bytes()
    path = tmp_path / "lying.nii.gz"
    path.write_bytes(gzip.compress(whole[: 352 + 40 * 40 * 20 * 4]))
    with pytest.raises(InputError) as caught:
        read_volume(path)
    assert str(caught.value).startswith("lying.nii.gz is truncated: its header promises 256000 bytes")
    assert "from )" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_says_permission_not_incomplete(tmp_path):
    path = write_nifti(tmp_path / "locked.nii.gz", np.random.rand(6, 5, 4).astype(np.float32))
    path.chmod(0)
    with pytest.raises(InputError, match="cannot read locked.nii.gz: permission denied"):
        read_volume(path)


def test_the_sidecar_is_strict_json(tmp_path):
    volume = _small_volume(tmp_path)
    write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume,
                 sidecar={"seconds": float("inf"), "dice": np.float32("nan"), "box": [1.5, float("-inf")]})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads((tmp_path / "seg.json").read_text(), parse_constant=refuse)
    record.pop("output")  # the label map's name and sha256
    assert record == {"seconds": None, "dice": None, "box": [1.5, None]}


def test_the_memory_guard_reads_available_memory_not_free_memory(tmp_path, monkeypatch):
    """Page cache is available memory: a machine that has read many files still opens a big CT."""
    path = write_nifti(tmp_path / "ct.nii.gz", np.zeros((64, 64, 40), np.float32))  # 640 KiB as float32
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr("napari_sam2unet.volume._MEMINFO", meminfo)
    meminfo.write_text("MemTotal: 8000000 kB\nMemFree: 1000 kB\nMemAvailable: 6000000 kB\n")
    assert read_volume(path).data.shape == (64, 64, 40)
    meminfo.write_text("MemTotal: 8000000 kB\nMemFree: 6000000 kB\nMemAvailable: 1000 kB\n")
    with pytest.raises(InputError, match="only 0.0 GiB is available; crop or resample it first"):
        read_volume(path)


# --- issue 25: --overwrite publishes the label map and its sidecar as a pair -------------------


def _pair_matches(out) -> bool:
    """The sidecar names the map beside it: its file name and sha256."""
    record = json.loads(paths.sidecar_path_for(out).read_text())
    return record["output"] == {"file": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def test_the_sidecar_names_the_label_maps_sha256(tmp_path):
    volume = _small_volume(tmp_path)
    out = write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"run": 1})
    assert _pair_matches(out)


def test_a_failure_between_the_two_publishes_puts_the_old_pair_back(tmp_path, monkeypatch):
    volume = _small_volume(tmp_path)
    out = write_labels(tmp_path / "seg.nii.gz", np.ones((6, 5, 4), np.uint8), volume, sidecar={"run": "old"})
    old = {name: (tmp_path / name).read_bytes() for name in ("seg.nii.gz", "seg.json")}
    real_publish = atomic._publish

    def stop_after_the_map(tmp, target, overwrite):
        real_publish(tmp, target, overwrite)
        raise KeyboardInterrupt  # as a signal where it cannot be deferred (not the main thread)

    monkeypatch.setattr(atomic, "_publish", stop_after_the_map)
    with pytest.raises(KeyboardInterrupt):
        write_labels(out, np.zeros((6, 5, 4), np.uint8), volume, sidecar={"run": "new"}, overwrite=True)
    assert {name: (tmp_path / name).read_bytes() for name in ("seg.nii.gz", "seg.json")} == old
    assert _names(tmp_path) == ["img.nii.gz", "seg.json", "seg.nii.gz"]  # nothing set aside is left


def test_sigterm_between_the_two_publishes_waits_and_the_message_says_what_is_on_disk(tmp_path, monkeypatch,
                                                                                      capsys, brightness_card):
    import signal

    from napari_sam2unet.cli import main

    source = write_nifti(tmp_path / "img.nii.gz", np.random.rand(40, 40, 4).astype(np.float32))
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(source), "--out", str(out), "--box", "1:5,5,30,30", "--model",
            str(brightness_card.card_path), "--quiet"]
    assert main(args) == 0
    real_publish = atomic._publish

    def terminated_after_the_map(tmp, target, overwrite):
        real_publish(tmp, target, overwrite)
        if target == out:
            signal.raise_signal(signal.SIGTERM)  # between the map and its sidecar

    monkeypatch.setattr(atomic, "_publish", terminated_after_the_map)
    capsys.readouterr()
    assert main([*args, "--overwrite", "--threshold", "0.9"]) == 0  # the output was complete before it stopped
    err = capsys.readouterr().err
    assert f"terminated after writing {out} and {tmp_path / 'seg.json'}, which are complete" in err
    record = json.loads((tmp_path / "seg.json").read_text())
    assert record["threshold"] == 0.9 and _pair_matches(out)
    # a signal before anything is published: old pair kept, 143 and the message says so
    monkeypatch.setattr(atomic, "_publish", real_publish)
    monkeypatch.setattr(io.nib, "save", lambda *a: signal.raise_signal(signal.SIGTERM))
    assert main([*args, "--overwrite", "--threshold", "0.7"]) == 143
    assert "terminated; nothing was written (existing files were kept)" in capsys.readouterr().err
    assert json.loads((tmp_path / "seg.json").read_text())["threshold"] == 0.9 and _pair_matches(out)


_OVERWRITER = """
import sys, numpy as np
from napari_sam2unet.io import read_volume, write_labels
volume = read_volume(sys.argv[1])
for round in range(int(sys.argv[3])):
    labels = np.full(volume.data.shape, int(sys.argv[4]), np.uint8)
    write_labels(sys.argv[2], labels, volume, sidecar={"writer": sys.argv[4], "round": round}, overwrite=True)
"""


def test_concurrent_overwrites_never_leave_one_runs_map_beside_anothers_sidecar(tmp_path):
    source = write_nifti(tmp_path / "img.nii.gz", np.random.rand(32, 32, 16).astype(np.float32))
    out = tmp_path / "seg.nii.gz"
    runs = [subprocess.Popen([sys.executable, "-c", _OVERWRITER, str(source), str(out), "15", str(writer)])
            for writer in (1, 2, 3)]
    seen = 0
    while any(run.poll() is None for run in runs):  # a reader that looks while they write
        try:
            before, labels, after = (tmp_path / "seg.json").read_text(), out.read_bytes(), \
                (tmp_path / "seg.json").read_text()
        except FileNotFoundError:  # a moment without a pair: allowed, a mixed pair is not
            continue
        if before == after:
            seen += 1
            assert json.loads(after)["output"]["sha256"] == hashlib.sha256(labels).hexdigest()
    assert [run.wait() for run in runs] == [0, 0, 0]
    assert _pair_matches(out) and seen
    writer = json.loads((tmp_path / "seg.json").read_text())["writer"]
    assert np.all(np.asarray(nib.load(str(out)).dataobj) == int(writer))
    assert _names(tmp_path) == ["img.nii.gz", "seg.json", "seg.nii.gz"]


# --- issue 25: damage in the middle of a .nii.gz stream is found ------------------------------


def test_a_byte_flipped_in_the_middle_of_a_gz_stream_is_refused(tmp_path):
    plain = write_nifti(tmp_path / "img.nii", np.arange(20 * 20 * 10, dtype=np.float32).reshape(20, 20, 10))
    stored = bytearray(gzip.compress(plain.read_bytes(), compresslevel=0))  # stored blocks: a flip decodes
    stored[len(stored) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(bytes(stored))
    with pytest.raises(InputError, match=r"damaged.nii.gz is corrupt \(CRC check failed.*export it again"):
        read_volume(damaged)
    intact = tmp_path / "intact.nii.gz"
    intact.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=0))
    assert read_volume(intact).data.shape == (20, 20, 10)


def test_a_single_nii_with_vox_offset_inside_its_header_is_refused(tmp_path):
    path = write_nifti(tmp_path / "img.nii", np.arange(1000, dtype=np.float32).reshape(10, 10, 10))
    damaged = bytearray(path.read_bytes())
    damaged[108:112] = np.float32(0).tobytes()  # vox_offset 0: the header's bytes read as voxels
    (tmp_path / "zero.nii").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=r"zero.nii says its voxels start at byte 0 \(vox_offset\), inside"):
        read_volume(tmp_path / "zero.nii")
    assert read_volume(path).data.shape == (10, 10, 10)
