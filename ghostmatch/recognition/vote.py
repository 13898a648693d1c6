"""The similarity-weighted vote of a query's nearest labelled photos, and its confidence.

A neighbour's weight is its cosine (clipped to [0, 1]) to the power ``WEIGHT_POWER``, so a
close neighbour outvotes several loose ones. A label's score is the power mean of the ``k``
neighbours' cosines, each counted as 0 where the neighbour lacks the label: the cosine
itself when all ``k`` carry it and are equally close, and high only when many of the
nearest labelled photos carry it *and* are close. That is what tells a photo of a known
class from one of an unknown class, whose nearest labelled photos are loose and disagree:
on caltech101 test photos it told them apart better than the winner's share of the vote or
its best cosine (AUROC 0.83 against 0.77 and 0.81; 10 known classes of 24, 8 seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WEIGHT_POWER = 4.0


def label_scores(
    neighbour_labels: Sequence[Sequence[int]], scores: np.ndarray, k: int | None = None
) -> list[tuple[int, float]]:
    """(label, score) of every label the neighbours carry, best first (ties: lower label).

    ``neighbour_labels[i]`` are the labels of neighbour ``i`` (a photo may carry several;
    each gets its full weight), ``scores[i]`` its cosine to the query; ``k`` is the number
    of neighbours asked for (default: as many as given), so that fewer labelled photos
    than that count as less evidence.
    """
    sims = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    weights = sims**WEIGHT_POWER
    votes = max(k or 0, len(weights), 1)
    support: dict[int, float] = {}
    for labels, weight in zip(neighbour_labels, weights.tolist(), strict=True):
        for label in labels:
            support[label] = support.get(label, 0.0) + weight
    ranked = [(label, (s / votes) ** (1.0 / WEIGHT_POWER)) for label, s in support.items()]
    return sorted(ranked, key=lambda item: (-item[1], item[0]))
