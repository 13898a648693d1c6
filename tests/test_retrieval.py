"""Retrieval refinements: whitening, alpha-QE and DBA against their definitions, and
refined queries through the library and the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from cli_support import CLI, cli_env
from PIL import Image, ImageOps
from threadpoolctl import threadpool_info, threadpool_limits

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.retrieval.expansion import alpha_qe, dba
from ghostmatch.retrieval.pipeline import WHITENING_FILE
from ghostmatch.retrieval.refine import DEFAULT, PLAIN, QUICK, Refinements
from ghostmatch.retrieval.whitening import Whitening, learn_whitening
from ghostmatch.store.catalog import NewImage

pytestmark = pytest.mark.filterwarnings("ignore:using RANDOM weights")


def run_cli(args: Sequence[object], model_cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(os.fspath, args)],  # type: ignore[arg-type]
        env=cli_env(model_cache),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Uneven variances and a shared offset, as descriptors have.
    return _unit(rng.normal(size=(n, dim)) * np.linspace(0.2, 3.0, dim) + 1.5)


# ---------------------------------------------------------------------------- the maths


def test_whitening_decorrelates_and_shrinkage_evens_it_out() -> None:
    x = _vectors(400, 12, seed=0)
    plain = learn_whitening(x, 0.0)
    white = (x - plain.mean) @ plain.projection
    assert np.allclose(np.cov(white.T, bias=True), np.eye(12), atol=1e-4)
    # Full shrinkage only centres and rotates: every direction is scaled alike.
    rotation = learn_whitening(x, 1.0).projection
    singular = np.linalg.svd(rotation, compute_uv=False)
    assert singular.max() / singular.min() == pytest.approx(1.0, rel=1e-4)
    # Shrinkage bounds the gain on the weakest direction.
    half = np.linalg.svd(learn_whitening(x, 0.5).projection, compute_uv=False)
    assert half.max() / half.min() < np.linalg.svd(plain.projection, compute_uv=False).max() / (
        np.linalg.svd(plain.projection, compute_uv=False).min()
    )
    out = plain.apply(x[:3])
    assert out.shape == (3, 12) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_whitening_needs_enough_vectors_and_a_sane_shrinkage() -> None:
    with pytest.raises(GhostmatchError, match="at least 32 indexed images"):
        learn_whitening(_vectors(10, 8, seed=1), 0.1)
    with pytest.raises(GhostmatchError, match="shrinkage"):
        learn_whitening(_vectors(40, 8, seed=1), 1.5)


def test_whitening_round_trips_through_its_file(tmp_path: Path) -> None:
    learnt = learn_whitening(_vectors(50, 8, seed=2), 0.2)
    learnt.save(tmp_path / "w.npz", fingerprint="abc", shrinkage=0.2)
    again, stamp = Whitening.load(tmp_path / "w.npz")
    assert stamp == {"fingerprint": "abc", "shrinkage": 0.2}
    assert again.learnt_on == 50
    x = _vectors(5, 8, seed=3)
    assert np.array_equal(again.apply(x), learnt.apply(x))


def test_alpha_qe_is_the_query_plus_its_weighted_nearest_candidates() -> None:
    candidates = _vectors(20, 6, seed=4)
    query = _unit(candidates[3] + 0.1)
    alpha, n = 3.0, 4
    sims = candidates @ query
    top = np.argsort(-sims)[:n]
    expected = _unit(query + sum(max(sims[t], 0.0) ** alpha * candidates[t] for t in top))
    assert np.allclose(alpha_qe(query, candidates, n, alpha), expected, atol=1e-6)
    assert np.array_equal(alpha_qe(query, candidates, 0, alpha), query)


def test_dba_moves_each_candidate_towards_its_nearest_others() -> None:
    candidates = _vectors(15, 6, seed=5)
    alpha, n = 2.0, 3
    out = dba(candidates, n, alpha)
    for m in range(len(candidates)):
        sims = candidates @ candidates[m]
        sims[m] = -np.inf
        top = np.argsort(-sims)[:n]
        expected = _unit(
            candidates[m] + sum(max(sims[t], 0.0) ** alpha * candidates[t] for t in top)
        )
        assert np.allclose(out[m], expected, atol=1e-6)
    assert np.array_equal(dba(candidates, 0, alpha), candidates)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"whiten": "zca"}, "whiten must be one of"),
        ({"augment": "rotate"}, "augment must be one of"),
        ({"rerank": -1}, "rerank is a number of results"),
        ({"dba": 1.5}, "dba is a number of results"),
        ({"shortlist": 0}, "shortlist must be"),
        ({"alpha": -1.0}, "alpha must be"),
    ],
)
def test_refinement_settings_are_checked(changes: dict[str, object], words: str) -> None:
    with pytest.raises(GhostmatchError, match=words):
        Refinements(**changes)  # type: ignore[arg-type]


def test_plain_turns_every_refinement_off() -> None:
    assert PLAIN.plain and not DEFAULT.plain
    assert DEFAULT.with_changes(augment="none", dba=0, expand=0, rerank=0).plain


# ---------------------------------------------------------------------------- queries


@pytest.fixture(scope="module")
def copies(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder, index): five photos and a mirrored crop of chelsea, bundled model."""
    tmp_path = tmp_path_factory.mktemp("copies")
    folder = tmp_path / "photos"
    folder.mkdir()
    # skimage's cat is chelsea again, so it stays out.
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        shutil.copy(photos / f"{name}.jpg", folder / f"{name}.jpg")
    with Image.open(photos / "chelsea.jpg") as image:
        w, h = image.size
        crop = ImageOps.mirror(image.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
        crop.save(folder / "chelsea-crop.jpg", quality=85)
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="bundled", runtime="torch") as lib:
        lib.index([folder])
    return folder, index


def test_a_plain_query_is_the_cosine_search(copies: tuple[Path, Path]) -> None:
    folder, index = copies
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        ids, vectors = lib.catalog.vectors()
        query = folder / "coffee.jpg"
        vector, own = lib.query_vector(query)
        scores = vectors @ vector
        order = [i for i in np.argsort(-scores, kind="stable") if ids[i] != own]
        matches = lib.query(query, 4, refine=PLAIN)
        assert lib.query(query, 4, refine=None) == matches
    assert [m.id for m in matches] == [int(ids[i]) for i in order[:4]]
    assert [m.score for m in matches] == pytest.approx([float(scores[i]) for i in order[:4]])
    assert all(m.inliers is None and "inliers" not in m.to_dict() for m in matches)


def test_the_library_refines_without_re_ranking_by_default(copies: tuple[Path, Path]) -> None:
    # Programs and servers ask many queries: the library's default skips the re-ranking's
    # network passes, and ranks as the command does when asked to.
    folder, index = copies
    assert DEFAULT.with_changes(rerank=0) == QUICK and DEFAULT.rerank > 0
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        by_default = lib.query(folder / "coffee.jpg", 4)
        assert by_default == lib.query(folder / "coffee.jpg", 4, refine=QUICK)
        assert by_default != lib.query(folder / "coffee.jpg", 4, refine=PLAIN)
        assert all(m.inliers is None for m in by_default)
        assert all(
            m.inliers is not None for m in lib.query(folder / "coffee.jpg", 4, refine=DEFAULT)
        )


RERANK = DEFAULT.with_changes(augment="flip", rerank=24)


def test_re_ranking_confirms_a_copy_by_local_features(copies: tuple[Path, Path]) -> None:
    folder, index = copies
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        matches = lib.query(folder / "chelsea.jpg", 5, refine=RERANK)
        fewer = lib.query(folder / "chelsea.jpg", 2, refine=RERANK)
        cut = (matches[1].score + matches[2].score) / 2
        kept = lib.query(folder / "chelsea.jpg", 5, refine=RERANK, min_score=cut)
        # A new image (not a path) is refined the same way.
        with Image.open(folder / "chelsea.jpg") as image:
            unindexed = lib.query(image.copy(), 5, refine=RERANK)
    assert matches[0].path.name == "chelsea-crop.jpg"
    assert matches[0].inliers is not None
    assert all(m.inliers is not None and m.inliers < matches[0].inliers for m in matches[1:])
    assert all(m.path.name != "chelsea.jpg" for m in matches)  # never itself
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert [m.id for m in kept] == [m.id for m in matches[:2]]
    assert [m.id for m in fewer] == [m.id for m in matches[:2]]
    assert unindexed[0].path.name in ("chelsea.jpg", "chelsea-crop.jpg")
    assert matches[0].to_dict()["inliers"] == matches[0].inliers


def test_an_indexed_query_re_ranks_with_its_kept_local_maps(
    copies: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its maps are kept, an indexed query costs no network pass for re-ranking, and
    its answer is the same as from a library that kept nothing."""
    import ghostmatch.retrieval.pipeline as pipeline

    folder, index = copies
    mapped: list[int] = []
    computed = pipeline.local_maps

    def counted(model, card, images, mirrored=0):  # type: ignore[no-untyped-def]
        mapped.append(len(images))
        return computed(model, card, images, mirrored)

    monkeypatch.setattr(pipeline, "local_maps", counted)
    query = folder / "coffee.jpg"
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        first = lib.query(query, 4, refine=RERANK)
        again = lib.query(query, 4, refine=RERANK)
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        cold = lib.query(query, 4, refine=RERANK)
    # The query and its 5 indexed neighbours, then nothing, then all again.
    assert mapped == [6, 0, 6]
    assert first == again == cold


def test_the_command_s_default_query_re_ranks_at_one_network_pass_per_result(
    copies: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default ``ghostmatch query``'s best results are checked by local features, each at
    one pass of the network (the query at two: as it is and mirrored), all in one batch."""
    import ghostmatch.retrieval.rerank as rerank

    folder, index = copies
    batches: list[int] = []
    computed = rerank.local_features

    def counted(model, batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        return computed(model, batch)

    monkeypatch.setattr(rerank, "local_features", counted)
    with ghostmatch.open(index, create=False, runtime="torch") as lib:
        indexed = lib.catalog.count()
        with Image.open(folder / "chelsea.jpg") as image:
            matches = lib.query(image.copy(), 3, refine=DEFAULT)
    assert DEFAULT.rerank > indexed  # so every indexed photo is a result to check
    assert batches == [indexed + 2]
    assert matches[0].path.name in ("chelsea.jpg", "chelsea-crop.jpg")
    assert all(m.inliers is not None for m in matches)
    assert matches[0].inliers is not None and matches[0].inliers >= rerank.INLIER_CAP


def test_re_ranking_checks_results_with_blas_on_one_thread(
    copies: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each local-feature check multiplies small matrices, where a BLAS thread pool only
    spins: the checks run with BLAS on one thread whatever the process allows."""
    import ghostmatch.retrieval.rerank as rerank

    folder, index = copies
    threads: list[int] = []
    checked = rerank.verify_pair

    def counted(*maps):  # type: ignore[no-untyped-def]
        threads.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return checked(*maps)

    monkeypatch.setattr(rerank, "verify_pair", counted)
    with (
        ghostmatch.open(index, create=False, runtime="torch") as lib,
        threadpool_limits(2, user_api="blas"),
    ):
        lib.query(folder / "coffee.jpg", 3, refine=DEFAULT)
    assert threads and set(threads) == {1}


def test_whitening_from_the_training_photos_needs_a_model_that_has_them(
    photos: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="random", runtime="torch") as lib:
        lib.index([photos])
        with pytest.raises(GhostmatchError, match="no training descriptors"):
            lib.query(photos / "coffee.jpg", 2, refine=PLAIN.with_changes(whiten="training"))


def _add_vectors(lib: ghostmatch.Library, start: int, n: int, dim: int) -> None:
    vectors = _vectors(start + n, dim, seed=6)[start:]
    rows = [
        NewImage(
            Path(f"/synthetic/{start + i:04d}.jpg"), 1, 0, f"{start + i:064x}", 8, 8, "JPEG", v
        )
        for i, v in enumerate(vectors)
    ]
    with lib.catalog.transaction() as tx:
        tx.insert_images(rows)
    lib.rebuild()


def test_collection_whitening_is_kept_in_the_index_and_learnt_again_as_it_grows(
    photos: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    query = np.asarray(Image.open(photos / "coffee.jpg").convert("RGB"))
    whiten = PLAIN.with_changes(whiten="collection")
    with ghostmatch.open(index, weights="random", runtime="torch") as lib:
        lib.index([photos])
        dim = lib.embedder.dim
        with pytest.raises(GhostmatchError, match="at least 32 indexed images"):
            lib.query(query, 3, refine=whiten)
        _add_vectors(lib, 0, 60, dim)
        lib.query(query, 3, refine=whiten)
        first = Whitening.load(index / WHITENING_FILE)[0].learnt_on
        assert first == lib.catalog.count()
        _add_vectors(lib, 60, 3, dim)  # under a tenth more: kept
        lib.query(query, 3, refine=whiten)
        assert Whitening.load(index / WHITENING_FILE)[0].learnt_on == first
        _add_vectors(lib, 63, 20, dim)  # more than a tenth: learnt again
        matches = lib.query(query, 3, refine=whiten)
        assert Whitening.load(index / WHITENING_FILE)[0].learnt_on == lib.catalog.count()
        assert len(matches) == 3 and all(-1.0 <= m.score <= 1.0 for m in matches)


def test_cli_query_options(copies: tuple[Path, Path], model_cache: Path) -> None:
    folder, index = copies
    query = folder / "chelsea.jpg"
    refined = run_cli(
        ["query", query, "--index", index, "--json", "-k", "3", "--rerank", "4", "--qe", "0"],
        model_cache,
    )
    assert refined.returncode == 0, refined.stderr
    rows = json.loads(refined.stdout)[0]["matches"]
    assert rows[0]["path"].endswith("chelsea-crop.jpg") and "inliers" in rows[0]
    bad = run_cli(["query", query, "--index", index, "--augment", "sideways"], model_cache)
    assert bad.returncode == 2
    assert "augment must be one of" in bad.stderr and "Traceback" not in bad.stderr
