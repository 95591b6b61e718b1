"""Augmentations of a training slice: elastic deformation, synthetic contrasts from label maps,
remapped intensities, synthetic lesions, jittered windows. numpy only."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..preprocess import View


def random_field(rng: np.random.Generator, shape, scale: int = 8) -> np.ndarray:
    """A smooth random field in about [-1, 1], upsampled from a coarse grid."""
    coarse = rng.standard_normal((max(2, shape[0] // scale), max(2, shape[1] // scale)))
    zoom = (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1])
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: shape[0], : shape[1]]


def deform(rng, arrays_nearest: list[np.ndarray], strength: float = 1.0) -> list[np.ndarray]:
    """Random affine + elastic warp of 2D label arrays (nearest neighbour)."""
    h, w = arrays_nearest[0].shape
    angle = rng.uniform(-0.25, 0.25) * strength
    scale = np.exp(rng.uniform(-0.12, 0.12, 2) * strength)
    shear = rng.uniform(-0.08, 0.08) * strength
    c, s = np.cos(angle), np.sin(angle)
    mat = np.array([[c, -s], [s, c]]) @ np.array([[scale[0], shear], [0, scale[1]]])
    centre = np.array([h / 2, w / 2])
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([rr - centre[0], cc - centre[1]]).reshape(2, -1)
    coords = (mat @ coords).reshape(2, h, w)
    amp = rng.uniform(0, 3.0) * strength
    coords[0] += centre[0] + amp * random_field(rng, (h, w), 16)
    coords[1] += centre[1] + amp * random_field(rng, (h, w), 16)
    return [ndimage.map_coordinates(a, coords, order=0, mode="nearest") for a in arrays_nearest]


def synth_image(rng, labels: np.ndarray) -> np.ndarray:
    """A random contrast from a label map: intensity per label, texture, bias, blur, noise, gamma."""
    top = int(labels.max()) + 1
    means = rng.uniform(0, 1000, top).astype(np.float32)
    if rng.random() < 0.5:
        means[0] = rng.uniform(0, 100)  # background often dark, as in scans
    stds = rng.uniform(0, 60, top).astype(np.float32)
    img = means[labels] + stds[labels] * rng.standard_normal(labels.shape).astype(np.float32)
    if rng.random() < 0.7:
        img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.5))
    if rng.random() < 0.7:
        img *= np.exp(rng.uniform(0.1, 0.5) * random_field(rng, img.shape, 32)).astype(np.float32)
    img += rng.uniform(0, 30) * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0, None)
    if rng.random() < 0.5:
        hi = max(float(img.max()), 1e-3)
        img = hi * (img / hi) ** np.exp(rng.uniform(-0.4, 0.4))
    return img.astype(np.float32)


def remap_intensity(rng, img: np.ndarray) -> np.ndarray:
    """A random smooth, possibly non-monotonic intensity mapping: a real scan with a new contrast."""
    lo, hi = np.percentile(img[:: max(1, img.size // 20000)], [0.5, 99.5])
    x = np.clip((img - lo) / max(hi - lo, 1e-3), 0, 1)
    knots = np.sort(rng.uniform(0, 1, 4))
    values = rng.uniform(0, 1000, 6)
    xp = np.concatenate([[0], knots, [1]])
    noise = rng.uniform(0, 15) * rng.standard_normal(x.shape).astype(np.float32)
    return np.interp(x, xp, values).astype(np.float32) + noise


def add_lesion(rng, img: np.ndarray, spacing, width: float, fg: np.ndarray | None = None):
    """Paint a smooth random blob with its own intensity and texture; returns (image, mask)."""
    h, w = img.shape
    cand = np.flatnonzero(fg.ravel()) if fg is not None and fg.any() else None
    if cand is not None:
        idx = cand[rng.integers(cand.size)]
        cr, cc = divmod(int(idx), w)
    else:
        cr, cc = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    radius_mm = float(np.exp(rng.uniform(np.log(2.5), np.log(30))))
    rr = radius_mm / spacing[0] * np.exp(rng.uniform(-0.3, 0.3))
    rc = radius_mm / spacing[1] * np.exp(rng.uniform(-0.3, 0.3))
    rr, rc = max(rr, 2.0), max(rc, 2.0)
    r0, r1 = max(0, int(cr - 2 * rr) - 2), min(h, int(cr + 2 * rr) + 3)
    c0, c1 = max(0, int(cc - 2 * rc) - 2), min(w, int(cc + 2 * rc) + 3)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cr, xx - cc
    u = (dy * np.cos(ang) + dx * np.sin(ang)) / rr
    v = (-dy * np.sin(ang) + dx * np.cos(ang)) / rc
    dist = np.sqrt(u * u + v * v)
    dist = dist + rng.uniform(0, 0.35) * random_field(rng, dist.shape, max(2, int(min(rr, rc))))
    inside = dist < 1.0
    if inside.sum() < 6:
        return img, None
    mask = np.zeros((h, w), bool)
    mask[r0:r1, c0:c1] = inside
    patch = img[r0:r1, c0:c1]
    local = float(np.median(patch))
    # Contrast relative to the window width; small blobs are sometimes very faint.
    contrast = np.exp(rng.uniform(np.log(0.06), np.log(0.7))) * width * rng.choice([-1, 1])
    tex = rng.uniform(0, 0.25) * abs(contrast) * random_field(rng, patch.shape, 3)
    value = local + contrast + tex
    edge = rng.uniform(0.0, 1.2)
    alpha = inside.astype(np.float32)
    if edge > 0.2:
        alpha = ndimage.gaussian_filter(alpha, edge)
    if rng.random() < 0.3:  # a ring-enhancing rim
        rim = (dist > 0.75) & (dist < 1.0)
        value = value + rim * 0.5 * contrast
    out = img.copy()
    out[r0:r1, c0:c1] = patch * (1 - alpha) + value * alpha
    if RING_SHARE and min(rr, rc) >= 6 and rng.random() < RING_SHARE:  # smaller rings' cores are a pixel or two
        return _hollow(rng, out, mask, (r0, r1, c0, c1), dist, min(rr, rc), local + contrast, width)
    return out, mask


# Painted lesions that are a wall around a core of other tissue. Off in the bundled recipe: 1000
# steps from the bundled model with 0.5 taught it no real ring (validation myocardium, box + 3
# corrective rounds, 0.069 -> 0.141) and cost propagation (0.524 -> 0.506; docs/performance.md).
RING_SHARE = 0.0


def _hollow(rng, img, mask, window, dist, radius, wall, width):
    """Make a painted lesion a ring (a heart's myocardium around its blood pool, a tumour's
    rim around necrosis): its core gets its own intensity and leaves the target. Walls run
    from half the radius down to 2 pixels (a myocardium is a thin wall around a bright pool)."""
    r0, r1, c0, c1 = window
    core = dist < rng.uniform(0.5, max(0.5, min(0.92, 1 - 2.0 / radius)))
    if core.sum() < 4 or (mask[r0:r1, c0:c1] & ~core).sum() < 6:
        return img, mask
    # The core differs from the wall by 15-80% of the window (a blood pool, necrosis).
    value = wall + rng.choice([-1, 1]) * np.exp(rng.uniform(np.log(0.15), np.log(0.8))) * width
    alpha = ndimage.gaussian_filter(core.astype(np.float32), rng.uniform(0.0, 1.0))
    out = img.copy()
    patch = out[r0:r1, c0:c1]
    out[r0:r1, c0:c1] = patch * (1 - alpha) + value * alpha
    ring = mask.copy()
    ring[r0:r1, c0:c1] &= ~core
    return out, ring


# ---------------------------------------------------------------------------------------------
# Crops


def jitter_views(rng, views, modality):
    if rng.random() < 0.5:
        return views
    out = []
    for v in views:
        width = v.high - v.low
        d = rng.normal(0, 0.05 if modality == "mr" else 0.03, 2) * width
        out.append(View(v.low + d[0], v.high + d[1], v.gamma, v.label))
    return tuple(out)


def paint_lesion(rng, img, views, spacing2d):
    """A synthetic lesion whose contrast shows in one of the three views (not always the first):
    on CT a lesion may be visible only in the lung window, as subsolid margins are."""
    view = views[0] if rng.random() < 0.6 else views[int(rng.integers(1, 3))]
    width = view.high - view.low
    scaled = (img - view.low) / max(width, 1e-6)
    fg = (scaled > 0.1) & (scaled < 0.95)
    fg = ndimage.binary_erosion(fg, iterations=3) if fg.sum() > 500 else fg
    return add_lesion(rng, img, spacing2d, width, fg)


