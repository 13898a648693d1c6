"""Duplicate detection in two stages on caltech101 test photos: the global descriptor alone
(stage 1) beside the descriptor plus geometric verification of local features (stage 2),
and the (threshold, min_inliers) rule to ship: the best recall at precision >= 0.995 here,
a margin over the 0.99 the rule must keep on collections it was not tuned on (the
held-out benchmark checks that)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.data import Photo, caltech_test, copy_set, missing_caltech_note, split_photos
from benchmarks.measure import Stopwatch
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.eval.copies import read_truth
from ghostmatch.eval.evaluation import (
    DuplicateCandidates,
    duplicate_candidates,
    evaluate_candidates,
    transform_recall,
)
from ghostmatch.eval.metrics import plot_pr, recall_at_precision
from ghostmatch.indexes.allpairs import pair_scores
from ghostmatch.library import Library

SOURCES, SOURCES_QUICK = 300, 30
DISTRACTORS, DISTRACTORS_QUICK = 1500, 120
SEED = 0
# Stage 2 checks the candidates of stage 1 from this recall of the retrieved true pairs on.
VERIFY_RECALL = 0.995
INLIER_GRID = tuple(range(4, 120, 2))
# The precision the shipped rule is chosen for on this set. A rule tuned to exactly 0.99
# here kept 0.984 on held-out copies, so the choice leaves a margin.
SHIPPED_PRECISION = 0.995


def run(settings: Settings) -> Report:
    report = Report("dupes_stages", settings.quick)
    photos = caltech_test()
    if photos is None:
        report.notes.append(missing_caltech_note("two-stage duplicate detection"))
        return report
    sources, distractors = choose(photos, settings.quick)
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        folder = Path(tmp)
        copies, truth = copy_set(sources, distractors, folder, SEED)
        with Library(folder / "index", weights=settings.weights, device="cpu") as lib:
            lib.index([copies])
            # Stage 1 exactly as `ghostmatch eval dupes` measures it.
            candidates = duplicate_candidates(lib, read_truth(truth))
            # Same bytes is "exact" before any model: a cosine of 1 stands in for the hash.
            cosines = pair_scores(candidates.vectors, candidates.a, candidates.b)
            evaluate(report, lib, candidates, cosines >= 0.99999, settings.out)
    report.notes.append(
        f"weights {settings.weights!r}; {len(sources)} test photos x 13 transforms (seed "
        f"{SEED}) among {len(distractors)} distractors; stage 1 = cosine of the global "
        "descriptors over each photo's 20 nearest (the duplicate finder's score: less the two "
        "background offsets when the model carries a score background); stage 2 = stage-1 "
        "candidates whose local stride-16 features agree on one affine transform "
        "(ghostmatch.dupes.verify); recall counts every true pair"
    )
    return report


def choose(photos: Sequence[Photo], quick: bool) -> tuple[list[Photo], list[Photo]]:
    """(sources, distractors) of the run: the full run's are the photos the shipped rule is
    tuned on, which the held-out check must leave out."""
    return split_photos(
        photos,
        SOURCES_QUICK if quick else SOURCES,
        DISTRACTORS_QUICK if quick else DISTRACTORS,
        SEED,
    )


def evaluate(
    report: Report,
    lib: Library,
    candidates: DuplicateCandidates,
    exact: np.ndarray,
    out: Path,
) -> None:
    ids, scores, same = candidates.ids, candidates.scores, candidates.same
    n_positive = candidates.truth.n_positive
    stage1 = evaluate_candidates(candidates)
    first = stage1.pairs
    order = np.argsort(-scores)
    found = np.cumsum(same[order])
    cut = int(np.searchsorted(found, VERIFY_RECALL * found[-1])) if found[-1] else 0
    floor = float(scores[order[min(cut, len(order) - 1)]])
    checked = scores >= floor
    pairs = [
        (int(ids[a]), int(ids[b]))
        for a, b in zip(candidates.a[checked], candidates.b[checked], strict=True)
    ]
    clock = Stopwatch()
    with clock:
        records = {r.id: r for r in lib.catalog.get(ids.tolist())}
        verified = lib.verify_pairs(pairs, records)
    inliers = np.zeros(len(scores))
    inliers[checked] = [verified[p].inliers for p in pairs]
    # Stage-2 score: inliers first, the cosine breaks ties; unchecked pairs rank below.
    second_scores = np.where(checked, inliers + scores, scores - 2.0)
    stage2 = evaluate_candidates(candidates.rescored(candidates.a, candidates.b, second_scores))
    second = stage2.pairs
    rule = best_rule(scores, same, inliers, checked, exact, n_positive, SHIPPED_PRECISION)
    rule_p99 = best_rule(scores, same, inliers, checked, exact, n_positive, 0.99)
    # The baseline at the shipped precision: a threshold alone, no geometric stage.
    alone = best_threshold(scores, same, exact, n_positive, SHIPPED_PRECISION)
    base = "stage 1 (descriptor only)"
    report.add(Figure("micro-AP, stage 2", second.micro_ap, "", base, first.micro_ap))
    report.add(
        Figure(
            "recall @ precision 0.99, stage 2",
            second.recall_at_p99,
            "",
            base,
            first.recall_at_p99,
        )
    )
    report.add(
        Figure(
            "recall @ precision 0.99, best rule",
            rule_p99["recall"],
            "",
            base,
            first.recall_at_p99,
        )
    )
    report.add(
        Figure(
            f"recall, shipped rule (precision >= {SHIPPED_PRECISION} here)",
            rule["recall"],
            "",
            f"stage 1 alone at precision >= {SHIPPED_PRECISION}",
            alone["recall"],
        )
    )
    # Stage 1 at its p99 threshold, beside the shipped rule.
    per_first = {name: t.recall for name, t in stage1.per_transform.items()}
    band = (scores >= rule["verify_threshold"]) & (inliers >= rule["min_inliers"])
    accepted = (scores >= rule["threshold"]) | band | exact
    per_second = {name: t.recall for name, t in transform_recall(candidates, accepted).items()}
    for name in per_first:
        report.add(
            Figure(f"recall, {name}: two stages", per_second[name], "", base, per_first[name])
        )
    paths = [records[int(image_id)].path for image_id in ids]
    hard = hard_negatives(paths, candidates)
    plot_pr(
        {"stage 1": stage1.curve, "stage 2": stage2.curve},
        out / "dupes_stages_pr.png",
        title="duplicates: descriptor vs descriptor + geometric check",
    )
    report.plots.append("dupes_stages_pr.png")
    report.details.update(
        {
            "stage1": asdict(first),
            "stage2": asdict(second),
            "rule": rule,
            "rule_at_p99": rule_p99,
            "stage1_rule": alone,
            "verified_pairs": len(pairs),
            "verify_floor_score": floor,
            "verify_seconds": round(clock.seconds, 1),
            "per_transform_stage1": per_first,
            "per_transform_two_stages": per_second,
            "top_false_pairs_same_class": hard,
        }
    )


def best_rule(
    scores: np.ndarray,
    same: np.ndarray,
    inliers: np.ndarray,
    checked: np.ndarray,
    exact: np.ndarray,
    n_positive: int,
    precision: float = 0.99,
) -> dict[str, float]:
    """The rule "cosine >= threshold, or cosine >= verify_threshold with min_inliers
    geometric inliers" with the most recall at ``precision`` or more on the candidate pairs
    (``scores``, and ``same``: whether each is a true pair)."""
    best = {"recall": 0.0, "precision": 1.0, "threshold": 1.0, "verify_threshold": 1.0}
    best["min_inliers"] = 0.0
    levels = np.unique(np.quantile(scores[checked], np.linspace(0, 1, 26)))
    for high in levels:
        alone = (scores >= high) | exact
        for low in levels[levels <= high]:
            band = (scores >= low) & ~alone
            for n in INLIER_GRID:
                accepted = alone | (band & (inliers >= n))
                total = int(accepted.sum())
                hits = int((accepted & same).sum())
                if total and hits / total >= precision and hits / n_positive > best["recall"]:
                    best = {
                        "recall": hits / n_positive,
                        "precision": hits / total,
                        "threshold": float(high),
                        "verify_threshold": float(low),
                        "min_inliers": float(n),
                    }
    return best


def best_threshold(
    scores: np.ndarray, same: np.ndarray, exact: np.ndarray, n_positive: int, precision: float
) -> dict[str, float]:
    """The cosine threshold alone (exact copies always in) with the most recall at
    ``precision`` or more on the candidate pairs: the rule without a geometric stage.
    Every candidate score is tried, so the baseline gets its best threshold, not a grid's."""
    # Exact copies rank above every score, so every threshold keeps them.
    ranked = np.where(exact, scores.max() + 1.0, scores)
    recall, threshold = recall_at_precision(ranked, same, precision, n_positive)
    accepted = ranked >= threshold
    kept = int(accepted.sum())
    hits = int((accepted & same).sum())
    return {"recall": recall, "precision": hits / kept if kept else 1.0, "threshold": threshold}


def hard_negatives(paths: Sequence[Path], candidates: DuplicateCandidates) -> float:
    """Share of the 2,000 best-scoring false pairs that are two photos of one class
    (file names start with ``<class>-``, copies included); ``paths`` in row order."""
    wrong = np.flatnonzero(~candidates.same)
    top = wrong[np.argsort(-candidates.scores[wrong])[:2000]]
    labels = [p.name.split("-", 1)[0] for p in paths]
    same = [labels[int(candidates.a[i])] == labels[int(candidates.b[i])] for i in top]
    return float(np.mean(same)) if same else 0.0
