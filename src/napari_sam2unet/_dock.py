"""Layout helpers shared by the plugin's docks, so that they fit a 1366x768 laptop screen: the
controls scroll, and advanced options fold away.

napari docks a magicgui widget's ``native``, which for ``Container(scrollable=True)`` is the
inner widget without its scroll area; so the scroll area is made here, in Qt.
"""

from magicgui.widgets import Container
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea
from superqt import QCollapsible


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
    fit_width(scroll)
    return scroll


def fit_width(scroll: QScrollArea) -> None:
    """No horizontal scrolling: the scroll area is as wide as its contents and a scroll bar."""
    bar = scroll.verticalScrollBar().sizeHint().width()
    scroll.setMinimumWidth(scroll.widget().minimumSizeHint().width() + bar)


def fold_into(inner: Container, title: str, options: Container, before) -> QCollapsible:
    """Put ``options`` in a collapsed section of ``inner``, just above the control ``before``."""
    section = QCollapsible(title)
    section.setDuration(0)  # no animation: a fold is instant, also under test
    section.addWidget(options.native)
    section.layout().setContentsMargins(0, 0, 0, 0)
    inner.native.layout().insertWidget(inner.index(before), section)
    return section
