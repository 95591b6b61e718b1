"""The segment widget's Volume control: which volume of a 4D file the image layer shows (and the
model segments). Shown only for images read from a 4D file."""

from magicgui.widgets import SpinBox

from .errors import Sam2UnetError
from .io import read_volume
from .provenance import META_KEY


class VolumePicker:
    def __init__(self, widget) -> None:
        self.widget = widget
        self.control = SpinBox(label="Volume", min=0, max=0, visible=False,
                               tooltip="This image came from a 4D file: the volume shown and segmented")
        self.control.changed.connect(self.on_choice)

    def _geometry(self, image) -> dict:
        return (image.metadata.get(META_KEY) or {}) if image is not None else {}

    def update(self, _value=None):
        """Show the control for an image from a 4D file, at the volume it shows."""
        geometry = self._geometry(self.widget.image.value)
        count = int(geometry.get("volumes", 1))
        with self.control.changed.blocked():
            self.control.max = max(count - 1, 0)
            self.control.value = int(geometry.get("volume", 0))
        self.control.label = f"Volume (of {count})" if count > 1 else "Volume"
        self.widget.set_visible(self.control, count > 1)

    def on_choice(self, index: int):
        """Put volume `index` of the file into the image layer (same grid, so labels stay aligned)."""
        widget = self.widget
        image = widget.image.value
        geometry = self._geometry(image)
        if widget.busy or image is None or int(geometry.get("volume", 0)) == index or not geometry.get("path"):
            self.update()
            return
        try:
            volume = read_volume(geometry["path"], volume_index=int(index))
        except Sam2UnetError as error:
            widget.say(str(error), error)
            self.update()
            return
        image.data = volume.data
        geometry["volume"], geometry["notes"] = int(index), list(volume.notes)
        widget.set_status(f"showing volume {index} of {geometry.get('volumes')} of {image.name}")
