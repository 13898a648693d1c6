"""A refined query: the plain search's shortlist ranked anew by the refinements asked for
(query augmentation, whitening, DBA, alpha-QE, local-feature re-ranking), in that order."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.pathtext import path_text
from ghostmatch.retrieval.augment import augmented
from ghostmatch.retrieval.expansion import alpha_qe, dba
from ghostmatch.retrieval.refine import Refinements
from ghostmatch.retrieval.rerank import blend, inliers, local_maps, map_card
from ghostmatch.retrieval.whitening import Whitening, learn_whitening

if TYPE_CHECKING:
    from ghostmatch.model.binding import ImageLike
    from ghostmatch.search import Searcher

# Learnt from the collection, the whitening is kept in the index folder and learnt again
# once the number of indexed images has moved this far (as a share) from what it saw.
WHITENING_FILE = "whitening.npz"
RELEARN_CHANGE = 0.1
# Indexed images whose local maps a searcher keeps for re-ranking (about 0.06 MB each,
# fp16, at the bundled model's 160 px).
MAP_CACHE_IMAGES = 1024
# An indexed image's local maps are kept under its catalog id, file size and mtime.
MapKey = tuple[int, int, int]


def refined(
    searcher: Searcher,
    x: ImageLike,
    vector: np.ndarray,
    pairs: list[tuple[int, float]],
    refine: Refinements,
    own: int | None = None,
) -> tuple[list[tuple[int, float]], dict[int, int]]:
    """``pairs`` (id, plain cosine), best first, ranked anew: (id, score) pairs and the
    inlier counts of the results that were re-ranked. ``own``: the catalog id of ``x``
    when it is an indexed path, whose kept local maps then serve as the query's."""
    ids, vectors = searcher.catalog.vectors([i for i, _ in pairs])
    if len(ids) == 0:
        return [], {}
    image = query_image(x, searcher) if looks_again(refine) else None
    query = vector
    if image is not None:
        query = augmented(searcher.model.embedder, image, vector, refine.augment)
    if refine.whiten != "none":
        whitening = whitening_for(searcher, refine)
        query, vectors = whitening.apply(query)[0], whitening.apply(vectors)
    vectors = dba(vectors, refine.dba, refine.alpha)
    query = alpha_qe(query, vectors, refine.expand, refine.alpha)
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    ranked = [(int(ids[r]), float(scores[r])) for r in order]
    counts: dict[int, int] = {}
    if refine.rerank and image is not None:
        top = ranked[: refine.rerank]
        found = _inliers(searcher, image, [i for i, _ in top], _own_key(searcher, x, own))
        lifted = blend(
            np.array([s for _, s in top]),
            np.array([found[i] for i, _ in top]),
            refine.rerank_weight,
        )
        again = np.argsort(-lifted, kind="stable")
        # The rest are blended with no inliers, so that scores fall with rank and a
        # minimum score means the same above and below the re-ranked part.
        rest = [(i, s / (1.0 + refine.rerank_weight)) for i, s in ranked[refine.rerank :]]
        ranked = [(top[r][0], float(lifted[r])) for r in again] + rest
        counts = found
    return ranked, counts


def looks_again(refine: Refinements) -> bool:
    """Whether ``refine`` needs the query's pixels, not only its descriptor."""
    return refine.augment != "none" or refine.rerank > 0


def query_image(x: ImageLike, searcher: Searcher) -> Image.Image:
    """The query as an RGB image, decoded large enough for the local maps."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        return image_from_array(x)
    size = map_card(searcher.model.embedder.card).input_size
    try:
        return load_image(x, min_side=size).image
    except ImageRejected as err:
        raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err


def _own_key(searcher: Searcher, x: ImageLike, own: int | None) -> MapKey | None:
    """The map cache's key of the query when it is an indexed file unchanged since it was
    indexed (a changed one is not what its kept maps describe)."""
    if own is None or not isinstance(x, str | os.PathLike):
        return None
    records = searcher.catalog.get([own])
    if not records:
        return None
    record = records[0]
    try:
        st = os.stat(x)
    except OSError:
        return None
    if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
        return None
    return (record.id, record.size, record.mtime_ns)


def _inliers(
    searcher: Searcher, image: Image.Image, ids: list[int], own: MapKey | None = None
) -> dict[int, int]:
    """Each indexed image's inlier count against the query (0 if it cannot be read).

    Indexed images' maps are kept (``MAP_CACHE_IMAGES`` of them, least recently used
    dropped first, keyed by file size and mtime too): the results of one query are often
    the results of the next, and a map costs a pass of the network. An indexed query (key
    ``own``) is one of those images: its kept map, and its mirror image's, are the query's.
    The query's maps go through the same half precision either way, so that an answer does
    not depend on what was kept.
    """
    embedder = searcher.model.embedder
    card = embedder.card
    size = map_card(card).input_size
    cache: OrderedDict[MapKey, np.ndarray | None]
    cache = searcher.cache.setdefault("local_maps", OrderedDict())
    mirrors: OrderedDict[MapKey, np.ndarray]
    mirrors = searcher.cache.setdefault("mirrored_maps", OrderedDict())
    records = {r.id: r for r in searcher.catalog.get(ids)}
    keys = {i: (i, r.size, r.mtime_ns) for i, r in records.items()}
    missing = [i for i in ids if i in keys and keys[i] not in cache]
    kept_query = cache.get(own) if own is not None else None
    kept_mirror = mirrors.get(own) if own is not None else None

    def decode(i: int) -> Image.Image | None:
        try:
            return load_image(records[i].path, min_side=size).image
        except ImageRejected:
            return None

    with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:
        decoded = list(pool.map(decode, missing))
    readable = [d for d in decoded if d is not None]
    if kept_query is not None and kept_mirror is not None:
        maps = local_maps(embedder.local_maps_model, card, readable)
        query, mirrored = kept_query, kept_mirror
    else:
        # The query, its results, and the query mirrored, in one batch.
        fresh_query, *maps, fresh_mirror = local_maps(
            embedder.local_maps_model, card, [image, *readable], mirrored=1
        )
        query, mirrored = _half(fresh_query), _half(fresh_mirror)
        if own is not None:
            cache[own], mirrors[own] = query, mirrored
    fresh = iter(maps)
    for i, d in zip(missing, decoded, strict=True):
        cache[keys[i]] = None if d is None else _half(next(fresh))
    candidates: list[np.ndarray | None] = []
    for i in ids:
        key = keys.get(i)
        if key is None:
            candidates.append(None)
            continue
        cache.move_to_end(key)
        found = cache[key]
        candidates.append(None if found is None else _single(found))
    if own is not None and own in cache:
        cache.move_to_end(own)
    if own is not None and own in mirrors:
        mirrors.move_to_end(own)
    while len(cache) > max(MAP_CACHE_IMAGES, len(ids) + 1):
        cache.popitem(last=False)
    while len(mirrors) > MAP_CACHE_IMAGES:
        mirrors.popitem(last=False)
    counts = inliers(_single(query), _single(mirrored), candidates)
    return dict(zip(ids, counts.tolist(), strict=True))


def _half(found: np.ndarray) -> np.ndarray:
    return found.astype(np.float16)


def _single(found: np.ndarray) -> np.ndarray:
    return found.astype(np.float32)


def whitening_for(searcher: Searcher, refine: Refinements) -> Whitening:
    """The whitening ``refine`` asks for: from the model file's training descriptors, or
    from the collection (kept in the index folder, learnt again when it has grown or
    shrunk by more than ``RELEARN_CHANGE``)."""
    kept: dict[tuple[str, float], Whitening] = searcher.cache.setdefault("whitening", {})
    key = (refine.whiten, refine.shrinkage)
    if refine.whiten == "training":
        if key not in kept:
            norm = searcher.model.embedder.score_norm
            if norm is None:
                raise GhostmatchError(
                    "the index's model carries no training descriptors to learn whitening "
                    "from; whiten with the collection instead, or not at all"
                )
            kept[key] = learn_whitening(norm.background, refine.shrinkage)
        return kept[key]
    count = searcher.catalog.count()
    held = kept.get(key)
    if held is not None and _fresh(held, count):
        return held
    card = searcher.model.card
    fingerprint = card.fingerprint if card is not None else ""
    file = searcher.vectors.path / WHITENING_FILE
    try:
        stored, stamp = Whitening.load(file)
    except (OSError, ValueError, KeyError):
        stored, stamp = None, {}
    if (
        stored is not None
        and stamp.get("fingerprint") == fingerprint
        and stamp.get("shrinkage") == refine.shrinkage
        and _fresh(stored, count)
    ):
        kept[key] = stored
        return stored
    _, vectors = searcher.catalog.vectors()
    learnt = learn_whitening(vectors, refine.shrinkage)
    # A read-only index learns it again in each process.
    with contextlib.suppress(OSError):
        learnt.save(file, fingerprint=fingerprint, shrinkage=refine.shrinkage)
    kept[key] = learnt
    return learnt


def _fresh(whitening: Whitening, count: int) -> bool:
    """Whether a whitening still stands for a collection of ``count`` images."""
    return abs(count - whitening.learnt_on) <= RELEARN_CHANGE * whitening.learnt_on
