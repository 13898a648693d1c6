"""What the same-capture decision spends on a pair: the shortcuts give the answers the full
measurement gives, and the work they skip is really skipped."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from judge_support import records_by_name
from PIL import Image, ImageDraw, ImageOps
from skimage import data
from threadpoolctl import threadpool_info

import ghostmatch
from ghostmatch.dupes import samecapture
from ghostmatch.dupes.samecapture import LEVELS, agreement, prepare_capture
from ghostmatch.eval.copies import TRANSFORMS
from ghostmatch.model.localmaps import LocalMaps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic


def scene() -> Image.Image:
    return Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))


def sorted_share(e: np.ndarray, inside: np.ndarray) -> float:
    """The patch share by each patch's own median, the way it reads in the docstring."""
    patch = samecapture._patch_of(*e.shape)
    mask = inside.ravel()
    n = samecapture.PATCHES**2
    sizes, covered = np.bincount(patch, minlength=n), np.bincount(patch[mask], minlength=n)
    counted = covered >= 0.5 * sizes
    if not counted.any():
        return 0.0
    medians = np.array(
        [np.median(e.ravel()[mask & (patch == k)]) if covered[k] else np.inf for k in range(n)]
    )
    return float((medians[counted] <= samecapture.TOLERANCE).sum() / counted.sum())


def test_patch_medians_by_counting_equal_sorted_medians() -> None:
    rng = np.random.default_rng(3)
    for case in range(300):
        h, w = (int(v) for v in rng.integers(8, 130, 2))
        # Residuals rounded to tenths put many values exactly on the tolerance and make
        # even-sized patches whose two middle values straddle it.
        e = np.round(np.abs(rng.standard_normal((h, w))) * rng.choice([0.1, 0.2, 0.4]), 1)
        inside = rng.random((h, w)) >= rng.choice([0.0, 0.3, 0.6])
        if case % 5 == 0:
            inside[:, : w // 2] = False
        assert samecapture._patch_share(e, inside) == sorted_share(e, inside)


def test_alignment_that_slides_off_is_settled_at_a_coarse_level() -> None:
    # Two independent smooth noise images: the alignment slides into a strong shear or
    # onto a sliver of overlap, which no edit makes; that is settled before the finest,
    # dearest level.
    noise = [prepare_capture(synthetic.make_image("noise", n, seed=5)) for n in range(4)]
    for n in range(3):
        found = agreement(noise[n], noise[n + 1], np.eye(2, 3))
        assert not found.same_capture
        assert found.level < len(LEVELS) - 1
    # A copy goes all the way to the finest level, and is the same capture there.
    kept = prepare_capture(scene())
    copy = agreement(kept, prepare_capture(scene().resize((200, 150))), np.eye(2, 3))
    assert copy.level == len(LEVELS) - 1
    assert copy.same_capture and copy.is_whole()
    # A mirror image is no copy unmoved (the geometric check finds its flip).
    mirrored = agreement(kept, prepare_capture(ImageOps.mirror(scene())), np.eye(2, 3))
    assert not mirrored.same_capture


def test_a_recoloured_copy_still_agrees_after_the_colour_fit() -> None:
    # Hue and saturation changes agree in colour, not in grey: however little agrees in
    # grey, the colour fit decides.
    pixels = np.asarray(scene(), np.float64)
    recoloured = np.clip(pixels[..., [1, 2, 0]] * 0.6 + pixels * 0.4, 0, 255).astype(np.uint8)
    kept = prepare_capture(scene())
    found = agreement(kept, prepare_capture(Image.fromarray(recoloured)), np.eye(2, 3))
    assert found.same_capture


def test_pairs_are_decided_on_one_thread_and_the_count_is_restored(tmp_path: Path) -> None:
    # Idle pool threads spin between the many small steps of deciding pairs; one thread
    # each for torch and BLAS, and the caller's setting back afterwards.
    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    scene().save(folder / "scene_q50.jpg", quality=50)
    for n in range(4):
        synthetic.make_image("noise", n, seed=5).save(folder / f"noise{n}.jpg", quality=90)
    seen: list[tuple[int, list[int]]] = []

    def progress(stage: str, done: int, total: int | None) -> None:
        blas = [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
        seen.append((torch.get_num_threads(), blas))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
            lib.index([folder])
            groups = lib.find_duplicates(progress=progress)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and all(threads == 1 and set(blas) <= {1} for threads, blas in seen)
    assert [(g.keep.path.name, [(m.path.name, m.tier) for m in g.members]) for g in groups] == [
        ("scene.jpg", [("scene_q50.jpg", "near")])
    ]


def four_neighbours(stack: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of a (c, h, w) stack at unit coordinates, clamped at the border,
    from each point's four neighbouring pixels: the formula itself."""
    _, h, w = stack.shape
    x, y = units[:, 0] * w - 0.5, units[:, 1] * h - 0.5
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.minimum(x.astype(np.intp), w - 2), np.minimum(y.astype(np.intp), h - 2)
    fx, fy = x - x0, y - y0
    return (
        stack[:, y0, x0] * ((1 - fx) * (1 - fy))
        + stack[:, y0, x0 + 1] * (fx * (1 - fy))
        + stack[:, y0 + 1, x0] * ((1 - fx) * fy)
        + stack[:, y0 + 1, x0 + 1] * (fx * fy)
    ), inside


def test_bilinear_samples_equal_the_four_neighbour_formula() -> None:
    rng = np.random.default_rng(11)
    for case in range(40):
        c, h, w = 1 + case % 3, int(rng.integers(8, 60)), int(rng.integers(8, 60))
        stack = rng.random((c, h, w))
        # Maps near the identity and wild ones, with points well outside the image.
        warp = np.eye(2, 3) + rng.normal(0, 0.05 if case % 2 else 0.5, (2, 3))
        units = samecapture._unit_grid(h, w) @ warp.T
        got, inside = samecapture._sample(stack, units)
        want, want_inside = four_neighbours(stack, units)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert np.array_equal(inside, want_inside)


def test_a_first_try_that_hardly_agrees_is_settled_before_the_finest_level() -> None:
    # Two unrelated photos framed alike: the alignment stays a map an edit could make, but
    # few patches agree at the next-to-finest level. A first try (the geometric check
    # follows) stops there; a pair without a second chance is measured at the finest.
    kept = prepare_capture(scene())
    other = Image.fromarray(data.hubble_deep_field()).convert("RGB").resize((320, 240))
    first = agreement(kept, prepare_capture(other), np.eye(2, 3), second_chance=True)
    assert first.level == len(LEVELS) - 2 and first.score < samecapture.FIRST_TRY_SHARE
    assert not first.same_capture
    only = agreement(kept, prepare_capture(other), np.eye(2, 3))
    assert only.level == len(LEVELS) - 1 and not only.same_capture
    # A copy is not stopped on its first try.
    copy = agreement(
        kept, prepare_capture(scene().resize((200, 150))), np.eye(2, 3), second_chance=True
    )
    assert copy.level == len(LEVELS) - 1 and copy.same_capture


def test_zoomed_maps_are_made_only_for_pairs_the_equal_scale_check_leaves_open(
    tmp_path: Path,
) -> None:
    from ghostmatch.dupes.finder import PairJudge

    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    ImageOps.mirror(scene()).save(folder / "mirrored.jpg", quality=95)
    Image.fromarray(data.coffee()).convert("RGB").resize((320, 240)).save(folder / "coffee.jpg")
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        records, ids = records_by_name(lib)
        # A score under any threshold: each pair goes to the geometric check.
        judge = PairJudge(lib.finder.model, records, 2.0, 36)
        # The mirror image matches at equal scale on its mirrored map, tried once the kept
        # file's zoomed map (which serves all of its pairs) finds too few inliers.
        assert judge(ids["scene.jpg"], [(ids["mirrored.jpg"], 0.0)]) == {
            ids["mirrored.jpg"]: "edited"
        }
        assert judge.maps.made == {"base": 2, "zoomed": 1, "mirrored": 1}
        # An unrelated photo leaves the equal-scale check open: both images zoomed, once
        # (and both mirrored, for the zoomed checks of either against the other).
        assert judge(ids["scene.jpg"], [(ids["coffee.jpg"], 0.0)]) == {ids["coffee.jpg"]: None}
        assert judge.maps.made == {"base": 3, "mirrored": 3, "zoomed": 2}


def test_local_maps_from_onnx_runtime_equal_torch_s(tmp_path: Path) -> None:
    from ghostmatch.dupes import verify
    from ghostmatch.model.embedder import prepare, to_batch

    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        model = lib.finder.embedder.local_model
    if verify._local_session(model) is None:
        return  # no onnxruntime here: the maps come from torch only
    card = model.card
    images = [scene(), ImageOps.mirror(scene()), synthetic.make_image("noise", 1, seed=5)]
    for size in (card.input_size, card.input_size * 3 // 2):
        batch = to_batch([prepare(i, card.with_changes(input_size=size)) for i in images])
        fast = verify.local_features(model, batch)
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            plain = LocalMaps(model)(x).numpy()
        assert fast.shape == plain.shape == (3, size // 16, size // 16, fast.shape[-1])
        np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-4)


def jacobian_align(
    kept: samecapture.Capture, other: samecapture.Capture, warp: np.ndarray
) -> np.ndarray:
    """Gauss-Newton as its textbook form reads: an n x 6 Jacobian and its normal equations."""
    p = warp.astype(np.float64).copy()
    for level, (_, _, steps) in enumerate(LEVELS):
        t_img, stack = kept.levels[level][0], other.levels[level]
        design = samecapture._unit_grid(*t_img.shape)
        t = t_img.ravel()
        done = samecapture.STEP_DONE
        if level < len(LEVELS) - 1:
            done = samecapture.COARSE_STEP_DONE / max(t_img.shape)
        for _ in range(steps):
            sampled, inside = four_neighbours(stack, design @ p.T)
            if inside.sum() < 16:
                break
            gain, r, weight = samecapture._robust_fit(t, sampled[0], inside, rounds=1)
            ix, iy = sampled[1] * gain, sampled[2] * gain
            jac = np.concatenate([ix[:, None] * design, iy[:, None] * design], axis=1)
            jw = jac * weight[:, None]
            step = np.linalg.solve(jw.T @ jac + 1e-6 * np.eye(6), jw.T @ r)
            p += step.reshape(2, 3)
            if np.abs(step).max() < done:
                break
    return p


def test_alignment_equals_the_textbook_gauss_newton() -> None:
    kept = prepare_capture(scene())
    w, h = scene().size
    crop = scene().crop((w // 10, h // 10, w - w // 10, h - h // 10))
    start = np.array([[0.75, 0.02, 0.14], [-0.01, 0.8, 0.11]])
    # Photos with detail: on smooth noise the alignment wanders, and rounding alone takes
    # two runs apart.
    for other in (crop, ImageOps.mirror(scene()), scene().rotate(8, Image.Resampling.BICUBIC)):
        captured = prepare_capture(other)
        fast = samecapture.align(kept, captured, start)
        # Single-precision pixels and sums: a thousandth of a pixel at the finest level.
        np.testing.assert_allclose(fast, jacobian_align(kept, captured, start), atol=1e-5)


def test_local_maps_come_from_torch_where_the_export_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghostmatch.dupes import verify
    from ghostmatch.model.embedder import prepare, to_batch

    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        model = lib.finder.embedder.local_model
    # A cache "directory" that is a file: no export can be written beneath it.
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(blocked))
    monkeypatch.setattr(verify, "_SESSIONS", {})
    batch = to_batch([prepare(scene(), model.card)])
    maps = verify.local_features(model, batch)
    assert verify._local_session(model) is None
    with torch.inference_mode():
        x = torch.from_numpy(batch)
        if model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(maps, LocalMaps(model)(x).numpy(), atol=1e-6)


def test_a_capture_is_prepared_only_when_compared(tmp_path: Path) -> None:
    from ghostmatch.dupes.finder import CROWDED_CORRELATION, PairJudge

    folder = tmp_path / "photos"
    folder.mkdir()
    scene().save(folder / "scene.jpg", quality=95)
    scene().resize((200, 150)).save(folder / "smaller.jpg", quality=90)
    Image.fromarray(data.coffee()).convert("RGB").resize((320, 240)).save(folder / "coffee.jpg")
    with ghostmatch.open(tmp_path / "index", weights="bundled") as lib:
        lib.index([folder])
        records, ids = records_by_name(lib)
        # Every file crowded: a pair is compared only when its thumbnails correlate.
        judge = PairJudge(lib.finder.model, records, 0.0, 36, crowded=set(records))
        kept, coffee, smaller = ids["scene.jpg"], ids["coffee.jpg"], ids["smaller.jpg"]
        assert judge(kept, [(coffee, 1.0)]) == {coffee: None}
        a, b = judge.capture(kept), judge.capture(coffee)
        assert a is not None and b is not None and a.correlation(b) < CROWDED_CORRELATION
        # Only the thumbnails were made: no pyramid for a pair that is never aligned.
        assert not a.prepared and not b.prepared
        assert judge(kept, [(smaller, 1.0)]) == {smaller: "near"}
        c = judge.capture(smaller)
        assert c is not None and a.prepared and c.prepared and not b.prepared


def test_a_lazily_prepared_capture_equals_the_pyramid_made_at_once() -> None:
    capture = prepare_capture(scene())
    assert not capture.prepared and capture.thumb.shape == (samecapture.THUMB_SIDE**2,)
    levels, rgb = capture.levels, capture.rgb
    assert capture.prepared
    # The same arrays on every read, in single precision.
    assert all(a is b for a, b in zip(capture.levels, levels, strict=True))
    assert capture.rgb is rgb
    # The levels read through a capture no longer held elsewhere.
    alone = prepare_capture(scene()).levels
    assert all(np.array_equal(a, b) for a, b in zip(alone, levels, strict=True))
    assert all(level.dtype == np.float32 for level in levels) and rgb.dtype == np.float32
    assert [level.shape for level in levels] == [(3, 36, 48), (3, 72, 96), (3, 96, 128)]
    assert rgb.shape == (96, 128, 3)


def test_each_level_and_the_colour_are_made_only_when_read() -> None:
    # A pair that slides off at the coarsest level reads nothing finer of either image.
    noise = [prepare_capture(synthetic.make_image("noise", n, seed=5)) for n in range(2)]
    found = agreement(noise[0], noise[1], np.eye(2, 3), first_try=True)
    assert found.level == 0 and not found.same_capture
    for capture in noise:
        assert capture._grey[0] is not None
        assert capture._grey[1] is None and capture._grey[2] is None and capture._rgb is None
    # Read in any order, the levels and colour are the same to the bit.
    coarse_first, fine_first = prepare_capture(scene()), prepare_capture(scene())
    coarse = [coarse_first.levels[n] for n in range(len(LEVELS))] + [coarse_first.rgb]
    fine = [fine_first.rgb] + [fine_first.levels[n] for n in reversed(range(len(LEVELS)))]
    again = [*reversed(fine[1:]), fine[0]]
    assert all(np.array_equal(a, b) for a, b in zip(coarse, again, strict=True))
    assert fine_first.levels[-1] is fine_first.levels[len(LEVELS) - 1]


def test_coarse_levels_measure_residuals_only_where_they_decide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The overlap and the map settle a coarse level; its residuals (a sampled image and a
    # robust fit) are only worth their cost where a share of agreeing patches is reported
    # or decides: a first try at the next-to-finest level, or a pair settled there.
    levels: list[int] = []
    measured = samecapture._fitted

    def counted(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray, float]:
        found = measured(*args, **kwargs)  # type: ignore[arg-type]
        levels.append(found[0].shape[0])
        return found

    monkeypatch.setattr(samecapture, "_fitted", counted)
    kept = prepare_capture(scene())
    copy = prepare_capture(scene().resize((200, 150)))
    coarse = [side * 3 // 4 for side, _, _ in LEVELS[:-1]]  # the rows of a 4:3 image
    assert agreement(kept, copy, np.eye(2, 3)).same_capture
    assert levels and not set(levels) & set(coarse)
    levels.clear()
    assert agreement(kept, copy, np.eye(2, 3), second_chance=True).same_capture
    assert [n for n in levels if n in coarse] == [coarse[-1]]
    # A pair whose map slides off is still reported with its share at that level.
    noise = [prepare_capture(synthetic.make_image("noise", n, seed=5)) for n in range(2)]
    levels.clear()
    settled = agreement(noise[0], noise[1], np.eye(2, 3))
    assert settled.level < len(LEVELS) - 1 and levels == [coarse[settled.level]]


def test_patch_medians_within_any_tolerance_equal_sorted_medians() -> None:
    # The counting settles every tolerance the checks use, with the overlap's patch counts
    # given or counted anew.
    rng = np.random.default_rng(5)
    n = samecapture.PATCHES**2
    for case in range(200):
        h, w = (int(v) for v in rng.integers(8, 130, 2))
        tolerance = float(rng.choice([samecapture.TIGHT_TOLERANCE, 0.2, 0.3]))
        e = np.round(np.abs(rng.standard_normal((h, w))) * 0.2, 2)
        e[rng.random((h, w)) < 0.3] = tolerance  # many values exactly on it
        inside = rng.random((h, w)) >= rng.choice([0.0, 0.3, 0.6])
        patch = samecapture._patch_of(h, w)
        mask = inside.ravel()
        covered = np.bincount(patch[mask], minlength=n)
        want = np.array(
            [
                covered[k] > 0 and np.median(e.ravel()[mask & (patch == k)]) <= tolerance
                for k in range(n)
            ]
        )
        given = None if case % 2 else samecapture._patch_counts(inside)
        ok, counted = samecapture._medians_within(e, inside, tolerance, given)
        assert np.array_equal(ok, want)
        assert np.array_equal(counted, covered >= 0.5 * np.bincount(patch, minlength=n))


def copies() -> list[Image.Image]:
    pixels = np.asarray(scene(), np.float64)
    recoloured = np.clip(pixels[..., [1, 2, 0]] * 0.3 + pixels * 0.7, 0, 255).astype(np.uint8)
    return [scene().resize((200, 150)), scene().resize((240, 180)), Image.fromarray(recoloured)]


def test_what_one_image_decides_is_measured_once_per_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kept image's fine detail and chroma are the same for every copy it is compared
    # with: made once on its capture. Only the other image's chroma under each map is new.
    made: dict[str, int] = {"detail": 0, "chroma": 0}
    detail, chroma = samecapture._detail, samecapture._chroma_of

    def counted_detail(kept: samecapture.Capture) -> int:
        made["detail"] += 1
        return detail(kept)

    def counted_chroma(planes: np.ndarray) -> np.ndarray:
        made["chroma"] += 1
        return chroma(planes)

    monkeypatch.setattr(samecapture, "_detail", counted_detail)
    monkeypatch.setattr(samecapture, "_chroma_of", counted_chroma)
    kept = prepare_capture(scene())
    found = [agreement(kept, prepare_capture(c), np.eye(2, 3)) for c in copies()]
    assert all(f.same_capture and f.distinct is not None for f in found)
    assert made["detail"] == 1
    # Once for the kept image, once per pair for the other under its map (a copy whose
    # colours all follow the first direction's change needs no second).
    assert made["chroma"] == 1 + len(found)


def test_colours_that_follow_one_change_on_enough_patches_are_not_fitted_the_other_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A captioned copy: most of its patches follow the kept image's colours times one
    # gain, the caption's do not. That already passes; the fit the other way round (for a
    # grey kept image) is not made.
    image = scene()
    kept = prepare_capture(image)
    copy = prepare_capture(TRANSFORMS["text"](image, random.Random(3)))
    found = agreement(kept, copy, np.eye(2, 3))
    _, inside, _ = samecapture._fitted(kept, copy, found.warp)
    fits = {"n": 0}
    medians = samecapture._medians_within

    def counted(*args: Any, **kwargs: Any) -> Any:
        fits["n"] += 1
        return medians(*args, **kwargs)

    monkeypatch.setattr(samecapture, "_medians_within", counted)
    share = samecapture._one_colour_change(kept, copy, found.warp, inside)
    assert samecapture.SAME_CAPTURE_CUT <= share < 1.0 and fits["n"] == 1
    # Both ways where the first falls short of the cut, the better of the two kept.
    monkeypatch.setattr(samecapture, "SAME_CAPTURE_CUT", 1.5)
    assert samecapture._one_colour_change(kept, copy, found.warp, inside) >= share
    assert fits["n"] == 3


def test_the_moved_maps_share_one_sampling_and_the_gain_of_the_residuals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four moved maps of the other image and four of the kept one against itself: one
    # sampling pass each, and the grey gain is the one the unmoved residuals were fitted
    # with, not a fit of its own.
    samples: list[int] = []
    gains: list[float] = []
    sample, gain = samecapture._sample, samecapture._gain

    def counted_sample(stack: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples.append(len(units))
        return sample(stack, units)

    def counted_gain(*args: samecapture.Capture | np.ndarray) -> float:
        found = gain(*args)  # type: ignore[arg-type]
        gains.append(found)
        return found

    monkeypatch.setattr(samecapture, "_sample", counted_sample)
    monkeypatch.setattr(samecapture, "_gain", counted_gain)
    # Measured even though the photo's own detail pins its map (see the next test).
    monkeypatch.setattr(samecapture, "SELF_PINNED", -1.0)
    kept, other = prepare_capture(scene()), prepare_capture(copies()[0])
    r, inside, fitted_gain = samecapture._fitted(kept, other, np.eye(2, 3))
    samecapture._MOVED_SELF.clear()
    samples.clear()
    distinct = samecapture.distinctiveness(kept, other, np.eye(2, 3), r, inside, fitted_gain)
    n = r.size
    assert samples == [4 * n, 4 * n] and not gains
    # The kept image's own moved copies are kept for its next pair.
    samecapture.distinctiveness(kept, other, np.eye(2, 3), r, inside, fitted_gain)
    assert samples == [4 * n, 4 * n, 4 * n]
    # The same gain a separate fit finds, to rounding of the sampled positions.
    assert distinct.gain == pytest.approx(samecapture._gain(kept, other, np.eye(2, 3)), abs=1e-4)
    assert distinct.squash == pytest.approx(1.0) and distinct.distinctive()


def test_a_photo_that_pins_its_own_map_skips_the_copys_moved_maps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A photo moved against itself disagrees almost everywhere: a copy that agrees with it
    # cannot agree under the moved maps, and they are not sampled. Measured anyway, they
    # would have passed the copy too.
    samples: list[int] = []
    sample = samecapture._sample

    def counted_sample(stack: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples.append(len(units))
        return sample(stack, units)

    monkeypatch.setattr(samecapture, "_sample", counted_sample)
    kept = prepare_capture(scene())
    for copy in copies():
        other = prepare_capture(copy)
        r, inside, gain = samecapture._fitted(kept, other, np.eye(2, 3))
        samples.clear()
        pinned = samecapture.distinctiveness(kept, other, np.eye(2, 3), r, inside, gain)
        if pinned.colours < samecapture.SAME_CAPTURE_CUT:
            continue  # settled by its colours first
        assert np.isnan(pinned.moved) and pinned.textured == 0 and pinned.distinctive()
        assert len(samples) <= 1  # the kept image against itself, unless kept from before
        with monkeypatch.context() as measuring:
            measuring.setattr(samecapture, "SELF_PINNED", -1.0)
            measured = samecapture.distinctiveness(kept, other, np.eye(2, 3), r, inside, gain)
        assert measured.moved < samecapture.LOOSE_MOVED and measured.distinctive()
    # A flat picture (one ellipse on a plain ground) does not pin its own map: its pairs'
    # moved maps are measured.
    picture = Image.new("RGB", (320, 240), (90, 120, 200))
    ImageDraw.Draw(picture).ellipse((60, 50, 260, 200), fill=(220, 180, 40))
    flat, copy = prepare_capture(picture), prepare_capture(picture.resize((240, 180)))
    r, inside, gain = samecapture._fitted(flat, copy, np.eye(2, 3))
    found = samecapture.distinctiveness(flat, copy, np.eye(2, 3), r, inside, gain)
    assert not np.isnan(found.moved)


def plain_tukey(r: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Tukey weights as the formula reads: at the median absolute residual (of every
    ``stride``-th pixel inside), clipped at zero, nothing outside."""
    stride = max(1, np.count_nonzero(inside) // samecapture.SCALE_SAMPLES)
    scale = max(1.4826 * float(np.median(np.abs(r[::stride][inside[::stride]]))), 1e-3)
    u = r * r * (1.0 / (samecapture.TUKEY * scale) ** 2)
    return np.maximum(1.0 - u, 0.0) ** 2 * inside


def plain_robust_fit(
    t: np.ndarray, i: np.ndarray, inside: np.ndarray, rounds: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """The robust grey fit as its formulas read, each step in fresh arrays: weighted
    least squares, then Tukey weights at the median absolute residual (of every
    ``stride``-th pixel inside) clipped at zero."""

    def photometric(weight: np.ndarray) -> tuple[float, float]:
        sw = weight.sum()
        if sw <= 0:
            return 1.0, 0.0
        mt, mi = (weight @ t) / sw, (weight @ i) / sw
        var = (weight @ ((i - mi) * (i - mi))) / sw
        gain = ((weight @ ((t - mt) * (i - mi))) / sw) / var if var > 1e-9 else 0.0
        return gain, mt - gain * mi

    weight = inside.astype(t.dtype)
    if not inside.any():
        return 1.0, t - i, weight
    for _ in range(rounds):
        gain, offset = photometric(weight)
        weight = plain_tukey(t - (i * gain + offset), inside)
    gain, offset = photometric(weight)
    return gain, t - (i * gain + offset), weight


def test_robust_fit_in_reused_arrays_equals_its_formulas_to_the_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The Gauss-Newton steps write the fit into arrays made once per level, select the
    # Tukey scale's median in place and zero the weights by a mask: the same values as
    # the formulas in fresh arrays, to the last bit, so that every decision is the same.
    # The numpy fit, as it runs without numba (the compiled one is checked against it in
    # tests/test_gaussnewton.py).
    monkeypatch.setattr(samecapture, "_kernels", lambda: None)
    rng = np.random.default_rng(11)
    work = tuple(np.empty(6000, np.float32) for _ in range(4))
    for case in range(60):
        n = int(rng.choice([17, 1728, 4099, 6000]))
        t = rng.random(n, dtype=np.float32)
        i = (t * rng.uniform(0.5, 1.5) + rng.normal(0, 0.05, n)).astype(np.float32)
        # An overlay the fit must shrug off, a share of pixels outside, or none inside.
        i[: n // 7] = rng.random(n // 7, dtype=np.float32)
        inside = rng.random(n) >= rng.choice([0.0, 0.4, 1.0 if case % 15 == 0 else 0.2])
        rounds = int(rng.integers(1, 4))
        want = plain_robust_fit(t, i, inside, rounds)
        fresh = samecapture._robust_fit(t, i, inside, rounds)
        reused = samecapture._robust_fit(
            t, i, inside, rounds, np.count_nonzero(inside), tuple(a[:n] for a in work)
        )
        for got in (fresh, reused):
            assert got[0] == want[0]
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])


def test_alignment_in_reused_arrays_equals_fresh_steps_to_the_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One Gauss-Newton step as it read before its arrays were made once per level: the
    # same refined map, to the last bit. The numpy steps, as they run without numba.
    monkeypatch.setattr(samecapture, "_kernels", lambda: None)

    def fresh_align(
        kept: samecapture.Capture, other: samecapture.Capture, warp: np.ndarray
    ) -> np.ndarray:
        p = warp.astype(np.float64).copy()
        for level, (_, _, steps) in enumerate(LEVELS):
            t_img, stack = kept.levels[level][0], other.levels[level]
            design = samecapture._unit_grid(*t_img.shape)
            moments = samecapture._moments(*t_img.shape)
            t = t_img.ravel()
            done = samecapture.STEP_DONE
            if level < len(LEVELS) - 1:
                done = samecapture.COARSE_STEP_DONE / max(t_img.shape)
            for _ in range(steps):
                grid = design @ (2.0 * p).T.astype(np.float32) - np.float32(1.0)
                inside = samecapture._inside_grid(*stack.shape[1:], grid)
                if inside.sum() < 16:
                    break
                sampled = torch.nn.functional.grid_sample(
                    torch.from_numpy(stack)[None],
                    torch.from_numpy(grid)[None, None],
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=False,
                )[0, :, 0].numpy()
                gain, r, weight = plain_robust_fit(t, sampled[0], inside, 1)
                gx, gy = sampled[1], sampled[2]
                sums = np.stack([weight * gx * gx, weight * gx * gy, weight * gy * gy]) @ moments
                hessian = sums.ravel()[samecapture._HESSIAN] * (gain * gain) + 1e-6 * np.eye(6)
                gradient = (np.stack([weight * gx * r, weight * gy * r]) @ design).ravel() * gain
                step = np.linalg.solve(hessian, gradient)
                p += step.reshape(2, 3)
                if np.abs(step).max() < done:
                    break
        return p

    kept = prepare_capture(scene())
    w, h = scene().size
    crop = scene().crop((w // 10, h // 10, w - w // 10, h - h // 10))
    start = np.array([[0.75, 0.02, 0.14], [-0.01, 0.8, 0.11]])
    noise = synthetic.make_image("noise", 1, seed=5).resize((320, 240))
    for other, warp in ((crop, start), (ImageOps.mirror(scene()), start), (noise, np.eye(2, 3))):
        captured = prepare_capture(other)
        assert np.array_equal(
            samecapture.align(kept, captured, warp), fresh_align(kept, captured, warp)
        )


def test_colour_fits_in_reused_arrays_equal_fresh_ones_to_the_bit() -> None:
    # The affine colour fit and the chroma of the sampled colour planes, as they read
    # with fresh arrays and the image laid out pixel by pixel.
    kept = prepare_capture(scene())
    recoloured = Image.fromarray((np.asarray(scene()) * [0.9, 1.0, 0.7]).astype(np.uint8))
    other = prepare_capture(recoloured.rotate(3, Image.Resampling.BICUBIC))
    warp = np.array([[0.98, 0.02, 0.01], [-0.02, 0.99, 0.02]])
    _, h, w = kept.planes.shape
    warped, inside = samecapture._sample(other.planes, samecapture._mapped((h, w), warp))
    pixels = np.ascontiguousarray(warped.T).reshape(h, w, 3)
    assert np.array_equal(
        samecapture._chroma_of(warped.reshape(3, h, w)), samecapture._chroma(pixels)
    )
    t = kept.planes.reshape(3, -1)
    design = np.vstack([warped, np.ones((1, warped.shape[1]), warped.dtype)])
    weight = inside.astype(t.dtype)
    for _ in range(4):
        dw = design * weight
        colour = np.linalg.solve(dw @ design.T + 1e-9 * np.eye(4), dw @ t.T).astype(t.dtype)
        r = np.sqrt(((t - colour.T @ design) ** 2).sum(axis=0))
        weight = plain_tukey(r, inside)
    contrast = max(float(np.sqrt(sum(float(c[inside].var()) for c in t))), 0.02)
    got = samecapture._colour_residuals(kept, other, warp)
    assert np.array_equal(got, (r / contrast).reshape(h, w))


def test_gauss_newton_steps_call_the_sampling_kernel_without_its_wrapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A coarse step is a few dozen passes over a couple of thousand pixels: the
    # functional wrapper's checks cost a third of its sampling, so the steps call the
    # kernel itself (the same values, see above).
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a Gauss-Newton step went through grid_sample's wrapper")

    kept, other = prepare_capture(scene()), prepare_capture(copies()[0])
    monkeypatch.setattr(torch.nn.functional, "grid_sample", wrapper)
    refined = samecapture.align(kept, other, np.eye(2, 3))
    assert np.abs(refined - np.eye(2, 3)).max() < 0.05
