"""Edits of one capture move as one piece; another view of the scene does not
(``ghostmatch.dupes.parallax``), and the duplicate search calls such a pair ``similar``."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from skimage import data

from ghostmatch import Library
from ghostmatch.dupes import parallax, samecapture

UKBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukbench-dev"
# A guitar on a plain wall, shot again from a little closer: at the dense agreement's 128
# pixels one affine map from the first shot, as a crop resized back is.
RESHOT = ("ukbench00270.jpg", "ukbench00271.jpg")


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def crop_map(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The map from the source's unit square to that of its crop ``box``, a little off,
    as the dense agreement leaves it at 128 pixels (a third of a pixel there)."""
    w, h = size
    x0, y0, x1, y1 = box[0] / w, box[1] / h, box[2] / w, box[3] / h
    warp = np.array([[1 / (x1 - x0), 0.0, -x0 / (x1 - x0)], [0.0, 1 / (y1 - y0), -y0 / (y1 - y0)]])
    warp[:, 2] += 0.0025
    return warp


def test_edits_of_one_photo_move_as_one_piece() -> None:
    source = scene()
    w, h = source.size
    box80 = (w // 10, h // 10, w - w // 10, h - h // 10)
    box60 = (w // 5, h // 5, w - w // 5, h - h // 5)
    copies = {
        "crop 80%": (jpeg(source.crop(box80).resize((w, h))), crop_map(box80, (w, h))),
        "crop 60%": (jpeg(source.crop(box60).resize((w, h))), crop_map(box60, (w, h))),
        "crop, half size": (
            jpeg(source.crop(box80).resize((w // 2, h // 2)), 60),
            crop_map(box80, (w, h)),
        ),
        "crop, recoloured": (
            jpeg(
                ImageEnhance.Color(
                    ImageEnhance.Brightness(source.crop(box80)).enhance(1.2)
                ).enhance(0.6)
            ),
            crop_map(box80, (w, h)),
        ),
        "crop, blurred": (
            jpeg(source.crop(box80).filter(ImageFilter.GaussianBlur(1.5))),
            crop_map(box80, (w, h)),
        ),
        "mirrored": (
            jpeg(ImageOps.mirror(source)),
            np.array([[-1.0, 0.0, 1.0025], [0.0, 1.0, 0.0025]]),
        ),
    }
    for name, (copy, warp) in copies.items():
        found = parallax.spread(source, copy, warp)
        assert found is not None, name
        assert found < parallax.SPREAD_CUT, (name, found)
        assert parallax.one_piece(source, copy, warp), name


def test_the_scene_seen_from_aside_does_not() -> None:
    # The same scene from a camera turned a little: a keystone (a perspective map, a tenth
    # wider at one side than at the other) that no single affine map follows everywhere.
    source = scene()
    w, h = source.size
    keystone = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 3e-4, 0.0)
    other = jpeg(
        source.transform((w, h), Image.Transform.PERSPECTIVE, keystone, Image.Resampling.BICUBIC)
    )
    found = parallax.spread(source, other, np.eye(2, 3))
    assert found is not None and found >= parallax.SPREAD_CUT
    assert not parallax.one_piece(source, other, np.eye(2, 3))
    # Its copy does: the keystone is in both.
    assert parallax.one_piece(other, jpeg(other, 60), np.eye(2, 3))


def test_a_featureless_overlap_cannot_tell_and_passes() -> None:
    flat = Image.new("RGB", (320, 240), (120, 130, 140))
    assert parallax.spread(flat, flat.copy(), np.eye(2, 3)) is None
    assert parallax.one_piece(flat, flat.copy(), np.eye(2, 3))


def test_the_coarse_look_settles_a_plain_crop_without_decoding_again() -> None:
    source = scene()
    w, h = source.size
    box = (w // 10, h // 10, w - w // 10, h - h // 10)
    kept = samecapture.prepare_capture(source)
    copy = samecapture.prepare_capture(jpeg(source.crop(box).resize((w, h))))
    found = samecapture.agreement(kept, copy, crop_map(box, (w, h)))
    assert found.same_capture
    coarse = parallax.coarse_spread(kept, copy, found.warp)
    assert coarse is not None and coarse < parallax.COARSE_SPREAD


@pytest.mark.skipif(
    not (UKBENCH / RESHOT[0]).exists(), reason=f"no ukbench-dev photos at {UKBENCH}"
)
def test_a_reshoot_that_passes_as_a_crop_is_similar_not_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    first = Image.open(UKBENCH / RESHOT[0]).convert("RGB")
    first.save(folder / "guitar.jpg", quality=92)
    Image.open(UKBENCH / RESHOT[1]).convert("RGB").save(folder / "guitar again.jpg", quality=92)
    w, h = first.size
    first.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(folder / "guitar crop.jpg")
    ImageOps.mirror(first).save(folder / "guitar flipped.png")
    first.resize((w // 2, h // 2)).save(folder / "guitar small.jpg", quality=70)
    copies = {"guitar.jpg", "guitar crop.jpg", "guitar flipped.png", "guitar small.jpg"}

    query = tmp_path / "the second shot.jpg"
    shutil.copyfile(folder / "guitar again.jpg", query)

    def tiers() -> tuple[dict[str, str], set[str], dict[str, str]]:
        with Library(tmp_path / "index", weights="bundled", device="cpu") as lib:
            lib.index([folder])
            groups = lib.find_duplicates(similar=True, workers=1)
            # ``--of``: the second shot as a new file, each indexed file as the kept one.
            of = {m.path.name: m.tier for m in lib.duplicates_of(query, similar=True)}
        found = {m.path.name: m.tier for g in groups for m in g.members}
        found.update({g.keep.path.name: "kept" for g in groups if g.members})
        similar = {m.path.name for g in groups for m in g.similar}
        return found, similar, of

    found, similar, of = tiers()
    # The four edits of the first shot are one group (the mirrored PNG kept: most pixels
    # without loss), and the second shot is only similar to it.
    assert set(found) == copies, found
    assert "guitar again.jpg" in similar
    # Its own bytes are an exact copy; the first shot's files are only similar to it.
    assert of.pop("guitar again.jpg") == "exact"
    assert of and set(of.values()) == {"similar"}, of
    # Without the look at how the pair moves, the dense agreement alone calls it a copy.
    monkeypatch.setattr(parallax, "SPREAD_CUT", float("inf"))
    found, _, of = tiers()
    assert found.get("guitar again.jpg") == "edited", found
    assert "edited" in of.values(), of


def test_a_map_that_is_not_finite_cannot_tell() -> None:
    source = scene()
    broken = np.array([[np.nan, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert parallax.spread(source, source.copy(), broken) is None
    capture = samecapture.prepare_capture(source)
    assert parallax.coarse_spread(capture, capture, broken) is None


def test_sixteen_bit_grey_is_the_same_picture() -> None:
    # Scaled from 0..65535 as the rest of the search reads it, not clipped to white.
    source = scene()
    grey = np.asarray(source.convert("L"), np.uint16) * 257
    sixteen = Image.fromarray(grey)
    assert sixteen.mode == "I;16"
    found = parallax.spread(source, sixteen, np.eye(2, 3))
    assert found is not None and found < parallax.SPREAD_CUT / 2
