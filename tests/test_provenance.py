"""Provenance records round-trip: what the napari writer and the CLI save, `sam2unet batch` replays."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import build_brightness_model, sphere_volume, write_nifti, write_test_card

from napari_sam2unet.cli import main
from napari_sam2unet.provenance import RUNS_KEY, SCHEMA

PLUGIN = "napari-sam2unet"
RUN_TIMEOUT_MS = 60_000


def _replay(tmp_path, image, sidecar, card, label=None):
    """`sam2unet batch` on a one-row manifest whose prompts column is the sidecar; its label map."""
    pytest.importorskip("distributed", reason="the [cohort] extra (dask.distributed) is not installed")
    manifest = tmp_path / "replay.csv"
    row = {"case": "replay", "image": str(image), "prompts": str(sidecar)}
    if label is not None:
        row["label"] = str(label)
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    out = tmp_path / "replayed"
    assert main(["batch", str(manifest), "-o", str(out), "--model", str(card.card_path), "--workers", "1",
                 "--threads-per-worker", "1", "--quiet"]) == 0, (out / "report.csv").read_text()
    return np.asarray(nib.load(str(out / "replay.nii.gz")).dataobj)


@pytest.mark.gui
def test_batch_replays_the_sidecar_the_napari_writer_saves(tmp_path, make_napari_viewer, qtbot):
    from napari_sam2unet._widget import SegmentWidget

    data, _ = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    image_path = write_nifti(tmp_path / "ball.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    card = write_test_card(build_brightness_model(tmp_path / "bright.onnx", gain=2.0))
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(image_path), plugin=PLUGIN)
    viewer.dims.order = (2, 0, 1)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_file.value = card.file
    widget.auto_run.value = False
    points, shapes = widget.add_prompt_layers()
    for k in (4, 8):  # boxes on two slices, the slices between interpolated
        shapes.add_rectangles(np.array([[14, 12, k], [14, 28, k], [34, 28, k], [34, 12, k]], dtype=float))
    points.add(np.array([[24.0, 20.0, 6]]))
    viewer.dims.set_current_step(2, 6)
    assert widget.run(scope="between prompted slices") is not None, widget.status.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=RUN_TIMEOUT_MS)
    (labels,) = [layer for layer in viewer.layers if layer.__class__.__name__ == "Labels"]
    assert labels.data.any(), widget.status.value
    # napari's own save, through our writer contribution
    saved = tmp_path / "saved.nii.gz"
    labels.save(str(saved), plugin=PLUGIN)
    sidecar = tmp_path / "saved.json"
    assert json.loads(sidecar.read_text())["runs"], "the writer saved no run to replay"
    replayed = _replay(tmp_path, image_path, sidecar, card)
    np.testing.assert_array_equal(replayed > 0, np.asarray(nib.load(str(saved)).dataobj) > 0)


def test_batch_replays_a_widget_run_saved_by_the_writer_function(tmp_path):
    """The bug of issue 24: the writer saved `axis` and prompts as dicts, the manifest read
    `slice_axis` and positional lists and refused the file as malformed."""
    from napari_sam2unet._reader import read_nifti
    from napari_sam2unet._writer import write_labels_layer
    from napari_sam2unet.backends.pool import BackendPool, model_sha256
    from napari_sam2unet.batch_case import BatchJob, run_case
    from napari_sam2unet.io import read_volume
    from napari_sam2unet.manifest import CaseSpec
    from napari_sam2unet.prompts import Box, Point, Prompts
    from napari_sam2unet.segment_case import SegmentOptions, segment_volume

    data, _ = sphere_volume(shape=(48, 40, 12), centre=(24, 20, 6), radius=8)
    image_path = write_nifti(tmp_path / "ball.nii.gz", data)
    card = write_test_card(build_brightness_model(tmp_path / "bright.onnx", gain=2.0))
    prompts = Prompts([Box(4, 14, 12, 34, 28), Box(8, 14, 12, 34, 28)], [Point(6, 24.0, 20.0)])
    options = SegmentOptions(scope="between", label=3, model=str(card.card_path))
    with BackendPool() as pool:
        labels, _, record = segment_volume(read_volume(image_path), prompts, options, pool,
                                           source=image_path.name, record_extra={"label_name": "ball"})
    assert record["schema"] == SCHEMA and labels.any()
    (_, layer_kwargs, _), = read_nifti(str(image_path))
    metadata = {**layer_kwargs["metadata"], RUNS_KEY: [record, {"operation": "refine", "label": 3}]}
    (saved,) = write_labels_layer(str(tmp_path / "saved.nii.gz"), labels, {"name": "ball labels",
                                                                         "metadata": metadata})
    sidecar = tmp_path / "saved.json"
    assert json.loads(sidecar.read_text())["schema"] == SCHEMA
    out = tmp_path / "out"
    out.mkdir()
    job = BatchJob(str(out), str(card.card_path), model_sha256(card), "cpu", 1)
    result = run_case(CaseSpec("replay", image_path, {"prompts": str(sidecar)}), job)
    assert result.status == "segmented", result.reason
    np.testing.assert_array_equal(np.asarray(nib.load(result.output).dataobj), np.asarray(nib.load(saved).dataobj))


def test_a_record_of_a_newer_schema_is_refused_in_one_line(tmp_path):
    from napari_sam2unet.manifest import CaseSpec, resolve_case

    sidecar = tmp_path / "new.json"
    sidecar.write_text(json.dumps({"schema": SCHEMA + 1, "runs": []}))
    with pytest.raises(Exception, match="newer napari-sam2unet"):
        resolve_case(CaseSpec("c", tmp_path / "scan.nii.gz", {"prompts": str(sidecar)}))
