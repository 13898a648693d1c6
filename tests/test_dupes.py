"""Duplicate groups: no chaining, threshold semantics, tiers, --of, --not-dup, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import ghostmatch
from ghostmatch.dupes.groups import DuplicateMember, group_pairs
from ghostmatch.dupes.verify import verify_pair
from ghostmatch.errors import GhostmatchError


def _member(name: str, pixels: int = 100, size: int = 10, mtime: int = 0) -> DuplicateMember:
    return DuplicateMember(Path(name), 1.0, "keep", pixels, 1, size, mtime)


def test_grouping_does_not_chain() -> None:
    # A~B, B~C, C~D each above threshold, A-C, A-D, B-D below: a chain of similar photos.
    members = {i: _member(n, pixels=100 - i) for i, n in enumerate("ABCD")}
    pairs = [(0, 1, 0.95), (1, 2, 0.95), (2, 3, 0.95)]
    groups = group_pairs(members, pairs)
    assert [(lead, [m for m, _ in taken]) for lead, taken in groups] == [(0, [1]), (2, [3])]
    for leader, taken in groups:
        for member, _ in taken:  # every member is a direct neighbour of its kept file
            assert any({leader, member} == {a, b} for a, b, _ in pairs)


def test_keep_rules() -> None:
    big = DuplicateMember(Path("big.jpg"), 1, "keep", 200, 100, 50, 5)
    heavy = DuplicateMember(Path("heavy.jpg"), 1, "keep", 100, 100, 900, 9)
    old = DuplicateMember(Path("old.jpg"), 1, "keep", 100, 100, 50, 1)
    members = {0: big, 1: heavy, 2: old}
    pairs = [(0, 1, 0.99), (0, 2, 0.99), (1, 2, 0.99)]
    assert group_pairs(members, pairs, "pixels")[0][0] == 0
    assert group_pairs(members, pairs, "size")[0][0] == 1
    assert group_pairs(members, pairs, "oldest")[0][0] == 2
    with pytest.raises(GhostmatchError, match="keep rule must be one of"):
        group_pairs(members, pairs, "biggest")


def test_geometric_check_accepts_a_copy_and_rejects_noise() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(14, 14, 64)).astype(np.float32)
    a /= np.linalg.norm(a, axis=2, keepdims=True)
    mirrored = a[:, ::-1]
    copy = a + 0.01
    # The third map is the copy's own mirror image, which must not be what matches.
    same = verify_pair(a, copy, copy[:, ::-1])
    assert same.inliers == 196 and same.is_identity() and same.coverage == 1.0
    flip = verify_pair(a, mirrored, mirrored[:, ::-1])
    assert flip.flipped and flip.inliers == 196 and not flip.is_identity()
    other = rng.normal(size=(14, 14, 64)).astype(np.float32)
    other /= np.linalg.norm(other, axis=2, keepdims=True)
    assert verify_pair(a, other, other[:, ::-1]).inliers < 20


def test_plain_background_cells_seldom_match(monkeypatch: pytest.MonkeyPatch) -> None:
    import ghostmatch.dupes.verify as verify

    rng = np.random.default_rng(3)
    textured = rng.normal(size=(60, 32))

    def plain() -> np.ndarray:  # cells of one colour, differing only by JPEG-like noise
        return np.ones(32) + rng.normal(scale=0.01, size=(136, 32))

    a = np.vstack([textured, plain()])
    b = np.vstack([textured + rng.normal(scale=0.05, size=textured.shape), plain()])
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    ia, ib = verify.mutual_matches(a, b)
    textured_matches = ia < 60
    assert textured_matches.sum() == 60 and (ia[textured_matches] == ib[textured_matches]).all()
    assert (~textured_matches).sum() <= 10  # the ratio test drops most background matches
    monkeypatch.setattr(verify, "MATCH_RATIO", 1.0)
    assert (verify.mutual_matches(a, b)[0] >= 60).sum() >= 30  # which it otherwise keeps


def test_closed_form_geometry_matches_numpy() -> None:
    from ghostmatch.dupes.verify import MAX_ANISOTROPY, MAX_SCALE, _affines_from_triples, plausible

    rng = np.random.default_rng(1)
    affines = rng.normal(scale=1.5, size=(2000, 2, 3))
    singular = np.linalg.svd(affines[:, :, :2], compute_uv=False)
    expected = (
        (np.linalg.det(affines[:, :, :2]) > 0)
        & (singular[:, 1] >= 1 / MAX_SCALE)
        & (singular[:, 0] <= MAX_SCALE)
        & (singular[:, 0] <= MAX_ANISOTROPY * singular[:, 1])
    )
    assert 100 < expected.sum() < 1900  # both outcomes are exercised
    np.testing.assert_array_equal(plausible(affines), expected)
    src = rng.random((500, 3, 2))
    dst = np.einsum("mij,mkj->mki", affines[:500, :, :2], src) + affines[:500, None, :, 2]
    src[0, 2] = src[0, 0] + 2 * (src[0, 1] - src[0, 0])  # a collinear triple is left out
    solved = _affines_from_triples(src, dst)
    assert len(solved) == 499
    np.testing.assert_allclose(solved, affines[1:500], atol=1e-6)


def test_locality_order_keeps_every_pair_once() -> None:
    from ghostmatch.dupes.finder import _locality_order

    rng = np.random.default_rng(2)
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, 300, (2000, 2)) if a != b]
    ordered = _locality_order(pairs + pairs[:50])
    assert sorted(ordered) == sorted(set(pairs)) and len(ordered) == len(set(pairs))
    # A chain 0-1-2-...-99 given shuffled comes back walking along the chain.
    chain = [(i, i + 1) for i in range(99)]
    shuffled = [chain[i] for i in rng.permutation(99)]
    assert _locality_order(shuffled) == chain


def test_verification_is_the_same_with_a_small_map_cache(
    dupe_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ghostmatch.dupes.finder as finder

    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([dupe_folder])
        ids, _ = lib.catalog.vectors()
        records = {r.id: r for r in lib.catalog.get(ids.tolist())}
        pairs = [(int(a), int(b)) for a in ids for b in ids if a < b]
        roomy = lib.verify_pairs(pairs, records)
        monkeypatch.setattr(finder, "MAP_CACHE_IMAGES", 4)
        monkeypatch.setattr(finder, "MAP_BATCH", 2)
        tight = lib.verify_pairs(pairs, records)
    assert set(roomy) == set(pairs) == set(tight)
    for pair in pairs:
        assert (roomy[pair].inliers, roomy[pair].flipped) == (
            tight[pair].inliers,
            tight[pair].flipped,
        )
    assert max(v.inliers for v in roomy.values()) >= 100  # real copies are among the pairs


@pytest.mark.parametrize("name", ["coffee.jpg", "astronaut.jpg"])
def test_zoomed_check_finds_a_tight_crop_and_where_it_is(name: str, photos: Path) -> None:
    from ghostmatch.dupes.verify import ZOOM, ScaledMaps, local_features, verify_scales
    from ghostmatch.model.embedder import prepare, to_batch
    from ghostmatch.model.weights import load_descriptor

    model = load_descriptor("bundled")
    card = model.card
    zoomed = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)

    def maps(image: Image.Image) -> ScaledMaps:
        pair = [prepare(image, card), prepare(ImageOps.mirror(image), card)]
        base = local_features(model, to_batch(pair))
        return ScaledMaps(
            base[0], base[1], local_features(model, to_batch([prepare(image, zoomed)]))[0]
        )

    image = Image.open(photos / name).convert("RGB")
    w, h = image.size
    window = np.array([0.25, 0.15, 0.85, 0.75])  # a 60% crop
    crop = image.crop(tuple(int(v) for v in window * [w, h, w, h]))
    original, copy = maps(image), maps(crop)
    equal_scale = verify_pair(original.base, copy.base, copy.mirrored)
    found = verify_scales(original, copy)
    assert found.inliers >= 2 * equal_scale.inliers and found.coverage >= 0.35
    assert not found.is_identity()  # a crop is an edited copy
    # The affine maps the crop's unit square onto its window in the original ...
    corners = found.affine @ np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]).T
    np.testing.assert_allclose(corners.T.ravel(), window, atol=0.08)
    # ... and the other way round when the crop is the first image.
    back = (
        verify_scales(copy, original).affine @ np.array([[*window[:2], 1.0], [*window[2:], 1.0]]).T
    )
    np.testing.assert_allclose(back.T.ravel(), [0, 0, 1, 1], atol=0.08)
    mirrored = verify_scales(original, maps(ImageOps.mirror(crop)))
    assert mirrored.flipped and mirrored.inliers >= 2 * equal_scale.inliers
    # Enough inliers at equal scale stop the search there.
    assert verify_scales(original, copy, enough=1).inliers == equal_scale.inliers


@pytest.fixture(scope="module")
def dupe_folder(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dupes")
    for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"):
        shutil.copy(photos / name, folder / name)
    shutil.copy(photos / "chelsea.jpg", folder / "chelsea_exact.jpg")
    chelsea = Image.open(photos / "chelsea.jpg")
    chelsea.save(folder / "chelsea_q40.jpg", quality=40)
    chelsea.resize((chelsea.width // 2, chelsea.height // 2)).save(folder / "chelsea_half.jpg")
    coffee = Image.open(photos / "coffee.jpg")
    w, h = coffee.size
    coffee.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(folder / "coffee_crop.jpg")
    ImageOps.mirror(Image.open(photos / "astronaut.jpg")).save(folder / "astronaut_flip.jpg")
    return folder


@pytest.fixture(scope="module")
def random_lib(dupe_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index = tmp_path_factory.mktemp("idx") / "index"
    with pytest.warns(UserWarning), ghostmatch.open(index, weights="random") as lib:
        lib.index([dupe_folder])
    return index


def test_exact_and_near_copies_with_a_tight_threshold(random_lib: Path, dupe_folder: Path) -> None:
    # Random weights already put re-encodes and resizes above 0.995 and other photos below.
    with ghostmatch.open(random_lib, create=False) as lib:
        groups = lib.find_duplicates(0.995, verify=False)
    assert len(groups) == 1
    group = groups[0]
    assert group.keep.path.name in ("chelsea.jpg", "chelsea_exact.jpg")
    tiers = {m.path.name: m.tier for m in group.members}
    assert set(tiers) | {group.keep.path.name} == {
        "chelsea.jpg",
        "chelsea_exact.jpg",
        "chelsea_q40.jpg",
        "chelsea_half.jpg",
    }
    exact = "chelsea_exact.jpg" if group.keep.path.name == "chelsea.jpg" else "chelsea.jpg"
    assert tiers[exact] == "exact"
    assert all(m.score >= 0.995 for m in group.members)


def test_threshold_is_inclusive_and_monotone(random_lib: Path) -> None:
    with ghostmatch.open(random_lib, create=False) as lib:
        loose = lib.find_duplicates(0.9, verify=False)
        tight = lib.find_duplicates(0.9999, verify=False)
        scores = [m.score for g in loose for m in g.members]
        lowest = min(scores)
        at_lowest = lib.find_duplicates(lowest, verify=False)
        with pytest.raises(GhostmatchError, match="threshold"):
            lib.find_duplicates(1.5)
    copies = {m.path for g in at_lowest for m in g.members}
    assert any(m.score == lowest for g in at_lowest for m in g.members)
    assert sum(len(g.members) for g in tight) <= sum(len(g.members) for g in loose)
    assert len(copies) == sum(len(g.members) for g in at_lowest)  # each file in one group


def test_not_dup_is_remembered(random_lib: Path, dupe_folder: Path) -> None:
    with ghostmatch.open(random_lib, create=False) as lib:
        lib.mark_not_duplicate(dupe_folder / "chelsea.jpg", dupe_folder / "chelsea_half.jpg")
    with ghostmatch.open(random_lib, create=False) as lib:
        groups = lib.find_duplicates(0.995, verify=False)
    pairs = {(g.keep.path.name, m.path.name) for g in groups for m in g.members}
    assert ("chelsea.jpg", "chelsea_half.jpg") not in pairs


def test_duplicates_of_a_new_image(random_lib: Path, tmp_path: Path, photos: Path) -> None:
    outside = tmp_path / "new.jpg"
    Image.open(photos / "chelsea.jpg").save(outside, quality=60)
    with ghostmatch.open(random_lib, create=False) as lib:
        found = lib.duplicates_of(outside, threshold=0.995)
        unrelated = lib.duplicates_of(photos / "camera.png", threshold=0.9999)
    names = {m.path.name for m in found}
    assert {"chelsea.jpg", "chelsea_exact.jpg"} <= names
    assert "coffee.jpg" not in names
    assert unrelated == []


@pytest.fixture(scope="module")
def bundled_lib(dupe_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two more plain copies, of photos whose copies score well under 1 with the bundled
    # model's normalised scores (chelsea's score near 0.68).
    folder = tmp_path_factory.mktemp("bundled-dupes")
    shutil.copytree(dupe_folder, folder, dirs_exist_ok=True)
    Image.open(dupe_folder / "coffee.jpg").save(folder / "coffee_q40.jpg", quality=40)
    astronaut = Image.open(dupe_folder / "astronaut.jpg")
    astronaut.resize((astronaut.width // 2, astronaut.height // 2)).save(
        folder / "astronaut_half.jpg"
    )
    index = tmp_path_factory.mktemp("bundled") / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([folder])
    return index


# The tier of each copy in dupe_folder, with its kept file.
TIERS = {
    ("chelsea.jpg", "chelsea_exact.jpg"): "exact",
    ("chelsea.jpg", "chelsea_q40.jpg"): "near",
    ("chelsea.jpg", "chelsea_half.jpg"): "near",
    ("coffee.jpg", "coffee_crop.jpg"): "edited",
    ("coffee.jpg", "coffee_q40.jpg"): "near",
    ("astronaut.jpg", "astronaut_flip.jpg"): "edited",
    ("astronaut.jpg", "astronaut_half.jpg"): "near",
}


def test_a_kept_crop_of_a_smaller_copy_of_the_whole_is_found(tmp_path: Path, photos: Path) -> None:
    # Kept by its pixels, a crop at full resolution outranks a downscaled copy of the whole
    # photo: only the check with the roles swapped (the kept file a crop of the other,
    # ``verify.scale_steps``) finds these pairs.
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ("astronaut", "coffee", "rocket")
    for name in names:
        image = Image.open(photos / f"{name}.jpg")
        w, h = image.size
        left, top = w // 5, h // 5
        crop = image.crop((left, top, left + int(w * 0.6), top + int(h * 0.6)))
        crop.save(folder / f"{name}_crop.jpg", quality=92)
        small = image.resize((int(w * 0.4), int(h * 0.4)), Image.Resampling.LANCZOS)
        small.save(folder / f"{name}_small.jpg", quality=85)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        groups = lib.find_duplicates()
    found = {(g.keep.path.name, m.path.name): m.tier for g in groups for m in g.members}
    assert found == {(f"{name}_crop.jpg", f"{name}_small.jpg"): "edited" for name in names}


@pytest.mark.parametrize("verify", [True, False])
def test_bundled_model_finds_and_tiers_every_copy(bundled_lib: Path, verify: bool) -> None:
    with ghostmatch.open(bundled_lib, create=False) as lib:
        assert lib.normalised_scores  # the bundled model carries a score background
        groups = lib.find_duplicates(verify=verify)
    found = {(g.keep.path.name, m.path.name): m.tier for g in groups for m in g.members}
    # Which of two byte-identical files is kept only depends on their mtimes.
    exact = [pair for pair in found if set(pair) == {"chelsea.jpg", "chelsea_exact.jpg"}]
    assert len(exact) == 1
    found[("chelsea.jpg", "chelsea_exact.jpg")] = found.pop(exact[0])
    assert found == TIERS


def test_bundled_model_thresholds_are_the_measured_ones(bundled_lib: Path, tmp_path: Path) -> None:
    from ghostmatch.dupes.groups import THRESHOLD_META

    with ghostmatch.open(bundled_lib, create=False) as lib:
        extra = lib.card.extra
        # The rule the README states, stored in the model's card.
        assert (extra["dupe_threshold"], extra["verify_threshold"], extra["min_inliers"]) == (
            0.357,
            0.264,
            36,
        )
        assert lib.duplicate_threshold() == 0.357
    calibrated = tmp_path / "calibrated"
    shutil.copytree(bundled_lib, calibrated)
    with ghostmatch.open(calibrated, create=False) as lib:
        lib.catalog.set_meta(THRESHOLD_META, {"threshold": 0.5})
        assert lib.duplicate_threshold() == 0.5  # a calibrated threshold comes first


def test_duplicates_of_tiers_like_find_duplicates(bundled_lib: Path) -> None:
    with ghostmatch.open(bundled_lib, create=False) as lib:
        folder = lib.catalog.roots()[0]
        for (kept, copy), tier in TIERS.items():
            found = {m.path.name: m.tier for m in lib.duplicates_of(folder / copy)}
            assert found[kept] == tier, copy


def test_byte_identical_files_are_duplicates_whatever_their_score(bundled_lib: Path) -> None:
    # A normalised score puts even an exact copy under 1 (here under 0.7): a threshold
    # above that still groups byte-identical files, and nothing else.
    with ghostmatch.open(bundled_lib, create=False) as lib:
        [group] = lib.find_duplicates(0.99, verify=False)
        names = {group.keep.path.name} | {m.path.name for m in group.members}
        assert names == {"chelsea.jpg", "chelsea_exact.jpg"}
        assert group.members[0].tier == "exact" and group.members[0].score < 0.99
        folder = lib.catalog.roots()[0]
        # The geometric check may add copies under the threshold; the identical file is
        # there whatever its score.
        found = lib.duplicates_of(folder / "chelsea.jpg", threshold=0.99)
        [same] = [m for m in found if m.path.name == "chelsea_exact.jpg"]
        assert same.tier == "exact"
        assert same.score < 0.99


def test_cli_json_csv_html_and_of(random_lib: Path, dupe_folder: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    base = [sys.executable, "-m", "ghostmatch.cli.app", "dupes", "--index", str(random_lib)]
    html = tmp_path / "dupes.html"
    done = subprocess.run(
        [*base, "--threshold", "0.995", "--no-verify", "--json", "--html", str(html)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    data = json.loads(done.stdout)
    assert data["threshold"] == 0.995
    assert {"keep", "members"} <= set(data["groups"][0])
    assert {"path", "score", "tier"} <= set(data["groups"][0]["members"][0])
    assert html.read_text().count("<img") >= 2
    done = subprocess.run(
        [*base, "--threshold", "0.995", "--no-verify", "--csv"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stdout.splitlines()[0].startswith("group,role,path")
    done = subprocess.run(
        [*base, "--of", str(dupe_folder / "chelsea_q40.jpg"), "--threshold", "0.995", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(done.stdout)[0]["duplicates"]
    bad = subprocess.run(
        [*base, "--json", "--csv"], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# The last one, through its folder "stray [", holds a closing tag with nothing to close.
ODD_NAMES = ["holiday [copy].jpg", "[red]alert.jpg", "stray [/bold] tag.jpg"]
NON_UTF8 = b"caf\xe9.jpg"


@pytest.fixture(scope="module")
def odd_names(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder, index): chelsea.jpg and exact copies of it under names that look like
    rich markup and under a name that is not UTF-8, indexed with random weights."""
    folder = tmp_path_factory.mktemp("odd")
    shutil.copy(photos / "chelsea.jpg", folder / "chelsea.jpg")
    shutil.copy(photos / "coffee.jpg", folder / "coffee.jpg")
    (folder / "stray [").mkdir()
    for name in ODD_NAMES:
        shutil.copy(photos / "chelsea.jpg", folder / name)
    try:
        with open(os.fsencode(folder) + b"/" + NON_UTF8, "wb") as copy:
            copy.write((photos / "chelsea.jpg").read_bytes())
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    index = tmp_path_factory.mktemp("odd-index") / "index"
    with pytest.warns(UserWarning), ghostmatch.open(index, weights="random") as lib:
        lib.index([folder])
    return folder, index


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    # A strict UTF-8 stdout, as under en_US.UTF-8, and a terminal wide enough for one line
    # per table row.
    env = dict(os.environ, PYTHONIOENCODING="utf-8", COLUMNS="400")
    return subprocess.run(
        [sys.executable, "-m", "ghostmatch.cli.app", *map(os.fspath, args)],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        errors="surrogateescape",
        env=env,
        check=False,
    )


def test_cli_shows_every_path_as_it_is(odd_names: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = odd_names
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/" + NON_UTF8))
    shown = os.fsdecode(folder) + "/caf\\xe9.jpg"  # the byte as an escape, in human output
    expected = {os.fsdecode(folder / name) for name in ODD_NAMES} | {shown}
    base = ["dupes", "--index", index, "--threshold", "0.99", "--no-verify"]
    html = tmp_path / "page.html"

    table = _run(*base, "--html", html)
    assert table.returncode == 0, table.stderr
    for text in expected | {os.fsdecode(folder / "chelsea.jpg")}:
        assert text in table.stdout
    page = html.read_text(encoding="utf-8")
    assert all(text in page for text in expected)

    as_csv = _run(*base, "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert {row["path"] for row in rows if row["role"] == "copy"} | {
        row["path"] for row in rows if row["role"] == "keep"
    } == expected | {os.fsdecode(folder / "chelsea.jpg")}

    as_json = _run(*base, "--json")
    assert as_json.returncode == 0, as_json.stderr
    [group] = json.loads(as_json.stdout)["groups"]
    paths = {group["keep"]} | {m["path"] for m in group["members"]}
    # JSON keeps the undecodable byte as a surrogate escape: it maps back to the file.
    assert {os.fsencode(p) for p in paths} == {
        os.fsencode(folder / name) for name in [*ODD_NAMES, "chelsea.jpg"]
    } | {os.fsencode(odd)}

    of = _run("dupes", "--index", index, "--threshold", "0.99", "--of", odd)
    assert of.returncode == 0, of.stderr
    assert of.stdout.startswith(f"{shown}: 4 duplicate(s)")
    assert all(text in of.stdout for text in expected - {shown})
    of_json = _run("dupes", "--index", index, "--threshold", "0.99", "--of", odd, "--json")
    assert os.fsencode(json.loads(of_json.stdout)[0]["query"]) == os.fsencode(odd)


def test_machine_output_stays_pure_with_a_planned_action(
    odd_names: tuple[Path, Path], tmp_path: Path
) -> None:
    _, index = odd_names
    base = ["dupes", "--index", index, "--threshold", "0.99", "--no-verify"]
    moved = _run(*base, "--json", "--move-to", tmp_path / "moved")
    assert moved.returncode == 0, moved.stderr
    assert len(json.loads(moved.stdout)["groups"]) == 1  # nothing but the JSON on stdout
    assert "would move 4 files" in moved.stderr
    deleted = _run(*base, "--csv", "--delete", "--journal", tmp_path / "journal.jsonl")
    assert deleted.returncode == 0, deleted.stderr
    rows = list(csv.reader(io.StringIO(deleted.stdout)))
    assert rows[0][:3] == ["group", "role", "path"] and len(rows) == 6
    assert all(len(row) == 8 for row in rows)
    assert "would delete 4 files" in deleted.stderr
    assert not (tmp_path / "moved").exists()  # still a dry run
