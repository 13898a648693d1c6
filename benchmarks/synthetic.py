"""Seeded images unlike the photos the model was trained on: shapes, smooth noise,
textures and document-like pages. Each image is drawn from its own seed, so no two are
copies of each other, and a duplicate finder that groups any of them is wrong."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = (320, 240)
Painter = Callable[[np.random.Generator, tuple[int, int]], Image.Image]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def shapes(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Flat-coloured rectangles, ellipses, polygons and lines on a plain background, the
    stuff of slides, logos and diagrams."""
    width, height = size
    image = Image.new("RGB", size, _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 10))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        box = (x0, y0, max(x1, x0 + 8), max(y1, y0 + 8))
        kind = int(rng.integers(0, 4))
        outline = _colour(rng) if rng.random() < 0.5 else None
        if kind == 0:
            draw.rectangle(box, fill=_colour(rng), outline=outline, width=3)
        elif kind == 1:
            draw.ellipse(box, fill=_colour(rng), outline=outline, width=3)
        elif kind == 2:
            points = [
                (int(rng.integers(0, width)), int(rng.integers(0, height)))
                for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(points, fill=_colour(rng), outline=outline)
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(2, 12)))
    return image


def smooth_noise(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Gaussian noise on a coarse grid, upsampled smoothly: blotches of colour with no
    edges, like an out-of-focus background or a gradient wallpaper."""
    width, height = size
    cells = int(rng.integers(2, 9))
    coarse = rng.standard_normal((max(2, cells * height // width), cells, 3))
    low = coarse.min(axis=(0, 1), keepdims=True)
    span = np.maximum(coarse.max(axis=(0, 1), keepdims=True) - low, 1e-6)
    pixels = ((coarse - low) / span * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)


def texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A repetitive surface: a few sine gratings of random frequency, angle and phase
    mapped between two colours, or a small random tile repeated (fabric, tiles, wallpaper)."""
    width, height = size
    if rng.random() < 0.5:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        field = np.zeros((height, width))
        for _ in range(int(rng.integers(2, 5))):
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(4, 40)
            phase = rng.uniform(0, 2 * np.pi)
            field += np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period + phase)
        t = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
        pixels = (a + (b - a) * t[..., None]).astype(np.uint8)
        return Image.fromarray(pixels)
    tile_w, tile_h = (int(v) for v in rng.integers(6, 40, 2))
    tile = rng.integers(0, 256, (tile_h, tile_w, 3)).astype(np.uint8)
    tile = np.asarray(
        Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.BOX), dtype=np.uint8
    )
    reps = (-(-height // tile_h), -(-width // tile_w), 1)
    return Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:height, :width]))


def document(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A page: a title, paragraphs of random words in dark ink on a light background, now
    and then a table's rules or a box (scans, screenshots of text, receipts)."""
    width, height = size
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    margin = int(rng.integers(8, 30))
    y = margin
    title_size = int(rng.integers(16, 26))
    title = ImageFont.load_default(size=title_size)
    draw.text((margin, y), _words(rng, 2, 5), fill=ink, font=title)
    y += int(title_size * 1.6)
    body_size = int(rng.integers(8, 13))
    body = ImageFont.load_default(size=body_size)
    line = int(body_size * 1.45)
    while y + line < height - margin:
        if rng.random() < 0.12:  # paragraph break
            y += line
            continue
        if rng.random() < 0.06:  # a rule or a box
            right = int(rng.integers(width // 2, width - margin + 1))
            draw.rectangle((margin, y, right, y + 2 * line), outline=ink)
            y += 3 * line
            continue
        draw.text((margin, y), _words(rng, 3, 12), fill=ink, font=body)
        y += line
    return image


def _words(rng: np.random.Generator, low: int, high: int) -> str:
    letters = np.array(list(string.ascii_lowercase))
    count = int(rng.integers(low, high))
    return " ".join(
        "".join(rng.choice(letters, int(rng.integers(1, 10)))) for _ in range(count)
    ).capitalize()


KINDS: dict[str, Painter] = {
    "shapes": shapes,
    "noise": smooth_noise,
    "texture": texture,
    "document": document,
}
# Screenshots and scans are often PNG; the rest is saved as a camera or a web page would.
_FORMAT = {"shapes": "png", "noise": "jpg", "texture": "jpg", "document": "png"}


def make_image(kind: str, index: int, seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """Image ``index`` of ``kind``, from its own seed: the same arguments always give the
    same pixels, and any two images of the set are drawn independently."""
    rng = np.random.default_rng([seed, list(KINDS).index(kind), index])
    return KINDS[kind](rng, size)


def write_images(
    folder: Path, per_kind: int, seed: int, size: tuple[int, int] = SIZE
) -> list[Path]:
    """``per_kind`` images of each kind under ``folder`` as ``<kind>-<index>.<ext>``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in KINDS:
        for index in range(per_kind):
            path = folder / f"{kind}-{index:03d}.{_FORMAT[kind]}"
            image = make_image(kind, index, seed, size)
            if path.suffix == ".jpg":
                image.save(path, quality=90)
            else:
                image.save(path)
            paths.append(path)
    return paths
