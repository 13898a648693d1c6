"""The compiled kernels of the dense comparison against the numpy reference they replace."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data

from ghostmatch.dupes import gaussnewton, samecapture
from ghostmatch.dupes.samecapture import LEVELS, STEP_DONE, prepare_capture

pytestmark = pytest.mark.skipif(not gaussnewton.available(), reason="numba is not installed")


def _pair() -> tuple[samecapture.Capture, samecapture.Capture, np.ndarray]:
    """A photo, its edited copy (cropped to 80%, brighter, captioned) and a rough start."""
    image = Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))
    crop = image.crop((32, 24, 288, 216))
    copy = Image.eval(crop, lambda v: min(255, int(v * 1.15 + 10)))
    ImageDraw.Draw(copy).rectangle((0, 150, 255, 175), fill=(20, 20, 200))
    truth = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])
    rough = truth + np.array([[0.04, 0.0, 0.02], [0.0, -0.03, 0.02]])
    return prepare_capture(image), prepare_capture(copy), rough


def test_compiled_steps_refine_a_map_as_the_numpy_steps_do() -> None:
    kept, other, rough = _pair()
    compiled, reference = rough.copy(), rough.copy()
    for level, (_, _, steps) in enumerate(LEVELS):
        t_img, stack = kept.levels[level][0], other.levels[level]
        done = STEP_DONE if level == len(LEVELS) - 1 else 0.1 / max(t_img.shape)
        design = samecapture._unit_grid(*t_img.shape)
        gaussnewton.steps(t_img.ravel(), stack, design, compiled, steps, done)
        samecapture._refine(t_img, stack, reference, steps, done)
        # The same map after every level, to a hundredth of a pixel of the finest level.
        assert np.abs(compiled - reference).max() * LEVELS[-1][0] < 0.01
    truth = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])
    assert np.abs(compiled - truth).max() < 0.01


def test_one_step_moves_a_map_as_the_numpy_step_does() -> None:
    # A single step from far off: the sampling, the robust fit and the normal equations
    # each show in it, before iterating hides a difference.
    kept, other, rough = _pair()
    t_img, stack = kept.levels[-1][0], other.levels[-1]
    compiled, reference = rough.copy(), rough.copy()
    gaussnewton.steps(t_img.ravel(), stack, samecapture._unit_grid(*t_img.shape), compiled, 1, 0)
    samecapture._refine(t_img, stack, reference, 1, 0)
    assert not np.allclose(compiled, rough)
    np.testing.assert_allclose(compiled, reference, atol=1e-5)


def test_align_takes_the_compiled_steps_and_lands_where_the_numpy_ones_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept, other, rough = _pair()
    compiled = samecapture.align(kept, other, rough)
    assert samecapture._kernels() is gaussnewton
    monkeypatch.setattr(samecapture, "_kernels", lambda: None)
    reference = samecapture.align(kept, other, rough)
    assert np.abs(compiled - reference).max() * LEVELS[-1][0] < 0.01


@pytest.mark.parametrize("n", [1, 2, 7, 8, 2049])
def test_the_median_by_selection_is_numpys(n: int) -> None:
    rng = np.random.default_rng(n)
    for values in (rng.random(n), rng.integers(0, 4, n).astype(np.float64)):
        assert gaussnewton._median(values.copy()) == np.median(values)
    assert gaussnewton._median(np.empty(0)) == 0.0


def test_the_small_solve_is_numpys() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.standard_normal((6, 6))
        a = a @ a.T + 1e-6 * np.eye(6)
        b = rng.standard_normal(6)
        np.testing.assert_allclose(gaussnewton._solve(a.copy(), b.copy()), np.linalg.solve(a, b))


@pytest.mark.parametrize("rounds", [1, 3])
def test_the_compiled_robust_fit_is_the_numpy_one(
    rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kept image against its edited copy under the true map: a caption the fit must
    # weigh down, pixels outside the copy, and a gain.
    kept, other, _ = _pair()
    truth = np.array([[1.25, 0.0, -0.125], [0.0, 1.25, -0.125]])
    t_img, stack = kept.levels[-1][0], other.levels[-1]
    sampled, inside = samecapture._sample(stack[:1], samecapture._mapped(t_img.shape, truth))
    assert 0 < inside.sum() < inside.size
    t, i = t_img.ravel(), sampled[0]
    gain, r, weight = samecapture._robust_fit(t, i, inside, rounds)
    assert samecapture._kernels() is gaussnewton
    monkeypatch.setattr(samecapture, "_kernels", lambda: None)
    gain_n, r_n, weight_n = samecapture._robust_fit(t, i, inside, rounds)
    assert gain == pytest.approx(gain_n, abs=1e-5) and 0.8 < gain < 0.9
    np.testing.assert_allclose(r, r_n, atol=1e-5)
    np.testing.assert_allclose(weight, weight_n, atol=1e-4)
    assert (weight[~inside] == 0).all() and (weight[inside] < 0.5).any()


@pytest.mark.parametrize("shape", [(96, 128), (48, 37), (9, 8)])
def test_the_compiled_patch_counts_are_the_numpy_ones(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sides that do not split evenly into patches (37, 9) and patches of one pixel row.
    rng = np.random.default_rng(shape[1])
    inside = rng.random(shape) < 0.7
    e = rng.random(shape).astype(np.float32) * 0.4
    covered = samecapture._patch_counts(inside)
    ok, counted = samecapture._medians_within(e, inside, 0.2)
    assert samecapture._kernels() is gaussnewton
    monkeypatch.setattr(samecapture, "_kernels", lambda: None)
    np.testing.assert_array_equal(covered, samecapture._patch_counts(inside))
    assert covered.sum() == inside.sum()
    ok_n, counted_n = samecapture._medians_within(e, inside, 0.2)
    np.testing.assert_array_equal(ok, ok_n)
    np.testing.assert_array_equal(counted, counted_n)
    assert ok.any() and not ok.all()


def test_the_compiled_chroma_fit_is_the_numpy_one() -> None:
    # A recoloured copy (hue turned, saturation halved) with a caption the fit must weigh
    # down and pixels outside.
    kept, _, _ = _pair()
    ours = kept.chroma
    theirs = ours * (0.5 * np.exp(0.6j))
    theirs[: len(theirs) // 10] = 0.3 - 0.2j
    theirs.flags.writeable = False
    mask = np.ones(len(ours), bool)
    mask[-500:] = False
    for source, target in ((ours, theirs), (theirs, ours)):
        r, r_n = np.empty(len(ours)), np.empty(len(ours))
        gaussnewton.chroma_fit(source, target, mask, 4, r)
        samecapture._chroma_fit(source, target, mask, 4, r_n)
        np.testing.assert_allclose(r, r_n, atol=1e-9)
        # The recoloured pixels follow the one change; the caption does not.
        assert np.median(r[len(r) // 5 : -500]) < 1e-6 < r[: len(r) // 10].min()


# Mutual matches (cells of A's 10 x 10 map, cells of B's) of four photo pairs of the
# ``benchmarks.othershots`` set whose hypotheses include matches exactly at the tolerance
# (1.5 cells: offsets of 0.9 and 1.2 cells, or 1.5 and 0 on the grid). numpy's matrix
# product and the compiled loop round such an offset to either side of the tolerance, and
# a strict comparison chose other hypotheses on all four.
ON_THE_EDGE = [
    (
        "13 14 15 16 23 25 26 27 33 34 35 37 43 44 55 56 57 63 67 75 82 86 88",
        "3 4 5 6 13 15 46 17 33 34 35 37 43 44 55 56 57 63 67 85 92 96 98",
    ),
    (
        "11 14 18 26 27 31 34 36 37 39 43 44 45 46 47 48 52 53 54 55 57 60"
        " 63 65 68 72 74 76 77 79 84",
        "30 97 18 16 17 50 34 26 27 39 43 44 45 36 37 28 52 53 54 55 47 63"
        " 73 65 79 72 84 86 88 9 94",
    ),
    ("16 34 43 53 54 60 63 64 65 73 74 85 90", "25 26 35 45 46 18 55 56 57 75 66 80 34"),
    (
        "11 16 17 22 27 31 32 33 34 36 37 42 43 47 52 53 55 56 57 63 66 67 73 75 81 88",
        "0 7 8 21 18 30 31 42 34 36 38 51 52 58 61 62 65 67 68 82 77 78 92 87 50 99",
    ),
]


@pytest.mark.parametrize("case", range(len(ON_THE_EDGE)))
def test_the_compiled_choice_of_hypothesis_is_numpys(
    case: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghostmatch.dupes import verify

    ia, ib = (np.array(cells.split(), dtype=np.int64) for cells in ON_THE_EDGE[case])
    grid = verify._grid(10, 10)
    src, dst, tolerance = grid[ib], grid[ia], verify.TOLERANCE_CELLS / 10
    picks = verify._seeded_picks(0, len(ia))
    gaussnewton.warm()
    assert verify._kernels() is gaussnewton
    compiled = verify._fit_picked(src, dst, tolerance, picks)
    monkeypatch.setattr(verify, "_kernels", lambda: None)
    reference = verify._fit_picked(src, dst, tolerance, picks)
    np.testing.assert_array_equal(compiled[0], reference[0])
    np.testing.assert_array_equal(compiled[1], reference[1])
    assert reference[1].sum() >= 9


def test_hypotheses_are_scored_in_numpy_while_the_kernels_are_still_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys
    import types

    from ghostmatch.dupes import verify

    # A search imports the kernels on a thread of its own: meanwhile the module is in
    # sys.modules without its functions, and a fit on the main thread scores in numpy.
    monkeypatch.setitem(sys.modules, "ghostmatch.dupes.gaussnewton", types.ModuleType("partial"))
    assert verify._kernels() is None
    monkeypatch.setitem(sys.modules, "ghostmatch.dupes.gaussnewton", gaussnewton)
    gaussnewton.warm()
    assert verify._kernels() is gaussnewton


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_the_compiled_blur_is_scipys_to_the_bit(dtype: type, sigma: float) -> None:
    # Shapes of the levels, the chroma and lines shorter than the kernel (reflected again),
    # at the scales of grey levels, chroma and tiny residual sums.
    rng = np.random.default_rng(int(sigma * 10))
    for h, w in [(96, 128), (36, 48), (128, 100), (1, 9), (3, 2), (5, 17), (13, 1)]:
        for scale in (1.0, 255.0, 1e-3):
            image = (rng.random((h, w)) * scale - scale / 3).astype(dtype)
            ours = samecapture._gaussian(image, sigma)
            assert ours.dtype == image.dtype
            np.testing.assert_array_equal(ours, ndimage.gaussian_filter(image, sigma))


def test_a_captures_blurred_levels_colour_and_chroma_are_scipys() -> None:
    kept, _, _ = _pair()
    image = Image.fromarray(data.astronaut()).convert("RGB").resize((320, 240))
    for level, (side, sigma, _) in enumerate(LEVELS):
        grey = samecapture._resized(image.convert("L"), side, "L")
        np.testing.assert_array_equal(kept.levels[level][0], ndimage.gaussian_filter(grey, sigma))
    side, sigma, _ = LEVELS[-1]
    rgb = ndimage.gaussian_filter(samecapture._resized(image, side, "RGB"), (sigma, sigma, 0))
    np.testing.assert_array_equal(kept.rgb, rgb)
    np.testing.assert_array_equal(kept.planes, rgb.transpose(2, 0, 1))
    r, g, b = rgb.transpose(2, 0, 1)
    across = ndimage.gaussian_filter(r - (g + b) / 2, samecapture.CHROMA_BLUR)
    down = ndimage.gaussian_filter((np.sqrt(3) / 2) * (g - b), samecapture.CHROMA_BLUR)
    np.testing.assert_array_equal(kept.chroma, (across + 1j * down).ravel())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_sampling_is_torchs_grid_sample_to_the_bit(dtype: type) -> None:
    import torch

    rng = np.random.default_rng(3)
    for h, w in [(96, 128), (36, 48), (128, 100), (9, 8), (2, 3)]:
        stack = (rng.random((3, h, w)) * 2 - 0.5).astype(dtype)
        # Inside, past every border, and on pixel centres and edges exactly.
        grid = rng.random((3000, 2)) * 2.6 - 1.3
        grid[:200] = np.round(grid[:200] * 16) / 16
        for planes in (stack, stack[:1]):
            ours = samecapture._grid_sample(planes, grid)
            theirs = torch.nn.functional.grid_sample(
                torch.from_numpy(planes)[None],
                torch.from_numpy(grid.astype(dtype))[None, None],
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            ).numpy()[0, :, 0]
            assert ours.dtype == planes.dtype
            np.testing.assert_array_equal(ours, theirs)


def test_the_compiled_area_average_is_torchs_interpolate_to_the_bit() -> None:
    import torch

    rng = np.random.default_rng(4)
    # A capture's finest colour planes down to its coarser levels, wide and tall, and
    # sizes that no whole number of pixels divides.
    for (h, w), (oh, ow) in [
        ((96, 128), (72, 96)),
        ((96, 128), (36, 48)),
        ((128, 85), (96, 64)),
        ((128, 85), (48, 32)),
        ((123, 107), (37, 51)),
    ]:
        planes = rng.random((3, h, w)).astype(np.float32)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(planes)[None], size=(oh, ow), mode="area"
        ).numpy()[0]
        np.testing.assert_array_equal(samecapture._area(planes, oh, ow), theirs)
