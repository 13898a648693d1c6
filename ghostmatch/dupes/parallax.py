"""Does the pair move as one piece? Local shifts of a copy against another shot.

The dense agreement (``ghostmatch.dupes.samecapture``) compares a pair at 128 pixels. A
flat scene shot again from a little closer or aside is one affine map away from the first
shot at that size, just like a crop resized back, and passes. Finer, the two differ: an
edit of one capture moves all of it by one map, so once that map is refined every part of
the overlap lies on its source to a small fraction of a pixel, while another shot holds
parallax, perspective and things that moved, and its parts lie up to pixels apart under
the best single map.

:func:`spread` measures this. Both images at ``LONG_SIDE`` pixels (or the coarser of their
pixel densities), the map refined there, the other image's colours fitted to the kept
image's grey (one affine colour change) and the sharper image blurred to the softer one's
fine detail, the overlap is cut into a 4 x 4 grid; each cell's own best shift (one
Lucas-Kanade step, with a gain and offset) is compared with the cells' median shift. The
spread is the median distance, in pixels at that size. A pair whose spread reaches
``SPREAD_CUT`` is not one capture (``ghostmatch.dupes.finder`` then calls it ``similar``).

The size, the measure and the cut were chosen on the tuning half of ``python -m
benchmarks.othershots`` and checked on its held-out half (README, duplicates).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ghostmatch.dupes import samecapture
from ghostmatch.ingest.images import to_rgb

# The working size's long side, in pixels of the kept image (its grid is where the two
# are compared). Spreads at 256 and at full size (320 and 640 pixels) told copies from
# other shots alike on the tuning half; 256 costs a sixth of 640's pixels.
LONG_SIDE = 256
# The map's refinement at the working size, from the 128 pixel map the agreement found:
# (blur sigma, Gauss-Newton steps).
REFINE = ((1.0, 8), (0.6, 6))
STEP_DONE = 1e-4
REFINE_SHARE = 0.25
CELLS = 4
# Blurs tried on the sharper image to bring its fine detail to the softer one's.
MATCH_SIGMAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.3, 3.0)
# Pixels kept clear of the overlap's edge: the border, plus three sigmas of every blur.
EDGE = 3
# A cell's shift counts when its fitted gain is at least this (a cell of the other image
# that does not follow the kept one at all gives no shift).
MIN_GAIN = 0.2
MIN_CELLS = 4
# A cell counts only with some gradient: a mean squared gradient (grey levels of 0-1 per
# pixel, squared) of at least this, which only a flat cell lacks (one grey level's step
# in 3,000 pixels already gives 750 times as much).
MIN_GRADIENT = 1e-10
# The tuning half's spreads: copies at most 0.34 px, other shots at least 0.44. The cut
# sits just under the other shots: a copy lost costs recall on crops, where the rule is
# nearest its target.
SPREAD_CUT = 0.42
# Files are decoded for a spread with at least this shorter side (``LONG_SIDE`` for a 4:3
# picture).
DECODE_SIDE = 192
# :func:`coarse_spread` under this settles a pair as one piece without decoding it again:
# the tuning half's other shots spread at least 0.27 there; 91% of its copies under 0.12.
COARSE_SPREAD = 0.12


def working_pair(
    kept: Image.Image, other: Image.Image, warp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The kept image's grey pixels (h, w) and the other's colour planes (3, h', w') at
    the working size: the kept image's long side at most ``LONG_SIDE`` and at most the
    other's pixel density under ``warp`` (kept unit square to the other's), the other at
    the same density."""
    kw, kh = kept.size
    ow, oh = other.size
    # The other image's pixels per kept pixel, over an area.
    linear = np.diag([ow, oh]) @ warp[:, :2] @ np.diag([1.0 / kw, 1.0 / kh])
    density = math.sqrt(abs(float(np.linalg.det(linear)))) or 1.0
    factor = min(1.0, density, LONG_SIDE / max(kw, kh))
    grey = _reduced(to_rgb(kept).convert("L"), factor)
    planes = _reduced(to_rgb(other), factor / density)
    return grey[..., 0], planes.transpose(2, 0, 1).copy()


def _reduced(image: Image.Image, factor: float) -> np.ndarray:
    """``image`` scaled by ``factor`` (box filter; unchanged at 1 or more), float32 in 0-1,
    (h, w, channels)."""
    w, h = image.size
    if factor < 0.999:
        size = (max(8, round(w * factor)), max(8, round(h * factor)))
        image = image.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(image, np.float32) / np.float32(255.0)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def spread(kept: Image.Image, other: Image.Image, warp: np.ndarray) -> float | None:
    """The median distance, in pixels at the working size, of the overlap's cells' own
    shifts from their median shift once ``warp`` (kept unit square to the other's, as
    ``samecapture.agreement`` refines it) is refined at that size; None when too few
    cells can tell (a small or featureless overlap)."""
    if not np.isfinite(warp).all():
        return None
    grey, planes = working_pair(kept, other, warp)
    if min(grey.shape) < 4 * CELLS or min(planes.shape[1:]) < 8:
        return None
    luma = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), planes, axes=1)
    refined = _refined(grey, luma, warp)
    warped, inside = samecapture._sample(planes, samecapture._mapped(grey.shape, refined))
    shape = grey.shape
    inside = _eroded(inside.reshape(shape), EDGE)
    if np.count_nonzero(inside) < 64:
        return None
    fitted = _colour_fitted(grey, warped, inside.ravel()).reshape(shape)
    a, b, sigma = _blur_matched(grey, fitted, inside)
    cells = _eroded(inside, math.ceil(3 * (sigma + 1.0)))
    return _cell_spread(a, b, cells)


def _refined(grey: np.ndarray, other_grey: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """``warp`` refined by robust Gauss-Newton at the working size (``REFINE``), over the
    kept image's most graded pixels (``REFINE_SHARE`` of them): flat pixels hold the map
    little, and every step costs in proportion to the pixels it reads."""
    p = warp.astype(np.float64).copy()
    kernels = samecapture._kernels()
    design = samecapture._unit_grid(*grey.shape)
    chosen: np.ndarray | None = None
    for sigma, most in REFINE:
        t_img = samecapture._gaussian(grey, sigma)
        smooth = samecapture._gaussian(other_grey, sigma)
        gy, gx = np.gradient(smooth)
        h, w = smooth.shape
        stack = np.ascontiguousarray(np.stack([smooth, gx * w, gy * h]), np.float32)
        if kernels is None:
            samecapture._refine(t_img, stack, p, most, STEP_DONE)
            continue
        if chosen is None:
            ty, tx = np.gradient(t_img)
            graded = (np.square(tx) + np.square(ty)).ravel()
            count = max(16, int(REFINE_SHARE * graded.size))
            chosen = np.sort(np.argpartition(graded, graded.size - count)[-count:])
            picked = np.ascontiguousarray(design[chosen])
        values = np.ascontiguousarray(t_img.ravel()[chosen])
        kernels.steps(values, stack, picked, p, most, STEP_DONE)
    return p


def _eroded(mask: np.ndarray, radius: int) -> np.ndarray:
    """The pixels of ``mask`` whose whole (2 radius + 1) square lies in it."""
    if radius <= 0:
        return mask
    h, w = mask.shape
    padded = np.zeros((h + 2 * radius + 1, w + 2 * radius + 1), np.int32)
    padded[radius + 1 : radius + 1 + h, radius + 1 : radius + 1 + w] = mask
    total = padded.cumsum(0).cumsum(1)
    size = 2 * radius + 1
    window = (
        total[size:, size:] - total[:-size, size:] - total[size:, :-size] + total[:-size, :-size]
    )
    return np.asarray(window == size * size)


def _colour_fitted(grey: np.ndarray, warped: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The other image's colours (3, n) sent to the kept grey (n,) by one least-squares
    affine colour change over ``inside`` (its 4 x 4 normal equations)."""
    design = np.vstack([warped, np.ones((1, warped.shape[1]), warped.dtype)]).astype(np.float64)
    chosen = design[:, inside]
    normal = chosen @ chosen.T
    # Relative to the matrix's size: a flat overlap gives a nearly singular system, whose
    # solution would blow rounding up into a picture.
    normal += 1e-9 * float(np.trace(normal)) * np.eye(4)
    coef = np.linalg.solve(normal, chosen @ grey.ravel()[inside].astype(np.float64))
    return (coef @ design).astype(np.float32)


def _fine(image: np.ndarray) -> np.ndarray:
    return image - samecapture._gaussian(image, 1.0)


def _blur_matched(
    grey: np.ndarray, other: np.ndarray, inside: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The pair with the sharper image blurred (the sigma of ``MATCH_SIGMAS`` that brings
    its finest detail's energy over ``inside`` nearest the softer one's), and that sigma
    (0 when neither is blurred)."""

    def energy(image: np.ndarray) -> float:
        return float(np.mean(np.square(_fine(image)[inside], dtype=np.float64)))

    kept_energy, other_energy = energy(grey), energy(other)
    kept_sharper = kept_energy > other_energy
    sharp = grey if kept_sharper else other
    target = min(kept_energy, other_energy)
    # The energy falls as the blur grows: bisect for the last sigma still above the
    # target, then take the nearer of it and the next.
    low, high = -1, len(MATCH_SIGMAS)
    energies = {-1: max(kept_energy, other_energy)}
    while high - low > 1:
        middle = (low + high) // 2
        energies[middle] = energy(samecapture._gaussian(sharp, MATCH_SIGMAS[middle]))
        if energies[middle] > target:
            low = middle
        else:
            high = middle
    best = low
    if high < len(MATCH_SIGMAS):
        if high not in energies:
            energies[high] = energy(samecapture._gaussian(sharp, MATCH_SIGMAS[high]))
        if abs(energies[high] - target) < abs(energies[low] - target):
            best = high
    if best >= 0:
        sigma = MATCH_SIGMAS[best]
        blurred = samecapture._gaussian(sharp, sigma)
        return (blurred, other, sigma) if kept_sharper else (grey, blurred, sigma)
    return grey, other, 0.0


def _cell_spread(
    a: np.ndarray, b: np.ndarray, inside: np.ndarray, smooth: bool = True
) -> float | None:
    """Each cell's shift of ``b`` onto ``a`` (one Lucas-Kanade step with a gain and offset,
    both blurred by a pixel), and the median distance from the cells' median shift."""
    smooth_a = (samecapture._gaussian(a, 1.0) if smooth else a).astype(np.float64)
    smooth_b = (samecapture._gaussian(b, 1.0) if smooth else b).astype(np.float64)
    gy, gx = (np.asarray(g) for g in np.gradient(smooth_b))
    h, w = a.shape
    shifts = []
    for r in range(CELLS):
        for c in range(CELLS):
            rows = slice(r * h // CELLS, (r + 1) * h // CELLS)
            cols = slice(c * w // CELLS, (c + 1) * w // CELLS)
            m = inside[rows, cols]
            if m.mean() < 0.5:
                continue
            design = np.stack(
                [gx[rows, cols][m], gy[rows, cols][m], smooth_b[rows, cols][m], np.ones(m.sum())]
            )
            normal = design @ design.T + 1e-12 * np.eye(4)
            if normal[0, 0] + normal[1, 1] < MIN_GRADIENT * design.shape[1]:
                continue  # a featureless cell: no shift to see
            fit = np.asarray(np.linalg.solve(normal, design @ smooth_a[rows, cols][m]))
            if fit[2] < MIN_GAIN:
                continue
            shifts.append(fit[:2] / fit[2])
    if len(shifts) < MIN_CELLS:
        return None
    found = np.array(shifts)
    return float(np.median(np.linalg.norm(found - np.median(found, axis=0), axis=1)))


def one_piece(kept: Image.Image, other: Image.Image, warp: np.ndarray) -> bool:
    """Whether the pair moves as one piece under ``warp``: its spread is under
    ``SPREAD_CUT`` (or too few cells can tell)."""
    found = spread(kept, other, warp)
    return found is None or found < SPREAD_CUT


def coarse_spread(
    kept: samecapture.Capture, other: samecapture.Capture, warp: np.ndarray
) -> float | None:
    """:func:`spread` at the agreement's finest level (128 pixels), from the captures it
    compared and its refined map, without decoding anything again: a cheap first look."""
    if not np.isfinite(warp).all():
        return None
    grey = kept.levels[-1][0]
    warped, inside = samecapture._sample(other.planes, samecapture._mapped(grey.shape, warp))
    inside = _eroded(inside.reshape(grey.shape), EDGE)
    if np.count_nonzero(inside) < 64:
        return None
    fitted = _colour_fitted(grey, warped, inside.ravel()).reshape(grey.shape)
    return _cell_spread(grey, fitted, inside, smooth=False)
