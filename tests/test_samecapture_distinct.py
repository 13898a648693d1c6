"""A same-capture alignment must be distinctive: independent images without detail that
agree about as well anywhere nearby, or only after a squash, are no copies, while copies
of photos with large flat areas still are."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from ghostmatch.dupes import samecapture
from ghostmatch.dupes.samecapture import agreement, prepare_capture
from ghostmatch.eval.copies import TRANSFORMS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic

# Kept image's unit square to the copy's: a mirror image, and a crop of the middle 80%.
MIRROR = np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
CROP_80 = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])


def sample(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def middle_80(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((round(0.1 * w), round(0.1 * h), round(0.9 * w), round(0.9 * h)))


def test_independent_synthetic_images_that_agree_anywhere_nearby_are_no_copies() -> None:
    # Pairs that ``python -m benchmarks.othershots --synthetic-only 1000`` reported as
    # edited copies. Two smooth noise fields have no fine detail to pin a map, and can be
    # bent onto each other within the tolerance, never as closely as a copy's pixels; two
    # flat-shape pictures still agree on a quarter or more of their edges when moved.
    pairs = [("noise", 668, 470), ("noise", 422, 186), ("shapes", 723, 753)]
    for kind, a, b in pairs:
        kept = prepare_capture(synthetic.make_image(kind, a, seed=7))
        other = prepare_capture(synthetic.make_image(kind, b, seed=7))
        found = agreement(kept, other, np.eye(2, 3))
        assert found.score >= samecapture.SAME_CAPTURE_CUT - 1e-9
        assert found.distinct is not None
        assert not found.same_capture


def test_a_loosely_pinned_alignment_that_squashes_is_no_copy() -> None:
    # Two flat-shape pictures (seed 8) whose rectangles line up after a squash of 1.2 to 1:
    # most of the picture still agrees under the moved map, so nothing but the flat
    # areas holds the map, and no edit squashes a picture that way.
    kept = prepare_capture(synthetic.make_image("shapes", 277, seed=8))
    other = prepare_capture(synthetic.make_image("shapes", 25, seed=8))
    found = agreement(kept, other, np.eye(2, 3))
    assert found.score >= samecapture.SAME_CAPTURE_CUT - 1e-9
    assert found.distinct is not None
    assert found.distinct.moved >= samecapture.LOOSE_MOVED
    assert found.distinct.squash > samecapture.LOOSE_SQUASH
    assert not found.same_capture


def test_a_copy_of_a_smooth_image_is_still_one_when_its_pixels_match() -> None:
    image = synthetic.make_image("noise", 3, seed=99)
    kept = prepare_capture(image)
    found = agreement(kept, prepare_capture(image.resize((128, 96))), np.eye(2, 3))
    assert found.distinct is not None and found.distinct.detail < samecapture.MIN_DETAIL
    assert found.same_capture and found.is_whole()
    flipped = agreement(kept, prepare_capture(ImageOps.mirror(image)), MIRROR)
    assert flipped.same_capture


@pytest.mark.parametrize("name", ["rocket", "astronaut", "coffee", "chelsea", "camera"])
def test_copies_of_photos_with_flat_areas_still_agree(name: str) -> None:
    # A large flat sky agrees under any nearby map: it neither proves nor disproves, and
    # the rocket's own detail stops agreeing when the map moves.
    image = sample(name)
    kept = prepare_capture(image)
    rng = random.Random(f"7:{name}")
    copies = [
        ("mirrored", ImageOps.mirror(image), MIRROR),
        ("cropped", middle_80(image), CROP_80),
        ("recoloured", TRANSFORMS["color"](image, rng), np.eye(2, 3)),
        ("text bar", TRANSFORMS["text"](image, rng), np.eye(2, 3)),
    ]
    for edit, copy, warp in copies:
        found = agreement(kept, prepare_capture(copy), warp)
        assert found.same_capture, (name, edit, found)


def test_pairs_that_do_not_agree_skip_the_moved_maps() -> None:
    kept = prepare_capture(sample("rocket"))
    found = agreement(kept, prepare_capture(sample("coffee")), np.eye(2, 3))
    assert not found.same_capture and found.distinct is None
