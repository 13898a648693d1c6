"""PIL image edits shared by the near-duplicate test-set maker and the training augmentations.

Every function returns a new RGB image and takes its randomness, if any, from the
``random.Random`` passed in, so a seeded caller gets the same pixels every time.
"""

from __future__ import annotations

import io
import math
import random
import string

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from ghostmatch.ingest.images import to_rgb

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)

_TEXT_CHARS = string.ascii_letters + string.digits + "      !?#@&"


def random_color(rng: random.Random) -> Color:
    """A uniformly random RGB colour."""
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def reencode_jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Compress to JPEG at ``quality`` (1-100) and decode again, keeping the artefacts."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    to_rgb(img).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def resize(
    img: Image.Image, scale: float, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Scale both sides by ``scale`` (at least one pixel each)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    width, height = img.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return to_rgb(img).resize(size, resample)


def center_crop_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Cut the central ``width`` x ``height`` window; the image must be at least that big."""
    if width > img.width or height > img.height:
        raise ValueError(f"cannot crop {width}x{height} out of {img.width}x{img.height}")
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return to_rgb(img).crop((left, top, left + width, top + height))


def random_crop(img: Image.Image, fraction: float, rng: random.Random) -> Image.Image:
    """Keep ``fraction`` of each side at a random position."""
    width, height = _fraction_size(img, fraction)
    left = rng.randint(0, img.width - width)
    top = rng.randint(0, img.height - height)
    return to_rgb(img).crop((left, top, left + width, top + height))


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return ImageOps.mirror(to_rgb(img))


def rotate(
    img: Image.Image,
    degrees: float,
    fill: Color | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Rotate counter-clockwise about the centre without growing the canvas.

    With ``fill=None`` the result is cropped to the largest centred window of the original
    aspect ratio that holds no corner padding, so it is smaller than the input; otherwise
    the uncovered corners are painted with ``fill`` and the size is kept.
    """
    rgb = to_rgb(img)
    if fill is not None:
        return rgb.rotate(degrees, resample=resample, expand=False, fillcolor=fill)
    if degrees % 360.0 == 0.0:
        return rgb.copy()
    rotated = rgb.rotate(degrees, resample=resample, expand=False)
    angle = abs(degrees) % 180.0
    angle = math.radians(180.0 - angle if angle > 90.0 else angle)
    cos, sin = math.cos(angle), math.sin(angle)
    width, height = rgb.size
    # A centred (s*w, s*h) window fits inside the rotated w x h rectangle iff its corners,
    # rotated back, stay within +-w/2 and +-h/2.
    shrink = min(width / (width * cos + height * sin), height / (width * sin + height * cos))
    # Shave one pixel so that resampling never blends the padded corners into the edge.
    inner_w = max(1, math.floor(width * shrink) - 1)
    inner_h = max(1, math.floor(height * shrink) - 1)
    return center_crop_to(rotated, inner_w, inner_h)


def color_shift(
    img: Image.Image,
    hue: float = 0.0,
    saturation: float = 1.0,
    brightness: float = 1.0,
    contrast: float = 1.0,
) -> Image.Image:
    """Adjust brightness, contrast and saturation (1.0 = unchanged), then rotate the hue.

    ``hue`` is a fraction of the colour wheel in [-0.5, 0.5]; the order is fixed so that the
    same parameters always give the same pixels.
    """
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"hue must be in [-0.5, 0.5], got {hue}")
    out = to_rgb(img)
    if brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(brightness)
    if contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(contrast)
    if saturation != 1.0:
        out = ImageEnhance.Color(out).enhance(saturation)
    if hue != 0.0:
        hsv = np.array(out.convert("HSV"))
        shift = round(hue * 256)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        out = Image.fromarray(hsv, "HSV").convert("RGB")
    return out


def grayscale(img: Image.Image) -> Image.Image:
    """Drop colour but keep three channels."""
    return ImageOps.grayscale(to_rgb(img)).convert("RGB")


def blur(img: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur with standard deviation ``radius`` pixels."""
    return to_rgb(img).filter(ImageFilter.GaussianBlur(radius))


def random_text(rng: random.Random, min_chars: int = 4, max_chars: int = 16) -> str:
    """A random caption of letters, digits, spaces and a little punctuation."""
    length = rng.randint(min_chars, max_chars)
    return "".join(rng.choice(_TEXT_CHARS) for _ in range(length)).strip() or "copy"


def overlay_text(
    img: Image.Image, text: str, rng: random.Random, height_fraction: float = 0.12
) -> Image.Image:
    """Write ``text`` at a random position in a random colour with a contrasting outline.

    The glyphs are ``height_fraction`` of the image height tall; text wider than the image
    is placed so that it runs off one edge, as captions on reposted images often do.
    """
    out = to_rgb(img).copy()
    font_size = max(8, round(out.height * height_fraction))
    font = ImageFont.load_default(size=font_size)
    stroke = max(1, font_size // 16)
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x_low, x_high = sorted((-math.floor(left), out.width - math.ceil(right)))
    y_low, y_high = sorted((-math.floor(top), out.height - math.ceil(bottom)))
    x, y = rng.randint(x_low, x_high), rng.randint(y_low, y_high)
    color = random_color(rng)
    outline = tuple(255 - c for c in color)
    draw.text(
        (x, y),
        text,
        fill=color,
        font=font,
        stroke_width=stroke,
        stroke_fill=outline,
    )
    return out


def overlay_shape(img: Image.Image, rng: random.Random, size_fraction: float = 0.2) -> Image.Image:
    """Paint one emoji-like blob (disc, square or triangle) with an outline at random."""
    out = to_rgb(img).copy()
    side = max(4, round(min(out.size) * size_fraction))
    x = rng.randint(-side // 4, max(-side // 4, out.width - side * 3 // 4))
    y = rng.randint(-side // 4, max(-side // 4, out.height - side * 3 // 4))
    box = (x, y, x + side, y + side)
    kind = rng.choice(("disc", "square", "triangle"))
    color = random_color(rng)
    outline = random_color(rng)
    width = max(1, side // 12)
    draw = ImageDraw.Draw(out)
    if kind == "disc":
        draw.ellipse(box, fill=color, outline=outline, width=width)
    elif kind == "square":
        draw.rounded_rectangle(box, radius=side // 5, fill=color, outline=outline, width=width)
    else:
        points = [(x + side // 2, y), (x + side, y + side), (x, y + side)]
        draw.polygon(points, fill=color, outline=outline, width=width)
    return out


def pad(
    img: Image.Image, left: int, top: int, right: int, bottom: int, color: Color = WHITE
) -> Image.Image:
    """Grow the canvas by the given number of pixels on each side, filled with ``color``."""
    if min(left, top, right, bottom) < 0:
        raise ValueError("padding must be non-negative")
    return ImageOps.expand(to_rgb(img), border=(left, top, right, bottom), fill=color)


def add_border(img: Image.Image, fraction: float, color: Color = WHITE) -> Image.Image:
    """Frame the image with a uniform border ``fraction`` of its shorter side thick."""
    if fraction < 0:
        raise ValueError(f"border fraction must be non-negative, got {fraction}")
    thickness = max(1, round(min(img.size) * fraction))
    return pad(img, thickness, thickness, thickness, thickness, color)


def change_aspect(
    img: Image.Image, ratio: float, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Stretch so that width/height is multiplied by ``ratio``, keeping the area about equal."""
    if ratio <= 0:
        raise ValueError(f"aspect ratio factor must be positive, got {ratio}")
    root = math.sqrt(ratio)
    size = (max(1, round(img.width * root)), max(1, round(img.height / root)))
    return to_rgb(img).resize(size, resample)


def _fraction_size(img: Image.Image, fraction: float) -> tuple[int, int]:
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    return max(1, round(img.width * fraction)), max(1, round(img.height * fraction))
