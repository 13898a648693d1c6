"""Training augmentations for self-supervised copy detection, and the inference preprocessing.

``CopyAugment`` follows the spirit of SSCD (Pizzi et al., CVPR 2022): two draws of it on
one photo should look like an image and a copy of it found on the web.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import to_rgb
from ghostmatch.train.transforms import (
    add_border,
    blur,
    change_aspect,
    color_shift,
    grayscale,
    hflip,
    overlay_shape,
    overlay_text,
    pad,
    random_color,
    random_text,
    reencode_jpeg,
    rotate,
)

BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class CopyAugment:
    """Random copy-like edit of a PIL image into a ``size`` x ``size`` RGB image.

    Steps, each with its probability at ``strength=1``: blur of the photo itself (``blur``,
    0.2; sigma 0.05-1% of its longer side, as a user blurs a whole photo), aspect change
    (0.2, up to 1.5x), random resized crop (always; area 0.2-1, aspect within 3/4-4/3 of
    the photo's own, squashed to a square as inference squashes the whole photo), flip
    (0.5), rotation (0.2, up to 15 degrees, cropped so no corners show), colour jitter
    (0.8; brightness, contrast and saturation +-40%, hue +-0.1), grey (``grey``, 0.1), text
    or a shape pasted on (0.2), border or uneven padding (0.2) and JPEG re-encoding (0.3,
    quality 20-90). ``strength`` multiplies the probabilities and the size of each edit; at
    0 the result is the whole photo squashed to the square, which is the inference input.
    All randomness comes from the ``rng`` passed to each call.
    """

    size: int
    strength: float = 1.0
    grey: float = 0.1
    blur: float = 0.2

    def __post_init__(self) -> None:
        if self.size < 16:
            raise GhostmatchError(f"augmentation size must be at least 16 pixels, got {self.size}")
        if not 0.0 <= self.strength <= 3.0:
            raise GhostmatchError(f"augmentation strength must be in [0, 3], got {self.strength}")
        for name in ("grey", "blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GhostmatchError(f"{name} probability must be in [0, 1]")

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Apply one random draw of the edits; the same ``rng`` state gives the same pixels."""
        size, strength = self.size, self.strength
        # The crop below keeps at least ~45% of a side; more source pixels than that only
        # cost time.
        out = _cap_shorter_side(to_rgb(img), 3 * size)
        if self._happens(self.blur, rng):
            # Before the crop, so that a tighter crop magnifies the blur and a wide photo,
            # squashed to the square, is blurred more across its height than its width, as
            # in the blurred copies users meet. Drawn at a fixed size in model pixels after
            # the crop, it never reached a wide photo blurred by 0.6% of its width.
            out = blur(out, rng.uniform(0.0005, 0.0005 + 0.0095 * strength) * max(out.size))
        if self._happens(0.2, rng):
            out = change_aspect(out, math.exp(rng.uniform(-1.0, 1.0) * math.log(1.5) * strength))
        # Windows shaped like the photo (within 3/4-4/3 of it), because the model is shown
        # whole photos squashed to a square: a 2.4:1 airplane photo is squashed 2.4x at
        # inference, and near-square windows of it never showed the model such inputs.
        log_ratio = math.log(4.0 / 3.0) * strength
        shape = out.width / out.height
        out = random_resized_crop(
            out,
            size,
            scale=(max(0.05, 1.0 - 0.8 * strength), 1.0),
            ratio=(shape * math.exp(-log_ratio), shape * math.exp(log_ratio)),
            rng=rng,
        )
        if self._happens(0.5, rng):
            out = hflip(out)
        if self._happens(0.2, rng):
            limit = min(45.0, 15.0 * strength)
            out = rotate(out, rng.uniform(-limit, limit)).resize((size, size), BICUBIC)
        if self._happens(0.8, rng):
            jitter = 0.4 * strength
            out = color_shift(
                out,
                hue=rng.uniform(-1.0, 1.0) * min(0.5, 0.1 * strength),
                saturation=rng.uniform(max(0.05, 1.0 - jitter), 1.0 + jitter),
                brightness=rng.uniform(max(0.05, 1.0 - jitter), 1.0 + jitter),
                contrast=rng.uniform(max(0.05, 1.0 - jitter), 1.0 + jitter),
            )
        if self._happens(self.grey, rng):
            out = grayscale(out)
        if self._happens(0.2, rng):
            if rng.random() < 0.5:
                height = rng.uniform(0.05, 0.05 + 0.15 * strength)
                out = overlay_text(out, random_text(rng), rng, height_fraction=height)
            else:
                out = overlay_shape(out, rng, size_fraction=rng.uniform(0.1, 0.1 + 0.2 * strength))
        if self._happens(0.2, rng):
            color = random_color(rng)
            if rng.random() < 0.5:
                out = add_border(out, rng.uniform(0.02, 0.02 + 0.13 * strength), color)
            else:
                left, top, right, bottom = (
                    round(rng.uniform(0.0, 0.3 * strength) * size) for _ in range(4)
                )
                out = pad(out, left, top, right, bottom, color)
        if out.size != (size, size):
            out = out.resize((size, size), BICUBIC)
        if self._happens(0.3, rng):
            out = reencode_jpeg(out, rng.randint(max(5, round(90 - 70 * strength)), 90))
        return out

    def _happens(self, probability: float, rng: random.Random) -> bool:
        return rng.random() < min(1.0, probability * self.strength)


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Image.Image:
    """Crop a random window of ``scale`` of the area and width/height in ``ratio``, resized
    to ``size`` x ``size``.

    After ten windows that do not fit, fall back to the largest centred window whose aspect
    ratio is allowed.
    """
    width, height = img.size
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            break
    else:
        crop_w, crop_h = width, height
        if width / height < ratio[0]:
            crop_h = max(1, round(width / ratio[0]))
        elif width / height > ratio[1]:
            crop_w = max(1, round(height * ratio[1]))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return to_rgb(img).resize((size, size), BICUBIC, box=box)


def _cap_shorter_side(img: Image.Image, limit: int) -> Image.Image:
    if min(img.size) <= limit:
        return img
    # reducing_gap lets PIL box-reduce first: several times faster on camera-sized photos.
    scale = limit / min(img.size)
    new_size = (max(limit, round(img.width * scale)), max(limit, round(img.height * scale)))
    return img.resize(new_size, BICUBIC, reducing_gap=3.0)
