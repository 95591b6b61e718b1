"""What the segment widget's parts (prompt layers, the view, ...) share: the widget they serve."""


class WidgetPart:
    """A part of the segment widget; it reaches the viewer through the widget."""

    def __init__(self, widget) -> None:
        self.widget = widget

    @property
    def viewer(self):
        return self.widget.viewer
