"""Plain local maps kept by indexing: made in the pass that makes an image's vector, the
maps a duplicate search would make of the same pixels to the bit, read by the search in
their place, and the same duplicates with or without them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_support import ok, run_cli
from judge_support import records_by_name
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
from ghostmatch import Library
from ghostmatch.ingest.images import decodes_alike
from ghostmatch.model.exports import local_maps_tag
from ghostmatch.store.catalog import ImageRecord


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


# A JPEG whose shorter side is 1,350 px is decoded at an eighth of it (169 px) for the
# 160 px vector, at a quarter for the 256 px zoomed map: other pixels under the plain map.
BIG = (1800, 1350)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    scene().save(folder / "scene.jpg", quality=95)
    bordered = ImageOps.expand(scene().resize((280, 210)), border=20, fill=(255, 255, 255))
    bordered.save(folder / "bordered.jpg", quality=95)
    ImageOps.mirror(scene()).save(folder / "mirrored.jpg", quality=95)
    scene().crop((60, 30, 280, 200)).save(folder / "crop.png")
    coffee = Image.fromarray(data.coffee()).convert("RGB").resize((320, 240))
    coffee.save(folder / "coffee.jpg")
    scene().resize(BIG).save(folder / "big.jpg", quality=90)
    return folder


Indexed = tuple[Library, dict[int, ImageRecord], dict[str, int]]


@pytest.fixture
def indexed(tmp_path: Path, photos: Path) -> Iterator[Indexed]:
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([photos])
        yield lib, *records_by_name(lib)


def test_indexing_keeps_the_plain_maps_a_search_would_make(indexed: Indexed) -> None:
    from ghostmatch.dupes.finder import _MapCache

    lib, records, ids = indexed
    embedder = lib.finder.embedder
    tag = local_maps_tag(embedder.card)
    assert embedder.maps_made_by == tag
    kept = lib.catalog.local_maps(list(records), tag)
    assert sorted(kept) == sorted(records)  # every image, made in the same pass
    made = _MapCache(embedder, records)  # nothing kept: the search makes its own
    zoomed = made.zoomed_card.input_size
    for name, i in ids.items():
        r = records[i]
        own = made._make(i, "base")
        assert own is not None and own.dtype == kept[i].dtype
        alike = decodes_alike(r.format, (r.width, r.height), embedder.card.input_size, zoomed)
        assert alike == (name != "big.jpg")
        if alike:
            np.testing.assert_array_equal(kept[i], own, err_msg=name)
        else:
            # Decoded at another DCT scale: not the search's own pixels, so not its map.
            assert not np.array_equal(kept[i], own)


def test_a_search_reads_the_kept_maps_and_decides_the_same(indexed: Indexed) -> None:
    from ghostmatch.dupes.finder import PairJudge

    lib, records, ids = indexed
    leader = ids["scene.jpg"]
    # Scores under any threshold: every pair goes to the geometric check.
    others = [(i, 0.0) for name, i in ids.items() if name != "scene.jpg"]
    own = PairJudge(lib.finder.model, records, 2.0, 36)
    reading = PairJudge(lib.finder.model, records, 2.0, 36, kept_maps=lib.catalog.local_maps)
    expected = own(leader, others)
    assert expected[ids["bordered.jpg"]] == "edited" and expected[ids["coffee.jpg"]] is None
    assert reading(leader, others) == expected
    assert own.maps.made["base"] == len(ids)
    # Only the big JPEG's plain map is made: its kept one came from other pixels.
    assert reading.maps.made["base"] == 1 and reading.maps.made["kept"] == len(ids) - 1
    assert reading.maps.made["zoomed"] == own.maps.made["zoomed"]


def test_a_search_without_kept_maps_makes_its_own(indexed: Indexed) -> None:
    from ghostmatch.dupes.finder import PairJudge

    lib, records, ids = indexed
    # Maps kept under another name (another runtime or model) are not read.
    with lib.catalog.transaction() as tx:
        maps = lib.catalog.local_maps(list(records), lib.finder.embedder.maps_made_by or "")
        tx.set_local_maps((i, "elsewhere", m) for i, m in maps.items())
    judge = PairJudge(lib.finder.model, records, 2.0, 36, kept_maps=lib.catalog.local_maps)
    judge(ids["scene.jpg"], [(ids["bordered.jpg"], 0.0)])
    assert judge.maps.made["base"] == 2 and judge.maps.made["kept"] == 0


def test_dupes_finds_the_same_with_or_without_kept_maps(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    ok(run_cli(["index", photos, "--index", index, "--weights", "bundled"], model_cache))
    with sqlite3.connect(index / "catalog.db") as db:
        assert db.execute("SELECT count(*) FROM local_maps").fetchone()[0] == 6
    dupes = ["dupes", "--index", index, "--json", "--similar"]
    kept = ok(run_cli(dupes, model_cache)).stdout
    groups = json.loads(kept)
    assert any(len(g["members"]) >= 2 for g in groups["groups"])
    with sqlite3.connect(index / "catalog.db") as db:
        db.execute("DELETE FROM local_maps")
    assert ok(run_cli(dupes, model_cache)).stdout == kept


def test_a_changed_file_gets_the_maps_of_its_new_pixels(tmp_path: Path) -> None:
    from ghostmatch.dupes.finder import _MapCache

    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "a.jpg", quality=95)
    ImageOps.mirror(scene()).save(folder / "b.jpg", quality=95)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        records, ids = records_by_name(lib)
        tag = lib.finder.embedder.maps_made_by or ""
        before = lib.catalog.local_maps([ids["a.jpg"]], tag)[ids["a.jpg"]]
        coffee = Image.fromarray(data.coffee()).convert("RGB").resize((320, 240))
        coffee.save(folder / "a.jpg", quality=90)
        report = lib.index([folder])
        assert report.updated == 1 and report.unchanged == 1
        records, ids = records_by_name(lib)
        kept = lib.catalog.local_maps(list(records), tag)
        assert sorted(kept) == sorted(records)
        own = _MapCache(lib.finder.embedder, records)._make(ids["a.jpg"], "base")
        np.testing.assert_array_equal(kept[ids["a.jpg"]], own)
        assert not np.array_equal(kept[ids["a.jpg"]], before)
