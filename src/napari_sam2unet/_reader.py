"""napari reader for .nii/.nii.gz: one layer per file, scaled by the voxel sizes.

The file's geometry (affine, header, path) rides along in the layer's metadata under
``"sam2unet"`` so that the widget and the writer can put results back on the same grid.
napari's built-in reader also claims .nii files: choose this one with
``viewer.open(path, plugin="napari-sam2unet")`` or ``napari --plugin napari-sam2unet FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_info, show_warning

from .errors import InputError
from .io import INTENT_LABEL, read_volume
from .label_files import name_features, read_label_table
from .paths import is_nifti_path
from .provenance import COLOURS_KEY, META_KEY, NAMES_KEY
from .views import opening_window, show_plane
from .volume import Volume

# Integer files with at most this many distinct values (all >= 0) open as labels.
_MAX_LABEL_VALUES = 128

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]
LayerData = tuple[np.ndarray, dict[str, Any], str]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """npe2 reader hook: our reader for NIfTI paths, None for anything else."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and not is_nifti_path(paths[0]):
        from .dicom_series import is_dicom_input

        return read_dicom_layers if is_dicom_input(paths[0]) else None
    if not paths or not all(is_nifti_path(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: PathOrPaths) -> list[LayerData]:
    """Read NIfTI files as napari layer data (image, or labels for label maps)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = [volume_layer_data(read_volume(p)) for p in paths]
    for _, kwargs, kind in layers:
        geometry = kwargs["metadata"][META_KEY]
        if kind == "image" and geometry["volumes"] > 1:
            show_info(f"{kwargs['name']} is 4D: opened volume 0 of {geometry['volumes']} (numbered from 0); "
                      f"choose another under Volume in Segment with SAM2-UNet")
    _axial_when_added(layers)
    return layers


def volume_count(source_shape: tuple[int, ...]) -> int:
    """How many 3D volumes a file holds (a 4D file: its fourth dimension; trailing 1s do not count)."""
    shape = list(source_shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return int(shape[3]) if len(shape) == 4 else 1


def _axial_when_added(layers: list[LayerData]) -> None:
    """Images open in the radiological axial view of their affine, with or without the widget.
    A reader cannot set the view, so it waits for its layers to reach the viewer."""
    from napari import current_viewer

    viewer = current_viewer()
    # Known by their arrays: the series of one DICOM folder share its path, a name may change.
    waiting = [data for data, _, kind in layers if kind == "image"]
    if viewer is None or not waiting:
        return

    def on_inserted(event):
        from napari.layers import Image

        from .history import layer_key
        from .session import session_for

        layer = event.value
        found = [n for n, data in enumerate(waiting) if isinstance(layer, Image) and layer.data is data]
        if not found:
            return
        waiting.pop(found[0])
        if not waiting:
            viewer.layers.events.inserted.disconnect(on_inserted)
        viewed = session_for(viewer).viewed
        if layer_key(layer) not in viewed:  # the widget, when open, did it already
            viewed.add(layer_key(layer))
            show_plane(viewer, layer, "axial")

    viewer.layers.events.inserted.connect(on_inserted)


def read_dicom_layers(path: PathOrPaths) -> list[LayerData]:
    """A DICOM folder, DICOMDIR or file: one image layer per series found."""
    from .dicom import read_dicom
    from .dicom_series import find_series

    where = Path(path if isinstance(path, (str, os.PathLike)) else path[0])
    layers = []
    for series in find_series(where):
        data, kwargs, kind = volume_layer_data(read_dicom(where, series.uid))
        kwargs["name"] = f"{where.name} series {series.number or series.uid}"
        layers.append((data, kwargs, kind))
    _axial_when_added(layers)  # as NIfTI files open
    return layers


def geometry_metadata(volume: Volume) -> dict[str, Any]:
    """What the writer and the widget need to put voxels back on this file's grid."""
    return {
        "path": str(volume.path) if volume.path else None,
        "affine": volume.affine.copy(),
        "header": volume.header.copy(),
        "spacing": volume.spacing,
        "orientation": volume.orientation,
        "shape": tuple(volume.data.shape),
        "source_shape": tuple(volume.source_shape),
        "notes": list(volume.notes),
        "volumes": volume_count(volume.source_shape),
        "volume": 0,  # which of them (the widget's Volume control changes it)
        # DICOM input: the acquired frames a DICOM-SEG references (carried with the geometry).
        **({"dicom": {"frames": list(volume.frames), "series_uid": volume.series_uid}}
           if getattr(volume, "frames", None) else {}),
    }


def looks_like_labels(volume: Volume) -> bool:
    """A label map: the header says so, or integer storage with few non-negative values."""
    header = volume.header
    if int(header.get("intent_code", 0)) == INTENT_LABEL:
        return True
    if not np.issubdtype(header.get_data_dtype(), np.integer):
        return False
    slope, inter = header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return False
    data = volume.data
    if data.min() < 0:
        return False
    values = np.unique(data[:: max(1, data.shape[0] // 64)])  # a cheap first look
    if values.size > _MAX_LABEL_VALUES:
        return False
    return np.unique(data).size <= _MAX_LABEL_VALUES


def volume_layer_data(volume: Volume) -> LayerData:
    """One layer: labels (integers) for a label map, else an image with a sensible contrast."""
    name = _display_name(volume.path) if volume.path else "volume"
    metadata = {META_KEY: geometry_metadata(volume)}
    kwargs: dict[str, Any] = {"name": name, "scale": volume.spacing, "metadata": metadata}
    if looks_like_labels(volume):
        top = float(volume.data.max(initial=0))
        dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
        table = _label_table(volume)
        if table:
            metadata[NAMES_KEY] = {label: name for label, (name, _) in table.items()}
            metadata[COLOURS_KEY] = {label: rgb for label, (_, rgb) in table.items()}
            kwargs["features"] = name_features(metadata[NAMES_KEY])  # names on hover
            colours = {label: (*(c / 255 for c in rgb), 1.0) for label, (_, rgb) in table.items()}
            kwargs["colormap"] = {0: (0.0, 0.0, 0.0, 0.0), None: (0.6, 0.6, 0.6, 1.0), **colours}
        return volume.data.astype(dtype), kwargs, "labels"
    data = _finite(volume.data, name)
    # CT opens in the soft-tissue window, MR in its percentiles: the engine's own modality guess.
    window = opening_window(data)
    metadata[META_KEY]["display"] = window  # what the widget's Display "as opened" goes back to
    kwargs.update(contrast_limits=window, colormap="gray")
    return data, kwargs, "image"


def _finite(data: np.ndarray, name: str) -> np.ndarray:
    """NaN/Inf voxels as the lowest finite intensity (napari cannot scale a NaN range), said once."""
    if not np.issubdtype(data.dtype, np.floating):
        return data
    finite = np.isfinite(data)
    if finite.all():
        return data
    if not finite.any():
        raise InputError(f"every voxel of {name} is NaN or infinite: there is nothing to show or segment")
    low = data[finite].min()
    bad = int(finite.size - np.count_nonzero(finite))
    show_warning(f"{bad} NaN or infinite voxels in {name} are shown and segmented as its lowest intensity "
                 f"({low:g}); fix the file if they mark something else")
    return np.where(finite, data, low).astype(data.dtype, copy=False)


def _label_table(volume: Volume) -> dict:
    """Names and colours beside the file (ITK-SNAP or Slicer); a broken file is not worth failing the open."""
    if volume.path is None:
        return {}
    try:
        return read_label_table(volume.path)
    except (OSError, ValueError):
        return {}


def _display_name(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
