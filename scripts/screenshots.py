"""Screenshots of the real napari window for docs/user-guide.md.

Run under a virtual X server:
    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python scripts/screenshots.py
Writes docs/images/*.png: a 1366x768 laptop screen with both docks. Look at them before committing.
"""

from __future__ import annotations

import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication
from scipy import ndimage

from napari_sam2unet._finetune_widget import FinetuneWidget
from napari_sam2unet._sample_data import SAMPLE_LIVER, sample_paths
from napari_sam2unet._widget import SegmentWidget
from napari_sam2unet.geometry import mask_bbox
from napari_sam2unet.io import read_volume

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SLICE = 10
KIDNEY, KIDNEY_SLICE = 2, 5  # the right kidney in the sample's label map


def wait(widget: SegmentWidget, seconds: float = 120) -> None:
    app = QApplication.instance()
    end = time.time() + seconds
    while widget.busy and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        app.processEvents()


def shoot(viewer, name: str, reset: bool = True) -> None:
    if reset:
        viewer.reset_view()
    for _ in range(10):
        QApplication.instance().processEvents()
    viewer.window.screenshot(str(OUT / name), canvas_only=False)
    print("wrote", OUT / name)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = sample_paths()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment with SAM2-UNet", area="right")
    viewer.window.add_dock_widget(FinetuneWidget(viewer), name="Fine-tune SAM2-UNet", area="right")
    (image,) = viewer.open(str(image_path), plugin="napari-sam2unet")  # opens radiological axial
    viewer.dims.set_current_step(2, SLICE)
    widget.auto_run.value = False  # the first picture shows the box before the run

    # A box around the liver, as a user drags it (napari data coordinates).
    truth = np.asarray(read_volume(labels_path).data)
    liver = truth[:, :, SLICE] == SAMPLE_LIVER
    (r0, r1), (c0, c1) = mask_bbox(liver)
    points, shapes = widget.add_prompt_layers()
    widget.label_name.value = "liver"
    corners = [[r0 - 2, c0 - 2, SLICE], [r0 - 2, c1 + 1, SLICE], [r1 + 1, c1 + 1, SLICE], [r1 + 1, c0 - 2, SLICE]]
    shapes.add_rectangles(np.array(corners, dtype=float))
    shoot(viewer, "1-box-prompt.png")

    widget.scope.value = "propagate from this slice"
    widget.run()
    wait(widget)
    viewer.layers.selection.active = shapes
    shoot(viewer, "2-propagated.png")

    # The next object: the right kidney by one click, segmented as the point lands.
    widget.auto_run.value = True
    widget.commit()
    widget.label_name.value = "right kidney"
    viewer.dims.set_current_step(2, KIDNEY_SLICE)
    kidney = truth[:, :, KIDNEY_SLICE] == KIDNEY
    depth = ndimage.distance_transform_edt(kidney)
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    viewer.layers.selection.active = points
    points.add(np.array([[r, c, KIDNEY_SLICE]], dtype=float))
    wait(widget)
    shoot(viewer, "3-two-objects.png")

    viewer.dims.ndisplay = 3
    for layer in (image, points, shapes):
        layer.visible = False
    viewer.reset_view()
    labels = viewer.layers[f"{image.name} labels"]
    viewer.camera.center = labels.data_to_world(np.argwhere(labels.data).mean(axis=0))
    labels.opacity = 1.0
    viewer.camera.angles = (-15, 25, 120)
    shoot(viewer, "4-3d.png", reset=False)
    viewer.close()


if __name__ == "__main__":
    main()
