"""Metrics against hand-computed values and brute force over tie orders."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.metrics import (
    PRCurve,
    average_precision,
    pair_metrics,
    pick_threshold,
    plot_pr,
    precision_recall_curve,
    recall_at_precision,
    retrieval_metrics,
    retrieval_metrics_from_neighbors,
)


def _ap_of_order(labels: list[int], n_positive: int) -> float:
    hits, total = 0, 0.0
    for rank, label in enumerate(labels, start=1):
        if label:
            hits += 1
            total += hits / rank
    return total / n_positive


def _expected_ap_brute_force(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean AP over every order of the tied scores."""
    blocks = [
        [int(labels[i]) for i in np.flatnonzero(scores == value)]
        for value in sorted(set(scores.tolist()), reverse=True)
    ]
    per_block = [sorted(set(itertools.permutations(block))) for block in blocks]
    # Every distinct label order of a block stands for the same number of item orders.
    aps = [
        _ap_of_order([label for block in orders for label in block], int(labels.sum()))
        for orders in itertools.product(*per_block)
    ]
    return float(np.mean(aps))


def test_average_precision_of_a_ranking() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert average_precision(scores, [1, 0, 1, 0, 1]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(scores, [1, 1, 0, 0, 0]) == pytest.approx(1.0)
    # Input order does not matter, only the scores.
    assert average_precision(scores[::-1], [1, 0, 1, 0, 1][::-1]) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )


def test_average_precision_with_ties_is_the_mean_over_tie_orders() -> None:
    # The positive is at rank 2 or rank 3 with equal chance: (1/2 + 1/3) / 2.
    assert average_precision([0.9, 0.5, 0.5], [0, 1, 0]) == pytest.approx(5 / 12)
    assert average_precision([0.9, 0.5, 0.5], [0, 0, 1]) == pytest.approx(5 / 12)
    # All tied: [1, 0] or [0, 1].
    assert average_precision([1.0, 1.0], [1, 0]) == pytest.approx((1 + 1 / 2) / 2)


def test_average_precision_matches_brute_force_on_random_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores = rng.integers(0, 3, size=7).astype(float)
        labels = rng.integers(0, 2, size=7)
        if labels.sum() == 0:
            continue
        assert average_precision(scores, labels) == pytest.approx(
            _expected_ap_brute_force(scores, labels)
        )


def test_positives_never_scored_lower_ap_and_recall() -> None:
    scores, labels = [0.9, 0.8, 0.7], [1, 1, 0]
    assert average_precision(scores, labels) == pytest.approx(1.0)
    assert average_precision(scores, labels, n_positive_total=4) == pytest.approx(0.5)
    metrics = pair_metrics(scores, labels, n_positive_total=4, threshold=0.75)
    assert metrics.micro_ap == pytest.approx(0.5)
    assert metrics.recall == pytest.approx(0.5)
    assert metrics.precision == pytest.approx(1.0)
    assert metrics.recall_at_p99 == pytest.approx(0.5)
    assert (metrics.n_pairs, metrics.n_positive_retrieved, metrics.n_positive) == (3, 2, 4)
    with pytest.raises(ValueError):
        average_precision(scores, labels, n_positive_total=1)
    assert math.isnan(average_precision(scores, [0, 0, 0]))


def test_precision_recall_curve_groups_ties() -> None:
    curve = precision_recall_curve([0.9, 0.7, 0.7, 0.1], [1, 1, 0, 1], n_positive_total=4)
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.7, 0.1])
    np.testing.assert_allclose(curve.precision, [1.0, 2 / 3, 3 / 4])
    np.testing.assert_allclose(curve.recall, [0.25, 0.5, 0.75])


def test_recall_at_precision_takes_the_lowest_threshold_that_qualifies() -> None:
    # Precision by threshold: .95 -> 1, .9 -> 1, .8 -> 2/3, .7 -> 3/4, .6 -> 4/5, .5 -> 4/6.
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 1, 0, 1, 1, 0]
    assert recall_at_precision(scores, labels, 0.8, n_positive_total=5) == (
        pytest.approx(4 / 5),
        pytest.approx(0.6),
    )
    assert recall_at_precision(scores, labels, 0.99, n_positive_total=5) == (
        pytest.approx(2 / 5),
        pytest.approx(0.9),
    )
    assert recall_at_precision([0.9, 0.8], [0, 1], 0.9) == (0.0, math.inf)


def test_pick_threshold_on_labelled_pairs() -> None:
    scores = [0.97, 0.93, 0.91, 0.88, 0.85, 0.80, 0.75, 0.60]
    same = [True, True, True, False, True, True, False, False]
    # At 0.80: 5 same out of 6 accepted (0.833); at 0.85: 4 of 5 (0.8); at 0.91: 3 of 3.
    choice = pick_threshold(scores, same, precision=0.8)
    assert choice.threshold == pytest.approx(0.80)
    assert choice.precision == pytest.approx(5 / 6)
    assert choice.recall == pytest.approx(1.0)
    assert (choice.support, choice.n_same, choice.n_different) == (6, 5, 3)
    strict = pick_threshold(scores, same, precision=0.95)
    assert strict.threshold == pytest.approx(0.91)
    assert (strict.support, strict.recall) == (3, pytest.approx(3 / 5))
    with pytest.raises(GhostmatchError, match="no threshold reaches"):
        pick_threshold([0.9, 0.8], [False, True], precision=0.9)
    with pytest.raises(GhostmatchError, match="none of the"):
        pick_threshold([0.9, 0.8], [False, False], precision=0.9)


def test_retrieval_metrics_on_a_small_matrix() -> None:
    labels = np.array(["a", "a", "b", "b", "c"])
    sim = np.array(
        [
            [1.0, 0.9, 0.1, 0.2, 0.0],
            [0.9, 1.0, 0.3, 0.95, 0.0],
            [0.1, 0.3, 1.0, 0.2, 0.8],
            [0.2, 0.95, 0.2, 1.0, 0.1],
            [0.0, 0.0, 0.8, 0.1, 1.0],
        ]
    )
    result = retrieval_metrics(sim, labels, knn_k=1)
    # Query APs: 0 -> 1; 1 -> 1/2 (its pair is second); 2 -> 1/3 (after 4 and 1);
    # 3 -> 1/3 (after 1, then 2 ties with 0 at 0.2: rank 2 or 3). Item 4 has no partner.
    ap_3 = (1 / 2 + 1 / 3) / 2
    assert result.n_queries == 4
    assert result.map == pytest.approx((1 + 1 / 2 + 1 / 3 + ap_3) / 4)
    assert result.recall_at_1 == pytest.approx(1 / 4)
    assert result.recall_at_5 == pytest.approx(1.0)
    assert result.knn_top1 == pytest.approx(1 / 5)
    assert result.per_class == {"a": pytest.approx(3 / 4), "b": pytest.approx((1 / 3 + ap_3) / 2)}


def test_truncated_neighbour_lists_count_missing_items_as_misses() -> None:
    labels = [0, 0, 0, 1]
    # Query 0 finds itself and one of its two partners; -1 pads short rows.
    neighbors = [[0, 1, -1], [1, 0, 2], [2, 3, 0], [3, 2, -1]]
    scores = [[1.0, 0.9, 0.0], [1.0, 0.9, 0.8], [1.0, 0.7, 0.6], [1.0, 0.7, 0.0]]
    result = retrieval_metrics_from_neighbors(neighbors, scores, labels, knn_k=2)
    assert result.n_queries == 3
    # Query 2 ranks a partner second and never finds the other: (1/2) / 2.
    assert result.map == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)
    assert result.recall_at_1 == pytest.approx(2 / 3)


def test_plot_pr_writes_an_image(tmp_path: Path) -> None:
    curve = precision_recall_curve([0.9, 0.5, 0.4], [1, 0, 1])
    empty = PRCurve(np.zeros(0), np.zeros(0), np.zeros(0))
    plot_pr({"model": curve, "empty": empty}, tmp_path / "pr.png", title="pairs")
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
