"""Every pair of vectors scoring at least a threshold (duplicate search), in bounded memory.

Scores are inner products of unit vectors (cosine), higher = more alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import range_search_gpu
from ghostmatch.indexes.vector_index import VectorIndex

from ghostmatch.errors import GhostmatchError

# Candidates are gathered on float32 scores (BLAS summation order differs between faiss,
# numpy and GPU) at threshold - _SLACK, then rescored in float64 and rounded to float32 by
# one function for every path, so all paths agree to the last bit on which pairs pass.
# The slack covers the worst-case float32 rounding of a unit-vector dot product
# (dim * 2**-24) up to dim 1600, and its typical size (sqrt(dim) * 2**-24) far beyond.
_SLACK = 1e-4
_RESCORE_BATCH = 16_384
_BRUTE_BLOCK = 2048
# faiss GPU k-selection handles k <= 2048.
_GPU_MAX_K = 2048

Candidates = Iterator[tuple[np.ndarray, np.ndarray]]


def similar_pairs(
    vectors: np.ndarray,
    threshold: float,
    ids: np.ndarray | None = None,
    index: VectorIndex | None = None,
    chunk: int = 4096,
    max_neighbors: int = 100,
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
    """
    x, keys = _prepare(vectors, threshold, ids)
    if chunk < 1 or max_neighbors < 1:
        raise ValueError(f"chunk and max_neighbors must be positive, got {chunk}, {max_neighbors}")
    floor = float(threshold) - _SLACK
    if index is None or index.factory == "Flat":
        # A Flat index holds nothing the vectors do not, and range search is exact.
        return _collect(x, keys, threshold, _exact_candidates(x, floor, chunk), dedupe=False)
    candidates = _knn_candidates(x, keys, index, floor, chunk, max_neighbors)
    return _collect(x, keys, threshold, candidates, dedupe=True)


def brute_force_pairs(
    vectors: np.ndarray, threshold: float, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The O(n^2) numpy reference for :func:`similar_pairs`: every block of the score
    matrix above the diagonal, same scoring and ordering."""
    x, keys = _prepare(vectors, threshold, ids)
    floor = float(threshold) - _SLACK

    def blocks() -> Candidates:
        n = len(x)
        for i0 in range(0, n, _BRUTE_BLOCK):
            for j0 in range(i0, n, _BRUTE_BLOCK):
                rows, cols = np.nonzero(
                    x[i0 : i0 + _BRUTE_BLOCK] @ x[j0 : j0 + _BRUTE_BLOCK].T >= floor
                )
                rows += i0
                cols += j0
                above = cols > rows
                yield rows[above], cols[above]

    return _collect(x, keys, threshold, blocks(), dedupe=False)


def _exact_candidates(x: np.ndarray, floor: float, chunk: int) -> Candidates:
    """Row pairs (i < j) scoring above ``floor`` (float32), one query chunk at a time."""
    if faiss.get_num_gpus() > 0:
        yield from _exact_candidates_gpu(x, floor, chunk)
        return
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        # Rows before `start` already met this chunk as queries: scan only the tail.
        lims, found = _range_search_tail(x, start, stop, floor)
        queries = np.repeat(np.arange(start, stop), np.diff(lims))
        partners = found + start
        later = partners > queries
        yield queries[later], partners[later]


def _range_search_tail(
    x: np.ndarray, start: int, stop: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exhaustive inner-product range search of rows [start, stop) against rows
    [start, n), run on ``x`` itself: an IndexFlatIP would first copy the tail (n x dim)."""
    n, dim = x.shape
    result = faiss.RangeSearchResult(stop - start)
    faiss.range_search_inner_product(
        faiss.swig_ptr(x[start:stop]),
        faiss.swig_ptr(x[start:]),
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


def _exact_candidates_gpu(x: np.ndarray, floor: float, chunk: int) -> Candidates:
    """GPU has no range search: faiss's helper runs k-NN there and redoes on CPU the
    queries whose k-th neighbour is still above the floor, so the result stays exact."""
    cpu = faiss.IndexFlatIP(x.shape[1])
    cpu.add(x)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        lims, _, found = range_search_gpu(x[start:stop], floor, gpu, cpu)
        queries = np.repeat(np.arange(start, stop), np.diff(lims).astype(np.int64))
        later = found > queries
        yield queries[later], found[later]


def _knn_candidates(
    x: np.ndarray,
    keys: np.ndarray,
    index: VectorIndex,
    floor: float,
    chunk: int,
    max_neighbors: int,
) -> Candidates:
    """Row pairs (i < j) from each row's k-NN in ``index``, index score above ``floor``."""
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
        hit = (found >= 0) & (scores >= floor)
        queries = np.broadcast_to(np.arange(start, stop)[:, None], found.shape)[hit]
        partners = order[np.searchsorted(sorted_keys, found[hit])]
        other = partners != queries
        queries, partners = queries[other], partners[other]
        yield np.minimum(queries, partners), np.maximum(queries, partners)


def _collect(
    x: np.ndarray, keys: np.ndarray, threshold: float, candidates: Candidates, dedupe: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescore candidate row pairs exactly, keep score >= threshold, map rows to ids,
    order each pair a < b and all pairs by score descending."""
    kept_a, kept_b, kept_scores = [], [], []
    for rows_a, rows_b in candidates:
        scores = pair_scores(x, rows_a, rows_b)
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


def pair_scores(x: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """The one definition of a pair's score: float64 dot product rounded to float32."""
    out = np.empty(len(rows_a), np.float32)
    for start in range(0, len(rows_a), _RESCORE_BATCH):
        a = x[rows_a[start : start + _RESCORE_BATCH]].astype(np.float64)
        b = x[rows_b[start : start + _RESCORE_BATCH]].astype(np.float64)
        out[start : start + _RESCORE_BATCH] = np.einsum("ij,ij->i", a, b)
    return out


def _prepare(
    vectors: np.ndarray, threshold: float, ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected vectors of shape (n, dim), got {x.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise GhostmatchError(
            f"similarity threshold must be a cosine between -1 and 1, got {threshold}"
        )
    if ids is None:
        return x, np.arange(len(x), dtype=np.int64)
    keys = np.asarray(ids)
    if keys.shape != (len(x),) or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"expected {len(x)} integer ids, got {keys.dtype} {keys.shape}")
    keys = keys.astype(np.int64)
    if np.unique(keys).size != keys.size:
        raise ValueError("ids must be unique")
    return x, keys
