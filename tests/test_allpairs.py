"""similar_pairs against the brute-force reference, on clustered vectors with planted duplicates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.allpairs import brute_force_pairs, similar_pairs
from ghostmatch.indexes.vector_index import build_index

N, DIM, PLANTED = 5000, 64, 150
# Cluster mates score ~0.5 (a 0.6 threshold keeps ~10^4 of them, many near the line);
# planted duplicates score ~0.99, so at 0.9 only they pass.
DUPLICATE, LOOSE = 0.9, 0.6


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    ids: np.ndarray
    planted: set[tuple[int, int]]


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]
Reference = dict[float, Pairs]


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((40, DIM)))
    x = unit(centres[rng.integers(0, 40, N)] + rng.standard_normal((N, DIM)) / np.sqrt(DIM))
    originals, copies = rng.choice(N, size=(2, PLANTED), replace=False)
    x[copies] = unit(x[originals] + 0.015 * rng.standard_normal((PLANTED, DIM)))
    ids = rng.permutation(10 * N)[:N].astype(np.int64)
    a, b = ids[originals], ids[copies]
    planted = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))
    return Dataset(x, ids, planted)


def pairs(result: Pairs) -> set[tuple[int, int]]:
    return set(zip(result[0].tolist(), result[1].tolist(), strict=True))


def assert_same(got: Pairs, want: Pairs) -> None:
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_almost_equal(got[2], want[2], decimal=4)


@pytest.fixture(scope="module")
def reference(data: Dataset) -> Reference:
    return {t: brute_force_pairs(data.x, t, data.ids) for t in (DUPLICATE, LOOSE)}


def test_reference_finds_exactly_the_planted_duplicates(
    data: Dataset, reference: Reference
) -> None:
    assert pairs(reference[DUPLICATE]) == data.planted
    assert len(reference[LOOSE][0]) > 5000


@pytest.mark.parametrize("threshold", [DUPLICATE, LOOSE])
@pytest.mark.parametrize("chunk", [333, 4096, 100_000])
def test_exact_path_equals_brute_force(
    threshold: float, chunk: int, data: Dataset, reference: Reference
) -> None:
    assert_same(similar_pairs(data.x, threshold, data.ids, chunk=chunk), reference[threshold])


def test_tiny_chunks_equal_brute_force(data: Dataset) -> None:
    # Under 20 queries faiss scans without BLAS: a second code path, same answer.
    x, ids = data.x[:800], data.ids[:800]
    assert_same(similar_pairs(x, LOOSE, ids, chunk=13), brute_force_pairs(x, LOOSE, ids))


def test_flat_index_takes_the_exact_path(data: Dataset, reference: Reference) -> None:
    index = build_index(data.ids, data.x, "Flat", device="cpu")
    got = similar_pairs(data.x, LOOSE, data.ids, index=index, max_neighbors=1)
    assert_same(got, reference[LOOSE])


def test_pairs_are_ordered_unique_and_scored(data: Dataset, reference: Reference) -> None:
    a, b, scores = reference[LOOSE]
    assert scores.dtype == np.float32 and a.dtype == b.dtype == np.int64
    assert (a < b).all()
    assert len(pairs((a, b, scores))) == len(a)
    assert (np.diff(scores) <= 0).all() and (scores >= LOOSE).all()
    row = {int(i): r for r, i in enumerate(data.ids)}
    xa = data.x[[row[int(i)] for i in a]]
    xb = data.x[[row[int(i)] for i in b]]
    np.testing.assert_array_almost_equal(scores, np.einsum("nd,nd->n", xa, xb), decimal=4)


def test_threshold_is_inclusive(data: Dataset, reference: Reference) -> None:
    a, b, scores = reference[LOOSE]
    middle = len(scores) // 2
    edge = scores[middle]
    at_edge = similar_pairs(data.x, float(edge), data.ids, chunk=999)
    assert_same(at_edge, brute_force_pairs(data.x, float(edge), data.ids))
    assert (int(a[middle]), int(b[middle])) in pairs(at_edge)
    assert pairs(at_edge) == pairs(reference[LOOSE]) - set(
        zip(a[scores < edge].tolist(), b[scores < edge].tolist(), strict=True)
    )
    above = similar_pairs(data.x, float(np.nextafter(edge, np.float32(2))), data.ids)
    assert (int(a[middle]), int(b[middle])) not in pairs(above)
    assert (above[2] > edge).all()


def test_default_ids_are_row_numbers(data: Dataset) -> None:
    a, b, _ = similar_pairs(data.x[:500], LOOSE)
    want = brute_force_pairs(data.x[:500], LOOSE)
    np.testing.assert_array_equal(a, want[0])
    assert (a < b).all() and b.max() < 500


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32", "IVF64_HNSW32,Flat"])
def test_approximate_path_finds_planted_pairs(
    factory: str, data: Dataset, reference: Reference
) -> None:
    index = build_index(data.ids, data.x, factory, device="cpu")
    got = similar_pairs(data.x, DUPLICATE, data.ids, index=index, chunk=1500)
    found = pairs(got)
    assert len(found & data.planted) >= 0.99 * len(data.planted)
    # Candidates are rescored exactly, so whatever is returned is a true pair with its
    # true score, in the reference order.
    exact = pairs(reference[DUPLICATE])
    assert found <= exact
    ref_a, ref_b, _ = reference[DUPLICATE]
    keep = np.array([p in found for p in zip(ref_a.tolist(), ref_b.tolist(), strict=True)])
    assert_same(got, tuple(column[keep] for column in reference[DUPLICATE]))
    loose = similar_pairs(data.x, LOOSE, data.ids, index=index, max_neighbors=50)
    assert pairs(loose) <= pairs(reference[LOOSE])


def test_max_neighbors_truncates_crowded_points() -> None:
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((300, DIM)))
    x[:5] = unit(x[0] + 0.01 * rng.standard_normal((5, DIM)))  # a clique of 5: 10 pairs
    index = build_index(np.arange(300), x, "HNSW32", device="cpu")
    assert len(similar_pairs(x, 0.9, index=index)[0]) == 10
    truncated = similar_pairs(x, 0.9, index=index, max_neighbors=1)
    assert 2 <= len(truncated[0]) < 10
    assert len(similar_pairs(x, 0.9, max_neighbors=1)[0]) == 10


def test_index_must_hold_the_same_ids(data: Dataset) -> None:
    index = build_index(np.arange(300), data.x[:300], "HNSW32", device="cpu")
    with pytest.raises(ValueError, match="ids it was built with"):
        similar_pairs(data.x[:300], DUPLICATE, data.ids[:300], index=index)


def test_edge_cases(data: Dataset) -> None:
    for n in (0, 1):
        a, b, scores = similar_pairs(np.zeros((n, DIM), np.float32), 0.5)
        assert a.shape == b.shape == scores.shape == (0,)
        assert a.dtype == np.int64 and scores.dtype == np.float32
    with pytest.raises(GhostmatchError, match="between -1 and 1"):
        similar_pairs(data.x, 1.5)
    with pytest.raises(GhostmatchError, match="between -1 and 1"):
        brute_force_pairs(data.x, float("nan"))
    with pytest.raises(ValueError, match="unique"):
        similar_pairs(data.x[:3], 0.5, ids=np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="integer ids"):
        similar_pairs(data.x[:3], 0.5, ids=np.arange(4))


def _offsets(data: Dataset) -> np.ndarray:
    """Per-vector offsets like a score background gives: larger in crowded places."""
    rng = np.random.default_rng(7)
    return rng.uniform(0.05, 0.35, len(data.x))


def test_offsets_subtract_from_every_pair_score(data: Dataset) -> None:
    off = _offsets(data)
    x = data.x[:400]
    got = brute_force_pairs(x, 0.0, offsets=off[:400])
    dense = x.astype(np.float64) @ x.T.astype(np.float64) - off[:400, None] - off[None, :400]
    rows, cols = np.nonzero(np.triu(dense >= 0.0, k=1))
    assert pairs(got) == set(zip(rows.tolist(), cols.tolist(), strict=True))
    np.testing.assert_allclose(got[2], np.sort(dense[rows, cols])[::-1], atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_exact_path_with_offsets_equals_brute_force(data: Dataset, threshold: float) -> None:
    off = _offsets(data)
    want = brute_force_pairs(data.x, threshold, data.ids, offsets=off)
    assert len(want[0]) > len(data.planted) // 2
    assert_same(similar_pairs(data.x, threshold, data.ids, offsets=off, chunk=700), want)
    # Offsets change which pairs pass, not just their scores.
    raw = brute_force_pairs(data.x, threshold, data.ids)
    assert pairs(raw) != pairs(want)


def test_approximate_path_with_offsets_keeps_true_pairs_only(data: Dataset) -> None:
    off = _offsets(data)
    want = brute_force_pairs(data.x, 0.3, data.ids, offsets=off)
    index = build_index(data.ids, data.x, "IVF64,Flat", device="cpu")
    index.set_search_params(nprobe=64)  # every list: the k-NN candidates are exact
    # Enough neighbours that no crowded point loses any.
    got = similar_pairs(data.x, 0.3, data.ids, index=index, offsets=off, max_neighbors=1000)
    assert_same(got, want)


def test_offsets_are_checked(data: Dataset) -> None:
    with pytest.raises(ValueError, match="finite offsets"):
        similar_pairs(data.x[:3], 0.5, offsets=np.zeros(4))
    with pytest.raises(ValueError, match="finite offsets"):
        similar_pairs(data.x[:3], 0.5, offsets=np.array([0.1, np.nan, 0.1]))
    # Offsets widen the range a score can take.
    a, _, _ = similar_pairs(data.x[:3], -2.5, offsets=np.full(3, 0.5))
    assert len(a) == 3
    with pytest.raises(GhostmatchError, match="between -3 and 1"):
        similar_pairs(data.x[:3], -3.5, offsets=np.full(3, 0.5))
