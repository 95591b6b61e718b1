"""Widget against CLI wall time per slice on a whole-volume run (issue 11: within 2x).

    nice -n 19 xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/bench_widget.py

Both use the bundled model on totalseg/example_ct.nii.gz (122 x 101 x 112 CT), every slice
whole. The CLI figure is `sam2unet segment --scope volume` as a subprocess minus reading and
writing (its own reported segmentation time); the widget figure is from pressing Run to the
end of the run in a real napari window, model load included, labels drawn as they come.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_sam2unet._widget import SegmentWidget

SCAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg" / "example_ct.nii.gz"


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


def main() -> None:
    cli = min(cli_seconds_per_slice() for _ in range(2))
    gui = min(widget_seconds_per_slice() for _ in range(2))
    print(f"{SCAN.name}: CLI {1000 * cli:.1f} ms per slice, widget {1000 * gui:.1f} ms per slice "
          f"({gui / cli:.2f}x)")


if __name__ == "__main__":
    main()
