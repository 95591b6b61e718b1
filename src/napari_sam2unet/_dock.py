"""Layout helpers shared by the plugin's docks, so that they fit a 1366x768 laptop screen beside
napari's layer list: the controls scroll vertically, never horizontally (combo boxes and labels
shrink, the dock is as wide as its narrowest layout), and advanced options fold away.

napari docks a magicgui widget's ``native``, which for ``Container(scrollable=True)`` is the
inner widget without its scroll area; so the scroll area is made here, in Qt.
"""

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea
from superqt import QCollapsible

# A combo box shows at least this many characters and elides the rest (the list shows them all):
# a long layer or model name must not widen the dock.
COMBO_CHARACTERS = 14


def scroll_into(outer: Container, inner: Container) -> QScrollArea:
    """Show ``inner`` in a vertical scroll area that fills ``outer`` (an empty container)."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(inner.native)
    layout = outer.native.layout()
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(scroll)
    shrink_combos(inner)
    # The width follows the contents' whenever their layout changes (a control shown, a style
    # applied when docked): the dock never cuts a control off on the right.
    fit = _FitWidth(scroll)
    inner.native.installEventFilter(fit)
    fit.apply()
    return scroll


def shrink_combos(container: Container) -> None:
    """Combo boxes as wide as COMBO_CHARACTERS, not as their longest choice."""
    for combo in container.native.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(COMBO_CHARACTERS)


class _FitWidth(QObject):
    """Keeps a scroll area as wide as its contents' minimum and its vertical scroll bar."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self.scroll = scroll

    def apply(self) -> None:
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        width = self.scroll.widget().minimumSizeHint().width() + bar
        if width != self.scroll.minimumWidth():
            self.scroll.setMinimumWidth(width)

    def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.StyleChange, QEvent.Type.Show):
            self.apply()
        return False


def fold_into(inner: Container, title: str, options: Container, before) -> QCollapsible:
    """Put ``options`` in a collapsed section of ``inner``, just above the control ``before``."""
    section = QCollapsible(title)
    section.setDuration(0)  # no animation: a fold is instant, also under test
    section.addWidget(options.native)
    section.layout().setContentsMargins(0, 0, 0, 0)
    inner.native.layout().insertWidget(inner.index(before), section)
    return section
