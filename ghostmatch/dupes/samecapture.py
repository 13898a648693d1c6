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
affine colour fit. The pair is one capture when nearly all patches agree. A pair whose
alignment slides into a map no edit makes is settled at a coarse level (see
:func:`agreement`). An agreeing pair must also agree only where it is aligned
(:func:`distinctiveness`): between images without detail (smooth colour fields, flat
graphics) a nearby map agrees about as well, and that proves nothing. Nor does agreement
that needs the colours of one image sent onto the other's any which way: the colours of
a copy follow one colour change (``CHROMA_TOLERANCE``).

The rule (``either patches@0.2 >= 8/9``) was chosen on the tuning half of
``python -m benchmarks.othershots`` and checked on its held-out half (README, duplicates).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import overload

import numpy as np
from PIL import Image

# Coarse to fine: (long side in pixels, blur sigma in pixels, Gauss-Newton steps). The
# finest level at 128 pixels rather than 160: on the full ``benchmarks.othershots`` set the
# held-out figures were the same (precision 0.997, 2 other shots, crops to 60% 0.50;
# copies found 0.916 against 0.914), the tuning half's other shots 9 against 8, and the
# pairs' checks took 13% less CPU.
LEVELS = ((48, 1.0, 10), (96, 1.0, 6), (128, 1.0, 2))
# A patch agrees when its median residual, over the kept image's contrast, is at most this.
TOLERANCE = 0.2
PATCHES = 8
# A Gauss-Newton step this small (unit coordinates: about a seventieth of a pixel at the
# finest level) ends the finest level; a coarser level ends at a step under ``COARSE_STEP_DONE``
# of its own pixels, since the next level refines the map anyway (copies on the full set of
# ``python -m benchmarks.othershots`` took 7.7 and 4.3 steps at the two coarse levels, and
# 5.3 and 2.4 to get there).
STEP_DONE = 1e-4
COARSE_STEP_DONE = 0.1
TUKEY = 4.685
# The robust scale is the median of at most about this many of the overlap's residuals (an
# even spread of them): within a few percent of the median of all, plenty for Tukey's
# weights, at a fraction of the cost of partitioning 12,288 values at every step.
SCALE_SAMPLES = 2048
# Share of overlap patches that must agree (in grey or in colour) for one capture:
# measured, see the module docstring.
SAME_CAPTURE_CUT = 8 / 9
# Images are decoded for the comparison with at least this shorter side.
DECODE_SIDE = 128
# The identity alignment counts as "the whole image, unmoved" (a ``near`` copy) within
# this much of the identity map, covering at least this share of the kept image.
IDENTITY_TOLERANCE = 0.06
WHOLE_OVERLAP = 0.9
THUMB_SIDE = 16
# The least share of the kept image that a copy must cover (a crop to 60% of the side
# covers 0.36 of it), and the most a copy's map may stretch one way against the other.
MIN_OVERLAP = 0.2
MAX_ANISOTROPY = 1.5
MAX_SCALE = 4.0
# A first try (``agreement(..., second_chance=True)``) whose grey patches agree on less
# than this share at the next-to-finest level is settled there: unmoved copies measured
# at least 0.56 there (the quick set of ``python -m benchmarks.othershots``), except
# recoloured ones, which agree in colour only and which the second try then finds.
FIRST_TRY_SHARE = 0.4
# A first try from a map the glances chose (``agreement(..., first_try=True)``) whose grey
# patches agree on less than this share at the coarsest level is settled there. On the
# tuning half of ``python -m benchmarks.othershots`` the pairs that pass their unmoved try
# measured at least 0.33 there (a bordered copy against a recoloured crop; the held-out
# half 0.33 too). A crowded pair has no second try, so the cut must keep recoloured copies.
# On ``--synthetic-only 1000`` (seed 7) it settles 111 of the 529 crowded first tries that
# reach the finest level, and on the full set 100 of 470 failing tries past this level.
FIRST_TRY_COARSE_SHARE = 0.2
# A crowded pair (``agreement(..., colours_early=True)``) whose colours at the next-to-finest
# level follow one colour change (see ``CHROMA_TOLERANCE``) on less than this share of the
# patches is settled there: the finest level asks 8/9 of them. Measured on every pair
# compared on the full ``benchmarks.othershots`` set (713 copies: at least 0.81 there) and
# on 50 of the ``--synthetic-only 1000`` images (seed 10) with 13 edited copies each among
# the other 950 (382 copies, crowded: at least 0.90); of the pairs that failed at the finest
# level, it settles 734 of 856 there, and 559 of 579 among the 1,000 images alone.
COARSE_COLOURS = 0.6
# The same at the coarsest level (48 px), once aligned there: a crowded pair's patches
# following one colour change on less than this share are settled before the next level's
# alignment. Copies measured at least 0.56 there (701 copies of the full set, crowded or
# not, the least a bordered kept file against its other copies; its 103 crowded ones 0.70)
# and 0.73 (398 crowded copies of the synthetic set above); of the crowded pairs that went
# on to the next-to-finest level there and failed, it settles 759 of 867.
COARSEST_COLOURS = 0.4
# An alignment must be distinctive: the same map moved by ``SHIFT`` of the side, up, down,
# left and right, must stop agreeing where the picture has detail of its own. A patch
# tells (is textured) where the kept image, moved by the same step against itself, has a
# median residual above ``TEXTURED`` of its contrast: a copy moved there disagrees. Flat
# sky agrees anywhere, so it neither proves nor disproves. A pair with at least
# ``MIN_TEXTURED`` textured (patch, direction) cells, of which ``MOVED_AGREEMENT_CUT`` or
# more still agree under the moved map, agrees about as well anywhere nearby: no copy.
SHIFT = 0.08
TEXTURED = 0.3
MIN_TEXTURED = 8
MOVED_AGREEMENT_CUT = 0.25
# Where most of the overlap agrees under the moved map (at least ``LOOSE_MOVED`` of the
# patches, mean of the four), nothing pins the map: a squash then comes from the alignment
# sliding over flat areas, not from an edit. An edit's map is close to a similarity either
# in pixels (crop, turn, flip, border) or in each image's unit square (a whole image
# stretched to another aspect); such a pair may squash at most ``LOOSE_SQUASH`` in both.
LOOSE_MOVED = 0.45
# Where the kept image moved against itself by the same steps agrees on at most this share
# of its patches (a photo's detail), the pair's moved maps are not measured: on the full
# ``benchmarks.othershots`` set, of 720 pairs that agreed, the 481 whose kept image was so
# pinned had at most 0.34 of their patches agreeing under the moved maps (``LOOSE_MOVED``
# 0.45) and at most 0.12 of their textured cells (``MOVED_AGREEMENT_CUT`` 0.25); on the
# turned copies of ``benchmarks.turns --quick`` 148 of 253, at most 0.31 and 0.02. The
# only pairs the moved maps turned down had kept images agreeing with themselves on 0.71
# to 0.90 (flat pictures), and 1,000 synthetic images' agreeing pairs on 0.39 and up.
SELF_PINNED = 0.3
LOOSE_SQUASH = 1.15
# Nor does an edit scale the grey contrast by more than ``LOOSE_GAIN`` either way: a fit
# that nearly drops the other image's contrast agrees wherever the kept one is flat.
LOOSE_GAIN = 2.0
# Fine detail: a patch whose mean residual against the kept image moved by ``DETAIL_SHIFT``
# of the side is above ``DETAIL_RESIDUAL`` of the contrast. An image with fewer than
# ``MIN_DETAIL`` such patches (smooth colour fields) is a copy only when its patches agree
# within ``TIGHT_TOLERANCE``, the way re-encoded, resized or lightly edited pixels do:
# two independent smooth fields can be bent onto each other within ``TOLERANCE``.
DETAIL_SHIFT = 0.02
DETAIL_RESIDUAL = 0.2
MIN_DETAIL = 4
TIGHT_TOLERANCE = TOLERANCE / 4
# One colour change: an edit changes all of a picture's colours alike (brightness,
# contrast, saturation, a turn of the hue, or no colour left in a grey copy), so the other
# image's chroma is the kept one's times one complex gain (a scale and a turn of the hue
# circle), or the other way round. The grey gain and offset and the affine colour fit are
# far freer: between pictures of a few flat colours (slides, logos, random shapes) they
# send any two or three colours onto any others, and an affine map sends one rectangle or
# ellipse onto another, so two independent such pictures can agree everywhere. A patch
# follows the change when its median chroma residual is within ``CHROMA_TOLERANCE`` of the
# target's chroma spread, a spread counted as at least ``CHROMA_FLOOR`` (the colour of a
# nearly grey picture says little either way); ``SAME_CAPTURE_CUT`` of the patches must
# follow it. Chroma is compared blurred by ``CHROMA_BLUR`` pixels of the finest level, and
# more loosely than grey: JPEG keeps colour at half the resolution, and quantises it more
# coarsely (at quality 20, fine colour textures lose most of theirs).
CHROMA_TOLERANCE = 1.5 * TOLERANCE
CHROMA_FLOOR = 0.1
CHROMA_BLUR = 1.5


def _editable(warp: np.ndarray) -> bool:
    """Whether a 2 x 3 map could come from editing one image: a crop, resize, small turn,
    border or flip, with at most a mild squash, and a bounded change of scale."""
    linear = warp[:, :2]
    if abs(float(np.linalg.det(linear))) < 1e-9:
        return False
    big, small = np.linalg.svd(linear, compute_uv=False)
    return bool(small >= 1 / MAX_SCALE and big <= MAX_SCALE and big <= MAX_ANISOTROPY * small)


class _Pyramid(Sequence[np.ndarray]):
    """A capture's levels (``Capture.levels``), each made when first read."""

    def __init__(self, capture: Capture) -> None:
        self._capture = capture

    def __len__(self) -> int:
        return len(LEVELS)

    @overload
    def __getitem__(self, level: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, level: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, level: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(level, slice):
            return [self[n] for n in range(len(LEVELS))[level]]
        return self._capture._level(range(len(LEVELS))[level])


def unit_thumb(grey: np.ndarray) -> np.ndarray:
    """A grey thumbnail's uint8 pixels (``THUMB_SIDE`` squared, any shape) as a flat vector,
    mean removed and unit length: what :meth:`Capture.correlation` multiplies. The same
    for a capture's own thumbnail and for the catalog's (``TurnScreen.thumbnail``, the
    same reduction of the same pixels)."""
    thumb = np.asarray(grey, np.float64).ravel()
    thumb -= thumb.mean()
    thumb /= max(float(np.linalg.norm(thumb)), 1e-9)
    return thumb


class Capture:
    """One image prepared for comparison: per level of ``LEVELS`` a (3, h, w) stack of the
    blurred grey image and its x and y gradients (per unit of the image's width and
    height), and the finest level in colour (h, w, 3). Each level and the colour image are
    made on first use: many images of a duplicate search only ever show their thumbnail
    (``thumb``, made at once; see :meth:`correlation`), and many pairs are settled at the
    coarsest level (1,000 synthetic images: 401 of 964 images compared never needed more)."""

    def __init__(self, image: Image.Image) -> None:
        self._image: Image.Image | None = image
        self._luma: Image.Image | None = image.convert("L")  # once, not per level
        self._lock = threading.Lock()
        self._grey: list[np.ndarray | None] = [None] * len(LEVELS)
        self._rgb: np.ndarray | None = None
        # What the comparison derives from this image alone, made on first use and kept:
        # an image is compared with many others (as the kept one, or as the other).
        self._planes: np.ndarray | None = None
        self._chroma: np.ndarray | None = None
        # Coarser levels' colour planes and chroma (see :meth:`planes_at`), by level.
        self._coarse_planes: dict[int, np.ndarray] = {}
        self._coarse_chroma: dict[int, np.ndarray] = {}
        self._detail: int | None = None
        small = self._luma.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
        # A THUMB_SIDE x THUMB_SIDE grey thumbnail, zero mean and unit norm, flattened.
        self.thumb = unit_thumb(np.asarray(small, np.uint8))

    def _level(self, level: int) -> np.ndarray:
        made = self._grey[level]
        if made is not None:
            return made
        with self._lock:
            made = self._grey[level]
            if made is not None:  # made meanwhile by another thread
                return made
            assert self._luma is not None
            side, sigma, _ = LEVELS[level]
            grey = _gaussian(_resized(self._luma, side, "L"), sigma)
            gy, gx = np.gradient(grey)
            h, w = grey.shape
            made = np.stack([grey, gx * w, gy * h])
            self._grey[level] = made
            if all(g is not None for g in self._grey):
                self._luma = None  # the grey pixels are no longer needed
            return made

    @property
    def levels(self) -> Sequence[np.ndarray]:
        """The pyramid, each level made when first read (a view of this capture: the
        capture keeps no reference to it, so the two make no cycle)."""
        return _Pyramid(self)

    @property
    def prepared(self) -> bool:
        """Whether any level of the pyramid or the colour image has been made."""
        return self._rgb is not None or any(g is not None for g in self._grey)

    @property
    def rgb(self) -> np.ndarray:
        if self._rgb is not None:
            return self._rgb
        with self._lock:
            if self._rgb is None:
                assert self._image is not None
                side, sigma, _ = LEVELS[-1]
                # Each channel blurred on its own (no blur across the channel axis), as
                # the planes that sampling reads: the colour image is a view of them.
                rgb = _resized(self._image, side, "RGB")
                planes = np.stack([_gaussian(channel, sigma) for channel in rgb.transpose(2, 0, 1)])
                self._planes = planes
                self._rgb = planes.transpose(1, 2, 0)
                self._image = None  # the pixels are no longer needed
            return self._rgb

    @property
    def planes(self) -> np.ndarray:
        """The finest level in colour, channels first (3, h, w): what sampling reads and
        colour fits reduce over (a long axis, much faster than an axis of 3)."""
        if self._planes is None:
            self.rgb  # noqa: B018 - made with the colour image, which is a view of them
        assert self._planes is not None
        return self._planes

    @property
    def chroma(self) -> np.ndarray:
        """The finest level's chroma (see :func:`_chroma`)."""
        if self._chroma is None:
            self._chroma = _chroma(self.rgb)
        return self._chroma

    def planes_at(self, level: int) -> np.ndarray:
        """The colour planes (3, h, w) at ``level`` of ``LEVELS``: the finest level's
        (:attr:`planes`), or theirs averaged down to a coarser level's size."""
        level = range(len(LEVELS))[level]
        if level == len(LEVELS) - 1:
            return self.planes
        made = self._coarse_planes.get(level)
        if made is None:
            _, h, w = self.levels[level].shape
            made = self._coarse_planes[level] = _area(self.planes, h, w)
        return made

    def chroma_at(self, level: int) -> np.ndarray:
        """The chroma (see :func:`_chroma`) of :meth:`planes_at` ``level``."""
        level = range(len(LEVELS))[level]
        if level == len(LEVELS) - 1:
            return self.chroma
        made = self._coarse_chroma.get(level)
        if made is None:
            made = self._coarse_chroma[level] = _chroma_of(self.planes_at(level))
        return made

    @property
    def detail(self) -> int:
        """How many patches have fine detail (see :func:`_detail`)."""
        if self._detail is None:
            self._detail = _detail(self)
        return self._detail

    def correlation(self, other: Capture) -> float:
        """Correlation of the two thumbnails: near 1 for the same picture unmoved, near 0
        for unrelated ones. A cheap first test where the descriptor cannot tell images
        apart (``ghostmatch.dupes.finder``)."""
        return float(self.thumb @ other.thumb)


@dataclass(frozen=True)
class Distinctiveness:
    """Whether an agreeing pair agrees only where it is aligned: ``moved`` is the mean
    share of overlap patches that still agree under the map moved by ``SHIFT`` (four
    directions), ``textured_moved`` the share of textured (patch, direction) cells that
    do, of ``textured`` such cells; ``detail`` counts the kept image's patches with fine
    detail, and ``tight`` is the share of patches that agree within ``TIGHT_TOLERANCE``
    (grey or colour; only measured for an image with too little detail, else 1). An image
    with too little detail that fails ``tight``, or a pair whose colours follow no one
    colour change (``colours``), is settled by it: its moved maps are not measured (nan)."""

    moved: float
    textured_moved: float
    textured: int
    detail: int
    tight: float = 1.0
    # The map's squash (largest over smallest stretch) in pixels or in unit squares,
    # whichever is less.
    squash: float = 1.0
    # The grey gain taking the other image to the kept one (robust fit).
    gain: float = 1.0
    # The share of patches whose colours follow one colour change (see
    # ``CHROMA_TOLERANCE``; at least ``SAME_CAPTURE_CUT`` is all it tells of a pair that
    # follows it); a pair that fails it is settled by it (moved maps nan).
    colours: float = 1.0

    def distinctive(self) -> bool:
        """Whether the agreement proves the alignment (see the constants above)."""
        if self.colours < SAME_CAPTURE_CUT - 1e-9:
            return False
        if self.detail < MIN_DETAIL and self.tight < SAME_CAPTURE_CUT - 1e-9:
            return False
        if self.textured >= MIN_TEXTURED and self.textured_moved >= MOVED_AGREEMENT_CUT:
            return False
        if self.moved >= LOOSE_MOVED:
            return bool(self.squash <= LOOSE_SQUASH and 1 / LOOSE_GAIN <= self.gain <= LOOSE_GAIN)
        return True


@dataclass(frozen=True)
class Agreement:
    """A pair after alignment: ``score`` is the share of overlap patches that agree (the
    better of grey and colour), ``overlap`` the share of the kept image the other covers,
    ``warp`` the refined affine (2 x 3) from the kept image's unit square to the other's,
    ``level`` the level of ``LEVELS`` where it was settled (a coarse one for a pair that
    hardly agrees, see :func:`agreement`)."""

    score: float
    overlap: float
    warp: np.ndarray
    level: int = len(LEVELS) - 1
    # How distinctive the alignment is (see :func:`distinctiveness`): measured only for a
    # pair that agrees otherwise; None, not measured, decides nothing.
    distinct: Distinctiveness | None = None

    @property
    def same_capture(self) -> bool:
        """Nearly all the overlap agrees, under a map that an edit could have made, and
        only under that map, with colours that follow one colour change. On images without
        detail (smooth noise, flat graphics) the alignment can slide into a strong shear
        or squash that makes a small overlap agree, or agree about as well anywhere
        nearby, or agree only because the colour fit sends a few flat colours onto any
        others: that is no copy."""
        if self.overlap < MIN_OVERLAP or not _editable(self.warp):
            return False
        # The cut is a ratio of small counts: compare with a little slack for rounding.
        if self.score < SAME_CAPTURE_CUT - 1e-9:
            return False
        return self.distinct is None or self.distinct.distinctive()

    @property
    def pinned(self) -> bool:
        """The agreement holds only near its map: under the map moved by ``SHIFT`` less
        than ``LOOSE_MOVED`` of the patches still agree (a pair that does not agree was
        not measured and is not pinned). A photo's detail pins the map of its copies;
        flat graphics agree under many maps, and only a squash or gain check tells."""
        return self.distinct is not None and not self.distinct.moved >= LOOSE_MOVED

    def is_whole(self) -> bool:
        """The other image is the whole kept one, unmoved (re-encoded, resized, recoloured)."""
        close = float(np.abs(self.warp - np.eye(2, 3)).max()) <= IDENTITY_TOLERANCE
        return close and self.overlap >= WHOLE_OVERLAP


def _resized(image: Image.Image, side: int, mode: str) -> np.ndarray:
    w, h = image.size
    scale = side / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    # Converted only when it changes the mode: converting to its own mode copies it.
    same = image if image.mode == mode else image.convert(mode)
    small = same.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    # Single precision throughout the comparison: residuals are judged against a fifth of
    # the contrast, far above its rounding, and every pass over the pixels costs half.
    pixels = np.asarray(small, np.float32)
    pixels /= 255.0
    return pixels


@functools.lru_cache(maxsize=8)
def _gaussian_weights(sigma: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel for ``sigma`` (its default radius of four sigmas),
    computed as it computes it, read-only."""
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x**2)
    weights = weights / weights.sum()
    weights.flags.writeable = False
    return weights


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma)`` of a 2-d float image (its mode
    ``reflect``), compiled where numba is installed: the same values to the bit
    (``tests/test_gaussnewton.py``), a third of the time."""
    kernels = _kernels()
    if kernels is None or image.ndim != 2 or image.dtype not in (np.float32, np.float64):
        # Imported here: scipy.ndimage takes half a second to import, and with numba it
        # is never needed.
        from scipy import ndimage

        return np.asarray(ndimage.gaussian_filter(image, sigma))
    out = np.empty(image.shape, image.dtype)
    kernels.blur(np.ascontiguousarray(image), _gaussian_weights(sigma), out)
    return out


def prepare_capture(image: Image.Image) -> Capture:
    """The pyramid and colour image that :func:`agreement` compares (made when first
    compared)."""
    return Capture(image)


@functools.lru_cache(maxsize=32)
def _unit_grid(h: int, w: int) -> np.ndarray:
    """Pixel centres of an h x w image in unit coordinates, (h * w, 3) as (x, y, 1), in
    the captures' single precision."""
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / h, np.ones(h * w)], axis=1)
    grid = grid.astype(np.float32)
    grid.flags.writeable = False
    return grid


def _mapped(shape: tuple[int, ...], warp: np.ndarray) -> np.ndarray:
    """Where ``warp`` takes the pixel centres of an image of ``shape`` (h, w): unit
    coordinates (n, 2)."""
    h, w = shape
    return _unit_grid(h, w) @ _transposed(warp)


def _transposed(warp: np.ndarray) -> np.ndarray:
    """A 2 x 3 map as the (3, 2) single-precision right factor of a product with pixel
    centres, laid out by rows: the same product as with the transposed view, a third
    cheaper."""
    return np.ascontiguousarray(warp.T, np.float32)


@functools.lru_cache(maxsize=32)
def _moments(h: int, w: int) -> np.ndarray:
    """Products of the pixel centres' unit coordinates, (h * w, 6) as (xx, xy, x, yy, y, 1):
    what the Gauss-Newton normal equations of an affine map weigh, fixed per level."""
    x, y, one = _unit_grid(h, w).T.astype(np.float64)
    moments = np.stack([x * x, x * y, x, y * y, y, one], axis=1).astype(np.float32)
    moments.flags.writeable = False
    return moments


# Where each entry of the symmetric 3 x 3 (x, y, 1) outer product sits in ``_moments``.
_OUTER = np.array([[0, 1, 2], [1, 3, 4], [2, 4, 5]])
# The 6 x 6 normal matrix of a step from the three rows of weighted sums (gx^2, gx gy, gy^2
# against ``_moments``, flattened): gx^2 for the x parameters, gy^2 for the y ones, gx gy
# across.
_HESSIAN = np.array(
    [[(int(a >= 3) + int(b >= 3)) * 6 + _OUTER[a % 3, b % 3] for b in range(6)] for a in range(6)]
)
# What a Gauss-Newton step adds to its normal equations, so that a flat image still solves.
_REGULARISED = 1e-6 * np.eye(6)


def _inside(h: int, w: int, units: np.ndarray) -> np.ndarray:
    """Which points at unit coordinates (n, 2) fall inside an h x w image (between the
    centres of its outer pixels)."""
    return _inside_grid(h, w, units * 2.0 - 1.0)


def _inside_grid(h: int, w: int, grid: np.ndarray) -> np.ndarray:
    """:func:`_inside` for coordinates from -1 to 1 across the image (torch's grid): the
    outer pixels' centres lie at 1 - 1 / size either way."""
    across, down = grid.T
    return (np.abs(across) <= 1 - 1 / w) & (np.abs(down) <= 1 - 1 / h)


def _sample(stack: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples (c, n) of a (c, h, w) stack at unit coordinates (n, 2), clamped at
    the border, and which points fall inside it."""
    _, h, w = stack.shape
    # torch's grid_sample is this very interpolation (pixel centres at (k + 0.5) / size,
    # coordinates clamped to the border), in one pass (compiled, or torch's own): a tenth
    # of the CPU of numpy's four gathers, and the same values to rounding.
    coordinates = np.ascontiguousarray(units[:, :2]) * 2.0 - 1.0
    inside = _inside_grid(h, w, coordinates)
    return _grid_sample(stack, coordinates), inside


def _grid_sample(stack: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear samples (c, n) of a (c, h, w) float ``stack`` at ``grid`` (n, 2: x, y from
    -1 to 1 across the image; rounded to the stack's dtype first), clamped at the border:
    torch's ``grid_sample`` (bilinear, padding ``border``, corners not aligned), compiled
    where numba is installed (the same values to the bit, without loading torch)."""
    coordinates = grid.astype(stack.dtype)
    kernels = _kernels()
    if kernels is not None:
        out = np.empty((stack.shape[0], len(coordinates)), stack.dtype)
        kernels.sample(stack, coordinates, out)
        return out
    import torch

    with torch.inference_mode():
        value = torch.nn.functional.grid_sample(
            torch.from_numpy(stack)[None],
            torch.from_numpy(coordinates)[None, None],
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
    # Indexed as numpy (a tenth of torch indexing's overhead), the same memory.
    return value.numpy()[0, :, 0]


def _area(planes: np.ndarray, h: int, w: int) -> np.ndarray:
    """``planes`` (c, h', w') averaged down to (c, h, w): torch's ``interpolate`` in mode
    ``area``, compiled where numba is installed (the same values to the bit)."""
    kernels = _kernels()
    if kernels is not None:
        out = np.empty((planes.shape[0], h, w), planes.dtype)
        kernels.area(planes, out)
        return out
    import torch

    with torch.inference_mode():
        small = torch.nn.functional.interpolate(
            torch.from_numpy(planes)[None], size=(h, w), mode="area"
        )
    return np.ascontiguousarray(small.numpy()[0])


def _photometric(
    t: np.ndarray,
    i: np.ndarray,
    weight: np.ndarray,
    scratch: tuple[np.ndarray, ...] | None = None,
    total: np.floating | None = None,
) -> tuple[float, float]:
    """Gain and offset taking ``i`` to ``t`` by weighted least squares; ``scratch``, two
    arrays like ``t``, spares the two temporaries (this runs at every
    Gauss-Newton step); ``total`` is the weights' sum where already known."""
    sw = weight.sum() if total is None else total
    if sw <= 0:
        return 1.0, 0.0
    mt, mi = (weight @ t) / sw, (weight @ i) / sw
    di, product = (None, None) if scratch is None else scratch
    di = np.subtract(i, mi, out=di)
    # One scratch array for both products.
    product = np.multiply(di, di, out=product)
    var = (weight @ product) / sw
    np.subtract(t, mt, out=product)
    product *= di
    gain = ((weight @ product) / sw) / var if var > 1e-9 else 0.0
    return gain, mt - gain * mi


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-d array by one partition in place (the values are reordered),
    without its generic overhead or a copy: this runs at every Gauss-Newton step. The
    middle values are the same whichever way they are selected."""
    n = len(values)
    if n == 0:
        return 0.0
    k = n // 2
    if n % 2:
        values.partition(k)
        return float(values[k])
    values.partition((k - 1, k))
    return float((values[k - 1] + values[k]) / 2)


def _tukey(
    r: np.ndarray, inside: np.ndarray, count: int | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Tukey weights of residuals ``r`` at a robust scale (their median absolute value,
    over every ``stride``-th pixel: see ``SCALE_SAMPLES``), written into ``out`` where
    given; ``count``, how many pixels are ``inside``, where already counted."""
    if count is None:
        count = int(np.count_nonzero(inside))
    stride = max(1, count // SCALE_SAMPLES)
    # Selecting makes a copy, which the median may reorder.
    sample = r[::stride][inside[::stride]]
    scale = max(1.4826 * _median(np.abs(sample, out=sample)), 1e-3)
    # (1 - u^2)^2 for |u| < 1, else 0, with u = r / (TUKEY * scale), in place: squared,
    # then zeroed where 1 - u^2 is not positive or the pixel is outside (one multiply
    # by the mask instead of a nan-aware maximum, the same values).
    weight = np.multiply(r, r, out=out)
    weight *= 1.0 / (TUKEY * scale) ** 2
    np.subtract(1.0, weight, out=weight)
    keep = weight > 0.0
    keep &= inside
    weight *= weight
    weight *= keep
    return weight


def _robust_fit(
    t: np.ndarray,
    i: np.ndarray,
    inside: np.ndarray,
    rounds: int = 3,
    count: int | None = None,
    work: tuple[np.ndarray, ...] | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Gain and offset taking ``i`` to ``t`` over ``inside``, refitted with Tukey weights
    so that an overlay (a caption, a logo) does not shift them: (gain, residuals, weights).
    ``count`` is how many pixels are ``inside`` where already counted; ``work``, four
    arrays like ``t``, holds the scratch, residuals and weights (which then live there
    until the caller reuses it), else they are made here (apart: one array of four rows
    is large enough that the allocator maps fresh pages for it every time). Without
    ``work``, compiled where numba is installed (``ghostmatch.dupes.gaussnewton``)."""
    kernels = _kernels()
    if kernels is not None and work is None:
        r, weight = np.empty_like(t), np.empty_like(t)
        return kernels.robust_fit(t, i, inside, rounds, r, weight), r, weight
    if work is None:
        work = tuple(np.empty_like(t) for _ in range(4))
    scratch, r, weight = work[:2], work[2], work[3]
    if count is None:
        count = int(np.count_nonzero(inside))
    np.copyto(weight, inside)
    if not count:  # the other image does not cover the kept one at all
        return 1.0, np.subtract(t, i, out=r), weight
    # The first round weighs the pixels inside alike: their sum is their count, exactly
    # as summing the ones gives it (whole numbers far below 2 ** 24 add up exactly).
    total: np.floating | None = t.dtype.type(count)
    for _ in range(rounds):
        gain, offset = _photometric(t, i, weight, scratch, total)
        total = None
        _tukey(_residual(t, i, gain, offset, r), inside, count, weight)
    gain, offset = _photometric(t, i, weight, scratch)
    return gain, _residual(t, i, gain, offset, r), weight


def _residual(
    t: np.ndarray, i: np.ndarray, gain: float, offset: float, out: np.ndarray | None = None
) -> np.ndarray:
    """``t - (gain * i + offset)``, in one array (``out`` where given)."""
    r = np.multiply(i, gain, out=out)
    r += offset
    return np.subtract(t, r, out=r)


def align(
    kept: Capture, other: Capture, warp: np.ndarray, levels: range | None = None
) -> np.ndarray:
    """Refine ``warp`` (2 x 3, kept's unit coordinates to the other's) by robust
    Gauss-Newton from coarse to fine, over ``levels`` of ``LEVELS`` (all by default);
    compiled where numba is installed (``ghostmatch.dupes.gaussnewton``)."""
    p = warp.astype(np.float64).copy()
    kernels = _kernels()
    for level in range(len(LEVELS)) if levels is None else levels:
        t_img, stack = kept.levels[level][0], other.levels[level]
        done = STEP_DONE if level == len(LEVELS) - 1 else COARSE_STEP_DONE / max(t_img.shape)
        if kernels is None:
            _refine(t_img, stack, p, LEVELS[level][2], done)
        else:
            design = _unit_grid(*t_img.shape)
            kernels.steps(t_img.ravel(), stack, design, p, LEVELS[level][2], done)
    return p


@functools.cache
def _kernels() -> ModuleType | None:
    """``ghostmatch.dupes.gaussnewton``, whose steps and fit are compiled, or None without
    numba (imported on first use: only a duplicate search needs it)."""
    from ghostmatch.dupes import gaussnewton

    return gaussnewton if gaussnewton.available() else None


def _refine(t_img: np.ndarray, stack: np.ndarray, p: np.ndarray, steps: int, done: float) -> None:
    """Up to ``steps`` robust Gauss-Newton steps of ``p`` (updated in place) taking the
    kept level's grey image ``t_img`` onto the other's ``stack``, in numpy: the reference
    of ``ghostmatch.dupes.gaussnewton.steps``, and what runs without numba. Stops once no
    parameter moves by ``done``."""
    import torch  # this reference only runs without numba

    design = _unit_grid(*t_img.shape)
    moments = _moments(*t_img.shape)
    t = t_img.ravel()
    n = t.size
    # What every step writes, made once: at the coarse levels a step is a few dozen passes
    # over a couple of thousand pixels, where making arrays and calling through wrappers
    # costs as much as the arithmetic. The per-pixel products of a step: rows 0-2 for the
    # normal matrix, 3-4 for the gradient, 5-6 the weighted image gradients; the robust
    # fit's scratch, residuals and weights; the mapped centres.
    products = np.empty((7, n), t.dtype)
    work = tuple(np.empty_like(t) for _ in range(4))
    grid = np.empty((n, 2), np.float32)
    # What every step reads: the other image as torch sees it, and the grid as torch sees
    # it (the same memory, rewritten by each step).
    source = torch.from_numpy(stack)[None]
    where = torch.from_numpy(grid).view(1, 1, n, 2)
    _, ho, wo = stack.shape
    for _ in range(steps):
        # Torch's grid coordinates of the mapped centres (unit coordinates times two, less
        # one): doubling the map doubles every rounding, the same values as doubling the
        # product.
        np.matmul(design, _transposed(2.0 * p), out=grid)
        grid -= 1.0
        inside = _inside_grid(ho, wo, grid)
        count = int(np.count_nonzero(inside))
        if count < 16:
            break
        # torch.nn.functional.grid_sample's kernel (bilinear, border, not aligned corners)
        # without its argument checks.
        sampled = torch.grid_sampler(source, where, 0, 1, False).numpy()[0, :, 0]
        # One reweighting per step: the steps themselves iterate the robust fit.
        gain, r, weight = _robust_fit(t, sampled[0], inside, 1, count, work)
        # The Jacobian row of a pixel is (ix * d, iy * d) with d = (x, y, 1) and (ix, iy)
        # the gain times the other image's gradient, so the normal equations are the gain
        # squared times weighted sums of gx^2, gx gy, gy^2 times d's outer product, and the
        # gain times those of gx r, gy r times d: two small products with fixed per-level
        # matrices instead of an n x 6 Jacobian.
        # Rows at a time: (wx, wy), then wx (gx, gy), wy gy, and (wx, wy) r.
        np.multiply(sampled[1:3], weight, out=products[5:7])
        np.multiply(sampled[1:3], products[5], out=products[0:2])
        np.multiply(products[6], sampled[2], out=products[2])
        np.multiply(products[5:7], r, out=products[3:5])
        sums = (products[:3] @ moments).ravel()
        hessian = sums[_HESSIAN] * (gain * gain) + _REGULARISED
        gradient = (products[3:5] @ design).ravel() * gain
        step = np.linalg.solve(hessian, gradient)
        p += step.reshape(2, 3)
        if np.abs(step).max() < done:
            break


def residuals(
    kept: Capture, other: Capture, warp: np.ndarray, level: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Grey residuals (h, w) of ``other`` under ``warp`` at one level of ``LEVELS`` (the
    finest by default), after a robust gain and offset, and which pixels it covers."""
    r, inside, _ = _fitted(kept, other, warp, level)
    return r, inside


def _fitted(
    kept: Capture, other: Capture, warp: np.ndarray, level: int = -1
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`residuals`, and the robust grey gain that they are after."""
    t_img, stack = kept.levels[level][0], other.levels[level]
    sampled, inside = _sample(stack[:1], _mapped(t_img.shape, warp))
    gain, r, _ = _robust_fit(t_img.ravel(), sampled[0], inside)
    return r.reshape(t_img.shape), inside.reshape(t_img.shape), float(gain)


def _colour_residuals(kept: Capture, other: Capture, warp: np.ndarray) -> np.ndarray:
    """Residuals (h, w) over the kept image's colour contrast after a robust 3 x 4 affine
    colour fit from the other image to the kept one: a hue or saturation change is linear
    in RGB, not in grey."""
    _, h, w = kept.planes.shape
    warped, inside = _sample(other.planes, _mapped((h, w), warp))
    # Channels first (3, n) throughout: numpy reduces over a long axis much faster than
    # over an axis of 3.
    t = kept.planes.reshape(3, -1)
    design = np.vstack([warped, np.ones((1, warped.shape[1]), warped.dtype)])
    # Every round writes into the same arrays: made anew, arrays of several rows are
    # large enough that the allocator maps (and the kernel clears) fresh pages each time.
    weighted, error = np.empty_like(design), np.empty_like(t)
    weight, r = inside.astype(t.dtype), np.empty(t.shape[1], t.dtype)
    count = int(np.count_nonzero(inside))
    for _ in range(4):
        # Weighted least squares by its normal equations (4 x 4): the same fit as a
        # weighted lstsq, much cheaper for tens of thousands of pixels.
        dw = np.multiply(design, weight, out=weighted)
        colour = np.linalg.solve(dw @ design.T + 1e-9 * np.eye(4), dw @ t.T).astype(t.dtype)
        np.matmul(colour.T, design, out=error)
        np.subtract(t, error, out=error)
        error *= error
        np.sqrt(np.sum(error, axis=0, out=r), out=r)
        if not count:
            break
        weight = _tukey(r, inside, count, weight)
    # The root mean square distance from the mean colour over the overlap.
    spread = sum(float(channel[inside].var()) for channel in t) if inside.any() else 0.0
    contrast = max(float(np.sqrt(spread)), 0.02)
    return (r / contrast).reshape(h, w)


@functools.lru_cache(maxsize=32)
def _patch_of(h: int, w: int) -> np.ndarray:
    """Each pixel's patch number in a ``PATCHES`` x ``PATCHES`` grid over h x w, (h * w,)."""
    rows = np.concatenate(
        [np.full(len(c), n) for n, c in enumerate(np.array_split(range(h), PATCHES))]
    )
    cols = np.concatenate(
        [np.full(len(c), n) for n, c in enumerate(np.array_split(range(w), PATCHES))]
    )
    patch = (rows[:, None] * PATCHES + cols[None, :]).ravel()
    patch.flags.writeable = False
    return patch


@functools.lru_cache(maxsize=32)
def _patch_sums(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an h x w image, (rows, cols, sizes): ``rows @ m @ cols`` counts the pixels of a
    mask ``m`` (as 0/1 single floats) in each patch of :func:`_patch_of`'s grid, (PATCHES,
    PATCHES), exactly; ``sizes`` is each patch's pixel count, flattened."""
    rows = np.zeros((PATCHES, h), np.float32)
    for n, c in enumerate(np.array_split(np.arange(h), PATCHES)):
        rows[n, c] = 1.0
    cols = np.zeros((w, PATCHES), np.float32)
    for n, c in enumerate(np.array_split(np.arange(w), PATCHES)):
        cols[c, n] = 1.0
    sizes = np.bincount(_patch_of(h, w), minlength=PATCHES * PATCHES)
    for a in (rows, cols, sizes):
        a.flags.writeable = False
    return rows, cols, sizes


def _patch_counts(mask: np.ndarray) -> np.ndarray:
    """How many pixels of an (h, w) mask fall in each patch, flattened (``PATCHES`` ** 2):
    two small products instead of gathering the masked pixels' patch numbers (counts stay
    exact in single precision far beyond the pixels of a level)."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.patch_counts(mask, *_patch_axes(*mask.shape))
    rows, cols, _ = _patch_sums(*mask.shape)
    return (rows @ mask.astype(np.float32) @ cols).ravel().astype(np.int64)


@functools.lru_cache(maxsize=32)
def _patch_axes(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel row's patch row and each column's patch column in :func:`_patch_of`'s
    grid over h x w."""
    patch = _patch_of(h, w).reshape(h, w)
    rows, cols = (
        np.ascontiguousarray(patch[:, 0] // PATCHES),
        np.ascontiguousarray(patch[0] % PATCHES),
    )
    for a in (rows, cols):
        a.flags.writeable = False
    return rows, cols


def _medians_within(
    e: np.ndarray, inside: np.ndarray, tolerance: float, covered: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (``PATCHES`` ** 2 values): whether its median of ``e`` over ``inside`` is
    within ``tolerance``, and whether the patch counts (at least half inside). ``covered``,
    the patches' pixel counts in ``inside``, where already counted.

    A median is within the tolerance when both middle values are, so counting the values
    within it settles each patch without sorting: k of n values within it puts the median
    within it when k > n // 2, beyond it when k <= (n - 1) // 2. Only a patch of even size
    with exactly n / 2 values within it needs its two middle values."""
    sizes = _patch_sums(*e.shape)[2]
    if covered is None:
        covered = _patch_counts(inside)
    within = _patch_counts((e <= tolerance) & inside)
    ok = within > covered // 2
    even = (covered > 0) & (covered % 2 == 0)
    ties = np.flatnonzero(even & (within == covered // 2))
    if len(ties):
        patch, mask, values = _patch_of(*e.shape), inside.ravel(), e.ravel()
        for k in ties:
            middle = np.partition(values[mask & (patch == k)], [within[k] - 1, within[k]])
            ok[k] = (middle[within[k] - 1] + middle[within[k]]) / 2 <= tolerance
    return ok & (covered > 0), covered >= 0.5 * sizes


def _patch_share(e: np.ndarray, inside: np.ndarray) -> float:
    """Share of the overlap's patches (an ``PATCHES`` x ``PATCHES`` grid, those at least
    half inside) whose median residual is within ``TOLERANCE``."""
    ok, counted = _medians_within(e, inside, TOLERANCE)
    if not counted.any():
        return 0.0
    return float((ok & counted).sum() / counted.sum())


def agreement(
    kept: Capture,
    other: Capture,
    warp: np.ndarray,
    *,
    second_chance: bool = False,
    first_try: bool = False,
    colours_early: bool = False,
) -> Agreement:
    """Align ``other`` onto ``kept`` from ``warp`` (kept's unit square to the other's) and
    measure how much of the overlap agrees.

    A pair is settled at a coarse level (its score is the share of patches that agree in
    grey there) when the alignment has already slid into a map that no edit makes or onto
    too small an overlap, as between two smooth noise images: no copy was measured that
    way. Agreement itself is only judged at the finest level, in grey and in colour: a
    recoloured copy can agree on few patches in grey. With ``second_chance`` (the caller
    aligns a pair that fails here again, from the geometric check's map), a pair under
    ``FIRST_TRY_SHARE`` in grey at the next-to-finest level is settled there too. With
    ``first_try`` (a pair's first try, from a map its glances chose), one under
    ``FIRST_TRY_COARSE_SHARE`` at the coarsest level is settled there. With
    ``colours_early`` (a crowded pair, whose flat colour fields the alignment slides
    over), one whose colours at the next-to-finest level follow one colour change on less
    than ``COARSE_COLOURS`` of the patches is settled there (its score is that share), and
    one under ``COARSEST_COLOURS`` at the coarsest level."""
    refined = warp
    for level in range(len(LEVELS)):
        refined = align(kept, other, refined, range(level, level + 1))
        if level < len(LEVELS) - 1:
            # The overlap and the map settle most pairs here; residuals are only worth
            # their cost where a share of agreeing patches is reported or decides.
            _, ho, wo = other.levels[level].shape
            inside = _inside(ho, wo, _mapped(kept.levels[level][0].shape, refined))
            overlap = float(inside.mean())
            if np.count_nonzero(inside) < 16:
                return Agreement(0.0, overlap, refined, level)
            settled = overlap < MIN_OVERLAP or not _editable(refined)
            # The least share of agreeing grey patches that goes on from this level.
            least = 0.0
            if first_try and level == 0:
                least = FIRST_TRY_COARSE_SHARE
            if second_chance and level == len(LEVELS) - 2:
                least = FIRST_TRY_SHARE
            if settled or least > 0.0:
                r, inside = residuals(kept, other, refined, level)
                share = _share(kept, r, inside, level)
                if settled or share < least:
                    return Agreement(share, overlap, refined, level)
            if colours_early:
                shape = kept.levels[level][0].shape
                colours = _one_colour_change(kept, other, refined, inside.reshape(shape), level)
                if colours < (COARSEST_COLOURS if level == 0 else COARSE_COLOURS):
                    return Agreement(colours, overlap, refined, level)
    r, inside, gain = _fitted(kept, other, refined)
    return _measured(kept, other, refined, r, inside, gain)


def _share(kept: Capture, r: np.ndarray, inside: np.ndarray, level: int = -1) -> float:
    """Share of the overlap's patches that agree in grey, residuals ``r`` at ``level``."""
    contrast = max(float(kept.levels[level][0][inside].std()), 0.02)
    return _patch_share(np.abs(r) / contrast, inside)


def _measured(
    kept: Capture,
    other: Capture,
    warp: np.ndarray,
    r: np.ndarray,
    inside: np.ndarray,
    gain: float,
) -> Agreement:
    if np.count_nonzero(inside) < 16:
        return Agreement(0.0, 0.0, warp)
    score = _share(kept, r, inside)
    if score < SAME_CAPTURE_CUT - 1e-9:
        # Recoloured copies agree in colour, not in grey; a pair that agrees in grey
        # already needs no colour fit.
        score = max(score, _patch_share(_colour_residuals(kept, other, warp), inside))
    found = Agreement(score, float(inside.mean()), warp)
    if not found.same_capture:
        return found
    # Only a pair that agrees pays for the moved maps.
    # The grey gain of the residuals is the one the moved maps' checks weigh.
    distinct = distinctiveness(kept, other, warp, r, inside, gain)
    return Agreement(score, found.overlap, warp, distinct=distinct)


def _moved_map(warp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    moved = warp.copy()
    moved[0, 2] += dx
    moved[1, 2] += dy
    return moved


def distinctiveness(
    kept: Capture,
    other: Capture,
    warp: np.ndarray,
    r: np.ndarray,
    inside: np.ndarray,
    gain: float | None = None,
) -> Distinctiveness:
    """How the agreement of ``other`` under ``warp`` (grey residuals ``r`` over
    ``inside``, after the robust grey ``gain`` when the caller has it) holds up when the
    map moves by ``SHIFT`` of the other image's side, on all patches and on the textured
    ones; how much fine detail the kept image has; how far the map squashes and the grey
    gain scales the other image; and how much of the overlap follows one colour change."""
    contrast = max(float(kept.levels[-1][0][inside].std()), 0.02)
    covered = _patch_counts(inside)
    counted = covered >= 0.5 * _patch_sums(*inside.shape)[2]
    detail = kept.detail
    colours = _one_colour_change(kept, other, warp, inside)
    if colours < SAME_CAPTURE_CUT - 1e-9:
        # Settled without the moved maps (not measured: nan).
        return Distinctiveness(float("nan"), float("nan"), 0, detail, colours=colours)
    tight = 1.0
    if detail < MIN_DETAIL:
        close, _ = _medians_within(np.abs(r) / contrast, inside, TIGHT_TOLERANCE, covered)
        tight = float(close[counted].mean()) if counted.any() else 0.0
        if tight < SAME_CAPTURE_CUT - 1e-9:
            e = _colour_residuals(kept, other, warp)
            tight = max(
                tight,
                float(_medians_within(e, inside, TIGHT_TOLERANCE, covered)[0][counted].mean()),
            )
        if tight < SAME_CAPTURE_CUT - 1e-9:
            # Settled without the moved maps (not measured: nan).
            return Distinctiveness(float("nan"), float("nan"), 0, detail, tight, colours=colours)
    # The same step in the kept image's own coordinates, to move it against itself.
    to_kept = np.linalg.inv(warp[:, :2])
    shares, textured, agreeing = [], 0, 0
    steps = ((SHIFT, 0.0), (-SHIFT, 0.0), (0.0, SHIFT), (0.0, -SHIFT))
    if _self_pinned(kept, [_own_step(to_kept, dx, dy) for dx, dy in steps], inside, contrast):
        # The kept image's own detail pins the map: the other image, which agrees with it
        # on nearly all the overlap, cannot agree under the moved maps where the kept one
        # does not agree with itself. Settled without them (not measured: nan).
        return Distinctiveness(
            float("nan"),
            float("nan"),
            0,
            detail,
            tight,
            _squash(kept, other, warp),
            _gain(kept, other, warp) if gain is None else gain,
            colours,
        )
    moved = _moved_residuals(kept, other, [_moved_map(warp, dx, dy) for dx, dy in steps])
    judged = []
    for (dx, dy), (ro, io) in zip(steps, moved, strict=True):
        io &= inside
        agrees, co = _medians_within(np.abs(ro) / contrast, io, TOLERANCE)
        if np.count_nonzero(io) < 16 or not co.any():
            shares.append(0.0)  # a moved map covering too little agrees on nothing
            continue
        shares.append(float(agrees[co].mean()))
        judged.append((agrees, co, _own_step(to_kept, dx, dy)))
    selves = _moved_self(kept, [step for _, _, step in judged])
    for (agrees, co, _), (rs, own) in zip(judged, selves, strict=True):
        # The kept image against itself moved by the same step, judged the same way.
        unmoved, cs = _medians_within(rs / contrast, own & inside, TEXTURED)
        tells = cs & co & counted & ~unmoved
        textured += int(tells.sum())
        agreeing += int((tells & agrees).sum())
    return Distinctiveness(
        float(np.mean(shares)),
        agreeing / textured if textured else 0.0,
        textured,
        detail,
        tight,
        _squash(kept, other, warp),
        _gain(kept, other, warp) if gain is None else gain,
        colours,
    )


def _own_step(to_kept: np.ndarray, dx: float, dy: float) -> tuple[float, float]:
    """A step (dx, dy) of the other image's side in the kept image's own coordinates."""
    step = to_kept @ np.array([dx, dy])
    return float(step[0]), float(step[1])


def _self_pinned(
    kept: Capture, steps: list[tuple[float, float]], inside: np.ndarray, contrast: float
) -> bool:
    """Whether the kept image moved against itself by each of ``steps`` agrees, over the
    overlap ``inside``, on at most ``SELF_PINNED`` of its patches on average."""
    shares = []
    for rs, own in _moved_self(kept, steps):
        agrees, counted = _medians_within(rs / contrast, own & inside, TOLERANCE)
        shares.append(float(agrees[counted].mean()) if counted.any() else 1.0)
    return float(np.mean(shares)) <= SELF_PINNED


def _moved_residuals(
    kept: Capture, other: Capture, warps: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`residuals` at the finest level under each of ``warps``, the other image
    sampled for all of them in one pass (the same values)."""
    t_img, stack = kept.levels[-1][0], other.levels[-1]
    n = t_img.size
    sampled, covers = _sample(stack[:1], np.concatenate([_mapped(t_img.shape, w) for w in warps]))
    found = []
    for k in range(len(warps)):
        inside = covers[k * n : (k + 1) * n]
        _, r, _ = _robust_fit(t_img.ravel(), sampled[0, k * n : (k + 1) * n], inside)
        found.append((r.reshape(t_img.shape), inside.reshape(t_img.shape)))
    return found


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """The chroma of an (h, w, 3) RGB image as complex numbers in the hue plane (red
    against cyan, green against blue), blurred by ``CHROMA_BLUR``, flattened: turning the
    hue rotates it, desaturating scales it."""
    return _chroma_of(rgb.transpose(2, 0, 1))


def _chroma_of(planes: np.ndarray) -> np.ndarray:
    """:func:`_chroma` of an image as its (3, h, w) colour planes (read-only: a capture
    keeps its own, and the compiled chroma fit takes one kind of array)."""
    r, g, b = planes
    across = _gaussian(r - (g + b) / 2, CHROMA_BLUR)
    down = _gaussian((np.sqrt(3) / 2) * (g - b), CHROMA_BLUR)
    chroma = (across + 1j * down).ravel()
    chroma.flags.writeable = False
    return chroma


def _one_colour_change(
    kept: Capture, other: Capture, warp: np.ndarray, inside: np.ndarray, level: int = -1
) -> float:
    """Share of the overlap's patches (``inside``, at ``level``, the finest by default)
    whose colours follow one colour change (see ``CHROMA_TOLERANCE``): the better of the
    other image's chroma under ``warp`` as the kept one's times one complex gain, fitted
    robustly, and the kept one's as the other's (a grey kept image with its colour
    source), the second only where the first falls short of ``SAME_CAPTURE_CUT``."""
    ours = kept.chroma_at(level)
    _, h, w = kept.planes_at(level).shape
    # The other image's colours at the kept one's pixel centres (which of them it covers
    # is ``inside`` already): torch's grid coordinates are the unit ones doubled, less one.
    grid = _unit_grid(h, w) @ (2.0 * warp).T
    grid -= 1.0
    warped = _grid_sample(other.planes_at(level), grid)
    mask = inside.ravel()
    covered = _patch_counts(inside)
    # The sampled planes as they come (contiguous rows): the same values as the image
    # laid out pixel by pixel, without gathering its channels apart again.
    theirs = _chroma_of(warped.reshape(3, h, w))
    r = np.empty(theirs.shape, theirs.real.dtype)
    kernels = _kernels()
    fit = _chroma_fit if kernels is None else kernels.chroma_fit
    best = 0.0
    for source_chroma, target in ((ours, theirs), (theirs, ours)):
        fit(source_chroma, target, mask, 4, r)
        spread = max(float(np.sqrt(np.mean(np.abs(target[mask]) ** 2))), CHROMA_FLOOR)
        follows, counted = _medians_within(
            (r / spread).reshape(h, w), inside, CHROMA_TOLERANCE, covered
        )
        if counted.any():
            best = max(best, float(follows[counted].mean()))
        if best >= SAME_CAPTURE_CUT - 1e-9:
            # Enough patches follow for any use of the share (the cut): the other direction
            # would only tell by how much.
            break
    return best


def _chroma_fit(
    source: np.ndarray, target: np.ndarray, mask: np.ndarray, rounds: int, r: np.ndarray
) -> None:
    """``rounds`` fits of one complex gain taking the chroma ``source`` to ``target`` over
    the pixels of ``mask``, each after the first under Tukey weights of the one before's
    residuals; writes the last fit's residual magnitudes into ``r``. In numpy: the
    reference of ``ghostmatch.dupes.gaussnewton.chroma_fit``, and what runs without
    numba."""
    count = int(np.count_nonzero(mask))
    fitted = np.empty_like(source)
    # What the reweighted fits weigh, the same at every round: the complex products as
    # their real and imaginary parts, so that the real weights need no complex copy.
    power_of = np.abs(source) ** 2
    product = np.conj(source) * target
    real, imaginary = np.ascontiguousarray(product.real), np.ascontiguousarray(product.imag)
    weight = mask.astype(np.float64)
    for _ in range(rounds):
        power = float(weight @ power_of)
        gain = complex(weight @ real, weight @ imaginary) / power if power > 1e-12 else 0j
        np.multiply(gain, source, out=fitted)
        np.abs(np.subtract(target, fitted, out=fitted), out=r)
        weight = _tukey(r, mask, count)


def _gain(kept: Capture, other: Capture, warp: np.ndarray) -> float:
    """The robust grey gain taking ``other`` under ``warp`` to ``kept``."""
    grey = kept.levels[-1][0]
    sampled, inside = _sample(other.levels[-1][:1], _unit_grid(*grey.shape) @ warp.T)
    return _robust_fit(grey.ravel(), sampled[0], inside)[0]


def _squash(kept: Capture, other: Capture, warp: np.ndarray) -> float:
    """How much ``warp`` stretches one way against the other, in unit squares or in
    pixels (whichever is less): a turn of a wide image is no squash in pixels, a whole
    image stretched to another aspect none in unit squares."""
    _, hk, wk = kept.levels[-1].shape
    _, ho, wo = other.levels[-1].shape
    linear = warp[:, :2]
    pixels = np.diag([wo, ho]) @ linear @ np.diag([1 / wk, 1 / hk])
    squashes = []
    for m in (linear, pixels):
        big, small = np.linalg.svd(m, compute_uv=False)
        squashes.append(float(big / max(small, 1e-9)))
    return min(squashes)


# The kept image's residuals against itself moved by a step, for the last few (image,
# step): a kept file is compared with each of its group's members, mostly under the same
# step. Keyed by the capture's id, held by a weak reference that must still be that image.
_MOVED_SELF: OrderedDict[
    tuple[int, int, int], tuple[weakref.ref[Capture], np.ndarray, np.ndarray]
] = OrderedDict()
_MOVED_SELF_LOCK = threading.Lock()
MOVED_SELF_CACHE = 64


def _moved_self(
    kept: Capture, steps: list[tuple[float, float]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Absolute grey residuals of ``kept`` against itself moved by each (dx, dy) of its
    side, and which pixels the moved image covers (steps rounded to a thousandth); those
    not kept from an earlier pair are measured together."""
    keys = [(id(kept), round(dx * 1000), round(dy * 1000)) for dx, dy in steps]
    found: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
    with _MOVED_SELF_LOCK:
        for key in keys:
            kept_one = _MOVED_SELF.get(key)
            if kept_one is not None and kept_one[0]() is kept:
                _MOVED_SELF.move_to_end(key)
                found[key] = (kept_one[1], kept_one[2])
    missing = list(dict.fromkeys(key for key in keys if key not in found))
    if missing:
        maps = [_moved_map(np.eye(2, 3), key[1] / 1000, key[2] / 1000) for key in missing]
        for key, (r, inside) in zip(missing, _moved_residuals(kept, kept, maps), strict=True):
            r = np.abs(r)
            # Shared by the pairs that find it here.
            r.flags.writeable = False
            inside.flags.writeable = False
            found[key] = (r, inside)
        with _MOVED_SELF_LOCK:
            for key in missing:
                _MOVED_SELF[key] = (weakref.ref(kept), *found[key])
                _MOVED_SELF.move_to_end(key)
            while len(_MOVED_SELF) > MOVED_SELF_CACHE:
                _MOVED_SELF.popitem(last=False)
    return [found[key] for key in keys]


def _detail(kept: Capture) -> int:
    """Patches of the kept image with fine detail: a mean absolute difference above
    ``DETAIL_RESIDUAL`` of the contrast from itself moved by ``DETAIL_SHIFT`` of the side
    across or down (the larger of the two). Counted once per image: ``Capture.detail``."""
    grey = kept.levels[-1][0]
    h, w = grey.shape
    contrast = max(float(grey.std()), 0.02)
    patch = _patch_of(h, w).reshape(h, w)
    n = PATCHES * PATCHES
    most = np.zeros(n)
    sx, sy = max(1, round(DETAIL_SHIFT * w)), max(1, round(DETAIL_SHIFT * h))
    for diff, cells in (
        (grey[:, sx:] - grey[:, :-sx], patch[:, :-sx]),
        (grey[sy:, :] - grey[:-sy, :], patch[:-sy, :]),
    ):
        total = np.bincount(cells.ravel(), weights=np.abs(diff).ravel() / contrast, minlength=n)
        most = np.maximum(most, total / np.maximum(np.bincount(cells.ravel(), minlength=n), 1))
    return int((most > DETAIL_RESIDUAL).sum())
