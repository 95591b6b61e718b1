"""The points and boxes layers of an image in the segment widget: added, filled with an object's
prompts, emptied, and the sign of the next point (the sign shown is the sign used)."""

import numpy as np
import pandas as pd
from napari.layers import Points, Shapes

from ._widget_part import WidgetPart
from .errors import InputError, Sam2UnetError
from .layer_prompts import SIGN_COLOURS, colour_points, layer_prompts, show_prompts, slice_axis
from .prompts import Prompts

# Point markers on screen (pixels): visible at any zoom, small enough to leave a structure seen.
MARKER_PX = (7, 12)


class PromptLayers(WidgetPart):
    """The widget's prompt layers; ``quiet`` is True while we fill them (not a user's edit)."""

    def __init__(self, widget) -> None:
        super().__init__(widget)
        self.quiet = False

    def axis(self, image=None) -> int:
        image = image if image is not None else self.widget.image.value
        return slice_axis(self.viewer, image) if image is not None else 2

    def require_image(self):
        """The chosen image, if it is a 3D grey-level volume."""
        image = self.widget.image.value
        if image is None:
            raise InputError("no image layer: open a NIfTI file first (File > Open, reader napari-sam2unet)")
        if image.multiscale or image.rgb or image.ndim != 3:
            raise InputError(f"{image.name} is not a 3D grey-level volume; open a 3D MRI or CT")
        return image

    def find(self, image) -> tuple[Points | None, Shapes | None]:
        names = {f"{image.name} points": Points, f"{image.name} boxes": Shapes}
        found = [
            next((layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, kind)), None)
            for name, kind in names.items()
        ]
        return found[0], found[1]

    def add(self, image, sign: str):
        """Add (or select) the points and boxes layers of the image; boxes are drawn next."""
        points, shapes = self.find(image)
        frame = {"scale": image.scale, "translate": image.translate}
        edits = self.widget.edits
        if shapes is None:
            shapes = self.viewer.add_shapes(ndim=3, name=f"{image.name} boxes", edge_color="yellow",
                                            face_color="transparent",
                                            edge_width=0.6 * float(min(image.scale[-2:])), **frame)
            shapes.events.data.connect(edits.on_boxes_changed)
        if points is None:
            categories = pd.Categorical([], categories=list(SIGN_COLOURS))
            # A voxel across, but never under MARKER_PX on screen: it marks a spot without hiding it.
            points = self.viewer.add_points(ndim=3, name=f"{image.name} points", features={"sign": categories},
                                            face_color=SIGN_COLOURS[sign], border_color="white",
                                            size=float(min(image.scale[-2:])),
                                            canvas_size_limits=MARKER_PX, **frame)
            points.feature_defaults["sign"] = sign
            points.bind_key("n", self.toggle_sign, overwrite=True)
            points.events.data.connect(edits.on_points_changed)
        shapes.mode = "add_rectangle"
        self.viewer.layers.selection.active = shapes
        return points, shapes

    def read(self, image, axis: int) -> Prompts:
        points, shapes = self.find(image)
        return layer_prompts(image, points, shapes, axis)

    def keep(self, obj) -> None:
        """The layers hold the object's prompts: keep them with the object."""
        image = self.widget.image.value
        if image is None or obj is None:
            return
        try:
            obj.prompts = self.read(image, obj.axis if obj.axis is not None else self.axis())
        except Sam2UnetError:
            pass

    def fill(self, obj) -> None:
        """Show the object's prompts on its image's layers."""
        image = obj.image if obj.image is not None and obj.image in self.viewer.layers else self.widget.image.value
        if image is None:
            return
        points, shapes = self.find(image)
        self.quiet = True
        try:
            show_prompts(obj.prompts, image, points, shapes, obj.axis if obj.axis is not None else self.axis())
        finally:
            self.quiet = False
        self.keep_sign(points)

    def clear(self, image) -> None:
        points, shapes = self.find(image)
        self.quiet = True
        try:
            if points is not None:
                points.data = np.empty((0, points.ndim))
            if shapes is not None:
                shapes.data = []
        finally:
            self.quiet = False
        self.keep_sign(points)

    def set_sign(self, sign: str) -> None:
        """The sign of the next point (and the colour of selected points) on the image's layer."""
        image = self.widget.image.value
        if image is None:
            return
        points, _ = self.find(image)
        if points is not None:
            points.feature_defaults["sign"] = sign
            points.current_face_color = SIGN_COLOURS[sign]
            colour_points(points)  # current_face_color also recolours selected points

    def keep_sign(self, points) -> None:
        """Refilling the points layer resets its next point's sign: the combo's sign again (the
        old selection went with the old points)."""
        if points is not None:
            points.selected_data = set()
            self.set_sign(self.widget.point_sign.value)

    def toggle_sign(self, layer=None) -> None:
        """n: flip the selected points' sign, or the sign of the next points when none is selected."""
        points = layer if isinstance(layer, Points) else self.find(self.require_image())[0]
        if points is None:
            return
        selected = sorted(points.selected_data)
        if selected:
            signs = points.features["sign"].astype(str).to_numpy()
            flipped = np.where(signs[selected] == "negative", "positive", "negative")
            points.features.loc[selected, "sign"] = flipped
            colour_points(points)
            self.widget.edits.on_points_changed()
        else:
            sign = self.widget.point_sign
            sign.value = "negative" if sign.value == "positive" else "positive"
