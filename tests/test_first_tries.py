"""A pair's first dense try chosen from its glances: none where the unmoved try is hopeless
(another shot, independent synthetic images), the mirror map for a flipped copy."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from judge_support import records_by_name
from PIL import Image, ImageDraw, ImageOps
from skimage import data

import ghostmatch
from ghostmatch.dupes.finder import PairJudge
from ghostmatch.dupes.samecapture import (
    FIRST_TRY_COARSE_SHARE,
    LEVELS,
    agreement,
    prepare_capture,
)
from ghostmatch.dupes.settle import (
    HOPELESS_CROWDED_LAYOUT,
    Glance,
    first_try,
    layout_correlation,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic

UKBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukbench-dev"
# Two shots of one object in ``python -m benchmarks.othershots`` that score over the
# duplicate threshold, whose layouts correlate 0.05, and that its geometric check turns down.
OTHER_SHOTS = ("ukbench00460.jpg", "ukbench00462.jpg")
# Two smooth noise images of ``--synthetic-only 1000`` (seed 7), crowded, whose thumbnails
# correlate just enough to be compared (0.52) and whose layouts correlate 0.53.
NOISE = (476, 482)


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def captioned(image: Image.Image) -> Image.Image:
    """A copy with a caption bar along the bottom."""
    copy = image.copy()
    draw = ImageDraw.Draw(copy)
    draw.rectangle((0, 200, 320, 240), fill=(0, 0, 0))
    draw.text((10, 210), "a caption over the picture", fill=(255, 255, 255))
    return copy


def test_first_tries_from_glances() -> None:
    kept = Glance.of(scene())
    mirrored = Glance.of(ImageOps.mirror(scene()))
    assert first_try(kept, Glance.of(scene().resize((160, 120))), crowded=False) == "unmoved"
    assert first_try(kept, mirrored, crowded=False) == "mirrored"
    # A crowded file is only ever tried unmoved, here hopeless.
    assert first_try(kept, mirrored, crowded=True) is None
    # A picture that is its own mirror image is tried unmoved.
    half = scene().crop((0, 0, 160, 240))
    symmetric = Image.new("RGB", (320, 240))
    symmetric.paste(half, (0, 0))
    symmetric.paste(ImageOps.mirror(half), (160, 0))
    whole = Glance.of(symmetric)
    assert layout_correlation(whole, whole, mirrored=True) > 0.99
    assert first_try(whole, Glance.of(ImageOps.mirror(symmetric)), crowded=False) == "unmoved"
    # Light where the other is dark: no gain and offset make the two agree unmoved.
    assert first_try(kept, Glance.of(ImageOps.invert(scene())), crowded=False) is None


def test_a_first_try_that_hardly_agrees_is_settled_at_the_coarsest_level() -> None:
    pixels = np.asarray(scene()).copy()
    coffee = np.asarray(Image.fromarray(data.coffee()).convert("RGB").resize(scene().size))
    # The left half another picture: the unmoved map stays one an edit makes, and holds.
    pixels[:, :160] = coffee[:, :160]
    mixed = Image.fromarray(pixels)
    kept = prepare_capture(scene())
    # A crowded pair's first try (no second chance).
    first = agreement(kept, prepare_capture(mixed), np.eye(2, 3), first_try=True)
    assert first.level == 0 and first.score < FIRST_TRY_COARSE_SHARE
    assert not first.same_capture
    # Any other try of the same pair is measured at the finest level.
    later = agreement(kept, prepare_capture(mixed), np.eye(2, 3))
    assert later.level == len(LEVELS) - 1 and not later.same_capture
    # A copy's first try still passes.
    copy = prepare_capture(scene().resize((160, 120)))
    assert agreement(kept, copy, np.eye(2, 3), first_try=True).same_capture


Judged = tuple[ghostmatch.Library, dict[str, int], bool]


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Judged]:
    """One index of a photo and its mirror image, two independent smooth noise images and,
    where the data is, two other shots of one object: its library, the ids by file name,
    and whether the shots are in it."""
    tmp = tmp_path_factory.mktemp("first-tries")
    folder = tmp / "images"
    folder.mkdir()
    scene().save(folder / "scene.png")
    ImageOps.mirror(scene()).save(folder / "mirrored.jpg", quality=90)
    captioned(ImageOps.mirror(scene())).save(folder / "captioned-mirror.jpg", quality=90)
    for n in NOISE:
        synthetic.make_image("noise", n, seed=7).save(folder / f"noise-{n}.png")
    shots = [UKBENCH / name for name in OTHER_SHOTS]
    have_shots = all(p.is_file() for p in shots)
    if have_shots:
        for p in shots:
            (folder / p.name).write_bytes(p.read_bytes())
    with ghostmatch.open(tmp / "index", weights="bundled") as lib:
        lib.index([folder])
        records = lib.catalog.get(lib.catalog.ids().tolist())
        yield lib, {r.path.name: r.id for r in records}, have_shots


def judge_of(lib: ghostmatch.Library, crowded: bool = False) -> PairJudge:
    records, _ = records_by_name(lib)
    return PairJudge(
        lib.finder.model,
        records,
        lib.duplicate_threshold(),
        36,
        crowded=set(records) if crowded else frozenset(),
    )


def test_a_flipped_copy_is_settled_edited_from_its_glances(judged: Judged) -> None:
    lib, ids, _ = judged
    judge = judge_of(lib)
    kept, flipped = ids["scene.png"], ids["mirrored.jpg"]
    assert judge(kept, [(flipped, judge.threshold)]) == {flipped: "edited"}
    assert judge.settled == 1 and judge.mirrored == 0
    # No dense comparison, no local feature map.
    a, b = judge.capture(kept), judge.capture(flipped)
    assert a is not None and b is not None and not a.prepared and not b.prepared
    assert judge._maps is None


def test_a_captioned_flipped_copy_is_edited_from_its_mirrored_first_try(judged: Judged) -> None:
    lib, ids, _ = judged
    judge = judge_of(lib)
    kept, flipped = ids["scene.png"], ids["captioned-mirror.jpg"]
    # Scored at the threshold: the pair gets a first try before any geometric check.
    assert judge(kept, [(flipped, judge.threshold)]) == {flipped: "edited"}
    assert judge.settled == 0 and judge.mirrored == 1 and judge.hopeless == 0
    # No local feature map was made: no matching, no RANSAC.
    assert judge.maps.made == {}


def test_crowded_synthetic_images_whose_layouts_differ_are_not_compared(
    judged: Judged,
) -> None:
    lib, ids, _ = judged
    judge = judge_of(lib, crowded=True)
    a, b = (ids[f"noise-{n}.png"] for n in NOISE)
    ca, cb = judge.capture(a), judge.capture(b)
    assert ca is not None and cb is not None
    # Past the crowded pairs' thumbnail check, short of the layout cut.
    assert ca.correlation(cb) >= 0.5
    assert layout_correlation(judge.glances[a], judge.glances[b]) < HOPELESS_CROWDED_LAYOUT
    assert judge(a, [(b, judge.threshold)]) == {b: None}
    assert judge.hopeless == 1
    # Only the unmoved try exists for a crowded pair, and it was never made.
    assert not ca.prepared and not cb.prepared
    assert judge._maps is None


def test_another_shot_whose_unmoved_try_is_hopeless_goes_to_the_geometric_check(
    judged: Judged,
) -> None:
    lib, ids, have_shots = judged
    if not have_shots:
        pytest.skip(f"no ukbench-dev photos at {UKBENCH}")
    judge = judge_of(lib)
    kept, other = (ids[name] for name in OTHER_SHOTS)
    assert judge(kept, [(other, judge.threshold)]) == {other: None}
    assert judge.hopeless == 1
    # Decided by the geometric check, without the unmoved try.
    assert judge.maps.made["base"] == 2
