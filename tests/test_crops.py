"""Copies cropped to 60% of their source: found through regional descriptors, which
indexing makes beside the descriptors and which follow their images."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from judge_support import records_by_name
from PIL import Image

import ghostmatch
from tests.cli_support import CLI, cli_env

# (source, left, top): 60% of each side at that position. Their whole-image scores with
# the bundled model (0.235 and 0.18) are under its verify threshold (0.264), so without
# regional descriptors neither crop is even a candidate.
CROPS = {
    "astronaut_crop60.jpg": ("astronaut", 0.05, 0.05),
    "coffee_crop60.jpg": ("coffee", 0.2, 0.0),
}


@pytest.fixture(scope="module")
def crop_folder(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crops")
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        shutil.copy(photos / f"{name}.jpg", folder)
    for crop, (name, left, top) in CROPS.items():
        image = Image.open(photos / f"{name}.jpg")
        w, h = image.size
        x, y = int(left * w), int(top * h)
        image.crop((x, y, x + int(0.6 * w), y + int(0.6 * h))).save(folder / crop, quality=92)
    return folder


def _crops_found(groups: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    return {member: (kept, tier) for kept, member, tier in groups if member in CROPS}


def test_dupes_finds_a_crop_to_60_percent_as_edited(
    crop_folder: Path, tmp_path: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    env = cli_env(model_cache)
    subprocess.run(
        [*CLI, "index", str(crop_folder), "--index", str(index)],
        env=env,
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [*CLI, "dupes", "--index", str(index), "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    pairs = [
        (Path(g["keep"]).name, Path(m["path"]).name, m["tier"])
        for g in json.loads(done.stdout)["groups"]
        for m in g["members"]
    ]
    expected = {crop: (f"{name}.jpg", "edited") for crop, (name, _, _) in CROPS.items()}
    assert _crops_found(pairs) == expected
    # Nothing else: the four photos are unrelated.
    assert len(pairs) == len(CROPS)


def _as_before_regions(index: Path) -> None:
    """Make the index's catalog what a ghostmatch without regional descriptors wrote."""
    with sqlite3.connect(index / "catalog.db") as db:
        db.execute("DROP TABLE regions")
        db.execute("DELETE FROM schema_version WHERE version >= 4")


def test_an_index_made_before_regions_runs_dupes_and_a_reindex_fills_them(
    crop_folder: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([crop_folder])
    _as_before_regions(index)
    with ghostmatch.open(index, create=False) as lib:
        assert len(lib.catalog.regions()[0]) == 0
        groups = lib.find_duplicates()  # as before regions: the crops are not found
        assert not {m.path.name for g in groups for m in g.members} & set(CROPS)
        report = lib.index([crop_folder])
        assert report.added == 0 and report.embedded == lib.catalog.count()
        assert lib.catalog.ids_without_regions().size == 0
        found = {
            m.path.name: (g.keep.path.name, m.tier)
            for g in lib.find_duplicates()
            for m in g.members
        }
    assert {crop: found.get(crop) for crop in CROPS} == {
        crop: (f"{name}.jpg", "edited") for crop, (name, _, _) in CROPS.items()
    }
    with ghostmatch.open(index, create=False) as lib:
        assert lib.index([crop_folder]).embedded == 0  # filled once, not at every run


def test_regional_descriptors_follow_moves_and_removes(crop_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(crop_folder, folder)
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([folder])
        ids, parts = lib.catalog.regions()
        assert np.array_equal(ids, lib.catalog.ids()) and parts.shape[:2] == (len(ids), 5)
        moved = lib.catalog.records_by_path([folder / "coffee.jpg"])[folder / "coffee.jpg"]
        before = lib.catalog.regions([moved.id])[1]
        (folder / "coffee.jpg").rename(folder / "coffee_moved.jpg")
        (folder / "rocket.jpg").unlink()
        report = lib.index([folder])
        assert (report.moved, report.removed, report.embedded) == (1, 1, 0)
        assert np.array_equal(lib.catalog.regions([moved.id])[1], before)
        lib.remove([folder / "chelsea.jpg"])
        assert np.array_equal(lib.catalog.regions()[0], lib.catalog.ids())
        assert len(lib.catalog.ids()) == len(CROPS) + 2


def test_crop_cost_benchmark_times_dupes_with_and_without_the_crop_candidates(
    crop_folder: Path, tmp_path: Path
) -> None:
    from benchmarks.crop_cost import measure

    work = tmp_path / "work"
    with ghostmatch.open(work / "index", weights="bundled") as lib:
        lib.index([crop_folder])
    (work / "timings.json").write_text(json.dumps({"index_cpu_s": 1.0}))
    report = measure(work)
    assert report.error is None
    with_crops, without = report.details["with_crops"], report.details["without_crops"]
    # The two crops are grouped only through the regional descriptors' candidates.
    assert (with_crops["copies"], without["copies"]) == (len(CROPS), 0)
    assert with_crops["crop_candidates"] >= len(CROPS) and without["crop_candidates"] == 0
    assert all(figure.value > 0 for figure in report.figures)
    assert "benchmarks.othershots" in (measure(tmp_path / "missing").error or "")


def test_a_region_pair_must_agree_only_near_its_map(tmp_path: Path) -> None:
    # A flat picture and its top nine tenths stretched back to the full height: its
    # shapes line up under a loose map, which still agrees when moved, squashed 1.11 to 1.
    # Only the whole-image descriptors could bring such a pair; a region pair with a loose
    # map must be an unchanged crop, and this one is squashed.
    from PIL import ImageDraw

    from ghostmatch.dupes.finder import CROP_LOOSE_SQUASH, PairJudge
    from ghostmatch.dupes.samecapture import agreement, prepare_capture

    kept = Image.new("RGB", (320, 240), (200, 80, 150))
    draw = ImageDraw.Draw(kept)
    draw.ellipse((55, 60, 295, 235), fill=(90, 25, 30))
    draw.rectangle((20, 150, 40, 200), fill=(40, 230, 60))
    other = kept.crop((0, 0, 320, 216)).resize((320, 240), Image.Resampling.BILINEAR)
    found = agreement(prepare_capture(kept), prepare_capture(other), np.eye(2, 3))
    assert found.same_capture and not found.pinned
    assert found.distinct is not None and found.distinct.squash > CROP_LOOSE_SQUASH
    folder = tmp_path / "images"
    folder.mkdir()
    kept.save(folder / "kept.png")
    other.save(folder / "other.png")
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        records, ids = records_by_name(lib)
        # Scored at the threshold, the pair is tried unmoved, as a region pair can be.
        judge = PairJudge(lib.finder.model, records, 0.0, 24)
        pair = [(ids["other.png"], 1.0)]
        assert judge(ids["kept.png"], pair) == {ids["other.png"]: "edited"}
        judge.crops_only = True
        assert judge(ids["kept.png"], pair)[ids["other.png"]] != "edited"
