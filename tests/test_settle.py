"""Near copies settled from their glances: a re-encoded or resized copy needs no dense
comparison, while another shot of the same object and independent smooth noise are left to
it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from judge_support import records_by_name
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
from ghostmatch.dupes import settle
from ghostmatch.dupes.finder import _QUERY, PairJudge
from ghostmatch.dupes.settle import MIN_CORRELATION, Glance, settled_tier, settles

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic

UKBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukbench-dev"
# The two other shots of one object nearest to settling in ``benchmarks.othershots``'s
# tuning half (thumbnail correlation 0.97).
NEAREST_SHOTS = ("ukbench00061.jpg", "ukbench00062.jpg")
# The two of 60 smooth noise images (seed 11) whose thumbnails correlate most (0.94).
NEAREST_NOISE = (11, 59)


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def test_plain_copies_settle_and_moved_or_changed_pictures_do_not() -> None:
    kept = Glance.of(scene())
    for copy in (
        reencoded(scene(), 20),
        scene().resize((128, 96)),
        ImageOps.grayscale(scene()).convert("RGB"),
        scene().resize((320, 160)),  # squashed: the same picture in the unit square
    ):
        assert settles(kept, Glance.of(copy))
    w, h = scene().size
    for other in (
        ImageOps.mirror(scene()),
        ImageOps.invert(scene()),
        # Moved by 2.5% of the width: a camera that moved a little.
        scene().crop((8, 0, w, h)).resize((w, h)),
        Image.fromarray(data.coffee()).convert("RGB").resize((w, h)),
    ):
        assert not settles(kept, Glance.of(other))


def bordered(image: Image.Image) -> Image.Image:
    return ImageOps.expand(image, border=24, fill=(40, 160, 220))


def test_a_framed_copy_settles_inside_its_frame() -> None:
    framed = Glance.of(reencoded(bordered(scene()), 95))
    assert framed.inside is not None and Glance.of(scene()).inside is None
    copy = Glance.of(scene().resize((160, 120)))
    # The frame is an edit: the pair is settled ``edited``, whichever file is kept.
    assert not settles(framed, copy)
    assert settled_tier(framed, copy) == settled_tier(copy, framed) == "edited"
    assert settled_tier(Glance.of(scene()), copy) == "near"
    # Another picture inside the same frame is not settled.
    w, h = scene().size
    moved = Glance.of(scene().crop((8, 0, w, h)).resize((w, h)))
    assert settled_tier(framed, moved) is None


def test_flat_glances_settle_nothing() -> None:
    flat = Glance.of(Image.new("RGB", (320, 240), (120, 130, 140)))
    assert not settles(flat, flat)
    # Fine stripes average out at the glance's size: too little contrast to settle.
    stripes = np.zeros((240, 320, 3), np.uint8)
    stripes[:, ::2] = 255
    fine = Glance.of(Image.fromarray(stripes))
    assert not settles(fine, fine)


def test_independent_smooth_noise_does_not_settle() -> None:
    a, b = (synthetic.make_image("noise", n, seed=11) for n in NEAREST_NOISE)
    ga, gb = Glance.of(reencoded(a, 90)), Glance.of(reencoded(b, 90))
    assert float(ga.thumbnail() @ gb.thumbnail()) < MIN_CORRELATION
    assert not settles(ga, gb) and not settles(gb, ga)


def judge_of(lib: ghostmatch.Library) -> tuple[PairJudge, dict[str, int]]:
    records, ids = records_by_name(lib)
    judge = PairJudge(lib.finder.model, records, lib.duplicate_threshold(), 36)
    return judge, ids


def test_a_reencoded_copy_is_settled_without_a_dense_comparison(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.png")
    scene().save(folder / "reencoded.jpg", quality=30)
    bordered(scene()).save(folder / "framed.jpg", quality=95)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        judge, ids = judge_of(lib)
        kept, copy = ids["scene.png"], ids["reencoded.jpg"]
        # Scored at the threshold: the pair is tried unmoved.
        assert judge(kept, [(copy, judge.threshold)]) == {copy: "near"}
        assert judge.settled == 1
        # No pyramid was made for the dense comparison, and no local feature map.
        a, b = judge.capture(kept), judge.capture(copy)
        assert a is not None and b is not None and not a.prepared and not b.prepared
        assert judge._maps is None
        # The same for a copy given as a file that is not indexed (``dupes --of``).
        query = lib.finder._judge_against(
            folder / "reencoded.jpg", {kept: judge.records[kept]}, judge.threshold
        )
        assert query(kept, [(_QUERY, judge.threshold)]) == {_QUERY: "near"}
        assert query.settled == 1
        # A copy inside a frame: ``edited``, still without a dense comparison.
        framed = ids["framed.jpg"]
        assert judge(framed, [(copy, judge.threshold)]) == {copy: "edited"}
        assert judge.settled == 2
        f = judge.capture(framed)
        assert f is not None and not f.prepared and judge._maps is None
        # A pair that regional descriptors alone found is left to the dense comparison.
        judge.crops_only = True
        judge(kept, [(copy, judge.threshold)])
        assert judge.settled == 2


def test_a_crowded_pair_is_never_settled(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.png")
    scene().save(folder / "reencoded.jpg", quality=30)
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        records, ids = records_by_name(lib)
        judge = PairJudge(
            lib.finder.model, records, lib.duplicate_threshold(), 36, crowded=set(records)
        )
        kept, copy = ids["scene.png"], ids["reencoded.jpg"]
        assert judge(kept, [(copy, judge.threshold)]) == {copy: "near"}
        assert judge.settled == 0


def test_neither_another_shot_nor_smooth_noise_is_settled(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for n in NEAREST_NOISE:
        synthetic.make_image("noise", n, seed=11).save(folder / f"noise-{n}.jpg", quality=90)
    shots = [UKBENCH / name for name in NEAREST_SHOTS]
    have_shots = all(p.is_file() for p in shots)
    if have_shots:
        for p in shots:
            (folder / p.name).write_bytes(p.read_bytes())
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        judge, ids = judge_of(lib)
        pairs = [tuple(f"noise-{n}.jpg" for n in NEAREST_NOISE)]
        if have_shots:
            pairs.append(NEAREST_SHOTS)
        for a, b in pairs:
            # Scored at the threshold, as both pairs are in the benchmark: tried unmoved.
            judge(ids[a], [(ids[b], judge.threshold)])
        assert judge.settled == 0
    if not have_shots:
        pytest.skip(f"no ukbench-dev photos at {UKBENCH}: only the noise pair was checked")


def _frame_by_numpy(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """The frame as its definition reads, pixel by pixel in numpy: the reference that the
    quicker search must match."""
    h, w = rgb.shape[:2]
    plain = np.abs(rgb.astype(np.int16) - rgb[0, 0].astype(np.int16)).max(axis=2) <= (
        settle.FRAME_TOLERANCE
    )
    rows, cols = plain.all(axis=1), plain.all(axis=0)
    top, bottom = settle._run(rows), settle._run(rows[::-1])
    left, right = settle._run(cols), settle._run(cols[::-1])
    if min(top, bottom, left, right) < settle.FRAME_MIN:
        return None
    if w - left - right < settle.FRAME_INSIDE * w or h - top - bottom < settle.FRAME_INSIDE * h:
        return None
    return left, top, w - right, h - bottom


def test_the_frame_found_is_the_one_its_definition_gives() -> None:
    # Frames of every width and shade, near the tolerance on either side, on real photos
    # and on flat pictures that fill most of the image.
    rng = np.random.default_rng(5)
    photo = np.asarray(scene().convert("RGB"))
    found = 0
    for n in range(60):
        h, w = photo.shape[:2]
        rgb = photo.copy() if n % 3 else np.full_like(photo, rng.integers(0, 256, 3))
        shade = rng.integers(0, 256, 3)
        sides = rng.integers(0, 12, 4)
        top, bottom, left, right = (int(s) for s in sides)
        frame = np.zeros((h, w), bool)
        frame[:top], frame[h - bottom :], frame[:, :left], frame[:, w - right :] = (
            True,
            True,
            True,
            True,
        )
        noise = rng.integers(-settle.FRAME_TOLERANCE - 2, settle.FRAME_TOLERANCE + 3, (h, w, 3))
        rgb = rgb.astype(np.int16)
        rgb[frame] = np.clip(shade + noise[frame] * (n % 2), 0, 255)
        rgb[0, 0] = shade
        rgb = rgb.astype(np.uint8)
        expected = _frame_by_numpy(rgb)
        found += expected is not None
        assert settle._frame(Image.fromarray(rgb)) == expected
    assert found >= 10  # the cases include frames that are found
