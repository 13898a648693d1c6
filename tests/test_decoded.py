"""One decode of a file for everything a duplicate search reads from its pixels: the
captures of the dense comparison and every kind of local map, the same decisions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from judge_support import records_by_name
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
from ghostmatch import Library
from ghostmatch.dupes.finder import DECODE_SIDE, PairJudge, _Decoded
from ghostmatch.ingest.images import draft_scale, load_image
from ghostmatch.store.catalog import ImageRecord


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


@pytest.fixture(scope="module")
def judged(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Library, dict[int, ImageRecord], dict[str, int]]]:
    """A library of a photo, a bordered and a mirrored copy of it and an unrelated photo;
    their catalog records by id, and their ids by file name."""
    root = tmp_path_factory.mktemp("decoded")
    folder = root / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    bordered = ImageOps.expand(scene().resize((280, 210)), border=20, fill=(255, 255, 255))
    bordered.save(folder / "bordered.jpg", quality=95)
    ImageOps.mirror(scene()).save(folder / "mirrored.jpg", quality=95)
    Image.fromarray(data.coffee()).convert("RGB").resize((320, 240)).save(folder / "coffee.jpg")
    with ghostmatch.open(root / "index", weights="bundled") as lib:
        lib.index([folder])
        yield lib, *records_by_name(lib)


def _judge_all(
    judged: tuple[Library, dict[int, ImageRecord], dict[str, int]], budget: int | None = None
) -> tuple[PairJudge, dict[int, str | None]]:
    lib, records, ids = judged
    # A score under any threshold: each pair goes to the geometric check, which reads the
    # plain, mirrored and zoomed maps, and the captures of the pairs it aligns.
    judge = PairJudge(lib.finder.model, records, 2.0, 36)
    if budget is not None:
        judge.decoded.budget = budget
    others = [(ids[n], 0.0) for n in ("bordered.jpg", "mirrored.jpg", "coffee.jpg")]
    try:
        return judge, judge(ids["scene.jpg"], others)
    finally:
        judge.close()


def test_each_file_is_decoded_once_for_its_captures_and_every_kind_of_map(
    judged: tuple[Library, dict[int, ImageRecord], dict[str, int]],
) -> None:
    _, _, ids = judged
    judge, tiers = _judge_all(judged)
    assert tiers == {ids["bordered.jpg"]: "edited", ids["mirrored.jpg"]: "edited"} | {
        ids["coffee.jpg"]: None
    }
    assert judge.maps.made == {"base": 4, "mirrored": 3, "zoomed": 2}
    made = {i for i, c in judge.captures.items() if c is not None}
    assert made == {ids["scene.jpg"], ids["bordered.jpg"], ids["mirrored.jpg"]}
    # Twelve reads of four small JPEGs (nine maps, three captures), one decode each.
    assert judge.decoded.decodes == 4


def test_no_decode_kept_decodes_every_read_and_decides_the_same(
    judged: tuple[Library, dict[int, ImageRecord], dict[str, int]],
) -> None:
    kept, tiers = _judge_all(judged)
    judge, again = _judge_all(judged, budget=0)
    assert again == tiers and judge.maps.made == kept.maps.made
    assert judge.decoded.decodes == 12


def test_a_jpeg_is_decoded_again_only_where_its_dct_scale_differs(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    scene().resize((1200, 1000)).save(big, quality=90)
    small = tmp_path / "small.png"
    scene().save(small)
    # 1000 pixels high: a quarter is 250, enough for the captures, not for the zoomed maps.
    assert draft_scale((1200, 1000), DECODE_SIDE) == 4
    assert draft_scale((1000, 1200), 256) == draft_scale((1200, 1000), 256) == 2
    decoded = _Decoded()
    for path, side, decodes in (
        (big, DECODE_SIDE, 1),
        (big, 200, 1),
        (big, 256, 2),
        (big, 300, 2),
        (small, 256, 3),
        (small, DECODE_SIDE, 3),
    ):
        image = decoded.image(path, side)
        assert decoded.decodes == decodes
        np.testing.assert_array_equal(np.asarray(image), np.asarray(load_image(path, side).image))
