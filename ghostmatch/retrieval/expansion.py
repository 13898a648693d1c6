"""Query expansion (alpha-QE) and database-side augmentation (DBA) over a shortlist.

Radenovic, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation"
(TPAMI 2018), section 5.2: a descriptor is replaced by the weighted sum of itself and its
``n`` nearest neighbours, each weighted by its similarity to the power ``alpha``. On the
query side (alpha-QE) the other shots of the object a query finds first pull in the ones
it missed; on the database side (DBA) each photo's descriptor moves towards its own
object's other photos. Here DBA looks for each candidate's neighbours within the query's
shortlist, not the whole collection, so that it needs no collection-wide neighbour graph
kept in step with the index: the photos that matter for a query are the ones near it.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """Similarity to the power ``alpha``, negatives counting for nothing."""
    return np.power(np.clip(similarities, 0.0, None), alpha)


def alpha_qe(query: np.ndarray, candidates: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The query (dim,) expanded by its ``n`` most similar ``candidates`` (m, dim)."""
    if n <= 0 or len(candidates) == 0:
        return query
    scores = candidates @ query
    top = np.argsort(-scores, kind="stable")[:n]
    expanded = query + weights(scores[top], alpha) @ candidates[top]
    return _unit(expanded)


def dba(candidates: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Each of ``candidates`` (m, dim) replaced by the weighted sum of itself and its ``n``
    nearest others among them."""
    if n <= 0 or len(candidates) < 2:
        return candidates
    similarity = candidates @ candidates.T
    np.fill_diagonal(similarity, -np.inf)
    take = min(n, len(candidates) - 1)
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :take]
    w = weights(np.take_along_axis(similarity, top, axis=1), alpha)
    return _unit(candidates + np.einsum("mn,mnd->md", w, candidates[top]))
