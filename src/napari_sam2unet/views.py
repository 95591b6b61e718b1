"""Views users know from 3D Slicer and ITK-SNAP, worked out from the NIfTI affine (no Qt).

napari shows planes of the last two entries of ``dims.order`` (rows down, columns right) and
its camera can flip either. The radiological convention: axial and coronal with the patient's
right on the screen's left, anterior (axial) or superior (coronal, sagittal) up; sagittal with
anterior on the left. Oblique files use the array axis nearest each anatomical direction.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .preprocess import CT_PRESETS, plan_views

PLANES = ("axial", "coronal", "sagittal")
# Anatomical directions as RAS+ world axes: 0 = left->right, 1 = posterior->anterior, 2 = inferior->superior.
_LR, _PA, _IS = 0, 1, 2
# Per plane: the world axis the slider walks, then (vertical, horizontal) with the world
# direction that must point up (vertical) or left (horizontal) on screen (+1: towards R, A or S).
_LAYOUT = {
    "axial": (_IS, (_PA, +1), (_LR, +1)),
    "coronal": (_PA, (_IS, +1), (_LR, +1)),
    "sagittal": (_LR, (_IS, +1), (_PA, +1)),
}
DISPLAY_WINDOWS = ("as opened", *CT_PRESETS)


def array_axes(affine: np.ndarray) -> tuple[int, int, int]:
    """For each world axis (R, A, S) the array axis closest to it (unique even for oblique files)."""
    directions = np.abs(np.asarray(affine, dtype=float)[:3, :3])
    directions = directions / np.maximum(np.linalg.norm(directions, axis=0, keepdims=True), 1e-12)
    found: dict[int, int] = {}
    # Greedy on the strongest alignment first, so two world axes never claim one array axis.
    for flat in np.argsort(-directions, axis=None):
        world, array = divmod(int(flat), 3)
        if world not in found and array not in found.values():
            found[world] = array
    return found[0], found[1], found[2]


def plane_view(affine: np.ndarray, plane: str) -> tuple[tuple[int, int, int], tuple[str, str]]:
    """(dims order of the three array axes, camera orientation2d) for a radiological view."""
    if plane not in _LAYOUT:
        raise ValueError(f"unknown plane {plane!r}; use one of {', '.join(PLANES)}")
    axes = array_axes(affine)
    slice_world, (v_world, v_up), (h_world, h_left) = _LAYOUT[plane]
    v_axis, h_axis = axes[v_world], axes[h_world]
    affine = np.asarray(affine, dtype=float)
    # Does a growing index move towards the direction that should be up / left?
    v_towards = np.sign(affine[v_world, v_axis]) == v_up
    h_towards = np.sign(affine[h_world, h_axis]) == h_left
    orientation = ("up" if v_towards else "down", "left" if h_towards else "right")
    return (axes[slice_world], v_axis, h_axis), orientation


def ras_mm(affine: np.ndarray, voxel) -> np.ndarray:
    """Scanner coordinates (RAS mm, NIfTI convention) of a voxel index."""
    return (np.asarray(affine, dtype=float) @ np.append(np.asarray(voxel, dtype=float), 1.0))[:3]


def display_limits(preset: str) -> tuple[float, float]:
    """Contrast limits of a CT window preset (level/width in HU), for display only."""
    level, width = CT_PRESETS[preset]
    return level - width / 2, level + width / 2


def opening_window(data: np.ndarray) -> tuple[float, float]:
    """The contrast a volume opens with: the engine's own guess (CT soft tissue for CT-like
    values, else the MR percentiles), on its finite voxels."""
    flat = np.asarray(data).reshape(-1)
    sample = flat[:: max(1, flat.size // 2_000_000)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise InputError("every voxel of the image is NaN or infinite: there is nothing to show")
    try:
        view = plan_views(sample, "auto")[0]
    except InputError:  # nearly constant: show what there is
        return float(sample.min()), float(sample.max()) + 1e-6
    return float(view.low), float(view.high)


def show_plane(viewer, image, plane: str) -> None:
    """Show a 3D image layer in a radiological plane worked out from its file's affine (else the
    layer's), fitted to the canvas."""
    if image is None or image.ndim != 3:
        return
    affine = (image.metadata.get("sam2unet") or {}).get("affine")
    if affine is None:
        affine = np.asarray(image.affine.affine_matrix)
    order, orientation = plane_view(np.asarray(affine), plane)
    offset = viewer.dims.ndim - 3
    viewer.dims.order = tuple(range(offset)) + tuple(a + offset for a in order)
    scene = getattr(viewer, "scene", None)  # napari 0.9 moved the camera to the scene
    camera = scene.camera if scene is not None else viewer.camera
    camera.orientation2d = orientation
    viewer.reset_view()
