"""Re-ranking of a query's top results by local-feature agreement.

Another shot of the same object, taken a moment later, shows the same surfaces from
nearly the same viewpoint: its stride-16 GhostNet features match the query's and most
of those matches agree on one affine map, as a copy's do, while a merely similar photo's
matches agree on none. The check is the duplicate finder's own
(``ghostmatch.dupes.verify``); here its inlier count lifts the results it confirms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from ghostmatch.dupes.verify import ZOOM, ScaledMaps, local_features, verify_scales
from ghostmatch.model.card import ModelCard
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.embedder import prepare, to_batch

# Inliers beyond this count add nothing: a result with this many is confirmed.
INLIER_CAP = 40


def zoomed_card(card: ModelCard) -> ModelCard:
    """The card at ``ZOOM`` times the input size, rounded to the network's stride."""
    return card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)


def scaled_maps(
    model: Descriptor, card: ModelCard, images: Sequence[Image.Image]
) -> list[ScaledMaps]:
    """Each image's local maps at the input size, mirrored, and zoomed (float32)."""
    if not images:
        return []
    n = len(images)
    base = local_features(
        model,
        to_batch(
            [prepare(i, card) for i in images] + [prepare(ImageOps.mirror(i), card) for i in images]
        ),
    )
    zoom = zoomed_card(card)
    zoomed = local_features(model, to_batch([prepare(i, zoom) for i in images]))
    return [ScaledMaps(base[k], base[n + k], zoomed[k]) for k in range(n)]


def inliers(query: ScaledMaps, candidates: Sequence[ScaledMaps | None]) -> np.ndarray:
    """How many of the query's local matches with each candidate fit one affine map
    (0 for a candidate whose image could not be read)."""
    return np.array(
        [
            0 if maps is None else verify_scales(maps, query, INLIER_CAP).inliers
            for maps in candidates
        ],
        dtype=np.int64,
    )


def blend(scores: np.ndarray, counts: np.ndarray, weight: float) -> np.ndarray:
    """Re-ranking scores, still in [-1, 1]: each score and its share of ``INLIER_CAP``
    inliers, weighted 1 : ``weight``."""
    return (scores + weight * np.minimum(counts, INLIER_CAP) / INLIER_CAP) / (1.0 + weight)
