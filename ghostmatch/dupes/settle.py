"""Copies settled from small grey views: a re-encoded, resized, blurred or mildly
recoloured copy shows its source's picture up to one brightness and contrast change, which
another shot of the same scene does not, and so do a framed copy inside its frame and a
flipped copy mirrored; such a pair needs no dense comparison. The same views choose a
pair's first dense try: none where its layouts show the unmoved try hopeless, the mirror
map where they agree mirrored."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops

# Both views squash the image to a square, as the dense comparison's unit square does: a
# copy whose aspect ratio changed lines up at the identity map there, and is ``near`` there.
GLANCE_SIDE = 48
# The thumbnail is the glance averaged over blocks of this many pixels a side (16 x 16).
THUMB_BLOCK = 3
# The glance's patches a side (8 x 8 patches of 6 x 6 pixels) for the residual check.
PATCHES = 8
# Set on the tuning half of ``python -m benchmarks.othershots`` (ukbench objects 0-62,
# every candidate pair over the threshold). Re-encoded, resized, grey, blurred and
# aspect-changed copies: thumbnail correlation at least 0.996, worst thumbnail residual at
# most 0.35 and worst patch residual at most 0.47 (blur); most colour-changed copies pass
# too. Other shots of the same object: correlation at most 0.97, residuals from 1.22 and
# 0.82; independent synthetic images (noise, shapes, textures, pages; 60 of each kind, two
# seeds, every pair): correlation at most 0.96, the nearest pair by both residuals at 0.72
# and 0.68.
MIN_CORRELATION = 0.98
# The largest residual of one thumbnail pixel after the best gain, in units of the kept
# thumbnail's root mean square contrast.
THUMB_RESIDUAL = 0.4
# The largest root mean square residual of one glance patch after the best gain and
# offset, in units of the kept glance's standard deviation.
PATCH_RESIDUAL = 0.4
# Grey levels (of 255): a glance with less contrast than this shows too little to settle
# anything (a fine texture or a flat page averages out at this size).
MIN_CONTRAST = 4.0
# A frame: every side at least FRAME_MIN pixels (of the decoded image) of one colour, each
# channel within FRAME_TOLERANCE of the top left corner's, and the picture inside at least
# FRAME_INSIDE of each side. JPEG keeps a plain border within a few levels; the rows
# that touch the picture ring, and end the frame. Inside their frames, bordered copies
# settle as the plain ones do; the nearest other shot of the benchmark correlates 0.95,
# with residuals from 1.29 and 1.10.
FRAME_MIN = 2
FRAME_TOLERANCE = 24
FRAME_INSIDE = 0.5
# The layout: the glance averaged over blocks of this many pixels a side (8 x 8), coarse
# enough that a crop to 80% or a turn by 8 degrees still correlates with its source.
LAYOUT_BLOCK = 6
# Layout correlations (the best of the pair as it is and with either picture inside its
# frame), measured on the tuning half of ``python -m benchmarks.othershots`` (ukbench
# objects 0-62) over every pair tried unmoved. Pairs that pass the unmoved try: at least
# 0.26 (a bordered copy against a crop to 80% or a turn by 8 degrees; held-out half 0.41),
# and at least 0.66 where a file is crowded (held-out 0.75). Under these cuts the unmoved
# try is hopeless: a pair goes straight to the geometric check, or is no copy when
# crowded (a crowded pair has no other try). On ``--synthetic-only 1000`` (seed 7) the
# crowded cut leaves out 908 of 2,902 unmoved tries, none of which passed; on the full set
# the two cuts leave out 150 of 1,450, none of which passed.
HOPELESS_LAYOUT = 0.2
HOPELESS_CROWDED_LAYOUT = 0.6
# A pair whose layouts correlate at least ``MIRRORED_LAYOUT`` with one of them mirrored,
# and ``MIRROR_MARGIN`` better than as they are, is first tried from the mirror map (a
# flipped copy). On the same tuning half, all 60 pairs that pass the mirrored try (all
# flipped copies) clear both (the least margin 0.115: a nearly symmetric picture), and 7
# that fail it do (then judged as before, without their unmoved try, which all 7 fail).
MIRRORED_LAYOUT = 0.6
MIRROR_MARGIN = 0.1


@dataclass(frozen=True)
class Glance:
    """An image as ``GLANCE_SIDE`` x ``GLANCE_SIDE`` grey pixels (uint8, squashed to a
    square), what :func:`settles` compares."""

    grey: np.ndarray
    # The glance of the picture inside a uniform frame, when the image has one.
    inside: Glance | None = None
    # Thumbnails by block, made on first use and kept: a file meets many others, and each
    # pair reads its thumbnails and layouts again (on the full ``benchmarks.othershots``
    # set, 14,862 thumbnails of 2,051 glances).
    _thumbnails: dict[int, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def of(cls, image: Image.Image, framed: bool = True) -> Glance:
        small = image.convert("L").resize((GLANCE_SIDE, GLANCE_SIDE), Image.Resampling.BOX)
        box = _frame(image.convert("RGB")) if framed else None
        inside = None if box is None else cls.of(image.crop(box), framed=False)
        return cls(np.asarray(small, dtype=np.uint8), inside)

    @functools.cached_property
    def mirrored(self) -> Glance:
        """The glance of the image's mirror image (made once)."""
        inside = None if self.inside is None else self.inside.mirrored
        return Glance(np.ascontiguousarray(self.grey[:, ::-1]), inside)

    def thumbnail(self, block: int = THUMB_BLOCK) -> np.ndarray:
        """The glance averaged over ``block`` squares, mean removed and unit length (zero
        for a flat glance), flattened (read-only)."""
        made = self._thumbnails.get(block)
        if made is not None:
            return made
        side = GLANCE_SIDE // block
        blocks = self.grey.astype(np.float64).reshape(side, block, side, block)
        thumb = blocks.mean(axis=(1, 3)).ravel()
        thumb -= thumb.mean()
        norm = float(np.linalg.norm(thumb))
        thumb = thumb / norm if norm > 1e-6 else np.zeros_like(thumb)
        thumb.flags.writeable = False
        self._thumbnails[block] = thumb
        return thumb


def settles(kept: Glance, other: Glance) -> bool:
    """Whether ``other`` is ``kept`` unmoved, up to one gain and offset, on cheap evidence
    alone: the thumbnails correlate at least ``MIN_CORRELATION`` with no pixel off by more
    than ``THUMB_RESIDUAL``, and no patch of the glances is off by more than
    ``PATCH_RESIDUAL``. A pair that fails is not decided: the dense comparison does that."""
    a, b = kept.thumbnail(), other.thumbnail()
    correlation = float(a @ b)
    if correlation < MIN_CORRELATION:
        return False
    # Unit vectors: the best gain is the correlation, and a pixel's residual is measured
    # against the root mean square of the kept thumbnail, 1 / side.
    side = GLANCE_SIDE // THUMB_BLOCK
    if float(np.abs(a - correlation * b).max()) * side > THUMB_RESIDUAL:
        return False
    y = kept.grey.astype(np.float64).ravel()
    x = other.grey.astype(np.float64).ravel()
    y -= y.mean()
    x -= x.mean()
    contrast = float(y.std())
    if contrast < MIN_CONTRAST or float(x.std()) < MIN_CONTRAST:
        return False
    residual = (y - (x @ y) / (x @ x) * x).reshape(GLANCE_SIDE, GLANCE_SIDE)
    size = GLANCE_SIDE // PATCHES
    patches = (residual.reshape(PATCHES, size, PATCHES, size) ** 2).mean(axis=(1, 3))
    return float(np.sqrt(patches.max())) <= PATCH_RESIDUAL * contrast


def settled_tier(kept: Glance, other: Glance) -> str | None:
    """``near`` when ``other`` is ``kept`` unmoved (:func:`settles`), ``edited`` when one
    of them is the other inside a uniform frame (a bordered copy), or the other's mirror
    image (a flipped copy, framed or not), else None: not decided here. On the full set of
    ``python -m benchmarks.othershots`` the mirror images settle 100 of the 111 flipped
    copies that pass a dense try from the mirror map, 5 other flipped copies, and no
    other pair."""
    if settles(kept, other):
        return "near"
    if _framed(kept, other):
        return "edited"
    flipped = other.mirrored
    if settles(kept, flipped) or _framed(kept, flipped):
        return "edited"
    return None


def _framed(kept: Glance, other: Glance) -> bool:
    """Whether one of the two is the other inside a uniform frame."""
    if kept.inside is not None and settles(kept.inside, other):
        return True
    return other.inside is not None and settles(kept, other.inside)


def layout_correlation(kept: Glance, other: Glance, mirrored: bool = False) -> float:
    """The best correlation of the two layouts (``LAYOUT_BLOCK``), as they are and with
    either picture inside its frame; with ``mirrored``, the other's mirror image."""
    side = GLANCE_SIDE // LAYOUT_BLOCK
    pairs = [(kept, other)]
    if kept.inside is not None:
        pairs.append((kept.inside, other))
    if other.inside is not None:
        pairs.append((kept, other.inside))
    best = -1.0
    for a, b in pairs:
        theirs = b.thumbnail(LAYOUT_BLOCK)
        if mirrored:
            theirs = theirs.reshape(side, side)[:, ::-1].ravel()
        best = max(best, float(a.thumbnail(LAYOUT_BLOCK) @ theirs))
    return best


def first_try(kept: Glance, other: Glance, crowded: bool) -> str | None:
    """Where the dense comparison of a pair not settled here starts: ``unmoved`` (the
    identity map), ``mirrored`` (the mirror map: the layouts agree mirrored, see
    ``MIRRORED_LAYOUT``; never for a crowded file, which is only ever tried unmoved), or
    None when the layouts show the unmoved try hopeless (``HOPELESS_LAYOUT``)."""
    unmoved = layout_correlation(kept, other)
    if not crowded:
        mirror = layout_correlation(kept, other, mirrored=True)
        if mirror >= MIRRORED_LAYOUT and mirror >= unmoved + MIRROR_MARGIN:
            return "mirrored"
    if unmoved < (HOPELESS_CROWDED_LAYOUT if crowded else HOPELESS_LAYOUT):
        return None
    return "unmoved"


def _frame(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of the picture inside a uniform frame of the RGB
    ``image``, or None when it has none."""
    rgb: np.ndarray = np.asarray(image)
    h, w = rgb.shape[:2]
    corner = rgb[0, 0].astype(np.int16)

    def plain_lines(lines: np.ndarray) -> bool:
        return bool((np.abs(lines.astype(np.int16) - corner).max(axis=-1) <= FRAME_TOLERANCE).all())

    # Most images have no frame: their outermost lines already say so, before the whole
    # image is looked at.
    edges = (rgb[:FRAME_MIN], rgb[-FRAME_MIN:], rgb[:, :FRAME_MIN], rgb[:, -FRAME_MIN:])
    if not all(plain_lines(edge) for edge in edges):
        return None
    # Each pixel's largest channel difference from the corner, by Pillow (a picture on a
    # plain background passes the outer lines, and numpy's int16 passes over the whole
    # image cost 0.8 ms of it; these 0.1 ms).
    plain_colour = Image.new("RGB", image.size, tuple(int(c) for c in rgb[0, 0]))
    red, green, blue = ImageChops.difference(image, plain_colour).split()
    off: np.ndarray = np.asarray(ImageChops.lighter(ImageChops.lighter(red, green), blue))
    plain: np.ndarray = off <= FRAME_TOLERANCE
    rows = np.asarray(plain.all(axis=1))
    cols = np.asarray(plain.all(axis=0))
    top, bottom = _run(rows), _run(rows[::-1])
    left, right = _run(cols), _run(cols[::-1])
    if min(top, bottom, left, right) < FRAME_MIN:
        return None
    if w - left - right < FRAME_INSIDE * w or h - top - bottom < FRAME_INSIDE * h:
        return None
    return left, top, w - right, h - bottom


def _run(flags: np.ndarray) -> int:
    """How many of ``flags`` are true from the start on."""
    false = np.flatnonzero(~flags)
    return int(false[0]) if len(false) else len(flags)
