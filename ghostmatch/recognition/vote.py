"""The similarity-weighted vote of a query's nearest labelled photos, and its confidence.

A neighbour's weight is its cosine (clipped to [0, 1]) to the power ``WEIGHT_POWER``, so a
close neighbour outvotes several loose ones. A label's score is the share of the weight its
neighbours carry times the best cosine among them: high only when the neighbours agree
*and* are close, which is what tells a photo of a known class from one of an unknown class
(whose nearest labelled photos are loose and disagree).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WEIGHT_POWER = 4.0


def label_scores(
    neighbour_labels: Sequence[Sequence[int]], scores: np.ndarray
) -> list[tuple[int, float]]:
    """(label, score) of every label the neighbours carry, best first (ties: lower label).

    ``neighbour_labels[i]`` are the labels of neighbour ``i`` (a photo may carry several;
    each gets its full weight), ``scores[i]`` its cosine to the query.
    """
    sims = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    weights = sims**WEIGHT_POWER
    total = float(weights.sum())
    support: dict[int, float] = {}
    best: dict[int, float] = {}
    for labels, weight, sim in zip(neighbour_labels, weights.tolist(), sims.tolist(), strict=True):
        for label in labels:
            support[label] = support.get(label, 0.0) + weight
            best[label] = max(best.get(label, 0.0), sim)
    if total <= 0.0:
        return sorted(((label, 0.0) for label in support), key=lambda item: item[0])
    ranked = [(label, support[label] / total * best[label]) for label in support]
    return sorted(ranked, key=lambda item: (-item[1], item[0]))
