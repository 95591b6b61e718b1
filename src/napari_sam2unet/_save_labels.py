"""The segment widget's Save button: which formats, where by default, and the writer for each."""

from pathlib import Path

import numpy as np
from napari.layers import Labels
from qtpy.QtWidgets import QFileDialog

from . import _writer
from .errors import Sam2UnetError
from .paths import nifti_stem
from .provenance import META_KEY

# Save formats by file ending: (what the dialog calls it, the writer function in _writer.py).
# The first entry is the default.
SAVE_FORMATS = {
    ".nii.gz": ("NIfTI labels + ITK-SNAP/Slicer label files", "write_labels_layer"),
    ".nii": ("NIfTI labels, uncompressed", "write_labels_layer"),
    ".dcm": ("DICOM-SEG referencing the source DICOM series", "write_dicom_seg_layer"),
    ".seg.nrrd": ("3D Slicer segmentation", "write_seg_nrrd_layer"),
}
DICOM_SEG = ".dcm"


def with_save_suffix(path: Path) -> Path:
    """A path ending in a format we write (typed without one: NIfTI)."""
    if any(path.name.lower().endswith(end) for end in SAVE_FORMATS):
        return path
    return path.with_name(path.name + next(iter(SAVE_FORMATS)))


def default_save_path(layer) -> Path:
    """Beside the source image, named after it: <image>_labels.nii.gz (.dcm for a DICOM series)."""
    geometry = layer.metadata.get(META_KEY) or {}
    end = DICOM_SEG if geometry.get("dicom") else next(iter(SAVE_FORMATS))
    source = geometry.get("path")
    if source:
        return Path(source).with_name(f"{nifti_stem(Path(source))}_labels{end}")
    return Path.cwd() / f"{layer.name}{end}"


def dialog_filter() -> str:
    return ";;".join(f"{name} (*{end})" for end, (name, _) in SAVE_FORMATS.items())


def save_layer(layer, path: Path) -> list[str]:
    """Write a labels layer with its geometry, label files and provenance in the path's format."""
    path = with_save_suffix(Path(path))
    name = next(w for end, (_, w) in SAVE_FORMATS.items() if path.name.lower().endswith(end))
    meta = {"name": layer.name, "metadata": layer.metadata, "scale": tuple(layer.scale),
            "translate": tuple(layer.translate)}
    return getattr(_writer, name)(str(path), np.asarray(layer.data), meta)


def save_labels(widget, path: str | Path | None = None) -> list[str]:
    """The Save button: the current object's labels layer (else the run target, else the only
    one), to ``path`` or where the user says, beside the image by default."""
    current = widget.current
    layer = current.layer if current is not None else None
    if widget.layer_gone(layer):
        layer = widget.target.value
    if layer is None:
        found = [layer for layer in widget.viewer.layers if isinstance(layer, Labels)]
        layer = found[0] if len(found) == 1 else None
    if layer is None:
        widget.tell("error", "no labels to save: segment something first, or choose the layer under Write into")
        return []
    if path is None:
        path, _ = QFileDialog.getSaveFileName(widget.native, "Save labels", str(default_save_path(layer)),
                                              dialog_filter())
        if not path:
            return []
    widget.edits.close()
    try:
        written = save_layer(layer, Path(path))
    except (Sam2UnetError, OSError) as error:
        widget.say(f"could not save {Path(path).name}: {error}", error if isinstance(error, Sam2UnetError) else None)
        return []
    widget.set_status(f"saved {Path(written[0]).name} beside its label files")
    widget.tell("info", f"saved {layer.name} to {written[0]}")
    return written
