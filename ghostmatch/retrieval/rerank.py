"""Re-ranking of a query's top results by local-feature agreement.

Another shot of the same object, taken a moment later, shows the same surfaces from
nearly the same viewpoint: its stride-16 GhostNet features match the query's and most
of those matches agree on one affine map, as a copy's do, while a merely similar photo's
matches agree on none. The check is the duplicate finder's own
(``ghostmatch.dupes.verify.verify_pair``); here its inlier count lifts the results it
confirms.

Unlike the duplicate finder, which tries each pair at two scales, re-ranking takes one map
per image at ``MAP_SCALE`` times the input size (16 x 16 cells at the bundled model's
160 px): on ukbench-dev that one finer map confirms other shots as well as the finder's
three maps do, for a third of the network's work, and the network passes are nearly all
of a re-ranked query's cost. Only the query is also mirrored, so that a flipped copy is
still confirmed (:func:`inliers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps
from threadpoolctl import threadpool_limits

from ghostmatch.dupes.verify import ZOOM, local_features, verify_pair
from ghostmatch.model.card import ModelCard
from ghostmatch.model.embedder import prepare, to_batch

if TYPE_CHECKING:
    from ghostmatch.model.descriptor import Descriptor
    from ghostmatch.model.exports import ExportedModel

# The local maps' input size as a multiple of the model's own (rounded to the stride).
MAP_SCALE = ZOOM
# Inliers beyond this count add nothing: a result with this many is confirmed.
INLIER_CAP = 20


def map_card(card: ModelCard) -> ModelCard:
    """The card at ``MAP_SCALE`` times the input size, rounded to the network's stride."""
    return card.with_changes(input_size=round(card.input_size * MAP_SCALE / 16) * 16)


def local_maps(
    model: Descriptor | ExportedModel,
    card: ModelCard,
    images: Sequence[Image.Image],
    mirrored: int = 0,
) -> list[np.ndarray]:
    """Each image's local map (h, w, c) float32 at ``map_card(card)``'s size, in one
    batch, followed by the maps of the first ``mirrored`` images' mirror images (``model``
    as ``ghostmatch.dupes.verify.local_features`` takes it)."""
    if not images:
        return []
    size = map_card(card)
    views = [prepare(i, size) for i in images]
    views += [prepare(ImageOps.mirror(i), size) for i in images[:mirrored]]
    return list(local_features(model, to_batch(views)))


def inliers(
    query: np.ndarray, query_mirrored: np.ndarray | None, candidates: Sequence[np.ndarray | None]
) -> np.ndarray:
    """How many of the query's local matches with each candidate fit one affine map (0 for
    a candidate whose image could not be read).

    The mirrored query counts only where it confirms a result (``INLIER_CAP`` inliers or
    more) and the query as it is does not: a flipped copy is confirmed, while the mirror
    image's chance fits, which the better of two fits would add to every unrelated
    result, are left out.

    BLAS runs on one thread meanwhile: each check multiplies matrices of a few hundred rows,
    where a pool's idle threads only spin, and on two busy cores that spinning made a
    query's checks take twenty times the CPU of one thread.
    """
    counts = np.zeros(len(candidates), dtype=np.int64)
    with threadpool_limits(1, user_api="blas"):
        for n, found in enumerate(candidates):
            if found is None:
                continue
            counts[n] = verify_pair(found, query).inliers
            if query_mirrored is not None and counts[n] < INLIER_CAP:
                flipped = verify_pair(found, query_mirrored).inliers
                if flipped >= INLIER_CAP:
                    counts[n] = flipped
    return counts


def blend(scores: np.ndarray, counts: np.ndarray, weight: float) -> np.ndarray:
    """Re-ranking scores, still in [-1, 1]: each score and its share of ``INLIER_CAP``
    inliers, weighted 1 : ``weight``."""
    return (scores + weight * np.minimum(counts, INLIER_CAP) / INLIER_CAP) / (1.0 + weight)
