"""The geometric check's fast paths give the very fits of the plain algorithm: one seeded
generator per try, full sorts, every row's second neighbour (the reference below)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from ghostmatch.dupes import verify
from ghostmatch.dupes.verify import ScaledMaps, Verification


def _reference_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = a @ b.T
    best_b = sim.argmax(axis=1)
    best_a = sim.argmax(axis=0)
    ia = np.arange(len(a))
    best = sim[ia, best_b]
    keep = (best_a[best_b] == ia) & (best >= verify.MIN_LOCAL_SIMILARITY)
    second = np.sort(sim, axis=1)[:, -2]
    keep &= (1.0 - best) < verify.MATCH_RATIO**2 * (1.0 - second)
    return ia[keep], best_b[keep]


def _reference_affine(
    src: np.ndarray, dst: np.ndarray, tolerance: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    n = len(src)
    none = np.zeros(n, dtype=bool)
    if n < 3:
        return np.eye(2, 3), none
    design = np.hstack([src, np.ones((n, 1))])
    picks = rng.integers(0, n, (verify.RANSAC_ITERATIONS, 3))
    picks = picks[(picks[:, 0] != picks[:, 1]) & (picks[:, 1] != picks[:, 2])]
    picks = picks[picks[:, 0] != picks[:, 2]]
    models = verify._affines_from_triples(src[picks], dst[picks])
    models = models[verify.plausible(models)]
    if len(models) == 0:
        return np.eye(2, 3), none
    offsets = np.matmul(models, design.T) - dst.T[None]
    counts = ((offsets**2).sum(axis=1) <= tolerance**2).sum(axis=1)
    best_model = models[int(counts.argmax())]
    best = np.linalg.norm(design @ best_model.T - dst, axis=1) <= tolerance
    if best.sum() < 3:
        return np.eye(2, 3), none
    m, *_ = np.linalg.lstsq(design[best], dst[best], rcond=None)
    if not verify.plausible(m.T):
        return best_model, best
    return m.T, np.linalg.norm(design @ m.T.T - dst, axis=1) <= tolerance


def _reference_fit(fa: np.ndarray, fb: np.ndarray, flipped: bool, after: int) -> Verification:
    (ha, wa, c), (hb, wb, _) = fa.shape, fb.shape
    tolerance = verify.TOLERANCE_CELLS / min(max(ha, wa), max(hb, wb))
    rng = np.random.default_rng(verify.SEED)
    if after >= 3:
        rng.integers(0, after, (verify.RANSAC_ITERATIONS, 3))
    ia, ib = _reference_matches(fa.reshape(-1, c), fb.reshape(-1, c))
    affine, inliers = _reference_affine(
        verify._grid(hb, wb)[ib], verify._grid(ha, wa)[ia], tolerance, rng
    )
    if flipped:
        affine = affine @ verify._MIRROR
    return Verification(len(ia), int(inliers.sum()), affine, flipped, min(ha * wa, hb * wb))


def _same(fit: Verification, reference: Verification) -> None:
    assert (fit.matches, fit.inliers, fit.flipped, fit.cells) == (
        reference.matches,
        reference.inliers,
        reference.flipped,
        reference.cells,
    )
    np.testing.assert_array_equal(fit.affine, reference.affine)


@pytest.fixture(scope="module")
def scaled(photos: Path) -> dict[str, ScaledMaps]:
    from ghostmatch.model.embedder import prepare, to_batch
    from ghostmatch.model.weights import load_descriptor

    model = load_descriptor("bundled")
    card = model.card
    zoomed = card.with_changes(input_size=round(card.input_size * verify.ZOOM / 16) * 16)
    coffee = Image.open(photos / "coffee.jpg").convert("RGB")
    w, h = coffee.size
    images = {
        "coffee": coffee,
        "crop": coffee.crop((w // 4, h // 6, w * 17 // 20, h * 3 // 4)),
        "flip": ImageOps.mirror(coffee.crop((0, 0, w * 9 // 10, h))),
        "rocket": Image.open(photos / "rocket.jpg").convert("RGB"),
    }
    out = {}
    for name, image in images.items():
        base = verify.local_features(
            model, to_batch([prepare(image, card), prepare(ImageOps.mirror(image), card)])
        )
        big = verify.local_features(model, to_batch([prepare(image, zoomed)]))
        out[name] = ScaledMaps(base[0], base[1], big[0])
    return out


@pytest.mark.parametrize("other", ["crop", "flip", "rocket"])
def test_fits_are_those_of_the_plain_algorithm(scaled: dict[str, ScaledMaps], other: str) -> None:
    a, b = scaled["coffee"], scaled[other]
    tries = [
        (a.base, b.base),
        (a.base, b.mirrored),
        (a.zoomed, b.base),
        (a.zoomed, b.mirrored),
        (b.zoomed, a.base),
        (b.zoomed, a.mirrored),
    ]
    inliers = []
    for fa, fb in tries:
        plain = verify._fit_one(fa, fb, False)
        _same(plain, _reference_fit(fa, fb, False, 0))
        # A mirrored try draws after the plain try's draws, whatever their number.
        for after in (0, 2, plain.matches, plain.matches + 7):
            _same(verify._fit_one(fa, fb, True, after), _reference_fit(fa, fb, True, after))
        inliers.append(plain.inliers)
    # The pairs reach the interesting paths: a copy's fit and an unrelated photo's.
    if other == "rocket":
        assert max(inliers) < 20
    else:
        assert max(inliers) >= 40


def test_fit_affine_keeps_its_draws() -> None:
    # The public RANSAC still reads its triples from the generator it is given.
    rng = np.random.default_rng(3)
    src = rng.random((40, 2))
    dst = src * 0.8 + 0.1
    dst[:10] = rng.random((10, 2))  # outliers
    for seed in range(5):
        got = verify.fit_affine(src, dst, 0.01, np.random.default_rng(seed))
        want = _reference_affine(src, dst, 0.01, np.random.default_rng(seed))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert verify.fit_affine(src[:2], dst[:2], 0.01, np.random.default_rng(0))[1].shape == (2,)
