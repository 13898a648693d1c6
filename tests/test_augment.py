"""Training augmentations and inference preprocessing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ghostmatch.augment import CopyAugment, eval_transform, random_resized_crop, to_tensor
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
    # At strength 0 only the centred square crop and the resize are left (the photo is small
    # enough that it is not downscaled first).
    plain = CopyAugment(160, strength=0.0)(photo, random.Random(1))
    side = min(photo.size)
    left = (photo.width - side) // 2
    box = (left, 0, left + side, side)
    expected = photo.resize((160, 160), Image.Resampling.BICUBIC, box=box)
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


def test_eval_transform_shape_and_normalisation(photo: Image.Image) -> None:
    tensor = eval_transform(photo, 224, MEAN, STD, crop=0.875)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    grey = Image.new("RGB", (300, 200), (124, 116, 104))
    flat = eval_transform(grey, 64, MEAN, STD)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(flat.mean(dim=(1, 2)), expected.float(), atol=1e-5, rtol=0)
    assert flat.std(dim=(1, 2)).max() < 1e-5


def test_to_tensor_matches_the_formula(photo: Image.Image) -> None:
    small = photo.resize((20, 10))
    pixels = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255
    expected = (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(to_tensor(small, MEAN, STD), expected, atol=1e-5, rtol=1e-5)
