"""Every pair of vectors scoring at least a threshold (duplicate search), in bounded memory.

Scores are inner products of unit vectors (cosine), higher = more alike; with per-vector
``offsets`` (background score normalisation, ``ghostmatch.model.scorenorm``) a pair scores
``cos(a, b) - offset(a) - offset(b)``. That too is an inner product, of asymmetric
augmented vectors ``[a, -1, -offset(a)] . [b, offset(b), 1]``, so the exact search stays a
faiss range search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import range_search_gpu

from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.vector_index import VectorIndex

# Candidates are gathered on float32 scores (BLAS summation order differs between faiss,
# numpy and GPU) at threshold - _SLACK, then rescored in float64 and rounded to float32 by
# one function for every path, so all paths agree to the last bit on which pairs pass.
# The slack covers the worst-case float32 rounding of a unit-vector dot product
# (dim * 2**-24) up to dim 1600, and its typical size (sqrt(dim) * 2**-24) far beyond.
_SLACK = 1e-4
# How far half-precision (SQfp16) codes can move a unit-vector score: ~1e-4 measured,
# a margin of ten times that.
_CODE_SLACK = 1e-3
_RESCORE_BATCH = 16_384
_BRUTE_BLOCK = 2048
# faiss GPU k-selection handles k <= 2048.
_GPU_MAX_K = 2048

Candidates = Iterator[tuple[np.ndarray, np.ndarray]]


class Rows(Protocol):
    """Vectors read by rows, held or not: ``rows[r]`` are the vectors of rows ``r``."""

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


def similar_pairs(
    vectors: np.ndarray,
    threshold: float,
    ids: np.ndarray | None = None,
    index: VectorIndex | None = None,
    chunk: int = 4096,
    max_neighbors: int = 100,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All unordered pairs with score >= ``threshold``: (a_ids, b_ids, scores), a < b,
    best first (ties by a, then b). ``ids`` label the rows of ``vectors`` (default arange).

    Without an index, or with a Flat one, the search is exact: each chunk of queries is
    range-searched in place against the rows from it on, so memory is O(results) beyond
    faiss's fixed 4096 x 1024 score block. With a GPU, range search is emulated by k-NN
    plus CPU fallback, still exact.

    With an approximate index (IVF, HNSW), which must hold exactly these vectors under
    these ids, each row keeps those of its ``max_neighbors`` nearest neighbours in the
    index that pass the threshold: a row with more such neighbours loses the excess (the
    partner may still find the pair from its side), and pairs the index misses or
    under-scores (PQ) are lost. The GPU path is the same k-NN search.

    ``offsets`` (one per row) turn scores into normalised scores (see the module).
    """
    x, keys, off = _prepare(vectors, threshold, ids, offsets)
    if chunk < 1 or max_neighbors < 1:
        raise ValueError(f"chunk and max_neighbors must be positive, got {chunk}, {max_neighbors}")
    floor = float(threshold) - _SLACK
    if index is None or index.factory == "Flat":
        # A Flat index holds nothing the vectors do not, and range search is exact.
        queries, base = (x, x) if off is None else _augmented(x, off)
        candidates = _exact_candidates(queries, base, floor, chunk)
        return _collect(x, keys, threshold, candidates, dedupe=False, offsets=off)
    candidates = _knn_candidates(x, keys, index, floor, chunk, max_neighbors, off)
    return _collect(x, keys, threshold, candidates, dedupe=True, offsets=off)


def similar_pairs_streamed(
    index: VectorIndex,
    queries: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    max_neighbors: int = 100,
    lookup: Callable[[np.ndarray], np.ndarray] | None = None,
    offsets: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`similar_pairs` over an index whose vectors do not fit in memory (an on-disk
    index): ``queries`` are (ids, vectors) chunks, every chunk of the index for the full
    pass or a sample of it, each searched for its ``max_neighbors`` nearest neighbours in
    ``index`` as the approximate path does. Every candidate is rescored by
    :func:`pair_scores` between the query's vector and its partner's from ``lookup(ids)``
    (default: the vectors stored in the index: exact for Flat codes, within ~1e-4 for
    half-precision ones). ``offsets(ids)`` gives the ids' score offsets, as ``offsets``
    does for :func:`similar_pairs`. Memory: one chunk and the pairs found."""
    low = -1.0 if offsets is None else -3.0
    if not low <= threshold <= 1.0:
        raise GhostmatchError(
            f"similarity threshold must be between {low:g} and 1, got {threshold}"
        )
    if max_neighbors < 1:
        raise ValueError(f"max_neighbors must be positive, got {max_neighbors}")
    fetch = lookup or index.reconstruct
    # Candidates are picked on the index's scores, which half-precision codes round by up
    # to ~1e-4: a wider margin keeps every pair the exact rescoring would pass.
    floor = float(threshold) - _SLACK - _CODE_SLACK
    k = min(max_neighbors + 1, max(index.ntotal, 1))
    kept_a, kept_b, kept_scores = [], [], []
    for ids, vectors in queries:
        keys = np.asarray(ids, dtype=np.int64)
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        scores, found = index.search(x, k)
        valid = (found >= 0) & (found != keys[:, None])
        own = None
        if offsets is not None:
            own = np.asarray(offsets(keys), dtype=np.float64)
            partner = np.zeros(found.shape)
            partner[valid] = offsets(found[valid])
            scores = scores - own[:, None] - partner
        hit = valid & (scores >= floor)
        rows = np.broadcast_to(np.arange(len(x))[:, None], found.shape)[hit]
        partners, where = np.unique(found[hit], return_inverse=True)
        if not partners.size:
            continue
        both = np.concatenate([x, fetch(partners).astype(np.float32, copy=False)])
        shift = None
        if own is not None and offsets is not None:
            shift = np.concatenate([own, np.asarray(offsets(partners), dtype=np.float64)])
        # Rows of both sides, lower id first: the score is then computed in the same order
        # as the in-memory paths compute it, to the last bit.
        first, second = rows, len(x) + where.reshape(-1)
        swap = keys[rows] > partners[where.reshape(-1)]
        first, second = np.where(swap, second, first), np.where(swap, first, second)
        pair = pair_scores(both, first, second, shift)
        passed = pair >= np.float32(threshold)
        a, b = keys[rows[passed]], partners[where.reshape(-1)[passed]]
        kept_a.append(np.minimum(a, b))
        kept_b.append(np.maximum(a, b))
        kept_scores.append(pair[passed])
    a_ids = np.concatenate([np.empty(0, np.int64), *kept_a])
    b_ids = np.concatenate([np.empty(0, np.int64), *kept_b])
    scores = np.concatenate([np.empty(0, np.float32), *kept_scores])
    # A pair found from both sides is kept once.
    order = np.lexsort((b_ids, a_ids))
    a_ids, b_ids, scores = a_ids[order], b_ids[order], scores[order]
    first_seen = np.ones(len(a_ids), bool)
    first_seen[1:] = (a_ids[1:] != a_ids[:-1]) | (b_ids[1:] != b_ids[:-1])
    a_ids, b_ids, scores = a_ids[first_seen], b_ids[first_seen], scores[first_seen]
    order = np.lexsort((b_ids, a_ids, -scores))
    return a_ids[order], b_ids[order], scores[order]


def _augmented(x: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(queries, base) whose inner products are the normalised scores."""
    n = len(x)
    queries = np.empty((n, x.shape[1] + 2), np.float32)
    base = np.empty_like(queries)
    queries[:, :-2] = base[:, :-2] = x
    queries[:, -2], queries[:, -1] = -1.0, -off
    base[:, -2], base[:, -1] = off, 1.0
    return queries, base


def brute_force_pairs(
    vectors: np.ndarray,
    threshold: float,
    ids: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The O(n^2) numpy reference for :func:`similar_pairs`: every block of the score
    matrix above the diagonal, same scoring and ordering."""
    x, keys, off = _prepare(vectors, threshold, ids, offsets)
    floor = float(threshold) - _SLACK
    shift = np.zeros(len(x)) if off is None else off

    def blocks() -> Candidates:
        n = len(x)
        for i0 in range(0, n, _BRUTE_BLOCK):
            for j0 in range(i0, n, _BRUTE_BLOCK):
                block = x[i0 : i0 + _BRUTE_BLOCK] @ x[j0 : j0 + _BRUTE_BLOCK].T
                block = block - shift[i0 : i0 + _BRUTE_BLOCK, None]
                block = block - shift[None, j0 : j0 + _BRUTE_BLOCK]
                rows, cols = np.nonzero(block >= floor)
                rows += i0
                cols += j0
                above = cols > rows
                yield rows[above], cols[above]

    return _collect(x, keys, threshold, blocks(), dedupe=False, offsets=off)


def _exact_candidates(
    queries: np.ndarray, base: np.ndarray, floor: float, chunk: int
) -> Candidates:
    """Row pairs (i < j) with queries[i] . base[j] above ``floor`` (float32), one query
    chunk at a time; the score must be symmetric (queries[i] . base[j] = queries[j] . base[i])."""
    if faiss.get_num_gpus() > 0:
        yield from _exact_candidates_gpu(queries, base, floor, chunk)
        return
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        # Rows before `start` already met this chunk as queries: scan only the tail.
        lims, found = _range_search_tail(queries, base, start, stop, floor)
        rows = np.repeat(np.arange(start, stop), np.diff(lims))
        partners = found + start
        later = partners > rows
        yield rows[later], partners[later]


def _range_search_tail(
    queries: np.ndarray, base: np.ndarray, start: int, stop: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exhaustive inner-product range search of query rows [start, stop) against
    base rows [start, n), run in place: an IndexFlatIP would first copy the tail."""
    n, dim = base.shape
    result = faiss.RangeSearchResult(stop - start)
    faiss.range_search_inner_product(
        faiss.swig_ptr(queries[start:stop]),
        faiss.swig_ptr(base[start:]),
        dim,
        stop - start,
        n - start,
        floor,
        result,
    )
    lims = faiss.rev_swig_ptr(result.lims, stop - start + 1).astype(np.int64)
    if lims[-1] == 0:
        return lims, np.empty(0, np.int64)
    return lims, faiss.rev_swig_ptr(result.labels, int(lims[-1])).astype(np.int64)


def _exact_candidates_gpu(
    queries: np.ndarray, base: np.ndarray, floor: float, chunk: int
) -> Candidates:
    """GPU has no range search: faiss's helper runs k-NN there and redoes on CPU the
    queries whose k-th neighbour is still above the floor, so the result stays exact."""
    cpu = faiss.IndexFlatIP(base.shape[1])
    cpu.add(base)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        lims, _, found = range_search_gpu(queries[start:stop], floor, gpu, cpu)
        rows = np.repeat(np.arange(start, stop), np.diff(lims).astype(np.int64))
        later = found > rows
        yield rows[later], found[later]


def _knn_candidates(
    x: np.ndarray,
    keys: np.ndarray,
    index: VectorIndex,
    floor: float,
    chunk: int,
    max_neighbors: int,
    off: np.ndarray | None = None,
) -> Candidates:
    """Row pairs (i < j) from each row's k-NN in ``index`` (by cosine), index score
    (less both offsets, when given) above ``floor``."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    if index.dim != x.shape[1] or not np.array_equal(index.ids(), sorted_keys):
        raise ValueError(
            "the index must hold exactly these vectors under these ids; pass the ids it was "
            "built with"
        )
    # +1: a row is normally its own first hit.
    k = min(max_neighbors + 1, len(keys))
    if index.on_gpu and k > _GPU_MAX_K:
        raise ValueError(f"max_neighbors must be below {_GPU_MAX_K} for a GPU index")
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        scores, found = index.search(x[start:stop], k)
        valid = found >= 0
        rows = np.full(found.shape, -1, np.int64)
        rows[valid] = order[np.searchsorted(sorted_keys, found[valid])]
        if off is not None:
            scores = scores - off[start:stop, None] - np.where(valid, off[rows], 0.0)
        hit = valid & (scores >= floor)
        queries = np.broadcast_to(np.arange(start, stop)[:, None], found.shape)[hit]
        partners = rows[hit]
        other = partners != queries
        queries, partners = queries[other], partners[other]
        yield np.minimum(queries, partners), np.maximum(queries, partners)


def _collect(
    x: np.ndarray,
    keys: np.ndarray,
    threshold: float,
    candidates: Candidates,
    dedupe: bool,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescore candidate row pairs exactly, keep score >= threshold, map rows to ids,
    order each pair a < b and all pairs by score descending."""
    kept_a, kept_b, kept_scores = [], [], []
    for rows_a, rows_b in candidates:
        scores = pair_scores(x, rows_a, rows_b, offsets)
        passed = scores >= np.float32(threshold)
        kept_a.append(rows_a[passed])
        kept_b.append(rows_b[passed])
        kept_scores.append(scores[passed])
    rows_a = np.concatenate([np.empty(0, np.int64), *kept_a]).astype(np.int64)
    rows_b = np.concatenate([np.empty(0, np.int64), *kept_b]).astype(np.int64)
    scores = np.concatenate([np.empty(0, np.float32), *kept_scores])
    if dedupe:
        _, first = np.unique(rows_a * len(x) + rows_b, return_index=True)
        rows_a, rows_b, scores = rows_a[first], rows_b[first], scores[first]
    a_ids, b_ids = keys[rows_a], keys[rows_b]
    a_ids, b_ids = np.minimum(a_ids, b_ids), np.maximum(a_ids, b_ids)
    order = np.lexsort((b_ids, a_ids, -scores))
    return a_ids[order], b_ids[order], scores[order]


def pair_scores(
    x: np.ndarray | Rows, rows_a: np.ndarray, rows_b: np.ndarray, offsets: np.ndarray | None = None
) -> np.ndarray:
    """The one definition of a pair's score: the float64 dot product, less both rows'
    ``offsets`` when given, rounded to float32."""
    out = np.empty(len(rows_a), np.float32)
    for start in range(0, len(rows_a), _RESCORE_BATCH):
        ra = rows_a[start : start + _RESCORE_BATCH]
        rb = rows_b[start : start + _RESCORE_BATCH]
        score = np.einsum("ij,ij->i", x[ra].astype(np.float64), x[rb].astype(np.float64))
        if offsets is not None:
            score = score - offsets[ra] - offsets[rb]
        out[start : start + _RESCORE_BATCH] = score
    return out


def _prepare(
    vectors: np.ndarray,
    threshold: float,
    ids: np.ndarray | None,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected vectors of shape (n, dim), got {x.shape}")
    off = None
    if offsets is not None:
        off = np.asarray(offsets, dtype=np.float64)
        if off.shape != (len(x),) or not np.isfinite(off).all():
            raise ValueError(f"expected {len(x)} finite offsets, got {off.dtype} {off.shape}")
    # A normalised score is a cosine less two offsets (each within [-1, 1]).
    low = -1.0 if off is None else -3.0
    if not low <= threshold <= 1.0:
        raise GhostmatchError(
            f"similarity threshold must be between {low:g} and 1, got {threshold}"
        )
    if ids is None:
        return x, np.arange(len(x), dtype=np.int64), off
    keys = np.asarray(ids)
    if keys.shape != (len(x),) or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"expected {len(x)} integer ids, got {keys.dtype} {keys.shape}")
    keys = keys.astype(np.int64)
    if np.unique(keys).size != keys.size:
        raise ValueError("ids must be unique")
    return x, keys, off
