"""Local feature maps of the duplicate search: mirrored maps made only for pairs the plain
maps leave open, plain maps made ahead on a background thread, same decisions either way."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from judge_support import records_by_name
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
from ghostmatch import Library
from ghostmatch.dupes.groups import DuplicateMember, group_judged
from ghostmatch.dupes.verify import (
    SEED,
    TOLERANCE_CELLS,
    ZOOM,
    ScaledMaps,
    Verification,
    _grid,
    fit_affine,
    mutual_matches,
    scale_steps,
    verify_scales,
)
from ghostmatch.store.catalog import ImageRecord


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def bordered(image: Image.Image) -> Image.Image:
    """A copy with a border: the plain maps align it (a scaled, shifted map), no mirror."""
    return ImageOps.expand(image.resize((280, 210)), border=20, fill=(255, 255, 255))


def _reference_pair(fa: np.ndarray, fb: np.ndarray, fb_flipped: np.ndarray) -> Verification:
    """The check of one pair as first written: plain then mirrored, one random stream."""
    (ha, wa, c), (hb, wb, _) = fa.shape, fb.shape
    grid_a, grid_b = _grid(ha, wa), _grid(hb, wb)
    tolerance = TOLERANCE_CELLS / min(max(ha, wa), max(hb, wb))
    rng = np.random.default_rng(SEED)
    best: Verification | None = None
    for feats, flipped in [(fb, False), (fb_flipped, True)]:
        ia, ib = mutual_matches(fa.reshape(-1, c), feats.reshape(-1, c))
        affine, inliers = fit_affine(grid_b[ib], grid_a[ia], tolerance, rng)
        if flipped:
            affine = affine @ np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        result = Verification(len(ia), int(inliers.sum()), affine, flipped, min(ha * wa, hb * wb))
        if best is None or result.inliers > best.inliers:
            best = result
    assert best is not None
    return best


def _reference_scales(a: ScaledMaps, b: ScaledMaps, enough: int | None) -> Verification:
    """Every scale and mirror tried up front, the best fit kept (first on a tie)."""
    best = _reference_pair(a.base, b.base, b.mirrored)
    if enough is not None and best.inliers >= enough:
        return best
    zoomed = _reference_pair(a.zoomed, b.base, b.mirrored)
    swapped = _reference_pair(b.zoomed, a.base, a.mirrored)
    inverse = np.linalg.inv(np.vstack([swapped.affine, [0.0, 0.0, 1.0]]))[:2]
    swapped = Verification(
        swapped.matches, swapped.inliers, inverse, swapped.flipped, swapped.cells
    )
    for result in (zoomed, swapped):
        if result.inliers > best.inliers:
            best = result
    return best


class _CountedMaps:
    """Maps that count which of them a check reads."""

    def __init__(self, maps: ScaledMaps, reads: Counter[str]) -> None:
        self._maps, self.reads = maps, reads

    @property
    def base(self) -> np.ndarray:
        self.reads["base"] += 1
        return self._maps.base

    @property
    def mirrored(self) -> np.ndarray:
        self.reads["mirrored"] += 1
        return self._maps.mirrored

    @property
    def zoomed(self) -> np.ndarray:
        self.reads["zoomed"] += 1
        return self._maps.zoomed


@pytest.fixture(scope="module")
def scaled() -> dict[str, ScaledMaps]:
    from ghostmatch.dupes.verify import local_features
    from ghostmatch.model.embedder import prepare, to_batch
    from ghostmatch.model.weights import load_descriptor

    model = load_descriptor("bundled")
    card = model.card
    zoomed = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)
    w, h = scene().size
    images = {
        "scene": scene(),
        "bordered": bordered(scene()),
        "mirrored": ImageOps.mirror(scene()),
        "crop": scene().crop((80, 36, 272, 180)),
        "mirrored crop": ImageOps.mirror(scene().crop((80, 36, 272, 180))),
        "coffee": Image.fromarray(data.coffee()).convert("RGB").resize((w, h)),
    }
    maps = {}
    for name, image in images.items():
        pair = [prepare(image, card), prepare(ImageOps.mirror(image), card)]
        base = local_features(model, to_batch(pair))
        big = local_features(model, to_batch([prepare(image, zoomed)]))[0]
        maps[name] = ScaledMaps(base[0], base[1], big)
    return maps


@pytest.mark.parametrize("enough", [None, 1, 36, 400])
@pytest.mark.parametrize("other", ["bordered", "mirrored", "crop", "mirrored crop", "coffee"])
def test_checks_with_late_mirrors_equal_every_map_tried_up_front(
    scaled: dict[str, ScaledMaps], other: str, enough: int | None
) -> None:
    for a, b in ((scaled["scene"], scaled[other]), (scaled[other], scaled["scene"])):
        found, expected = verify_scales(a, b, enough), _reference_scales(a, b, enough)
        assert (found.matches, found.inliers, found.flipped) == (
            expected.matches,
            expected.inliers,
            expected.flipped,
        )
        np.testing.assert_array_equal(found.affine, expected.affine)


def test_a_plain_fit_is_offered_before_any_mirrored_map_is_read(
    scaled: dict[str, ScaledMaps],
) -> None:
    reads: Counter[str] = Counter()
    a, b = _CountedMaps(scaled["scene"], reads), _CountedMaps(scaled["bordered"], reads)
    steps = scale_steps(a, b, 36)
    first, final = next(steps)
    assert not final and not first.flipped and first.inliers >= 36
    assert reads["mirrored"] == reads["zoomed"] == 0
    # Passed over, the check goes on to the mirrored map and ends where verify_scales does.
    rest = list(steps)
    assert rest[-1][1] and reads["mirrored"] == 1
    assert rest[-1][0].inliers == verify_scales(scaled["scene"], scaled["bordered"], 36).inliers


def test_a_crop_is_offered_on_the_kept_files_zoomed_map_before_its_own_is_read(
    scaled: dict[str, ScaledMaps],
) -> None:
    # The crop (60% of the scene) has too few inliers at equal scale: the kept scene's
    # zoomed map finds it, and the crop's own zoomed map is only read if that is passed
    # over.
    kept_reads: Counter[str] = Counter()
    crop_reads: Counter[str] = Counter()
    a = _CountedMaps(scaled["scene"], kept_reads)
    b = _CountedMaps(scaled["crop"], crop_reads)
    enough = 36
    steps = scale_steps(a, b, enough)
    offered, final = next(steps)
    assert not final and offered.inliers >= enough
    assert kept_reads["zoomed"] == 1 and crop_reads["zoomed"] == 0
    # Nor is the crop's mirrored map read before that offer.
    assert crop_reads["mirrored"] == 0
    # Passed over, the check ends where verify_scales does.
    rest = list(steps)
    assert rest[-1][1] and crop_reads["zoomed"] >= 1
    expected = verify_scales(scaled["scene"], scaled["crop"], enough)
    assert rest[-1][0].inliers == expected.inliers
    np.testing.assert_array_equal(rest[-1][0].affine, expected.affine)


@pytest.fixture
def indexed(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    bordered(scene()).save(folder / "bordered.jpg", quality=95)
    ImageOps.mirror(scene()).save(folder / "mirrored.jpg", quality=95)
    Image.fromarray(data.coffee()).convert("RGB").resize((320, 240)).save(folder / "coffee.jpg")
    return folder


# A library, its catalog records by id, and their ids by file name.
Judged = tuple[Library, dict[int, ImageRecord], dict[str, int]]


@pytest.fixture
def judged(tmp_path: Path, indexed: Path) -> Iterator[Judged]:
    """The indexed photos' library, their catalog records by id, and their ids by name."""
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([indexed])
        yield lib, *records_by_name(lib)


def test_a_plain_copy_needs_no_mirrored_map_and_a_mirrored_one_is_still_found(
    judged: Judged,
) -> None:
    from ghostmatch.dupes.finder import PairJudge

    lib, records, ids = judged
    # A score under any threshold: each pair goes to the geometric check.
    judge = PairJudge(lib.finder.model, records, 2.0, 36)
    assert judge(ids["scene.jpg"], [(ids["bordered.jpg"], 0.0)]) == {ids["bordered.jpg"]: "edited"}
    assert judge.maps.made == {"base": 2}
    # The mirror image is found on its mirrored map, read once the kept file's zoomed map
    # (which serves all of its pairs) finds too few inliers.
    assert judge(ids["scene.jpg"], [(ids["mirrored.jpg"], 0.0)]) == {ids["mirrored.jpg"]: "edited"}
    assert judge.maps.made == {"base": 3, "zoomed": 1, "mirrored": 1}


def _maps_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ghostmatch-maps")]


def test_maps_made_ahead_in_the_background_give_the_same_decisions(
    judged: Judged,
) -> None:
    from ghostmatch.dupes.finder import PairJudge

    lib, records, ids = judged
    others = [(ids[n], 0.0) for n in ("bordered.jpg", "mirrored.jpg", "coffee.jpg")]
    leader = ids["scene.jpg"]
    plain = PairJudge(lib.finder.model, records, 2.0, 36)
    expected = plain(leader, others)
    ahead = PairJudge(lib.finder.model, records, 2.0, 36)
    try:
        ahead.prefetch(leader, others)
        assert _maps_threads()
        ahead.maps.wait()
        made = Counter(ahead.maps.made)
        # The background followed each check to its first possible decision: the
        # bordered copy's plain maps, the mirror image's mirrored map, both images'
        # zoomed maps and the kept one's mirrored map for the unrelated photo.
        assert made == {"base": 4, "mirrored": 3, "zoomed": 2} == plain.maps.made
        assert ahead(leader, others) == expected
        # The main thread took them all: none made twice.
        assert ahead.maps.made == made
    finally:
        ahead.close()
    assert not _maps_threads()
    # A pair above the threshold needs maps only when unmoved alignment fails: nothing
    # is made ahead for it.
    above = PairJudge(lib.finder.model, records, -1.0, 36)
    above.prefetch(leader, others)
    assert not _maps_threads() and above.maps.made == {}


def test_grouping_announces_files_ahead_and_decides_the_same() -> None:
    members = {
        i: DuplicateMember(Path(f"{i}.jpg"), 1.0, "keep", 100 - i, 100, 1, 0) for i in range(8)
    }
    pairs = [(0, 1, 0.9), (0, 2, 0.8), (1, 3, 0.7), (2, 3, 0.6), (4, 5, 0.9), (6, 7, 0.5)]
    calls: list[int] = []

    def judge(leader: int, others: list[int]) -> dict[int, str | None]:
        calls.append(leader)
        return {j: ("near" if (leader + j) % 2 else "similar") for j in others}

    alone = group_judged(members, pairs, judge)
    judged, calls[:] = list(calls), []
    heard: list[tuple[int, list[int]]] = []
    both = group_judged(members, pairs, judge, ahead=lambda i, js: heard.append((i, js)))
    assert both == alone and calls == judged
    # The first file, and the ones no earlier unvisited file could take, are announced.
    assert [i for i, _ in heard] == [0, 4, 6]


def test_grouping_announces_only_pairs_it_goes_on_to_judge() -> None:
    # One part whose files come one after the other (as a worker process groups it): the
    # first file takes both others, so their own pair is never judged, and nothing is
    # prepared ahead for it.
    members = {
        i: DuplicateMember(Path(f"{i}.jpg"), 1.0, "keep", 100 - i, 100, 1, 0) for i in range(3)
    }
    pairs = [(0, 1, 0.9), (0, 2, 0.8), (1, 2, 0.7)]
    asked: set[tuple[int, int]] = set()

    def judge(leader: int, others: list[int]) -> dict[int, str | None]:
        asked.update((leader, j) for j in others)
        return dict.fromkeys(others, "near")

    heard: list[tuple[int, list[int]]] = []
    groups = group_judged(members, pairs, judge, ahead=lambda i, js: heard.append((i, js)))
    assert groups == [(0, [(1, 0.9, "near"), (2, 0.8, "near")])]
    assert heard == [(0, [1, 2])]
    assert {(i, j) for i, js in heard for j in js} <= asked


def test_ctrl_c_while_maps_are_made_ahead_stops_them(tmp_path: Path, indexed: Path) -> None:
    for n, angle in enumerate((3, 6)):
        scene().rotate(angle).save(indexed / f"turned-{n}.jpg", quality=90)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([indexed])
        # A threshold no pair reaches: every candidate goes to the geometric check, and
        # its maps are made ahead.
        expected = lib.find_duplicates(threshold=0.999)

        def interrupt(stage: str, done: int, total: int | None) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            lib.find_duplicates(threshold=0.999, progress=interrupt)
        assert not _maps_threads()
        assert lib.find_duplicates(threshold=0.999) == expected
        assert expected  # the turned and bordered copies are found


def test_the_grouping_judges_each_pair_once() -> None:
    # 0 and 1 are alike but no copies, so 0 stays free; when 1 is visited, its pair with 0
    # keeps the tier it got, and only its pair with 2 is judged.
    members = {
        i: DuplicateMember(Path(f"{i}.jpg"), 1.0, "keep", 100 - i, 100, 1, 0) for i in range(4)
    }
    pairs = [(0, 1, 0.9), (1, 2, 0.8), (0, 3, 0.7)]
    asked: list[tuple[int, int]] = []

    def judge(leader: int, others: list[int]) -> dict[int, str | None]:
        asked.extend((min(leader, j), max(leader, j)) for j in others)
        return {j: "near" if {leader, j} == {1, 2} else "similar" for j in others}

    groups = group_judged(members, pairs, judge)
    assert sorted(asked) == sorted(set(asked)) == [(0, 1), (0, 3), (1, 2)]
    # The earlier tier stands for the pair: 0 is listed as similar with 1 as before.
    assert groups == [
        (0, [(1, 0.9, "similar"), (3, 0.7, "similar")]),
        (1, [(0, 0.9, "similar"), (2, 0.8, "near")]),
        (3, [(0, 0.7, "similar")]),
    ]


def test_maps_a_check_started_ahead_read_are_not_made_again_for_the_next_pair(
    judged: Judged, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghostmatch.dupes import finder
    from ghostmatch.dupes.finder import PairJudge

    # Room for three maps made ahead and not yet taken: the unrelated photo's check
    # started ahead reads five that the judging thread does not hold yet.
    monkeypatch.setattr(finder, "PREFETCH_MAPS", 3)
    lib, records, ids = judged
    leader, coffee = ids["scene.jpg"], ids["coffee.jpg"]
    judge = PairJudge(lib.finder.model, records, 2.0, 36)
    try:
        assert judge(leader, [(ids["bordered.jpg"], 0.0)]) == {ids["bordered.jpg"]: "edited"}
        judge.prefetch(leader, [(coffee, 0.0)])
        judge.maps.wait()
        assert judge(leader, [(coffee, 0.0)]) == {coffee: None}
        made = Counter(judge.maps.made)
        assert made == {"base": 3, "mirrored": 2, "zoomed": 2}
        # The other way round the pair reads the same maps: none is made again.
        assert judge(coffee, [(leader, 0.0)]) == {leader: None}
        assert judge.maps.made == made
    finally:
        judge.close()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_input_of_a_mirror_image_is_the_mirrored_input(interpolation: str) -> None:
    """Pillow's squash weighs mirrored pixels alike, short of its integer reduction: the
    mirrored map's input can be the plain one's mirrored (``finder._mirrors_alike``)."""
    from ghostmatch.dupes.finder import _mirrors_alike
    from ghostmatch.model.card import ModelCard
    from ghostmatch.model.embedder import prepare

    rng = np.random.default_rng(3)
    for size in (160, 256):
        card = ModelCard("test", "0" * 64, input_size=size, interpolation=interpolation)
        for _ in range(12):
            w, h = (int(v) for v in rng.integers(8, 6 * size, 2))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            assert _mirrors_alike(image, card)
            mirrored = prepare(ImageOps.mirror(image), card)
            np.testing.assert_array_equal(mirrored, prepare(image, card)[:, ::-1])
    big = Image.new("RGB", (6 * 160, 100))
    assert not _mirrors_alike(big, ModelCard("test", "0" * 64, input_size=160))
    assert not _mirrors_alike(
        scene(), ModelCard("test", "0" * 64, input_size=160, resize="center-crop")
    )


def test_a_mirrored_map_from_the_plain_input_is_the_mirror_images_map(judged: Judged) -> None:
    from ghostmatch.dupes.finder import PairJudge

    lib, records, ids = judged
    i = ids["scene.jpg"]
    judge = PairJudge(lib.finder.model, records, 2.0, 36)
    maps = judge.maps
    direct = maps._make(i, "mirrored")
    assert maps._prepared(i, "base") is not None and i in maps._plain
    from_plain = maps._make(i, "mirrored")
    assert i not in maps._plain  # taken once
    assert direct is not None and from_plain is not None
    np.testing.assert_array_equal(from_plain, direct)
