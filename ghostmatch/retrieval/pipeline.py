"""A refined query: the plain search's shortlist ranked anew by the refinements asked for
(query augmentation, whitening, DBA, alpha-QE, local-feature re-ranking), in that order."""

from __future__ import annotations

import contextlib
import os
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
from ghostmatch.retrieval.rerank import boost, inliers, scaled_maps, zoomed_card
from ghostmatch.retrieval.whitening import Whitening, learn_whitening

if TYPE_CHECKING:
    from ghostmatch.model.binding import ImageLike
    from ghostmatch.search import Searcher

# Learnt from the collection, the whitening is kept in the index folder and learnt again
# once the number of indexed images has moved this far (as a share) from what it saw.
WHITENING_FILE = "whitening.npz"
RELEARN_CHANGE = 0.1


def refined(
    searcher: Searcher,
    x: ImageLike,
    vector: np.ndarray,
    pairs: list[tuple[int, float]],
    refine: Refinements,
) -> tuple[list[tuple[int, float]], dict[int, int]]:
    """``pairs`` (id, plain cosine), best first, ranked anew: (id, score) pairs and the
    inlier counts of the results that were re-ranked."""
    ids, vectors = searcher.catalog.vectors([i for i, _ in pairs])
    if len(ids) == 0:
        return [], {}
    image = _image(x, searcher) if refine.augment != "none" or refine.rerank else None
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
        found = _inliers(searcher, image, [i for i, _ in top])
        lifted = boost(
            np.array([s for _, s in top]),
            np.array([found[i] for i, _ in top]),
            refine.rerank_weight,
        )
        again = np.argsort(-lifted, kind="stable")
        ranked = [(top[r][0], float(lifted[r])) for r in again] + ranked[refine.rerank :]
        counts = found
    return ranked, counts


def _image(x: ImageLike, searcher: Searcher) -> Image.Image:
    """The query as an RGB image, decoded large enough for the zoomed local maps."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        return image_from_array(x)
    size = zoomed_card(searcher.model.embedder.card).input_size
    try:
        return load_image(x, min_side=size).image
    except ImageRejected as err:
        raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err


def _inliers(searcher: Searcher, image: Image.Image, ids: list[int]) -> dict[int, int]:
    """Each indexed image's inlier count against the query (0 if it cannot be read)."""
    embedder = searcher.model.embedder
    card = embedder.card
    size = zoomed_card(card).input_size
    records = {r.id: r for r in searcher.catalog.get(ids)}

    def decode(i: int) -> Image.Image | None:
        record = records.get(i)
        if record is None:
            return None
        try:
            return load_image(record.path, min_side=size).image
        except ImageRejected:
            return None

    with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:
        decoded = list(pool.map(decode, ids))
    readable = [d for d in decoded if d is not None]
    model = embedder.local_model
    query_maps, *maps = scaled_maps(model, card, [image, *readable])
    found = iter(maps)
    candidates = [None if d is None else next(found) for d in decoded]
    return dict(zip(ids, inliers(query_maps, candidates).tolist(), strict=True))


def whitening_for(searcher: Searcher, refine: Refinements) -> Whitening:
    """The whitening ``refine`` asks for: from the model file's training descriptors, or
    from the collection (kept in the index folder, learnt again when it has grown or
    shrunk by more than ``RELEARN_CHANGE``)."""
    if refine.whiten == "training":
        norm = searcher.model.embedder.model.score_norm
        if norm is None:
            raise GhostmatchError(
                "the index's model carries no training descriptors to learn whitening from; "
                "whiten with the collection instead, or not at all"
            )
        return learn_whitening(norm.background, refine.shrinkage)
    card = searcher.model.card
    fingerprint = card.fingerprint if card is not None else ""
    count = searcher.catalog.count()
    file = searcher.vectors.path / WHITENING_FILE
    try:
        stored, stamp = Whitening.load(file)
    except (OSError, ValueError, KeyError):
        stored, stamp = None, {}
    if (
        stored is not None
        and stamp.get("fingerprint") == fingerprint
        and stamp.get("shrinkage") == refine.shrinkage
        and abs(count - stored.learnt_on) <= RELEARN_CHANGE * stored.learnt_on
    ):
        return stored
    _, vectors = searcher.catalog.vectors()
    learnt = learn_whitening(vectors, refine.shrinkage)
    # A read-only index learns it again next time.
    with contextlib.suppress(OSError):
        learnt.save(file, fingerprint=fingerprint, shrinkage=refine.shrinkage)
    return learnt
