"""Candidates for heavily cropped copies: each image's descriptor searched against the
regional descriptors of the others (``ghostmatch.model.regions``), since a crop to 60% of
each side scores too low against its source's whole-image descriptor to be a candidate,
but matches the region of its source that it shows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import faiss
import numpy as np

# Each file keeps this many region matches, best first. Measured on the tuning half of
# benchmarks.othershots: the first two already hold the crop's source or a copy of it for
# 61 of 63 crops to 60%; more add mostly other shots and unrelated photos to verify.
REGION_CANDIDATES = 2
# A region match also brings in at most this many strong partners of the matched file.
STRONG_PARTNERS = 16
# Above this many images the search (every descriptor against every regional one, exact)
# is skipped: it costs REGIONS times an exact all-pairs search.
REGION_SEARCH_LIMIT = 50_000


def region_matches(
    ids: np.ndarray,
    vectors: np.ndarray,
    offsets: np.ndarray | None,
    region_ids: np.ndarray,
    regions: np.ndarray,
    region_offsets: np.ndarray | None,
    floor: float,
    budget: int = REGION_CANDIDATES,
) -> list[tuple[int, int]]:
    """(file, other) id pairs where the descriptor of ``file`` (a row of ``vectors``,
    labelled by ``ids``) scores at least ``floor`` against a regional descriptor of
    ``other`` (``regions`` (m, r, d), labelled by ``region_ids``): each file's ``budget``
    best others. A score is the cosine, less the file's offset and the region's
    (``region_offsets`` (m, r)) when scores are normalised."""
    if len(ids) == 0 or len(region_ids) == 0 or budget < 1:
        return []
    m, r, d = regions.shape
    flat = np.ascontiguousarray(regions.reshape(m * r, d), dtype=np.float32)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    # A file's own regions can take r of the hits: enough for ``budget`` others beyond.
    k = min(m * r, (budget + 1) * r)
    sims, hits = faiss.knn(x, flat, k, faiss.METRIC_INNER_PRODUCT)
    owner = region_ids[hits // r]
    scores = sims.astype(np.float64)
    if offsets is not None and region_offsets is not None:
        scores = scores - offsets[:, None] - region_offsets.reshape(-1)[hits]
    found: list[tuple[int, int]] = []
    for row, file in enumerate(ids.tolist()):
        best: dict[int, float] = {}
        for other, score in zip(owner[row].tolist(), scores[row].tolist(), strict=True):
            if other != file and score >= floor and score > best.get(other, -np.inf):
                best[other] = score
        ranked = sorted(best, key=lambda o: (-best[o], o))[:budget]
        found.extend((file, other) for other in ranked)
    return found


def crop_candidates(
    ids: np.ndarray,
    vectors: np.ndarray,
    offsets: np.ndarray | None,
    region_ids: np.ndarray,
    regions: np.ndarray,
    region_offsets: Callable[[np.ndarray], np.ndarray | None],
    found: Mapping[tuple[int, int], float],
    floor: float,
    strong: float,
) -> set[tuple[int, int]]:
    """New candidate pairs (low id first, none of ``found``) for files that are crops of
    others: each file with the others whose regions it matches (:func:`region_matches`),
    and with those others' strong partners (pairs of ``found`` scoring at least
    ``strong``), since the file kept for a group of copies is often not the one the crop
    was cut from but a copy of it (a bordered or resized one, with more pixels).
    ``region_offsets(flat regions)`` gives each region's offset, or None."""
    if len(region_ids) == 0 or len(ids) > REGION_SEARCH_LIMIT:
        return set()
    m, r, d = regions.shape
    flat_offsets = region_offsets(regions.reshape(m * r, d))
    grid = None if flat_offsets is None else flat_offsets.reshape(m, r)
    matches = region_matches(ids, vectors, offsets, region_ids, regions, grid, floor)
    partners: dict[int, list[tuple[float, int]]] = {}
    for (i, j), score in found.items():
        if score >= strong:
            partners.setdefault(i, []).append((score, j))
            partners.setdefault(j, []).append((score, i))
    new: set[tuple[int, int]] = set()
    for file, other in matches:
        strongest = sorted(partners.get(other, []), reverse=True)[:STRONG_PARTNERS]
        for partner in (other, *(p for _, p in strongest)):
            key = (min(file, partner), max(file, partner))
            if partner != file and key not in found:
                new.add(key)
    return new
