"""Near copies settled from their glances: a re-encoded or resized copy needs no dense
comparison, while another shot of the same object and independent smooth noise are left to
it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

import ghostmatch
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
    records = {r.id: r for r in lib.catalog.get(lib.catalog.ids().tolist())}
    ids = {r.path.name: i for i, r in records.items()}
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
        records = {r.id: r for r in lib.catalog.get(lib.catalog.ids().tolist())}
        ids = {r.path.name: i for i, r in records.items()}
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
