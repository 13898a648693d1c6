"""Same capture or another shot? Dense agreement of an aligned pair over its overlap.

An edit of one capture (re-encoded, resized, recoloured, cropped, flipped, turned,
bordered, captioned) agrees with its source almost everywhere once the two are aligned,
up to one global colour change and a local overlay; another shot of the same scene
disagrees in many places (parallax, things that moved, light, sensor noise). The
geometric stage's affine (``ghostmatch.dupes.verify``) starts a Lucas-Kanade refinement
of one affine map between the two greyscale images, coarse to fine, weighted robustly
(Tukey) so that a caption or a border does not pull it, with a gain and offset for the
brightness. The overlap is then cut into an 8 x 8 grid of patches, and a patch agrees
when its median residual is small against the image's contrast, in grey or after an
affine colour fit. The pair is one capture when nearly all patches agree.

The rule (``either patches@0.2 >= 8/9``) was chosen on the tuning half of
``python -m benchmarks.othershots`` and checked on its held-out half (README, duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# Coarse to fine: (long side in pixels, blur sigma in pixels, Gauss-Newton steps).
LEVELS = ((48, 1.0, 20), (96, 1.0, 10), (160, 1.0, 5))
# A patch agrees when its median residual, over the kept image's contrast, is at most this.
TOLERANCE = 0.2
PATCHES = 8
TUKEY = 4.685
# Share of overlap patches that must agree (in grey or in colour) for one capture:
# measured, see the module docstring.
SAME_CAPTURE_CUT = 8 / 9
# Images are decoded for the comparison with at least this shorter side.
DECODE_SIDE = 160
# The identity alignment counts as "the whole image, unmoved" (a ``near`` copy) within
# this much of the identity map, covering at least this share of the kept image.
IDENTITY_TOLERANCE = 0.06
WHOLE_OVERLAP = 0.9
THUMB_SIDE = 16


@dataclass(frozen=True)
class Capture:
    """One image prepared for comparison: a blurred grey image per level of ``LEVELS``
    with its gradients, and the finest level in colour."""

    grey: tuple[np.ndarray, ...]
    gradients: tuple[tuple[np.ndarray, np.ndarray], ...]
    rgb: np.ndarray
    # A THUMB_SIDE x THUMB_SIDE grey thumbnail, zero mean and unit norm, flattened.
    thumb: np.ndarray

    def correlation(self, other: Capture) -> float:
        """Correlation of the two thumbnails: near 1 for the same picture unmoved, near 0
        for unrelated ones. A cheap first test where the descriptor cannot tell images
        apart (``ghostmatch.dupes.finder``)."""
        return float(self.thumb @ other.thumb)


@dataclass(frozen=True)
class Agreement:
    """A pair after alignment: ``score`` is the share of overlap patches that agree (the
    better of grey and colour), ``overlap`` the share of the kept image the other covers,
    ``warp`` the refined affine (2 x 3) from the kept image's unit square to the other's."""

    score: float
    overlap: float
    warp: np.ndarray

    @property
    def same_capture(self) -> bool:
        # The cut is a ratio of small counts: compare with a little slack for rounding.
        return self.score >= SAME_CAPTURE_CUT - 1e-9

    def is_whole(self) -> bool:
        """The other image is the whole kept one, unmoved (re-encoded, resized, recoloured)."""
        close = float(np.abs(self.warp - np.eye(2, 3)).max()) <= IDENTITY_TOLERANCE
        return close and self.overlap >= WHOLE_OVERLAP


def _resized(image: Image.Image, side: int, mode: str) -> np.ndarray:
    w, h = image.size
    scale = side / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    small = image.convert(mode).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small, np.float64) / 255.0


def prepare_capture(image: Image.Image) -> Capture:
    """The pyramid and colour image that :func:`agreement` compares."""
    grey = tuple(
        ndimage.gaussian_filter(_resized(image, side, "L"), sigma) for side, sigma, _ in LEVELS
    )
    side, sigma, _ = LEVELS[-1]
    pixels = _resized(image, side, "RGB")
    rgb = np.stack([ndimage.gaussian_filter(pixels[..., c], sigma) for c in range(3)], -1)
    gradients = tuple((g[0], g[1]) for g in (np.gradient(level) for level in grey))
    small = image.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    thumb = np.asarray(small, np.float64).ravel()
    thumb -= thumb.mean()
    thumb /= max(float(np.linalg.norm(thumb)), 1e-9)
    return Capture(grey, gradients, rgb, thumb)


def _unit_grid(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / h, np.ones(h * w)], axis=1)


def _sample(image: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` at unit coordinates (n, 2): values, and which points fall inside it."""
    h, w = image.shape
    x, y = units[:, 0] * w - 0.5, units[:, 1] * h - 0.5
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return ndimage.map_coordinates(image, [y, x], order=1, mode="nearest"), inside


def _photometric(t: np.ndarray, i: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Gain and offset taking ``i`` to ``t`` by weighted least squares."""
    sw = weight.sum()
    if sw <= 0:
        return 1.0, 0.0
    mt, mi = (weight * t).sum() / sw, (weight * i).sum() / sw
    var = (weight * (i - mi) ** 2).sum() / sw
    gain = ((weight * (i - mi) * (t - mt)).sum() / sw) / var if var > 1e-9 else 0.0
    return gain, mt - gain * mi


def _tukey(r: np.ndarray, inside: np.ndarray) -> np.ndarray:
    scale = max(1.4826 * float(np.median(np.abs(r[inside]))), 1e-3)
    u = r / (TUKEY * scale)
    return inside * np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)


def _robust_fit(
    t: np.ndarray, i: np.ndarray, inside: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Gain and offset taking ``i`` to ``t`` over ``inside``, refitted with Tukey weights
    so that an overlay (a caption, a logo) does not shift them: (gain, residuals, weights)."""
    weight = inside.astype(np.float64)
    if not inside.any():  # the other image does not cover the kept one at all
        return 1.0, t - i, weight
    for _ in range(3):
        gain, offset = _photometric(t, i, weight)
        weight = _tukey(t - (gain * i + offset), inside)
    gain, offset = _photometric(t, i, weight)
    return gain, t - (gain * i + offset), weight


def align(
    kept: Capture, other: Capture, warp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine ``warp`` (2 x 3, kept's unit coordinates to the other's) by robust
    Gauss-Newton from coarse to fine: (warp, finest residuals, finest inside mask)."""
    p = warp.astype(np.float64).copy()
    for level, (_, _, steps) in enumerate(LEVELS):
        t_img, i_img = kept.grey[level], other.grey[level]
        gy, gx = other.gradients[level]
        h, w = i_img.shape
        design = _unit_grid(*t_img.shape)
        t = t_img.ravel()
        for _ in range(steps):
            units = design @ p.T
            iw, inside = _sample(i_img, units)
            if inside.sum() < 16:
                break
            gain, r, weight = _robust_fit(t, iw, inside)
            ix = _sample(gx, units)[0] * w * gain
            iy = _sample(gy, units)[0] * h * gain
            jac = np.concatenate([ix[:, None] * design, iy[:, None] * design], axis=1)
            jw = jac * weight[:, None]
            hessian = jw.T @ jac + 1e-6 * np.eye(6)
            step = np.linalg.solve(hessian, jw.T @ r)
            p += step.reshape(2, 3)
            if np.abs(step).max() < 1e-5:
                break
    iw, inside = _sample(i_img, design @ p.T)
    _, r, _ = _robust_fit(t, iw, inside)
    return p, r.reshape(t_img.shape), inside.reshape(t_img.shape)


def _colour_residuals(kept: Capture, other: Capture, warp: np.ndarray) -> np.ndarray:
    """Residuals (h, w) over the kept image's colour contrast after a robust 3 x 4 affine
    colour fit from the other image to the kept one: a hue or saturation change is linear
    in RGB, not in grey."""
    target, source = kept.rgb, other.rgb
    h, w = target.shape[:2]
    units = _unit_grid(h, w) @ warp.T
    warped = np.stack([_sample(source[..., c], units)[0] for c in range(3)], -1)
    inside = _sample(source[..., 0], units)[1]
    t = target.reshape(-1, 3)
    design = np.hstack([warped, np.ones((len(warped), 1))])
    weight = inside.astype(np.float64)
    r = np.zeros(len(t))
    for _ in range(4):
        root = np.sqrt(weight)[:, None]
        colour, *_ = np.linalg.lstsq(design * root, t * root, rcond=None)
        r = np.linalg.norm(t - design @ colour, axis=1)
        if not inside.any():
            break
        weight = _tukey(r, inside)
    spread = t[inside] - t[inside].mean(axis=0) if inside.any() else np.zeros((1, 3))
    contrast = max(float(np.sqrt((spread**2).sum(axis=1).mean())), 0.02)
    return (r / contrast).reshape(h, w)


def _patch_share(e: np.ndarray, inside: np.ndarray) -> float:
    """Share of the overlap's patches (an ``PATCHES`` x ``PATCHES`` grid, those at least
    half inside) whose median residual is within ``TOLERANCE``."""
    h, w = e.shape
    agree = total = 0
    for rows in np.array_split(np.arange(h), PATCHES):
        for cols in np.array_split(np.arange(w), PATCHES):
            cell = np.ix_(rows, cols)
            covered = inside[cell]
            if covered.mean() >= 0.5:
                total += 1
                agree += float(np.median(e[cell][covered])) <= TOLERANCE
    return agree / total if total else 0.0


def agreement(kept: Capture, other: Capture, warp: np.ndarray) -> Agreement:
    """Align ``other`` onto ``kept`` from ``warp`` (kept's unit square to the other's) and
    measure how much of the overlap agrees."""
    refined, r, inside = align(kept, other, warp)
    if inside.sum() < 16:
        return Agreement(0.0, 0.0, refined)
    t = kept.grey[-1]
    contrast = max(float(t[inside].std()), 0.02)
    grey = _patch_share(np.abs(r) / contrast, inside)
    colour = _patch_share(_colour_residuals(kept, other, refined), inside)
    return Agreement(max(grey, colour), float(inside.mean()), refined)
