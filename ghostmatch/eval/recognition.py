"""Measure recognition on labelled photos: a seeded split into labelled and held-out
photos, some classes held out whole as unknowns; closed-set top-1, the calibrated
threshold's accuracy and coverage, and open-set figures.

It runs ``recognize``'s own parts (the labelled set, the vote, the leave-one-out
calibration) on the stored vectors, without writing labels into the index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.library import Library
from ghostmatch.recognition.calibration import DEFAULT_PRECISION, Calibration
from ghostmatch.recognition.recognizer import DEFAULT_K, LabelledSet, calibrate_set

# Share of the unknown photos an open-set cut must reject for the "accuracy on knowns"
# figure.
UNKNOWN_REJECTED = 0.95


@dataclass(frozen=True)
class RecognitionEvaluation:
    """Recognition measured on one split.

    ``top1``: held-out photos of known classes whose best label is right (no rejection).
    ``coverage`` / ``accuracy_at_coverage``: the share of them the calibrated ``threshold``
    answers, and how many of those answers are right; ``unknown_accepted``: the share of
    unknown-class photos it answers (wrongly, by construction). ``auroc``: how well the
    confidence tells known-class photos from unknown ones (1 = always, 0.5 = chance).
    ``known_accuracy_at_95``: held-out known photos answered and right at the cut that
    rejects 95% of the unknowns (``threshold_at_95``).
    """

    top1: float
    threshold: float
    target_precision: float
    coverage: float
    accuracy_at_coverage: float
    unknown_accepted: float
    auroc: float
    known_accuracy_at_95: float
    threshold_at_95: float
    calibration: Calibration
    n_labelled: int
    n_known_queries: int
    n_unknown_queries: int
    known_classes: list[str]
    unknown_classes: list[str]
    n_unindexed: int
    k: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"] = self.calibration.to_dict()
        return {key: _number(value) for key, value in data.items()}


def split(
    labels: Mapping[Path, str], unknown_classes: int, seed: int
) -> tuple[dict[Path, str], dict[Path, str], dict[Path, str]]:
    """(labelled, held-out known, unknown) photos: ``unknown_classes`` classes drawn with
    ``seed`` are all unknown; of every other class a seeded half (rounded down, at least
    one) is labelled and the rest held out."""
    classes = sorted(set(labels.values()))
    if unknown_classes < 0 or unknown_classes > len(classes) - 1:
        raise GhostmatchError(
            f"unknown_classes must be between 0 and {len(classes) - 1} (there are "
            f"{len(classes)} classes), not {unknown_classes}"
        )
    rng = np.random.default_rng(seed)
    unknown = {classes[i] for i in rng.permutation(len(classes))[:unknown_classes]}
    labelled: dict[Path, str] = {}
    held: dict[Path, str] = {}
    unknowns: dict[Path, str] = {}
    for name in classes:
        photos = sorted(p for p, c in labels.items() if c == name)
        if name in unknown:
            unknowns.update((p, name) for p in photos)
            continue
        order = rng.permutation(len(photos))
        n_labelled = max(1, len(photos) // 2)
        for rank, i in enumerate(order.tolist()):
            (labelled if rank < n_labelled else held)[photos[i]] = name
    return labelled, held, unknowns


def evaluate_recognition(
    lib: Library,
    labels: Mapping[Path, str],
    *,
    unknown_classes: int | None = None,
    k: int = DEFAULT_K,
    precision: float = DEFAULT_PRECISION,
    seed: int = 0,
) -> RecognitionEvaluation:
    """Label a seeded half of each known class, recognise the other half and every photo
    of the ``unknown_classes`` (default: a third of the classes) held out whole."""
    n_classes = len(set(labels.values()))
    if n_classes < 2:
        raise GhostmatchError(f"recognition needs at least two classes, found {n_classes}")
    if unknown_classes is None:
        unknown_classes = n_classes // 3
    records = lib.catalog.records_by_path(labels)
    indexed = {p: c for p, c in labels.items() if p in records}
    _, vectors = lib.catalog.vectors([records[p].id for p in indexed])
    card = lib.card
    return evaluate_vectors(
        indexed,
        vectors,
        [records[p].content_hash for p in indexed],
        unknown_classes=unknown_classes,
        k=k,
        precision=precision,
        seed=seed,
        model=card.fingerprint if card else "",
        n_unindexed=len(labels) - len(indexed),
    )


def evaluate_vectors(
    labels: Mapping[Path, str],
    vectors: np.ndarray,
    hashes: Sequence[str],
    *,
    unknown_classes: int,
    k: int = DEFAULT_K,
    precision: float = DEFAULT_PRECISION,
    seed: int = 0,
    model: str = "",
    n_unindexed: int = 0,
) -> RecognitionEvaluation:
    """:func:`evaluate_recognition` on given descriptors: ``vectors[i]`` and ``hashes[i]``
    (the content hash: byte-identical photos never vote for each other) belong to the
    ``i``-th photo of ``labels``, so that other descriptors of the same photos can be
    measured the same way."""
    paths = list(labels)
    row_of = {p: i for i, p in enumerate(paths)}
    labelled, held, unknowns = split(labels, unknown_classes, seed)
    rows = [(row_of[p], hashes[row_of[p]], c) for p, c in labelled.items()]
    ids = np.array([row_of[p] for p in labelled], dtype=np.int64)
    labelled_set = LabelledSet(rows, ids, vectors[ids], model)
    calibration = calibrate_set(labelled_set, precision, k)

    def answers(photos: Mapping[Path, str]) -> tuple[np.ndarray, np.ndarray]:
        queries = list(photos)
        if not queries:
            return np.zeros(0), np.zeros(0, dtype=bool)
        at = [row_of[p] for p in queries]
        exclude = [labelled_set.rows_of_hash.get(hashes[i], []) for i in at]
        confidence, winners = labelled_set.answer(vectors[at], k, exclude)
        right = np.array(
            [
                w >= 0 and labelled_set.names[w] == photos[p]
                for w, p in zip(winners, queries, strict=True)
            ],
            dtype=bool,
        )
        return confidence, right

    known_conf, known_right = answers(held)
    unknown_conf, _ = answers(unknowns)
    if not len(known_conf):
        raise GhostmatchError("no held-out photo of a known class; each class needs two photos")
    t = calibration.threshold
    answered = known_conf >= t
    cut95 = _cut_rejecting(unknown_conf, UNKNOWN_REJECTED)
    return RecognitionEvaluation(
        top1=float(known_right.mean()),
        threshold=t,
        target_precision=precision,
        coverage=float(answered.mean()),
        accuracy_at_coverage=float(known_right[answered].mean()) if answered.any() else math.nan,
        unknown_accepted=float((unknown_conf >= t).mean()) if len(unknown_conf) else math.nan,
        auroc=auroc(known_conf, unknown_conf),
        known_accuracy_at_95=float((known_right & (known_conf >= cut95)).mean())
        if len(unknown_conf)
        else math.nan,
        threshold_at_95=cut95,
        calibration=calibration,
        n_labelled=len(labelled_set),
        n_known_queries=len(known_conf),
        n_unknown_queries=len(unknown_conf),
        known_classes=sorted(set(labelled.values())),
        unknown_classes=sorted(set(unknowns.values())),
        n_unindexed=n_unindexed,
        k=k,
        seed=seed,
    )


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative (ties count half);
    nan when either side is empty."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_scores = both[order]
    # Average ranks over ties (Mann-Whitney U).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], both.size]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _cut_rejecting(unknown: np.ndarray, share: float) -> float:
    """The lowest confidence cut (accept >= cut) that rejects at least ``share`` of
    ``unknown``."""
    if unknown.size == 0:
        return math.nan
    values = np.sort(unknown)
    allowed = math.floor((1.0 - share) * values.size + 1e-9)  # unknowns it may accept
    if allowed == 0:
        return float(np.nextafter(values[-1], np.inf))
    # Accept the `allowed` highest unknowns at most: cut just above the next one down.
    return float(np.nextafter(values[values.size - allowed - 1], np.inf))


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
