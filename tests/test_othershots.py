"""The other-shots benchmark on a tiny set: how the set is made, and its figures."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

# pytest puts tests/ on sys.path, not the checkout root that holds benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import othershots, synthetic
from benchmarks.report import Report
from benchmarks.settings import Settings
from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
from ghostmatch.eval.copies import TRANSFORMS, read_truth
from ghostmatch.library import Library

# Objects 0 and 1 are in the tuning half, 70 in the held-out one.
OBJECTS = (0, 1, 70)
PHOTOS = {0: "astronaut", 1: "coffee", 70: "chelsea"}
SEED = 3


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    warnings.filterwarnings("ignore", message="using RANDOM weights")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_ukbench(folder: Path) -> Path:
    """Four shots per object named as in ukbench: windows of one photo that move a little
    from shot to shot, as a camera does between two captures."""
    folder.mkdir()
    for obj, name in PHOTOS.items():
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((400, 300))
        for shot in range(othershots.SHOTS):
            box = (10 + 12 * shot, 8 + 9 * shot, 330 + 12 * shot, 248 + 9 * shot)
            path = folder / f"ukbench{obj * othershots.SHOTS + shot:05d}.jpg"
            photo.crop(box).save(path, quality=90)
    return folder


def build(tmp_path: Path, name: str = "work") -> othershots.OtherShotSet:
    ukbench = tmp_path / "ukbench"
    if not ukbench.exists():
        fake_ukbench(ukbench)
    return othershots.build(tmp_path / name, ukbench, OBJECTS, SEED, synthetic_per_kind=2)


def test_set_has_one_source_per_object_its_copies_and_the_other_shots(tmp_path: Path) -> None:
    shots = build(tmp_path)
    roles = [item.role for item in shots.items]
    assert roles.count("source") == len(OBJECTS)
    assert roles.count("copy") == len(OBJECTS) * len(TRANSFORMS)
    assert roles.count("shot") == len(OBJECTS) * (othershots.SHOTS - 1)
    assert roles.count("synthetic") == 2 * len(synthetic.KINDS)
    for group in read_truth(shots.truth):
        source = group[0].name
        obj = int(source.removeprefix("ukbench").split(".")[0]) // othershots.SHOTS
        assert int(source[7:12]) % othershots.SHOTS == othershots.shot_of(obj, SEED)
        # The other shots are in the set, never among the source's copies.
        others = {item.path.name for item in shots.items if item.scene == f"ukbench-{obj}"}
        assert len(others) == 1 + len(TRANSFORMS) + othershots.SHOTS - 1
        assert not {p.name for p in group} & {i.path.name for i in shots.items if i.role == "shot"}
    halves = {item.scene: item.half for item in shots.items if item.scene}
    assert halves == {"ukbench-0": "tuning", "ukbench-1": "tuning", "ukbench-70": "heldout"}
    made = sorted((i.path.name, i.half) for i in shots.items if i.role == "synthetic")
    assert [h for _, h in made] == ["tuning", "heldout"] * len(synthetic.KINDS)
    assert othershots.load(shots.folder).items == shots.items


def test_set_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    first, second = build(tmp_path, "a"), build(tmp_path, "b")
    names = [p.path.relative_to(first.folder) for p in first.items]
    assert names == [p.path.relative_to(second.folder) for p in second.items]
    for item in first.items:
        if item.role in ("copy", "synthetic"):
            twin = second.folder / item.path.relative_to(first.folder)
            assert item.path.read_bytes() == twin.read_bytes()


def test_synthetic_images_are_independent_not_copies() -> None:
    images = [
        np.asarray(synthetic.make_image(kind, i, SEED), dtype=np.float64)
        for kind in synthetic.KINDS
        for i in range(3)
    ]
    assert all(image.shape == (240, 320, 3) for image in images)
    for i, a in enumerate(images):
        for b in images[i + 1 :]:
            assert np.abs(a - b).mean() > 10
    again = synthetic.make_image("document", 1, SEED)
    assert np.array_equal(np.asarray(again), np.asarray(synthetic.make_image("document", 1, SEED)))


def _member(path: Path, score: float = 0.5) -> DuplicateMember:
    return DuplicateMember(path, score, "edited", 1, 1, 1, 0)


def test_halves_count_their_own_pairs_and_wrong_pairs_across_them(tmp_path: Path) -> None:
    shots = build(tmp_path)
    by_role: dict[tuple[str, str], list[Path]] = {}
    for item in shots.items:
        by_role.setdefault((item.role, item.scene or item.half), []).append(item.path)
    source = by_role[("source", "ukbench-0")][0]
    copy = by_role[("copy", "ukbench-0")][0]
    shot = by_role[("shot", "ukbench-0")][0]
    held_out = by_role[("source", "ukbench-70")][0]
    made = by_role[("synthetic", "tuning")]
    groups = [
        DuplicateGroup(_member(source), [_member(copy), _member(shot), _member(held_out)]),
        DuplicateGroup(_member(made[0]), [_member(made[1])]),
    ]
    tuning = othershots.measure(shots, groups, "tuning")
    assert tuning.captures.reported_pairs == 4
    assert (tuning.captures.copies, tuning.captures.other_shots) == (1, 1)
    assert tuning.synthetic_pairs == 1 and tuning.synthetic_grouped == 2
    heldout = othershots.measure(shots, groups, "heldout")
    # The wrong pair across the halves counts against the held-out half too.
    assert heldout.captures.reported_pairs == 1 and heldout.captures.unrelated == 1
    assert heldout.synthetic_pairs == 0
    whole = othershots.measure(shots, groups, None)
    assert whole.captures.reported_pairs == 4 and whole.captures.unrelated == 2
    # One of the three objects' copies of that edit was found.
    edit = copy.name.split("__")[1].split(".")[0]
    assert whole.groups.per_transform[edit] == 1 / len(OBJECTS)


def test_figures_of_the_shipped_finder_on_a_tiny_set(tmp_path: Path) -> None:
    shots = build(tmp_path)
    with Library(tmp_path / "index", weights="bundled", device="cpu") as lib:
        lib.index([shots.folder])
        groups = lib.find_duplicates(similar=True)
        shipped = othershots.shipped_rule(lib)
    saved = tmp_path / "groups.json"
    othershots.write_groups(saved, groups)
    assert othershots.read_groups(saved) == groups
    report = Report("othershots", quick=True)
    othershots.describe(report, shots, groups, shipped, {"index_s": 2.0, "dupes_s": 3.0})
    figures = {f.name: f for f in report.figures}
    for part in ("tuning", "heldout", "all"):
        assert 0 <= figures[f"{part}: precision"].value <= 1
        assert math.isfinite(figures[f"{part}: recall"].value)
        assert f"{part}: recall, crop-60" in figures
    assert figures["dupes time"].ratio == 1.5
    whole = report.details["all"]["finder"]
    assert whole["groups"]["reported_pairs"] == whole["captures"]["reported_pairs"]
    # The source and its plain re-encode are found on any model worth shipping.
    assert whole["groups"]["per_transform"]["reencode-q20"] == 1.0


def test_run_without_ukbench_says_it_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(othershots, "UKBENCH", tmp_path / "absent")
    report = othershots.run(Settings(quick=True, weights="random", out=tmp_path))
    assert not report.figures and "skipped" in report.notes[0]


def test_full_set_takes_every_object_and_the_quick_one_both_halves() -> None:
    assert othershots.OBJECTS == 125
    halves = {othershots.half(obj) for obj in othershots.quick_objects()}
    assert halves == set(othershots.HALVES)
    assert len(othershots.quick_objects()) == othershots.OBJECTS_QUICK


def test_synthetic_timing_draws_its_images_from_the_seed_asked(tmp_path: Path) -> None:
    # Another seed gives images no rule was tuned on, in a folder of their own, so that a
    # kept work folder never mixes two seeds' images.
    settings = Settings(quick=True, weights="random", out=tmp_path)
    report = othershots.synthetic_timing(settings, 4, tmp_path, seed=8, rounds=1)
    assert report.details["seed"] == 8
    made = sorted((tmp_path / "synthetic-4-seed8" / "images").iterdir())
    names = ["noise-00000.png", "noise-00002.png", "shapes-00001.png", "shapes-00003.png"]
    assert [p.name for p in made] == names
    expected = np.asarray(synthetic.make_image("noise", 0, 8))
    assert np.array_equal(np.asarray(Image.open(made[0]).convert("RGB")), expected)
    assert not (tmp_path / "synthetic-4").exists()


def test_synthetic_timing_times_a_new_index_each_run(tmp_path: Path) -> None:
    # The images are kept between runs, the index is not: an index already up to date
    # would embed nothing and time next to nothing.
    settings = Settings(quick=True, weights="random", out=tmp_path)
    for _ in range(2):
        report = othershots.synthetic_timing(settings, 4, tmp_path, rounds=1)
        assert report.details["embedded"] == 4
