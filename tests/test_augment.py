"""Training augmentations and inference preprocessing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ghostmatch.errors import GhostmatchError
from ghostmatch.train.augment import CopyAugment, random_resized_crop
from ghostmatch.train.transforms import hflip, reencode_jpeg, rotate

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.coffee())


def test_edits_scale_16_bit_images_as_decoding_does() -> None:
    # A 16-bit scan at mid grey stays mid grey through the edits, as when it is indexed,
    # rather than being clipped to white.
    grey = Image.fromarray(np.full((4, 6), 32896, np.uint16))
    assert hflip(grey).getpixel((0, 0)) == (128, 128, 128)
    assert all(abs(v - 128) <= 2 for v in reencode_jpeg(grey, 95).getpixel((0, 0)))


def test_copy_augment_is_deterministic_under_the_rng(photo: Image.Image) -> None:
    augment = CopyAugment(size=96)
    outputs = [np.asarray(augment(photo, random.Random(seed))) for seed in range(12)]
    again = [np.asarray(augment(photo, random.Random(seed))) for seed in range(12)]
    for out, repeat in zip(outputs, again, strict=True):
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, repeat)
    assert len({out.tobytes() for out in outputs}) == len(outputs)


def test_copy_augment_accepts_any_mode_and_strength(photo: Image.Image) -> None:
    rng = random.Random(0)
    for image in (photo.convert("L"), photo.convert("RGBA"), photo.convert("P")):
        assert CopyAugment(64, strength=2.5)(image, rng).size == (64, 64)
    # At strength 0 only the squash of the whole photo to the square is left: the inference
    # input (the photo is small enough that it is not downscaled first).
    plain = CopyAugment(160, strength=0.0)(photo, random.Random(1))
    expected = photo.resize((160, 160), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(expected))
    with pytest.raises(GhostmatchError):
        CopyAugment(8)
    with pytest.raises(GhostmatchError):
        CopyAugment(64, strength=-1.0)


def _coordinates(width: int, height: int) -> Image.Image:
    """Red is the column and green the row of each pixel, so a crop shows where it was cut."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def _window(out: Image.Image) -> tuple[float, float, float, float]:
    """(left, top, width, height) of the window that ``out`` was resized from."""
    pixels = np.asarray(out, dtype=float)
    size = out.size[0]
    # Bicubic resizing keeps a linear ramp linear: output pixel i shows source column
    # left + (i + 0.5) * width / size - 0.5.
    width = (pixels[:, -1, 0].mean() - pixels[:, 0, 0].mean()) * size / (size - 1)
    height = (pixels[-1, :, 1].mean() - pixels[0, :, 1].mean()) * size / (size - 1)
    left = pixels[:, 0, 0].mean() + 0.5 - 0.5 * width / size
    top = pixels[0, :, 1].mean() + 0.5 - 0.5 * height / size
    return left, top, width, height


def test_random_resized_crop_draws_windows_of_the_asked_area_and_shape() -> None:
    image = _coordinates(240, 200)
    rng = random.Random(3)
    lefts = set()
    for _ in range(30):
        out = random_resized_crop(image, 64, scale=(0.2, 0.5), ratio=(0.75, 4 / 3), rng=rng)
        assert out.size == (64, 64)
        left, top, width, height = _window(out)
        assert left > -1 and top > -1 and left + width < 241 and top + height < 201
        assert 0.19 < width * height / (240 * 200) < 0.52
        assert 0.72 < width / height < 4 / 3 + 0.04
        lefts.add(round(left))
    assert len(lefts) > 10  # placed at random, not always in one spot


def test_random_resized_crop_falls_back_to_the_centre_of_a_strip() -> None:
    # No window of 20-50% of a 240 x 24 strip has an aspect ratio within 3/4-4/3: the
    # widest allowed one, 32 x 24, is cut from the middle.
    image = _coordinates(240, 24)
    out = random_resized_crop(
        image, 24, scale=(0.2, 0.5), ratio=(0.75, 4 / 3), rng=random.Random(0)
    )
    left, top, width, height = _window(out)
    assert abs(left - 104) < 1 and abs(top) < 1 and abs(width - 32) < 1 and abs(height - 24) < 1


def test_rotation_crops_away_the_corners(photo: Image.Image) -> None:
    white = Image.new("RGB", (200, 120), (255, 255, 255))
    for degrees in (8.0, -15.0, 90.0):
        turned = np.asarray(rotate(white, degrees))
        assert turned.min() > 200, degrees


def test_grey_probability_one_gives_grey_views(photo: Image.Image) -> None:
    always = CopyAugment(64, grey=1.0, blur=0.0)
    never = CopyAugment(64, grey=0.0)
    for seed in range(6):
        out = np.asarray(always(photo, random.Random(seed))).astype(int)
        # Coloured text, shapes and borders come after the grey step; the photo stays grey.
        assert np.median(np.abs(out[..., 0] - out[..., 1])) <= 1
        coloured = np.asarray(never(photo, random.Random(seed))).astype(int)
        assert np.median(np.abs(coloured[..., 0] - coloured[..., 1])) > 1
    with pytest.raises(GhostmatchError, match="grey probability"):
        CopyAugment(64, grey=1.5)


def test_views_of_a_wide_photo_are_shaped_like_it() -> None:
    # A 4:1 photo, red at its left end and blue at its right: inference squashes all of it
    # to the square, so light crops must keep both ends in view, as near-square windows
    # (a third of its width at most) never could.
    pixels = np.full((100, 400, 3), 128, np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, -30:] = (0, 0, 255)
    wide = Image.fromarray(pixels)
    augment = CopyAugment(64, strength=0.2, grey=0.0, blur=0.0)
    both = 0
    for seed in range(20):
        out = np.asarray(augment(wide, random.Random(seed))).astype(int)
        red = ((out[..., 0] > 150) & (out[..., 2] < 100)).any()
        blue = ((out[..., 2] > 150) & (out[..., 0] < 100)).any()
        both += bool(red and blue)
    assert both >= 15
