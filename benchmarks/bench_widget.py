"""The widget's speed: a whole-volume run against the CLI (issue 11), and a click's correction (issue 27).

    nice -n 19 xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/bench_widget.py volume
    nice -n 19 xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/bench_widget.py clicks \
        [--model NAME_OR_FILE] [--clicks 20]

volume: both use the bundled model on totalseg/example_ct.nii.gz (122 x 101 x 112 CT), every
slice whole. The CLI figure is `sam2unet segment --scope volume` as a subprocess minus reading
and writing (its own reported segmentation time); the widget figure is from pressing Run to the
end of the run in a real napari window, model load included, labels drawn as they come.

clicks: the liver (label 5) of totalseg/example_mr_sm.nii.gz in a real napari window. A few
slices are boxed and segmented (not timed), then each gets clicks where its mask is most wrong
(the middle of the largest miss, positive, or leak, negative: training/prompt_sim.error_click),
each added to the points layer as a user's click is. Timed: from adding the point to the labels
layer written (the widget's handler: engine.correct for a prompted model, the cache for
others) and to the redraw done. The card decides the path, so any model works; target < 100 ms.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_sam2unet._widget import SegmentWidget
from napari_sam2unet.geometry import mask_bbox
from napari_sam2unet.layer_prompts import slice_axis
from napari_sam2unet.models import DEFAULT_MODEL
from napari_sam2unet.training.prompt_sim import error_click

TOTALSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg"
SCAN = TOTALSEG / "example_ct.nii.gz"
MR, MR_LABELS, LIVER = TOTALSEG / "example_mr_sm.nii.gz", TOTALSEG / "example_seg_mr.nii.gz", 5
CLICK_SLICES = 5


def cli_seconds_per_slice() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "napari_sam2unet.cli", "segment", str(SCAN), "--scope", "volume",
                              "--out", f"{tmp}/seg.nii.gz", "--backend", "cpu"],
                             capture_output=True, text=True, check=True)
    found = re.search(r"segmented (\d+) slices in ([\d.]+) s", out.stderr)
    return float(found.group(2)) / int(found.group(1))


def widget_seconds_per_slice() -> float:
    viewer = napari.Viewer(show=True)
    viewer.open(str(SCAN), plugin="napari-sam2unet")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.backend.value = "cpu"
    widget.scope.value = "whole volume"
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
    began = time.perf_counter()
    widget.run()
    while widget.busy:
        app.processEvents()
        time.sleep(0.002)
    seconds = time.perf_counter() - began
    slices = len(widget.current.result.slices)
    viewer.close()
    return seconds / slices


def wait_for_run(widget) -> None:
    app = QApplication.instance()
    while widget.busy:
        app.processEvents()
        time.sleep(0.002)


def on_slice(axis: int, k: int, *plane) -> list[float]:
    """A napari data coordinate of the image from slice k and in-plane indices."""
    return [float(v) for v in np.insert(np.asarray(plane, dtype=float), axis, k)]


def box_slice(widget, shapes, axis: int, k: int, truth: np.ndarray) -> None:
    """Box the structure on slice k (as a user draws it, two voxels out) and segment the slice."""
    (r0, r1), (c0, c1) = mask_bbox(truth)
    r0, r1, c0, c1 = r0 - 2, r1 + 1, c0 - 2, c1 + 1
    shapes.add_rectangles(np.array([on_slice(axis, k, r, c) for r, c in ((r0, c0), (r0, c1), (r1, c1), (r1, c0))]))
    widget.run(scope="this slice")
    wait_for_run(widget)


def click_times(model: str, clicks: int) -> dict:
    """Milliseconds from a click to its slice's labels written, and to the redraw, per click."""
    viewer = napari.Viewer(show=True)
    (image,) = viewer.open(str(MR), plugin="napari-sam2unet")
    truth = np.asarray(nib.load(str(MR_LABELS)).dataobj) == LIVER
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.backend.value = "cpu"
    if Path(model).suffix in (".onnx", ".yaml"):
        widget.model_file.value = model
    else:
        widget.model.value = model
    widget.auto_run.value = False  # the boxes run when the benchmark says; clicks never start a run
    points, shapes = widget.add_prompt_layers()
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
    axis = slice_axis(viewer, image)
    area = truth.sum(axis=tuple(a for a in range(3) if a != axis))
    candidates = np.flatnonzero(area >= 200)
    chosen = candidates[np.linspace(0, len(candidates) - 1, CLICK_SLICES).round().astype(int)]
    per_slice = -(-clicks // len(chosen))
    handler, drawn, model_ms, dice = [], [], [], []
    for k in chosen:
        viewer.dims.set_current_step(axis, int(k))
        box_slice(widget, shapes, axis, int(k), np.take(truth, k, axis))
        labels = widget.current.layer
        target = np.take(truth, k, axis)
        label = widget.current.label
        before = np.take(labels.data, k, axis) == label
        for _ in range(per_slice):
            found = error_click(np.take(labels.data, k, axis) == label, target)
            if found is None or len(handler) == clicks:
                break
            r, c, positive = found
            points.feature_defaults["sign"] = "positive" if positive else "negative"
            engine = widget.current.engine
            spent = engine.backend_seconds
            began = time.perf_counter()
            points.add(np.array([on_slice(axis, int(k), r, c)]))
            handler.append(1000 * (time.perf_counter() - began))
            app.processEvents()
            drawn.append(1000 * (time.perf_counter() - began))
            model_ms.append(1000 * (engine.backend_seconds - spent))
        after = np.take(labels.data, k, axis) == label
        dice.append((_dice(before, target), _dice(after, target)))
    card = widget.current.engine.card
    viewer.close()
    return {"model": card.name, "prompted": widget.current.engine.prompted, "handler": handler, "drawn": drawn,
            "model_ms": model_ms, "dice": dice}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def report_clicks(found: dict) -> None:
    path = "engine.correct (one model call)" if found["prompted"] else "the cache (no model call)"
    n = len(found["handler"])
    before = np.mean([d[0] for d in found["dice"]])
    after = np.mean([d[1] for d in found["dice"]])
    print(f"{MR.name} liver, model {found['model']} via {path}: {n} clicks on {len(found['dice'])} slices")
    print(f"  click -> labels written: median {statistics.median(found['handler']):.0f} ms "
          f"(max {max(found['handler']):.0f}); -> redrawn: median {statistics.median(found['drawn']):.0f} ms; "
          f"model: median {statistics.median(found['model_ms']):.0f} ms")
    print(f"  slice Dice box {before:.3f} -> after the clicks {after:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=("volume", "clicks"), default="volume")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model name or .onnx/.yaml file (clicks)")
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()
    if args.what == "clicks":
        report_clicks(click_times(args.model, args.clicks))
        return
    cli = min(cli_seconds_per_slice() for _ in range(2))
    gui = min(widget_seconds_per_slice() for _ in range(2))
    print(f"{SCAN.name}: CLI {1000 * cli:.1f} ms per slice, widget {1000 * gui:.1f} ms per slice "
          f"({gui / cli:.2f}x)")


if __name__ == "__main__":
    main()
