"""Retrieval and duplicate-pair metrics over similarity scores (higher = more alike).

Ties: average precision is the expected AP over all orders of tied scores (McSherry and
Najork, ECIR 2008); thresholds accept every pair with ``score >= threshold``, so tied pairs
are always accepted or rejected together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ghostmatch.errors import GhostmatchError

# Precisions are ratios of counts; allow for the last bit of float rounding.
_PRECISION_SLACK = 1e-12


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall at every distinct score, highest threshold first.

    ``thresholds``, ``precision`` and ``recall`` are float64 arrays of shape (m,); point ``i``
    accepts the pairs with ``score >= thresholds[i]``. Recall is over all positives,
    including any never scored.
    """

    thresholds: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]


@dataclass(frozen=True)
class PairMetrics:
    """Quality of scored candidate pairs against a set of true duplicate pairs.

    ``micro_ap`` is AP over all candidate pairs ranked together, divided by ``n_positive``.
    ``recall_at_pXX`` is the best recall among thresholds whose precision is at least XX%,
    found at ``threshold_at_pXX`` (``inf`` and recall 0 when none is). ``precision`` and
    ``recall`` are at the given ``threshold`` (None when none was given; precision is nan
    when nothing reaches it). ``n_pairs`` pairs were scored, ``n_positive_retrieved`` of
    them are true, out of ``n_positive`` true pairs in all.
    """

    micro_ap: float
    recall_at_p90: float
    threshold_at_p90: float
    recall_at_p99: float
    threshold_at_p99: float
    threshold: float | None
    precision: float | None
    recall: float | None
    n_pairs: int
    n_positive_retrieved: int
    n_positive: int


@dataclass(frozen=True)
class RetrievalMetrics:
    """Each item queried against all the others (itself excluded), classes as relevance.

    ``map`` and ``recall_at_k`` average over the ``n_queries`` items that have at least one
    other item of their class; ``recall_at_k`` is the fraction with such an item in the top
    ``k``. ``knn_top1`` is the accuracy, over all items, of a majority vote of the labels of
    the top ``knn_k`` neighbours (ties go to the class seen first). ``per_class`` maps
    ``str(label)`` to the mean AP of that class's queries.
    """

    map: float
    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    knn_top1: float
    n_queries: int
    per_class: dict[str, float]


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold picked on labelled pairs: accept ``score >= threshold``.

    ``precision`` and ``recall`` are measured on those pairs at the threshold, ``support``
    pairs score at or above it, and the labelled set had ``n_same`` duplicate and
    ``n_different`` non-duplicate pairs in all.
    """

    threshold: float
    precision: float
    recall: float
    support: int
    n_same: int
    n_different: int


def average_precision(
    scores: npt.ArrayLike, labels: npt.ArrayLike, n_positive_total: int | None = None
) -> float:
    """AP of the ranking by descending score: mean over positives of precision at their rank.

    Tied scores give the expected AP over their orders, so the result does not depend on
    input order. Dividing by ``n_positive_total`` (default: positives in ``labels``) makes
    positives that were never scored count as missed. nan when there are no positives.
    """
    score, label = _pairs(scores, labels)
    n_positive = _positive_total(label, n_positive_total)
    if n_positive == 0:
        return math.nan
    if score.size == 0:
        return 0.0
    order = np.argsort(-score, kind="stable")
    score, relevant = score[order], label[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])
    sizes = np.diff(np.r_[starts, score.size])
    block = np.repeat(np.arange(starts.size), sizes)
    in_block = np.add.reduceat(relevant, starts)
    before_block = np.cumsum(in_block) - in_block
    n, r, c = sizes[block].astype(np.float64), in_block[block], before_block[block]
    rank = np.arange(1, score.size + 1, dtype=np.float64)
    offset = rank - 1 - starts[block]
    # In a block of n tied items with r relevant after c relevant ones, the item at offset j
    # is relevant with probability r/n, and then (r-1)/(n-1) of the j before it are too.
    others = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    expected = (r / n) * (c + 1 + offset * others) / rank
    return float(expected.sum() / n_positive)


def precision_recall_curve(
    scores: npt.ArrayLike, labels: npt.ArrayLike, n_positive_total: int | None = None
) -> PRCurve:
    """Precision and recall at each distinct score; see ``PRCurve``."""
    score, label = _pairs(scores, labels)
    n_positive = _positive_total(label, n_positive_total)
    order = np.argsort(-score, kind="stable")
    score, label = score[order], label[order]
    ends = np.flatnonzero(np.r_[score[1:] != score[:-1], True]) if score.size else np.array([])
    ends = ends.astype(np.intp)
    true_positives = np.cumsum(label, dtype=np.float64)[ends]
    accepted = (ends + 1).astype(np.float64)
    recall = true_positives / n_positive if n_positive else np.full(ends.size, math.nan)
    return PRCurve(thresholds=score[ends], precision=true_positives / accepted, recall=recall)


def recall_at_precision(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    precision: float,
    n_positive_total: int | None = None,
) -> tuple[float, float]:
    """(recall, threshold) at the lowest threshold whose precision is at least ``precision``.

    Recall only grows as the threshold falls, so this is the best recall at that precision.
    ``(0.0, inf)`` when no threshold reaches it.
    """
    curve = precision_recall_curve(scores, labels, n_positive_total)
    index = _lowest_meeting(curve, precision)
    if index is None:
        return 0.0, math.inf
    return float(curve.recall[index]), float(curve.thresholds[index])


def pair_metrics(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    n_positive_total: int | None = None,
    threshold: float | None = None,
) -> PairMetrics:
    """Summarise scored candidate pairs; ``labels`` says which are true duplicates.

    ``n_positive_total`` counts all true pairs, including those never proposed as
    candidates, which count against recall and AP (default: the positives in ``labels``).
    """
    score, label = _pairs(scores, labels)
    n_positive = _positive_total(label, n_positive_total)
    recall_90, threshold_90 = recall_at_precision(score, label, 0.90, n_positive)
    recall_99, threshold_99 = recall_at_precision(score, label, 0.99, n_positive)
    precision = recall = None
    if threshold is not None:
        accepted = score >= threshold
        hits = int(label[accepted].sum())
        precision = hits / int(accepted.sum()) if accepted.any() else math.nan
        recall = hits / n_positive if n_positive else math.nan
    return PairMetrics(
        micro_ap=average_precision(score, label, n_positive),
        recall_at_p90=recall_90,
        threshold_at_p90=threshold_90,
        recall_at_p99=recall_99,
        threshold_at_p99=threshold_99,
        threshold=threshold,
        precision=precision,
        recall=recall,
        n_pairs=int(score.size),
        n_positive_retrieved=int(label.sum()),
        n_positive=n_positive,
    )


def check_precision(precision: float) -> None:
    """Refuse a target precision outside (0, 1]."""
    if not 0.0 < precision <= 1.0:
        raise GhostmatchError(f"precision must be in (0, 1], got {precision}")


def pick_threshold(scores: npt.ArrayLike, same: npt.ArrayLike, precision: float) -> ThresholdChoice:
    """The lowest threshold whose precision on the labelled pairs is at least ``precision``.

    ``same[i]`` says whether pair ``i`` is a duplicate. Raises ``GhostmatchError`` when the
    labels cannot support the requested precision.
    """
    check_precision(precision)
    score, label = _pairs(scores, same)
    n_same = int(label.sum())
    if n_same == 0:
        raise GhostmatchError(
            f"none of the {score.size} labelled pairs is marked as the same image; "
            "label some duplicates first"
        )
    curve = precision_recall_curve(score, label)
    index = _lowest_meeting(curve, precision)
    if index is None:
        raise GhostmatchError(
            f"no threshold reaches precision {precision:.3f} on these {score.size} labelled "
            f"pairs (best is {curve.precision.max():.3f}); label more pairs or ask for a "
            "lower precision"
        )
    threshold = float(curve.thresholds[index])
    return ThresholdChoice(
        threshold=threshold,
        precision=float(curve.precision[index]),
        recall=float(curve.recall[index]),
        support=int((score >= threshold).sum()),
        n_same=n_same,
        n_different=int(score.size - n_same),
    )


def retrieval_metrics(
    sim: npt.ArrayLike, labels: npt.ArrayLike, knn_k: int = 10
) -> RetrievalMetrics:
    """Metrics from an (n, n) similarity matrix; row ``i`` scores query ``i`` against all.

    Items are ranked by descending similarity; equal similarities keep index order for
    ``recall_at_k`` and the kNN vote, and AP averages over their orders.
    """
    matrix = np.asarray(sim, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"sim must be a square matrix, got shape {matrix.shape}")
    neighbors = np.argsort(-matrix, axis=1, kind="stable")
    scores = np.take_along_axis(matrix, neighbors, axis=1)
    return retrieval_metrics_from_neighbors(neighbors, scores, labels, knn_k)


def retrieval_metrics_from_neighbors(
    neighbors: npt.ArrayLike, scores: npt.ArrayLike, labels: npt.ArrayLike, knn_k: int = 10
) -> RetrievalMetrics:
    """Metrics from ranked (n, k) neighbour ids and scores, best first, as a search returns.

    The query itself and ``-1`` padding are dropped from each row; same-class items missing
    from a row count as not found.
    """
    ids = np.asarray(neighbors, dtype=np.int64)
    similarity = np.asarray(scores, dtype=np.float64)
    label_values = np.asarray(labels)
    n = label_values.shape[0]
    if ids.ndim != 2 or ids.shape[0] != n or similarity.shape != ids.shape:
        raise ValueError(
            f"need (n, k) neighbours and scores for n={n} labels, got {ids.shape} and "
            f"{similarity.shape}"
        )
    if ids.size and ids.max() >= n:
        raise ValueError("neighbour id out of range of labels")
    classes, class_of = np.unique(label_values, return_inverse=True)
    class_of = class_of.reshape(-1)
    class_sizes = np.bincount(class_of, minlength=classes.size)

    ap_by_class: dict[int, list[float]] = {}
    hits = {1: 0, 5: 0, 10: 0}
    knn_correct = 0
    for query in range(n):
        keep = (ids[query] >= 0) & (ids[query] != query)
        found, found_scores = ids[query][keep], similarity[query][keep]
        own = class_of[query]
        relevant = class_of[found] == own
        nearest = class_of[found[:knn_k]].tolist()
        votes = Counter(nearest)
        if votes:
            best = max(votes.values())
            winner = next(c for c in nearest if votes[c] == best)
            knn_correct += int(winner == own)
        n_relevant = int(class_sizes[own]) - 1
        if n_relevant == 0:
            continue
        ap = average_precision(found_scores, relevant, n_positive_total=n_relevant)
        ap_by_class.setdefault(int(own), []).append(ap)
        for k in hits:
            hits[k] += int(relevant[:k].any())

    n_queries = sum(len(aps) for aps in ap_by_class.values())
    all_ap = [ap for aps in ap_by_class.values() for ap in aps]
    return RetrievalMetrics(
        map=float(np.mean(all_ap)) if all_ap else math.nan,
        recall_at_1=hits[1] / n_queries if n_queries else math.nan,
        recall_at_5=hits[5] / n_queries if n_queries else math.nan,
        recall_at_10=hits[10] / n_queries if n_queries else math.nan,
        knn_top1=knn_correct / n if n else math.nan,
        n_queries=n_queries,
        per_class={str(classes[c]): float(np.mean(aps)) for c, aps in ap_by_class.items()},
    )


def plot_pr(curves: Mapping[str, PRCurve], path: Path, title: str | None = None) -> None:
    """Draw precision against recall for each named curve into an image file at ``path``."""
    # Figure without pyplot renders with Agg and leaves the caller's backend alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, curve in curves.items():
        axes.plot(curve.recall, curve.precision, label=name, drawstyle="steps-pre")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    if curves:
        axes.legend(loc="lower left")
    figure.savefig(path, dpi=120)


def _pairs(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    label = np.asarray(labels).astype(bool).reshape(-1)
    if score.shape != label.shape:
        raise ValueError(f"{score.size} scores but {label.size} labels")
    if not np.isfinite(score).all():
        raise ValueError("scores must be finite")
    return score, label


def _positive_total(label: npt.NDArray[np.bool_], n_positive_total: int | None) -> int:
    found = int(label.sum())
    if n_positive_total is None:
        return found
    if n_positive_total < found:
        raise ValueError(f"n_positive_total={n_positive_total} but {found} positives were scored")
    return int(n_positive_total)


def _lowest_meeting(curve: PRCurve, precision: float) -> int | None:
    meeting = np.flatnonzero(curve.precision >= precision - _PRECISION_SLACK)
    return int(meeting[-1]) if meeting.size else None
