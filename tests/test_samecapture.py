"""Dense agreement after alignment: an edit of a photo agrees with it, another shot does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import samecapture

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def photo() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 320))


def edited(image: Image.Image) -> Image.Image:
    """Cropped to the middle 80%, brighter, with a caption bar: one capture, edited."""
    w, h = image.size
    crop = image.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    brighter = Image.eval(crop, lambda v: min(255, int(v * 1.15 + 10)))
    ImageDraw.Draw(brighter).rectangle((0, 200, 255, 230), fill=(20, 20, 200))
    return brighter


def other_shot(image: Image.Image) -> Image.Image:
    """The same scene from a little to the side: a perspective change, other light, and
    sensor noise of its own."""
    w, h = image.size
    coefficients = (1.02, 0.03, -4.0, -0.02, 1.0, 3.0, 1.5e-4, -1.0e-4)
    moved = image.transform((w, h), Image.Transform.PERSPECTIVE, coefficients, Image.BICUBIC)
    pixels = np.asarray(moved, np.float64)
    light = np.linspace(0.8, 1.15, w)[None, :, None]
    noise = np.random.default_rng(0).normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels * light + noise, 0, 255).astype(np.uint8))


def test_alignment_recovers_a_crop_from_a_rough_start() -> None:
    # Kept's unit coordinates map onto the 80% crop as u -> (u - 0.1) / 0.8.
    truth = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])
    rough = truth + np.array([[0.04, 0.0, 0.02], [0.0, -0.03, 0.02]])
    warp, _, _, _ = samecapture.align(photo(), edited(photo()), rough)
    assert np.abs(warp - truth).max() < 0.01


def test_an_edit_agrees_where_another_shot_does_not() -> None:
    truth = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])
    copy = samecapture.agreement(photo(), edited(photo()), truth, inliers=50)
    shot = samecapture.agreement(photo(), other_shot(photo()), IDENTITY, inliers=50)
    # The caption covers a tenth of the crop, the brightening clips the astronaut's white
    # suit; the rest agrees.
    assert copy.agree[0.1] > 0.75 and copy.median < 0.05
    assert shot.agree[0.1] < 0.5 and shot.median > 0.1
    assert copy.overlap > 0.6 and shot.overlap > 0.9


def test_a_recoloured_copy_agrees_in_colour_and_a_grey_one_in_grey() -> None:
    pixels = np.asarray(photo(), np.float64)
    # A hue and saturation change: channels mixed, which no grey gain and offset follows.
    mix = np.array([[0.55, 0.45, 0.0], [0.0, 0.6, 0.4], [0.5, 0.0, 0.5]])
    recoloured = Image.fromarray(np.clip(pixels @ mix.T, 0, 255).astype(np.uint8))
    colour = samecapture.agreement(photo(), recoloured, IDENTITY, inliers=50)
    assert colour.colour_patches[0.1] == 1.0
    assert colour.patches[0.1] < 0.9
    grey = samecapture.agreement(photo(), photo().convert("L").convert("RGB"), IDENTITY, 50)
    assert grey.patches[0.2] == 1.0
    either = samecapture.features(grey)["either patches@0.2"]
    assert either == max(grey.patches[0.2], grey.colour_patches[0.2]) == 1.0
