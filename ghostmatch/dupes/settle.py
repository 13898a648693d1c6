"""Copies settled from small grey views: a re-encoded, resized, blurred or mildly
recoloured copy shows its source's picture up to one brightness and contrast change, which
another shot of the same scene does not, and so does a framed copy inside its frame; such a
pair needs no dense comparison."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Glance:
    """An image as ``GLANCE_SIDE`` x ``GLANCE_SIDE`` grey pixels (uint8, squashed to a
    square), what :func:`settles` compares."""

    grey: np.ndarray
    # The glance of the picture inside a uniform frame, when the image has one.
    inside: Glance | None = None

    @classmethod
    def of(cls, image: Image.Image, framed: bool = True) -> Glance:
        small = image.convert("L").resize((GLANCE_SIDE, GLANCE_SIDE), Image.Resampling.BOX)
        box = _frame(image.convert("RGB")) if framed else None
        inside = None if box is None else cls.of(image.crop(box), framed=False)
        return cls(np.asarray(small, dtype=np.uint8), inside)

    def thumbnail(self) -> np.ndarray:
        """The glance averaged over ``THUMB_BLOCK`` squares, mean removed and unit length
        (zero for a flat glance), flattened."""
        side = GLANCE_SIDE // THUMB_BLOCK
        blocks = self.grey.astype(np.float64).reshape(side, THUMB_BLOCK, side, THUMB_BLOCK)
        thumb = blocks.mean(axis=(1, 3)).ravel()
        thumb -= thumb.mean()
        norm = float(np.linalg.norm(thumb))
        return thumb / norm if norm > 1e-6 else np.zeros_like(thumb)


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
    of them is the other inside a uniform frame (a bordered copy), else None: not decided
    here."""
    if settles(kept, other):
        return "near"
    if kept.inside is not None and settles(kept.inside, other):
        return "edited"
    if other.inside is not None and settles(kept, other.inside):
        return "edited"
    return None


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
