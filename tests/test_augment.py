"""Training augmentations and inference preprocessing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ghostmatch.augment import CopyAugment, random_resized_crop
from ghostmatch.errors import GhostmatchError
from ghostmatch.transforms import rotate

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.coffee())


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


def test_random_resized_crop_stays_inside_the_image(photo: Image.Image) -> None:
    rng = random.Random(3)
    for _ in range(20):
        out = random_resized_crop(photo, 32, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), rng=rng)
        assert out.size == (32, 32)


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
