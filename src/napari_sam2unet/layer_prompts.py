"""napari layers <-> engine prompts, without Qt: which slice is shown, points and boxes in voxels.

napari puts voxel centres on integer coordinates; the engine's voxel i spans [i, i + 1), so
in-plane coordinates move by half a voxel on the way in and back on the way out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError, PromptError
from .prompts import Box, Point, Prompts

SIGN_COLOURS = {"positive": "lime", "negative": "magenta"}


def slice_axis(viewer, image) -> int:
    """The image axis napari's 2D view slices through (the one it does not display)."""
    world_axis = viewer.dims.order[-3] if viewer.dims.ndim >= 3 else 0
    axis = world_axis - (viewer.dims.ndim - image.ndim)
    if not 0 <= axis < image.ndim:
        raise InputError("the slider does not move through the image; reset the view (Home)")
    return axis


def current_slice(viewer, image, axis: int) -> int:
    """The image slice index shown now on the slice axis."""
    point = np.asarray(viewer.dims.point)[-image.ndim :]
    k = int(np.round(image.world_to_data(point)[axis]))
    return int(np.clip(k, 0, image.data.shape[axis] - 1))


def _to_image(layer, image, coords: np.ndarray) -> np.ndarray:
    """Layer data coordinates (N x D) -> the image's data coordinates, through world space."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))[:, -image.ndim :]
    out = [np.asarray(image.world_to_data(np.asarray(layer.data_to_world(c), dtype=float))) for c in coords]
    return np.asarray(out, dtype=float).reshape(-1, image.ndim)


def _to_layer(layer, image, coords: np.ndarray) -> np.ndarray:
    """The image's data coordinates -> a prompt layer's data coordinates."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))
    out = [np.asarray(layer.world_to_data(np.asarray(image.data_to_world(c), dtype=float))) for c in coords]
    return np.asarray(out, dtype=float).reshape(-1, layer.ndim)


def _in_plane(coords: np.ndarray, axis: int) -> np.ndarray:
    return np.delete(coords, axis, axis=1) + 0.5


def _voxel(k: float, i: float, j: float, axis: int) -> np.ndarray:
    """A napari data coordinate from slice k and in-plane engine coordinates (i, j)."""
    return np.insert(np.array([i - 0.5, j - 0.5]), axis, k)


def point_prompts(image, points, axis: int) -> list[Point]:
    """Points (sign from the 'sign' feature) as engine points."""
    if points is None or not len(points.data):
        return []
    coords = _to_image(points, image, points.data)
    signs = points.features["sign"] if "sign" in points.features else None
    found = []
    for n, c in enumerate(coords):
        i, j = _in_plane(c[None], axis)[0]
        positive = signs is None or str(signs.iloc[n]) != "negative"
        found.append(Point(int(np.round(c[axis])), float(i), float(j), positive))
    return found


def box_prompts(image, shapes, axis: int) -> list[Box]:
    """Shapes (their bounding boxes on one slice each) as engine boxes."""
    if shapes is None:
        return []
    found = []
    for vertices in shapes.data:
        coords = _to_image(shapes, image, vertices)
        ks = np.round(coords[:, axis]).astype(int)
        if ks.min() != ks.max():
            raise PromptError("a box is not drawn on one slice; draw boxes in the 2D view")
        plane = _in_plane(coords, axis)
        (i0, j0), (i1, j1) = plane.min(axis=0), plane.max(axis=0)
        found.append(Box(int(ks[0]), float(i0), float(j0), float(i1), float(j1)))
    return found


def layer_prompts(image, points=None, shapes=None, axis: int = 2) -> Prompts:
    """Points and shapes layers as engine prompts on the image's slice axis."""
    return Prompts(box_prompts(image, shapes, axis), point_prompts(image, points, axis))


def show_prompts(prompts: Prompts, image, points, shapes, axis: int) -> None:
    """Put an object's prompts back into the (emptied) points and shapes layers."""
    if points is not None:
        coords = [_voxel(p.slice, p.i, p.j, axis) for p in prompts.points]
        signs = ["positive" if p.positive else "negative" for p in prompts.points]
        data = _to_layer(points, image, np.array(coords)) if coords else np.empty((0, points.ndim))
        points.data = data
        points.features = pd.DataFrame({"sign": pd.Categorical(signs, categories=list(SIGN_COLOURS))})
        colour_points(points)
    if shapes is not None:
        shapes.data = []
        rectangles = []
        for b in prompts.boxes:
            corners = [_voxel(b.slice, i, j, axis) for i, j in ((b.i0, b.j0), (b.i0, b.j1), (b.i1, b.j1), (b.i1, b.j0))]
            rectangles.append(_to_layer(shapes, image, np.array(corners)))
        if rectangles:
            shapes.add_rectangles(rectangles)


def colour_points(points) -> None:
    """Each point's face colour from its sign (positive / negative)."""
    if len(points.data) and "sign" in points.features:
        points.face_color = [SIGN_COLOURS.get(str(s), "lime") for s in points.features["sign"]]


def only_slice(prompts: Prompts, k: int) -> Prompts:
    return Prompts(prompts.boxes_on(k), prompts.points_on(k))
