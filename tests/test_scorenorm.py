"""Background score normalisation: offsets, model files that carry a background, and
duplicate scores through the Library."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ghostmatch
from ghostmatch.dupes.groups import DEFAULT_NORMALISED_THRESHOLD
from ghostmatch.errors import GhostmatchError
from ghostmatch.model.card import SCORE_NORM_BETA_KEY, SCORE_NORM_RANK_KEY
from ghostmatch.model.scorenorm import ScoreNorm, pick_background
from ghostmatch.model.weights import load_descriptor, save_descriptor


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_offsets_by_hand() -> None:
    angles = np.radians([0.0, 60.0, 90.0])
    background = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    norm = ScoreNorm(background, rank=2, beta=0.5)
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # Cosines of x[0] to the background: 1, 0.5, 0 -> second best 0.5; of x[1]: 0, .866, 1.
    np.testing.assert_allclose(norm.offsets(x), [0.25 * 0.5, 0.25 * np.sin(np.radians(60))], 1e-6)
    assert ScoreNorm(background, rank=1, beta=1.0).offsets(x[:1])[0] == pytest.approx(0.5)


def test_settings_are_checked() -> None:
    background = _unit(np.ones((3, 4)))
    with pytest.raises(GhostmatchError, match="rank"):
        ScoreNorm(background, rank=4)
    with pytest.raises(GhostmatchError, match="beta"):
        ScoreNorm(background, beta=3.0)
    with pytest.raises(GhostmatchError, match="do not match"):
        ScoreNorm(background).offsets(np.ones((2, 5), np.float32))
    assert pick_background(5, size=10) == [0, 1, 2, 3, 4]
    chosen = pick_background(1000, size=10, seed=3)
    assert chosen == sorted(set(chosen)) and len(chosen) == 10
    assert chosen == pick_background(1000, size=10, seed=3) != pick_background(1000, size=10)


@pytest.fixture(scope="module")
def normalised_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model file that carries a background of 40 random unit vectors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_descriptor("random")
    rng = np.random.default_rng(0)
    model.score_norm = ScoreNorm(_unit(rng.standard_normal((40, model.card.dim))), 3, 1.0)
    path = tmp_path_factory.mktemp("weights") / "normalised.safetensors"
    save_descriptor(model, path, half=True)
    return path


def test_model_file_round_trip(normalised_weights: Path, tmp_path: Path) -> None:
    model = load_descriptor(normalised_weights)
    norm = model.score_norm
    assert norm is not None and norm.rank == 3 and norm.beta == 1.0
    assert norm.background.shape == (40, model.card.dim)
    np.testing.assert_allclose(np.linalg.norm(norm.background, axis=1), 1.0, atol=2e-3)
    assert model.card.extra[SCORE_NORM_RANK_KEY] == 3
    assert model.card.extra[SCORE_NORM_BETA_KEY] == 1.0
    assert "background-normalised" in model.card.describe()
    # The background is not a weight: the file still loads into the plain network, and a
    # file saved without one has none.
    model.score_norm = None
    save_descriptor(model, tmp_path / "plain.safetensors")
    plain = load_descriptor(tmp_path / "plain.safetensors")
    assert plain.score_norm is None and SCORE_NORM_RANK_KEY not in plain.card.extra


def test_library_duplicate_scores_subtract_both_offsets(
    normalised_weights: Path, photos: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(photos / name, folder / name)
    Image.open(photos / "chelsea.jpg").save(folder / "chelsea_q40.jpg", quality=40)
    with ghostmatch.open(tmp_path / "index", weights=str(normalised_weights)) as lib:
        lib.index([folder])
        assert lib.normalised_scores
        assert lib.duplicate_threshold() == DEFAULT_NORMALISED_THRESHOLD
        ids, vectors = lib.catalog.vectors()
        norm = load_descriptor(normalised_weights).score_norm
        assert norm is not None
        offsets = dict(zip(ids.tolist(), norm.offsets(vectors), strict=True))
        cosines = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
        row = {image_id: n for n, image_id in enumerate(ids.tolist())}
        by_path = {r.path: r.id for r in lib.catalog.get(ids.tolist())}
        groups = lib.find_duplicates(-2.5, verify=False)  # every pair passes
        assert sum(len(g.members) for g in groups) == 3  # one group per kept file at most
        for group in groups:
            a = by_path[group.keep.path]
            for member in group.members:
                b = by_path[member.path]
                want = cosines[row[a], row[b]] - offsets[a] - offsets[b]
                assert member.score == pytest.approx(want, abs=1e-5)
        # --of scores a pair the way the all-pairs search does.
        of = lib.duplicates_of(folder / "chelsea_q40.jpg", threshold=-2.5)
        a, b = by_path[folder / "chelsea_q40.jpg"], by_path[folder / "chelsea.jpg"]
        got = {m.path.name: m.score for m in of}
        assert got["chelsea.jpg"] == pytest.approx(
            cosines[row[a], row[b]] - offsets[a] - offsets[b], abs=1e-5
        )
        assert list(got.values()) == sorted(got.values(), reverse=True)
        with pytest.raises(GhostmatchError, match=r"normalised score in \[-3, 1\]"):
            lib.find_duplicates(-3.5)
