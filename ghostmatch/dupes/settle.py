"""Near copies settled from small grey views: a re-encoded, resized, blurred or mildly
recoloured copy shows its source's picture up to one brightness and contrast change, which
another shot of the same scene does not; such a pair needs no dense comparison."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

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


@dataclass(frozen=True)
class Glance:
    """An image as ``GLANCE_SIDE`` x ``GLANCE_SIDE`` grey pixels (uint8, squashed to a
    square), what :func:`settles` compares."""

    grey: np.ndarray

    @classmethod
    def of(cls, image: Image.Image) -> Glance:
        small = image.convert("L").resize((GLANCE_SIDE, GLANCE_SIDE), Image.Resampling.BOX)
        return cls(np.asarray(small, dtype=np.uint8))

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
