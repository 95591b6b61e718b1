"""napari writer: a Labels layer -> .nii.gz on its source image's grid, with a provenance sidecar
and the label names and colours in the files ITK-SNAP and 3D Slicer read (label_files).

The geometry comes from the layer's ``metadata["sam2unet"]``: the reader puts it on layers it
opens and the widget copies it from the image onto the label layers it creates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError
from .io import write_labels
from .label_files import write_label_tables
from .objects import label_colour
from .paths import is_nifti_path
from .provenance import COLOURS_KEY, META_KEY, NAMES_KEY, RUNS_KEY, layer_sidecar
from .volume import Volume


def write_labels_layer(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer hook for one Labels layer; returns the paths written."""
    out = Path(path)
    if not is_nifti_path(out):
        out = out.with_name(out.name + ".nii.gz")
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise InputError(f"this writer saves 3D label layers; the layer has shape {labels.shape}")
    volume, note = like_volume(labels.shape, meta)
    # napari asks before replacing a file, so an existing path here is the user's choice.
    written = write_labels(out, labels, volume, sidecar=layer_sidecar(meta, volume, note), overwrite=True)
    write_label_tables(written, label_table(labels, meta))
    return [str(written)]


def write_dicom_seg_layer(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer hook: a Labels layer of a DICOM series as DICOM-SEG referencing that series."""
    return [str(_write_segmentation(Path(path), data, meta))]


def write_seg_nrrd_layer(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer hook: a Labels layer as a 3D Slicer .seg.nrrd with its segment names and colours."""
    out = Path(path)
    if not out.name.lower().endswith(".seg.nrrd"):
        out = out.with_name(out.name.removesuffix(".nrrd") + ".seg.nrrd")
    return [str(_write_segmentation(out, data, meta))]


def _write_segmentation(out: Path, data: Any, meta: dict) -> Path:
    from .seg_formats import last_model, layer_volume, write_segmentation

    labels = np.asarray(data)
    if labels.ndim != 3:
        raise InputError(f"this writer saves 3D label layers; the layer has shape {labels.shape}")
    volume, note = like_volume(labels.shape, meta)
    volume = layer_volume(volume, meta)
    runs = (meta.get("metadata") or {}).get(RUNS_KEY, [])
    return write_segmentation(out, labels, volume, sidecar=layer_sidecar(meta, volume, note), overwrite=True,
                              table=label_table(labels, meta), algorithm=last_model(runs))


def label_table(labels: np.ndarray, meta: dict) -> dict:
    """{label: (name, rgb)} for every label in the map: the layer's names and colours, else defaults."""
    metadata = meta.get("metadata") or {}
    names = {int(k): str(v) for k, v in (metadata.get(NAMES_KEY) or {}).items()}
    colours = {int(k): tuple(int(c) for c in v) for k, v in (metadata.get(COLOURS_KEY) or {}).items()}
    present = sorted(int(v) for v in np.unique(labels) if v)
    return {v: (names.get(v) or f"label {v}", colours.get(v, label_colour(v))) for v in present}


def like_volume(shape: tuple[int, ...], meta: dict) -> tuple[Volume, str | None]:
    """A data-less Volume with the source geometry (or one built from the layer's scale)."""
    geometry = (meta.get("metadata") or {}).get(META_KEY)
    placeholder = np.broadcast_to(np.float32(0), shape)  # no memory: only the shape is used
    if geometry is not None:
        if tuple(geometry["shape"]) != tuple(shape):
            raise InputError(
                f"the labels ({'x'.join(map(str, shape))}) do not match their image grid "
                f"({'x'.join(map(str, geometry['shape']))}); save labels made on that image"
            )
        path = Path(geometry["path"]) if geometry.get("path") else None
        volume = Volume(
            placeholder,
            np.asarray(geometry["affine"]),
            geometry["header"].copy(),
            path,
            tuple(geometry.get("source_shape") or shape),
        )
        return volume, None
    # No source file: the layer's own scale and translate define the grid (1 mm, no rotation).
    scale = np.asarray(meta.get("scale", (1.0, 1.0, 1.0)), dtype=float)[-3:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0, 0.0)), dtype=float)[-3:]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scale)
    affine[:3, 3] = translate
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(tuple(abs(s) for s in scale))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    note = (
        "this layer has no source NIfTI geometry; the grid comes from the layer's scale and "
        "translate only (open the image with the napari-sam2unet reader to keep its geometry)"
    )
    return Volume(placeholder, affine, header, None, tuple(shape)), note
