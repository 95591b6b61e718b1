"""The segment widget's view of the image: radiological planes, a view kept fitted while the
dock narrows the canvas, the display window and the cursor's voxel and RAS position."""

import numpy as np

from ._widget_part import WidgetPart
from .history import layer_key
from .provenance import META_KEY
from .views import display_limits, ras_mm, show_plane


class ViewKeeper(WidgetPart):
    def __init__(self, widget) -> None:
        super().__init__(widget)
        self._fitted = None  # (zoom, centre) of the last fitted view

    def _camera(self):
        scene = getattr(self.viewer, "scene", None)  # napari 0.9 moved the camera to the scene
        return scene.camera if scene is not None else self.viewer.camera

    def fit(self):
        self.viewer.reset_view()
        camera = self._camera()
        self._fitted = (camera.zoom, tuple(camera.center))

    def on_canvas_size(self, _event=None):
        """Docking narrows the canvas: a view the user has not moved stays fitted."""
        camera = self._camera()
        if not self.widget.closed and self._fitted == (camera.zoom, tuple(camera.center)):
            self.fit()

    def radiological(self, image):
        """Open a volume once in the radiological axial view of its affine."""
        viewed = self.widget.session.viewed
        key = layer_key(image)
        if key in viewed:
            return
        viewed.add(key)
        self.show_plane("axial", image)

    def show_plane(self, plane: str, image=None):
        """Axial, coronal or sagittal, radiological, from the image's affine (its file's, or its layer's)."""
        show_plane(self.viewer, image if image is not None else self.widget.image.value, plane)
        self.fit()

    def on_display(self, value):
        image = self.widget.image.value
        if image is None:
            return
        if value == "as opened":
            opened = (image.metadata.get(META_KEY) or {}).get("display")
            if opened is None:
                image.reset_contrast_limits()
            else:
                image.contrast_limits = opened
        else:
            image.contrast_limits = display_limits(value)

    def on_cursor(self, _event=None):
        if self.widget.closed:
            return
        image = self.widget.image.value
        if image is None or image.ndim != 3:
            return
        try:
            voxel = np.round(image.world_to_data(self.viewer.cursor.position[-3:])).astype(int)
        except Exception:  # a cursor outside any transform napari can invert: show nothing
            return
        if np.any(voxel < 0) or np.any(voxel >= np.array(image.data.shape)):
            self.widget.cursor.value = ""
            return
        affine = (image.metadata.get(META_KEY) or {}).get("affine")
        ras = ras_mm(affine, voxel) if affine is not None else np.asarray(image.data_to_world(voxel))
        self.widget.cursor.value = "voxel {} {} {} | RAS {:.1f} {:.1f} {:.1f} mm".format(*voxel, *ras)
