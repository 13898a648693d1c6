"""The few-copies benchmark: its folders and how it counts a search's groups."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fewcopies
from benchmarks.othershots import SHOTS, shot_of
from benchmarks.settings import Settings
from ghostmatch.dupes import parallax
from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember

SEED = 7
OBJECTS = (0, 1)


def fake_ukbench(folder: Path, objects: tuple[int, ...] = OBJECTS) -> Path:
    """Four shots per object named as in ukbench: windows of one photo that move a little
    from shot to shot."""
    folder.mkdir()
    for obj, name in zip(objects, ("astronaut", "coffee"), strict=True):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((400, 300))
        for shot in range(SHOTS):
            box = (10 + 12 * shot, 8 + 9 * shot, 330 + 12 * shot, 248 + 9 * shot)
            photo.crop(box).save(folder / f"ukbench{obj * SHOTS + shot:05d}.jpg", quality=90)
    return folder


def member(name: str) -> DuplicateMember:
    return DuplicateMember(Path("/photos") / name, 0.5, "edited", 1, 1, 1, 0)


def test_folder_holds_four_shots_and_three_copies_of_the_seeds_shot(tmp_path: Path) -> None:
    ukbench = fake_ukbench(tmp_path / "ukbench")
    folder = tmp_path / "photos"
    fewcopies.build(folder, OBJECTS, SEED, ukbench)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == len(OBJECTS) * (SHOTS + len(fewcopies.COPIES))
    source = fewcopies.name_of(0, shot_of(0, SEED))
    original = np.asarray(Image.open(ukbench / f"ukbench{shot_of(0, SEED):05d}.jpg"))
    flipped = np.asarray(Image.open(folder / fewcopies.name_of(0, shot_of(0, SEED), "flipped")))
    # The mirror is lossless: the source's pixels as decoded, mirrored.
    assert np.array_equal(flipped, original[:, ::-1])
    small = Image.open(folder / fewcopies.name_of(0, shot_of(0, SEED), "small"))
    assert small.size == (160, 120) and source in names
    # Made again, nothing changes.
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    fewcopies.build(folder, OBJECTS, SEED, ukbench)
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_counts_copies_other_shots_and_unrelated_pairs() -> None:
    shot = shot_of(0, SEED)
    other_shot = (shot + 1) % SHOTS
    kept = member(fewcopies.name_of(0, shot, "flipped"))
    groups = [
        DuplicateGroup(
            kept,
            [
                member(fewcopies.name_of(0, shot)),
                member(fewcopies.name_of(0, shot, "crop")),
                member(fewcopies.name_of(0, other_shot)),
                member(fewcopies.name_of(1, 0)),
            ],
            [member(fewcopies.name_of(0, (shot + 2) % SHOTS))],
        )
    ]
    counts = fewcopies.count(groups, Path("/photos"), [0], SEED)
    found = counts.captures
    assert (found.reported_pairs, found.copies, found.other_shots, found.unrelated) == (4, 2, 1, 1)
    assert found.precision == 0.5 and counts.other_shot_rate == 1 / 6
    # The crop and the mirror share a group with their source; the half-size copy does not.
    assert counts.recall == 2 / 3
    # One of the object's three other shots is listed as similar.
    assert counts.similar_recall == 1 / 3


def test_run_without_ukbench_says_it_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fewcopies, "UKBENCH", tmp_path / "absent")
    report = fewcopies.run(Settings(quick=True, weights="random", out=tmp_path), None)
    assert not report.figures and "skipped" in report.notes[0]


def test_a_quick_run_searches_both_halves_with_and_without_the_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One object per half: 0 (tuning) and 124 (held out).
    monkeypatch.setattr(fewcopies, "QUICK_OBJECTS", 2)
    monkeypatch.setattr(fewcopies, "UKBENCH", fake_ukbench(tmp_path / "ukbench", (0, 124)))
    cut = parallax.SPREAD_CUT
    report = fewcopies.run(Settings(quick=True, weights="bundled", out=tmp_path), tmp_path / "work")
    assert cut == parallax.SPREAD_CUT
    assert sorted((tmp_path / "work").iterdir()) == [
        tmp_path / "work" / name
        for name in ("heldout-index", "heldout-photos", "tuning-index", "tuning-photos")
    ]
    figures = {f.name: f for f in report.figures}
    for part in ("tuning", "heldout"):
        details = report.details[part]
        assert details["objects"] == 1 and details["photos"] == SHOTS + len(fewcopies.COPIES)
        assert details["finder"]["copies_made"] == 3
        assert 0 <= figures[f"{part}: precision"].value <= 1
        assert 0 <= figures[f"{part}: copies found"].baseline_value <= 1
