"""Turned copies: quarter-turned (and mirrored) and tilted copies are duplicates with
their turn named; ``query --rotations`` searches every quarter-turn of the query."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_support import CLI, cli_env
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
from ghostmatch.dupes import turns
from ghostmatch.dupes.turns import (
    Tilt,
    TurnedPair,
    compose_turns,
    find_tilt,
    inverse_turn,
    member_turn,
    straighten,
    turn_array,
    turn_image,
)

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def tilted(image: Image.Image, degrees: float, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` turned counter-clockwise by ``degrees`` onto a canvas that holds all of
    it, the corners filled."""
    return image.rotate(degrees, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)


# ---------------------------------------------------------------------------- geometry


def assert_is_the_picture(upright: Image.Image, original: Image.Image, slack: int) -> None:
    """``upright`` is the 320 x 240 ``original`` less a 2-pixel margin (its size within
    ``slack`` pixels), pixel for pixel up to resampling."""
    assert abs(upright.width - 316) <= slack and abs(upright.height - 236) <= slack
    diff = np.abs(
        np.asarray(upright.resize((316, 236)), np.int16)
        - np.asarray(original.crop((2, 2, 318, 238)), np.int16)
    )
    assert np.median(diff) < 12


def test_quarter_turns_are_clockwise_and_undo_each_other() -> None:
    pixels = np.arange(6).reshape(2, 3)
    # Clockwise: the bottom-left element comes to the top-left.
    assert turn_array(pixels, 90).tolist() == [[3, 0], [4, 1], [5, 2]]
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    for degrees in (0, 90, 180, 270):
        turned = turn_image(image, degrees)
        assert np.array_equal(np.asarray(turned), turn_array(np.asarray(image), degrees))
        back = turn_image(turned, inverse_turn(degrees, False))
        assert np.array_equal(np.asarray(back), np.asarray(image))
        # With a mirror the same turn undoes it: mirror(turn(mirror(turn(x)))) = x.
        mirrored = ImageOps.mirror(turned)
        again = ImageOps.mirror(turn_image(mirrored, inverse_turn(degrees, True)))
        assert np.array_equal(np.asarray(again), np.asarray(image))


def test_composed_turns_line_up_as_the_two_turns_one_after_the_other() -> None:
    pixels = np.arange(12).reshape(3, 4)

    def moved(a: np.ndarray, turn: int, flipped: bool) -> np.ndarray:
        turned = turn_array(a, turn)
        return turned[:, ::-1] if flipped else turned

    for first in (0, 90, 180, 270):
        for then in (0, 90, 180, 270):
            for f1 in (False, True):
                for f2 in (False, True):
                    z = moved(moved(pixels, first, f1), then, f2)
                    assert np.array_equal(
                        z, moved(pixels, compose_turns(first, f1, then), f1 != f2)
                    )


def test_member_turn_names_the_turn_from_either_side() -> None:
    # The owner turned clockwise by 90 is the other file.
    pair = TurnedPair(owner=1, other=2, turn=90, tilt=None, score=0.5)
    assert member_turn(pair, 1) == 90
    assert member_turn(pair, 2) == 270
    flipped = TurnedPair(owner=1, other=2, turn=90, tilt=None, score=0.5, flipped=True)
    assert member_turn(flipped, 2) == 90
    assert member_turn(None, 5) == 0


@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255)])
@pytest.mark.parametrize("degrees", [15.0, 20.0, -30.0])
def test_a_tilt_onto_filled_corners_is_measured_and_undone(
    degrees: float, fill: tuple[int, int, int]
) -> None:
    original = photo("coffee").resize((320, 240))
    copy = jpeg(tilted(original, degrees, fill))
    tilt = find_tilt(copy)
    assert tilt is not None
    assert tilt.degrees == pytest.approx(degrees, abs=0.6)
    assert np.abs(np.array(tilt.fill) - fill).max() <= 8
    upright = straighten(copy, tilt)
    # Back to the original's frame, less a thin margin where the fill was blended in.
    assert_is_the_picture(upright, original, 3)


@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255)])
def test_the_fill_is_found_per_channel_as_an_int16_difference_finds_it(
    fill: tuple[int, int, int],
) -> None:
    from ghostmatch.dupes.turns import FILL_TOLERANCE, _differs

    canvas = jpeg(tilted(photo("astronaut").resize((300, 300)), 20.0, fill))
    pixels = np.asarray(canvas, dtype=np.int16)
    expected = np.abs(pixels - np.array(fill)).max(axis=2) > FILL_TOLERANCE
    np.testing.assert_array_equal(_differs(canvas, fill), expected)


def test_captures_are_made_once_a_view_and_indexed_files_come_from_the_judge() -> None:
    from ghostmatch.dupes.samecapture import prepare_capture
    from ghostmatch.dupes.turns import View, capture_cache

    image = photo("coffee").resize((240, 160))
    kept = prepare_capture(image)
    made: list[View] = []
    asked: list[int] = []

    def views(view: View) -> Image.Image:
        made.append(view)
        return view.of(image)

    def stored(i: int):  # type: ignore[no-untyped-def]
        asked.append(i)
        return kept

    captures = capture_cache(views, stored)
    assert captures(View(3, 0), False) is kept
    turned = captures(View(3, 90), True)
    assert captures(View(3, 90), True) is turned
    assert captures(View(3, 90), False) is not turned
    # A new image (id -1) and a mirrored file are prepared here, once each.
    assert captures(View(-1, 0), False) is captures(View(-1, 0), False)
    assert captures(View(3, 0), True) is not kept
    assert asked == [3]
    assert made == [View(3, 90), View(3, 90), View(-1, 0), View(3, 0)]


@pytest.mark.parametrize("name", PHOTOS)
def test_an_upright_photo_has_no_tilt(name: str) -> None:
    assert find_tilt(photo(name)) is None


def test_letterboxed_and_bordered_photos_have_no_tilt() -> None:
    image = photo("chelsea").resize((320, 200))
    letterbox = Image.new("RGB", (320, 260))
    letterbox.paste(image, (0, 30))
    assert find_tilt(letterbox) is None
    assert find_tilt(ImageOps.expand(image, 20, fill=(255, 255, 255))) is None
    assert find_tilt(Image.new("RGB", (200, 100), (0, 0, 0))) is None


def light_photo(size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A 320 x 240 photo that is white but for coffee, ``size`` at ``at`` (a studio shot on
    white): tilted onto white corners, only the corners beside its dark sides show an edge."""
    canvas = Image.new("RGB", (320, 240), (255, 255, 255))
    canvas.paste(photo("coffee").resize(size), at)
    return canvas


@pytest.mark.parametrize(
    ("size", "at", "degrees"),
    [((240, 100), (40, 140), 15.0), ((140, 240), (180, 0), 15.0), ((140, 240), (180, 0), -30.0)],
)
def test_a_light_photo_tilted_onto_white_is_measured(
    size: tuple[int, int], at: tuple[int, int], degrees: float
) -> None:
    copy = jpeg(tilted(light_photo(size, at), degrees, (255, 255, 255)))
    tilt = find_tilt(copy)
    assert tilt is not None
    assert tilt.degrees == pytest.approx(degrees, abs=1.5)
    assert tilt.fill == (255, 255, 255) or min(tilt.fill) >= 248


@pytest.mark.parametrize(
    ("size", "at", "sides_shown"), [((200, 120), (60, 60), True), ((120, 80), (30, 30), False)]
)
def test_a_studio_shot_tilted_onto_white_is_straightened_to_its_whole_picture(
    size: tuple[int, int], at: tuple[int, int], sides_shown: bool
) -> None:
    # Coffee inside a white picture: tilted onto white, the picture's own sides show no
    # edge, only the subject's, which lie parallel to them (in three corners, or in one).
    original = light_photo(size, at)
    copy = jpeg(tilted(original, 30.0, (255, 255, 255)))
    assert (find_tilt(copy) is not None) == sides_shown
    tilt = find_tilt(copy, sides_shown=False)
    assert tilt is not None and tilt.degrees == pytest.approx(30.0, abs=1.0)
    upright = straighten(copy, tilt)
    # The whole picture, not the subject's bounding box.
    assert_is_the_picture(upright, original, 4)


def test_a_tilted_image_gets_views_only_where_its_picture_meets_another(tmp_path: Path) -> None:
    from ghostmatch.dupes.turns import screen

    photo("rocket").save(tmp_path / "rocket.jpg", quality=92)
    tilted(photo("rocket"), 20.0, (0, 0, 0)).save(tmp_path / "rocket-tilt20.jpg", quality=90)
    # Tilted too, but a copy of nothing here.
    lonely = Image.fromarray(data.coins()).convert("RGB")
    tilted(lonely, -25.0, (0, 0, 0)).save(tmp_path / "coins-tilt25.jpg", quality=90)
    paths = dict(enumerate(sorted(tmp_path.iterdir())))
    names = {i: p.name for i, p in paths.items()}
    found = screen(paths)
    assert {names[i] for i in found.tilts} == {"rocket-tilt20.jpg", "coins-tilt25.jpg"}
    # The straightened rocket is the upright rocket: its view at no turn, and nothing else.
    assert {names[i]: t for i, t in found.tilt_turns.items()} == {"rocket-tilt20.jpg": {0}}
    assert {names[i] for i in found.images} == {"rocket-tilt20.jpg"}


def test_an_edge_in_one_corner_that_misses_the_canvas_is_no_tilt() -> None:
    # A white picture crossed by one dark bar at 20 degrees: the top-left corner shows a
    # straight edge, but pixels lie where the corners of a tilted picture would be fill.
    from PIL import ImageDraw

    canvas = Image.new("RGB", (320, 240), (255, 255, 255))
    ImageDraw.Draw(canvas).line([(5, 60), (170, 0)], fill=(20, 20, 20), width=14)
    assert find_tilt(jpeg(canvas)) is None
    assert find_tilt(jpeg(light_photo((240, 100), (40, 140)))) is None


def test_straighten_with_a_tilt_of_nothing_keeps_the_image() -> None:
    blank = Image.new("RGB", (60, 40), (0, 0, 0))
    assert straighten(blank, Tilt(10.0, (0, 0, 0))).size == (60, 40)


def test_tilted_canvases_get_turned_views_only_of_their_own_picture(tmp_path: Path) -> None:
    from ghostmatch.dupes.turns import screen

    # Dull square photos tilted alike onto black: turned by 180, their canvases match by
    # their corners alone.
    for name in ("rocket", "coffee", "chelsea"):
        pixels = np.asarray(photo(name).resize((300, 300)), np.float32)
        dull = 110 + (pixels - pixels.mean()) * 0.15
        picture = Image.fromarray(dull.clip(0, 255).astype(np.uint8))
        tilted(picture, -30.0, (0, 0, 0)).save(tmp_path / f"{name}.jpg", quality=90)
    # And a tilted photo turned by 90: it is one of them.
    turn_image(Image.open(tmp_path / "coffee.jpg"), 90).save(tmp_path / "coffee-cw90.jpg")
    paths = dict(enumerate(sorted(tmp_path.iterdir())))
    names = {i: p.name for i, p in paths.items()}
    found = screen(paths)
    assert len(found.tilts) == 4
    assert {names[i] for i in found.turns} == {"coffee.jpg", "coffee-cw90.jpg"}
    # The only pair of tilted images whose turned views may be checked against each other.
    assert [{names[a], names[b]} for a, b in found.pairs] == [{"coffee.jpg", "coffee-cw90.jpg"}]


def test_a_tilted_file_is_not_kept_over_an_upright_one_of_about_its_pixels() -> None:
    from ghostmatch.dupes.groups import DuplicateMember
    from ghostmatch.dupes.turns import by_picture

    def member(name: str, width: int, height: int) -> DuplicateMember:
        return DuplicateMember(Path(name), 1.0, "keep", width, height, 10_000, 0)

    # The tilted canvas's picture measured a little large (its angle taken a few degrees
    # off): 96,000 pixels against the upright file's 90,000.
    members = {1: member("upright.jpg", 300, 300), 2: member("tilted.jpg", 400, 400)}
    ranked = by_picture(members, {2: 0.6})
    assert ranked[2].width * ranked[2].height < ranked[1].width * ranked[1].height
    # A picture with clearly more pixels is still the one to keep.
    larger = by_picture({**members, 2: member("tilted.jpg", 600, 600)}, {2: 0.6})
    assert larger[2].width * larger[2].height > ranked[1].width * ranked[1].height
    assert ranked[1] == members[1]


# ---------------------------------------------------------------------------- the finder


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("turn-photos")
    for name in PHOTOS:
        photo(name).save(folder / f"{name}.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def turned_folder(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos, and copies of three of them: coffee turned every way (and mirrored),
    smaller, astronaut mirrored and turned, and rocket tilted onto black corners; the
    originals are the files to keep."""
    folder = tmp_path_factory.mktemp("turned")
    for path in photo_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    coffee = photo("coffee").resize((480, 320))
    turn_image(coffee, 90).save(folder / "coffee-cw90.jpg", quality=90)
    turn_image(coffee, 180).save(folder / "coffee-180.jpg", quality=90)
    turn_image(coffee, 270).save(folder / "coffee-cw270.jpg", quality=90)
    ImageOps.mirror(turn_image(coffee, 90)).save(folder / "coffee-mirror-cw90.jpg", quality=90)
    # Mirrored, then turned clockwise: each file of this pair is the other turned by 270
    # and mirrored, from either side (astronaut, unlike coffee, looks nothing like itself
    # upside down).
    astronaut = turn_image(ImageOps.mirror(photo("astronaut").resize((400, 400))), 90)
    astronaut.save(folder / "astronaut-flip-cw90.jpg", quality=90)
    # Full size: its canvas has more pixels than the original, its picture has not.
    tilted(photo("rocket"), 20.0, (0, 0, 0)).save(folder / "rocket-tilt20.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def turned_index(
    turned_folder: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Path:
    index = tmp_path_factory.mktemp("turned-index") / "index"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHOSTMATCH_CACHE", str(model_cache))
        with ghostmatch.open(index, weights="bundled") as lib:
            lib.index([turned_folder])
    return index


# Each copy turned clockwise by this (then mirrored, for the mirror image) is coffee.
COFFEE_TURNS = {
    "coffee-cw90.jpg": 270,
    "coffee-180.jpg": 180,
    "coffee-cw270.jpg": 90,
    "coffee-mirror-cw90.jpg": 90,
}


def _groups_by_kept(groups: list) -> dict[str, dict[str, tuple[str, int]]]:  # type: ignore[type-arg]
    return {g.keep.path.name: {m.path.name: (m.tier, m.turn) for m in g.members} for g in groups}


def test_the_screen_picks_the_turned_and_the_tilted_images_only(turned_folder: Path) -> None:
    from ghostmatch.dupes.turns import decode, screen, screen_pairs, thumbnail

    paths = dict(enumerate(sorted(turned_folder.iterdir())))
    names = {i: p.name for i, p in paths.items()}
    thumbs = np.stack([thumbnail(decode(p, 224)) for p in paths.values()])  # type: ignore[arg-type]
    pairs = {
        frozenset((names[a], names[b])): (names[owner], turn, flipped)
        for (a, b), (owner, turn, flipped, _) in screen_pairs(thumbs).items()
    }
    turned = {**COFFEE_TURNS, "astronaut-flip-cw90.jpg": 270}
    for copy, turn in turned.items():
        original = "astronaut.jpg" if copy.startswith("astronaut") else "coffee.jpg"
        owner, found, flipped = pairs[frozenset((copy, original))]
        # The owner's view turned by ``found`` (then mirrored when the thumbnails say so)
        # lines up with the other file.
        mirrored = "mirror" in copy or "flip" in copy
        assert found == (turn if owner == copy else inverse_turn(turn, mirrored))
        assert flipped == mirrored
    # Only turned copies and their originals are screened: not the upright photos, not a
    # tilt (its own view is the straightened one).
    screened = {name for pair in pairs for name in pair}
    assert screened == {*turned, "coffee.jpg", "astronaut.jpg"}
    found = screen(paths, 224)
    assert {names[i] for i in found.turns} <= screened
    assert {names[i] for i in found.tilts} == {"rocket-tilt20.jpg"}


def test_the_stored_screen_is_the_screen_of_the_decoded_images(turned_folder: Path) -> None:
    from ghostmatch.dupes.turns import SCREEN_SIDE, decode, screen, turn_screen

    paths = dict(enumerate(sorted(turned_folder.iterdir())))
    decoded = screen(paths)
    stored = {i: turn_screen(decode(p, SCREEN_SIDE)) for i, p in paths.items()}  # type: ignore[arg-type]
    # Nothing is decoded for the screen when every image has its data.
    nowhere = {i: Path("/nonexistent") / p.name for i, p in paths.items()}
    assert screen(nowhere, stored=stored) == decoded
    # Some stored, the others decoded: the same again.
    assert screen(paths, stored={i: s for i, s in stored.items() if i % 2}) == decoded
    names = {i: p.name for i, p in paths.items()}
    found = {frozenset((names[p.owner], names[p.other])) for p in decoded.candidates}
    assert {frozenset((copy, "coffee.jpg")) for copy in COFFEE_TURNS} <= found
    assert frozenset(("rocket-tilt20.jpg", "rocket.jpg")) in found


def _as_before_turn_screens(index: Path) -> None:
    """Make the catalog of ``index`` one that the version before turn screens wrote."""
    with sqlite3.connect(index / "catalog.db") as db:
        db.execute("DROP TABLE turn_screens")
        db.execute("DELETE FROM schema_version WHERE version >= 5")


@pytest.mark.usefixtures("shared_model_cache")
def test_a_catalog_from_before_turn_screens_finds_turned_copies_and_gets_them_on_index(
    turned_index: Path, turned_folder: Path, tmp_path: Path
) -> None:
    from ghostmatch.dupes.turns import SCREEN_SIDE, decode, turn_screen
    from ghostmatch.store.catalog import MIGRATIONS

    index = tmp_path / "index"
    shutil.copytree(turned_index, index)
    _as_before_turn_screens(index)
    with ghostmatch.open(index, create=False) as lib:
        assert lib.catalog.schema_version() == MIGRATIONS[-1][0]
        assert lib.catalog.turn_screens() == {}
        # Screened the old way: every image decoded.
        groups = _groups_by_kept(lib.find_duplicates(turned=True))
        assert groups["coffee.jpg"] == {name: ("edited", t) for name, t in COFFEE_TURNS.items()}
        assert groups["rocket.jpg"] == {"rocket-tilt20.jpg": ("edited", 0)}
        # The next run adds them from a decode of each image, embedding nothing again.
        report = lib.index([turned_folder])
        assert (report.embedded, report.updated, report.added) == (0, 0, 0)
        assert report.unchanged == len(list(turned_folder.iterdir()))
        assert lib.catalog.ids_without_turn_screens().tolist() == []
        assert _groups_by_kept(lib.find_duplicates(turned=True)) == groups
        stored = lib.catalog.turn_screens()
        names = {stat[0]: path.name for path, stat in lib.catalog.all_stat().items()}
    for i, found in stored.items():
        assert found == turn_screen(decode(turned_folder / names[i], SCREEN_SIDE))  # type: ignore[arg-type]


@pytest.mark.usefixtures("shared_model_cache")
def test_turned_and_tilted_copies_are_grouped_with_their_original(turned_index: Path) -> None:
    with ghostmatch.open(turned_index, create=False) as lib:
        # Turned copies are found by default.
        groups = _groups_by_kept(lib.find_duplicates())
        upright = _groups_by_kept(lib.find_duplicates(turned=False))
    assert groups["coffee.jpg"] == {name: ("edited", t) for name, t in COFFEE_TURNS.items()}
    assert groups["rocket.jpg"] == {"rocket-tilt20.jpg": ("edited", 0)}
    assert groups["astronaut.jpg"] == {"astronaut-flip-cw90.jpg": ("edited", 270)}
    # Not one of them is a duplicate as it stands.
    assert not set(upright.get("coffee.jpg", {})) & set(COFFEE_TURNS)
    assert "rocket-tilt20.jpg" not in upright.get("rocket.jpg", {})
    # Nothing else is grouped (chelsea and rocket, astronaut and coffee stay apart).
    assert set(groups) == {"coffee.jpg", "rocket.jpg", "astronaut.jpg"}


@pytest.mark.usefixtures("shared_model_cache")
def test_turned_pairs_are_checked_only_when_the_grouping_needs_them(
    turned_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghostmatch.dupes import turns

    decided: list[set[str]] = []
    glanced: list[set[str]] = []
    geometric: list[set[str]] = []
    real_same, real_check = turns.same_capture, turns.check_screened
    real_glanced = turns.TurnedCandidates._glanced

    def deciding(captures, pair, *args, **kwargs):  # type: ignore[no-untyped-def]
        decided.append({names[pair.owner], names[pair.other]})
        return real_same(captures, pair, *args, **kwargs)

    def glancing(self, pair):  # type: ignore[no-untyped-def]
        found = real_glanced(self, pair)
        if found:
            glanced.append({names[pair.owner], names[pair.other]})
        return found

    def checking(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = real_check(*args, **kwargs)
        geometric.extend({names[p.owner], names[p.other]} for p in found)
        return found

    monkeypatch.setattr(turns, "same_capture", deciding)
    monkeypatch.setattr(turns, "check_screened", checking)
    monkeypatch.setattr(turns.TurnedCandidates, "_glanced", glancing)
    with ghostmatch.open(turned_index, create=False) as lib:
        names = {
            r.id: r.path.name for r in lib.catalog.get(list(map(int, lib.catalog.vectors()[0])))
        }
        groups = _groups_by_kept(lib.find_duplicates(turned=True))
    assert set(groups["coffee.jpg"]) == set(COFFEE_TURNS)
    # The kept file takes every turned copy, so two copies are never compared (their views
    # do find each other). Copies only turned (and re-encoded) are settled on small views,
    # as upright re-encodes are, without a dense comparison.
    assert {"coffee.jpg", "coffee-180.jpg"} in glanced
    assert not [pair for pair in decided + glanced if pair <= set(COFFEE_TURNS)]
    assert not [pair for pair in decided if pair & {"coffee-180.jpg"}]
    # Copies only turned (and resized, re-encoded) agree unmoved once turned, as upright
    # copies do: no local features needed.
    assert not [pair for pair in geometric if pair & set(COFFEE_TURNS)]


@pytest.mark.usefixtures("shared_model_cache")
def test_views_embedded_a_few_at_a_time_on_threads_score_as_in_one_batch(
    turned_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The turned views are embedded on other threads while more are made, their results
    taken in order: each view keeps its own descriptor, so every score is the one a single
    batch of all of them gives."""
    import threading

    from ghostmatch.dupes import turns
    from ghostmatch.model.embedder import Embedder

    threads: set[int] = set()
    real = Embedder.embed_arrays

    def embedding(self, arrays, **kwargs):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        return real(self, arrays, **kwargs)

    with ghostmatch.open(turned_index, create=False) as lib:
        monkeypatch.setattr(turns, "SCORE_BATCH", 10_000)
        whole = lib.find_duplicates(turned=True, workers=1)
        monkeypatch.setattr(Embedder, "embed_arrays", embedding)
        # One view a batch: more batches than are ever held at once.
        monkeypatch.setattr(turns, "SCORE_BATCH", 1)
        apart = lib.find_duplicates(turned=True, workers=1)
    assert threads and threading.get_ident() not in threads

    def found(groups: list[Any]) -> list[tuple[str, str, str, int, float]]:
        return sorted(
            (g.keep.path.name, m.path.name, m.tier, m.turn, m.score)
            for g in groups
            for m in g.members
        )

    assert any(m.turn for g in whole for m in g.members)
    assert [row[:4] for row in found(apart)] == [row[:4] for row in found(whole)]
    assert [row[4] for row in found(apart)] == pytest.approx([row[4] for row in found(whole)])


@pytest.mark.usefixtures("shared_model_cache")
def test_a_turned_copy_whose_partners_another_copy_kept_joins_that_copy(
    turned_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept by path, coffee-180 keeps the family. Where the screen never paired coffee-cw90
    with it (in a larger family, its nearest thumbnails are other copies), coffee-cw90
    still joins it through coffee, its original, which coffee-180 took."""
    from ghostmatch.dupes import finder

    real = finder.group_judged

    def without_pair(members, candidates, *args, **kwargs):  # type: ignore[no-untyped-def]
        unseen, candidates = {ids["coffee-180.jpg"], ids["coffee-cw90.jpg"]}, list(candidates)
        kept = [(a, b, s) for a, b, s in candidates if {a, b} != unseen]
        assert len(kept) < len(candidates)
        return real(members, kept, *args, **kwargs)

    monkeypatch.setattr(finder, "group_judged", without_pair)
    with ghostmatch.open(turned_index, create=False) as lib:
        ids = {r.path.name: r.id for r in lib.catalog.get(list(map(int, lib.catalog.vectors()[0])))}
        groups = _groups_by_kept(lib.find_duplicates(keep="path"))
    family = groups["coffee-180.jpg"]
    # coffee-cw90 turned by another 90 degrees is coffee-180.
    assert family["coffee-cw90.jpg"] == ("edited", 90)
    assert family["coffee.jpg"] == ("edited", 180)
    assert set(family) == {"coffee.jpg", *COFFEE_TURNS} - {"coffee-180.jpg"}


@pytest.mark.usefixtures("shared_model_cache")
def test_duplicates_of_a_new_turned_or_tilted_photo(turned_index: Path) -> None:
    coffee = photo("coffee")
    with ghostmatch.open(turned_index, create=False) as lib:
        # Counter-clockwise by 90: coffee.jpg turned clockwise by 270 lines up with it.
        found = {m.path.name: m for m in lib.duplicates_of(turn_image(coffee, 270), turned=True)}
        assert found["coffee.jpg"].turn == 270 and found["coffee.jpg"].tier == "edited"
        assert found["coffee-cw90.jpg"].turn == 180
        tilt = jpeg(tilted(photo("rocket"), -25.0, (255, 255, 255)))
        assert "rocket.jpg" in [m.path.name for m in lib.duplicates_of(tilt)]
        assert lib.duplicates_of(tilt, turned=False) == []


@pytest.mark.usefixtures("shared_model_cache")
def test_a_new_photo_only_turned_needs_no_local_features(
    turned_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghostmatch.dupes import turns

    geometric: list[int] = []
    real = turns.check_screened

    def checking(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = real(*args, **kwargs)
        geometric.extend(p.other for p in found)
        return found

    monkeypatch.setattr(turns, "check_screened", checking)
    with ghostmatch.open(turned_index, create=False) as lib:
        found = {m.path.name: m for m in lib.duplicates_of(turn_image(photo("coffee"), 90))}
        ids = {
            r.path.name: r.id for r in lib.catalog.get([int(i) for i in lib.catalog.vectors()[0]])
        }
    assert found["coffee.jpg"].turn == 90 and found["coffee.jpg"].tier == "edited"
    # Turned back, it agrees with coffee.jpg unmoved, as an upright copy would.
    assert ids["coffee.jpg"] not in geometric


# ---------------------------------------------------------------------------- query, CLI


@pytest.fixture(scope="module")
def photo_index(
    photo_folder: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Path:
    index = tmp_path_factory.mktemp("photo-index") / "index"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHOSTMATCH_CACHE", str(model_cache))
        with ghostmatch.open(index, weights="bundled") as lib:
            lib.index([photo_folder])
    return index


def _query(index: Path, image: Path, model_cache: Path, *flags: str) -> list[dict]:  # type: ignore[type-arg]
    done = subprocess.run(
        [*CLI, "query", str(image), "--index", str(index), "-k", "3", "--json", *flags],
        capture_output=True,
        text=True,
        env=cli_env(model_cache),
        check=True,
    )
    return json.loads(done.stdout)[0]["matches"]


def test_query_rotations_finds_a_turned_original(
    photo_index: Path, tmp_path: Path, model_cache: Path
) -> None:
    image = tmp_path / "sideways.jpg"
    turn_image(photo("astronaut"), 90).save(image, quality=90)
    turned = _query(photo_index, image, model_cache, "--rotations")
    plain = _query(photo_index, image, model_cache)
    assert turned[0]["path"].endswith("astronaut.jpg") and turned[0]["turn"] == 90
    assert "turn" not in plain[0]
    plain_score = next((m["score"] for m in plain if m["path"].endswith("astronaut.jpg")), -1.0)
    # Upright, the original is just another photo; turned back, it is nearly the same one.
    assert turned[0]["score"] > plain_score + 0.2


@pytest.mark.usefixtures("shared_model_cache")
def test_query_rotations_in_the_library_and_under_a_folder(
    photo_index: Path, photo_folder: Path
) -> None:
    upside_down = turn_image(photo("chelsea"), 180)
    with ghostmatch.open(photo_index, create=False) as lib:
        for under in (None, photo_folder):
            matches = lib.query(upside_down, 2, rotations=True, under=under)
            assert matches[0].path.name == "chelsea.jpg" and matches[0].turn == 180
            assert [m.rank for m in matches] == [1, 2]
        assert all(m.turn is None for m in lib.query(upside_down, 2))


def _dupes(index: Path, model_cache: Path, *flags: str) -> dict[str, list[dict]]:  # type: ignore[type-arg]
    done = subprocess.run(
        [*CLI, "dupes", "--index", str(index), "--json", *flags],
        capture_output=True,
        text=True,
        env=cli_env(model_cache),
        check=True,
    )
    return {Path(g["keep"]).name: g["members"] for g in json.loads(done.stdout)["groups"]}


def test_dupes_json_names_the_turn(turned_index: Path, model_cache: Path) -> None:
    # Turned copies are found unless --no-turned says not to look for them.
    groups = _dupes(turned_index, model_cache)
    turns = {Path(m["path"]).name: m["turn"] for m in groups["coffee.jpg"]}
    assert turns == COFFEE_TURNS
    assert [m["turn"] for m in groups["rocket.jpg"]] == [0]
    upright = _dupes(turned_index, model_cache, "--no-turned")
    assert not {Path(m["path"]).name for m in upright.get("coffee.jpg", [])} & set(COFFEE_TURNS)


def test_independent_noise_pictures_lined_up_by_a_turn_are_no_copies(tmp_path: Path) -> None:
    # Two independent smooth-noise pictures that ``python -m benchmarks.othershots
    # --synthetic-only 1000`` grouped through a half-turn: their thumbnails meet turned and
    # their local features fit one geometry, but pixel for pixel they are not one capture.
    from benchmarks import synthetic

    folder = tmp_path / "noise"
    folder.mkdir()
    for index in (176, 530):
        synthetic.make_image("noise", index, seed=7).save(folder / f"noise-{index}.png")
    with ghostmatch.Library(tmp_path / "index", device="cpu") as lib:
        lib.index([folder])
        assert lib.find_duplicates(turned=False) == []
        assert lib.find_duplicates() == []


def _spy_checks_and_crowds(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[tuple[int, int]], list[frozenset[int]]]:
    """The turned pairs handed to the geometric check (``check_screened``), and each
    upright judge's crowded files, as the searches that follow make them."""
    from ghostmatch.dupes import finder, turns

    checked: list[tuple[int, int]] = []
    real = turns.check_screened

    def counting(embedder, view, pairs, *args, **kwargs):  # type: ignore[no-untyped-def]
        checked.extend(p.key for p in pairs)
        return real(embedder, view, pairs, *args, **kwargs)

    crowded: list[frozenset[int]] = []
    real_judge = finder.PairJudge.__init__

    def judging(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_judge(self, *args, **kwargs)
        crowded.append(frozenset(self.crowded))

    monkeypatch.setattr(turns, "check_screened", counting)
    monkeypatch.setattr(finder.PairJudge, "__init__", judging)
    return checked, crowded


def test_a_crowded_files_turned_copy_is_found_unmoved_without_local_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Smooth noise pictures the descriptor cannot tell apart (crowded files) and a copy of
    # a crowded one turned a quarter: tried unmoved once turned, as a crowded file's
    # upright pairs are, it is found without the geometric check.
    from benchmarks import synthetic

    folder = tmp_path / "crowd"
    folder.mkdir()
    for index in range(60):
        synthetic.make_image("noise", index, seed=5).save(folder / f"noise-{index:02d}.png")
    checked, crowded = _spy_checks_and_crowds(monkeypatch)
    # The views embedded, each call's pairs as scored: the first call is the candidates'.
    scored: list[dict[tuple[int, int], float]] = []
    real_scored = turns.TurnedCandidates._scored

    def scoring(self, pairs):  # type: ignore[no-untyped-def]
        found = real_scored(self, pairs)
        scored.append({p.key: p.score for p in found})
        return found

    monkeypatch.setattr(turns.TurnedCandidates, "_scored", scoring)
    with ghostmatch.Library(tmp_path / "index", device="cpu") as lib:
        lib.index([folder])
        assert lib.find_duplicates(workers=1) == []
        names = {r.id: r.path.name for r in lib.catalog.get(sorted(crowded[-1]))}
        source = sorted(names.values())[0]
        turn_image(Image.open(folder / source), 90).save(folder / "turned.png")
        lib.index([folder])
        checked.clear()
        scored.clear()
        groups = lib.find_duplicates(workers=1)
        records = lib.catalog.get([int(i) for i in lib.catalog.vectors()[0]])
        # Two processes: the copy passes in one of them, and its score comes with it.
        apart = lib.find_duplicates(workers=2)
    copy = next(r.id for r in records if r.path.name == "turned.png")
    found = {
        frozenset({g.keep.path.name, m.path.name}): (m.tier, m.turn, m.score)
        for g in groups
        for m in g.members
    }
    tier, turn, score = found[frozenset({source, "turned.png"})]
    assert tier == "edited" and turn in (90, 270)
    assert not [key for key in checked if copy in key]
    # A crowded pair turned by a quarter is a candidate on its thumbnails alone: its view is
    # embedded only once it has passed, and the copy is listed at that view's score.
    key = next(k for k in scored[1] if copy in k)
    assert not [k for k in scored[0] if copy in k]
    assert score == scored[1][key]
    assert [g.to_dict() for g in apart] == [g.to_dict() for g in groups]


def test_crowded_files_pair_by_a_turn_only_as_the_screen_pairs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Independent smooth noise and random shapes, which the descriptor cannot tell apart
    # (as ``python -m benchmarks.othershots --synthetic-only`` makes them): each view's
    # nearest images are any of them, so only the thumbnails' screen may pair them turned.
    from benchmarks import synthetic
    from ghostmatch.dupes import turns

    folder = tmp_path / "synthetic"
    folder.mkdir()
    for index in range(200):
        kind = ("noise", "shapes")[index % 2]
        synthetic.make_image(kind, index, seed=7).save(folder / f"{kind}-{index}.png")
    checked, crowded = _spy_checks_and_crowds(monkeypatch)
    with ghostmatch.Library(tmp_path / "index", device="cpu") as lib:
        lib.index([folder])
        assert lib.find_duplicates() == []
        ids = [int(i) for i in lib.catalog.vectors()[0]]
        paths = {r.id: r.path for r in lib.catalog.get(ids)}
        screened = turns.screen(paths, stored=lib.catalog.turn_screens(ids))
    assert crowded and crowded[0]
    by_views = set(checked) - {p.key for p in screened.candidates}
    assert not [key for key in by_views if set(key) & crowded[0]]
