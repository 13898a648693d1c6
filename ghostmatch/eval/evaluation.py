"""Measure an index against ground truth: retrieval by class, duplicate pairs, and the
calibration of the duplicate threshold from labelled pairs.

Scores are cosine similarities of the stored unit vectors, higher = more alike, less two
background offsets when the model carries a score background (``ghostmatch.model.scorenorm``).
Pair scores come from the duplicate finder's own scoring (``indexes.allpairs`` with
``Library.score_offsets``), so a threshold chosen here cuts exactly where
``ghostmatch dupes`` will.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ghostmatch.dupes.groups import DEFAULT_THRESHOLD, THRESHOLD_META, DuplicateGroup, threshold_of
from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.copies import TRANSFORMS, read_truth, transform_of
from ghostmatch.eval.metrics import (
    PairMetrics,
    PRCurve,
    RetrievalMetrics,
    ThresholdChoice,
    check_precision,
    pair_metrics,
    pick_threshold,
    precision_recall_curve,
    retrieval_metrics_from_neighbors,
)
from ghostmatch.indexes import allpairs
from ghostmatch.ingest.scan import scan
from ghostmatch.library import Library, check_threshold

# The threshold of an index that was never calibrated, and where calibration stores one:
# the duplicate finder's own, so that `eval dupes` measures what `ghostmatch dupes` does.
DEFAULT_DUPE_THRESHOLD = DEFAULT_THRESHOLD
DUPE_THRESHOLD_META = THRESHOLD_META
# Candidate pairs for duplicate evaluation: each image's nearest neighbours. A make-copies
# group has 14 images, so 20 leaves room for look-alikes without scoring all n^2 pairs.
DUPE_CANDIDATES = 20
# Retrieval ranks every other item while n^2 stays below this (~500 MB of ranked ids and
# scores at the limit); above it each query keeps its top MAX_RANKED // n.
MAX_RANKED = 25_000_000
# Rows of the query-by-database score matrix computed at once (~64 MB of float32).
_SCORE_BLOCK = 16_000_000
CONFIDENCE = 0.95
_SAME = {"same": True, "different": False}


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ClassRetrieval:
    """Retrieval quality of the queries of one class; see ``RetrievalMetrics``.

    ``n_items`` images carry the label; the rates are nan for a class of one image, which
    has nothing to retrieve.
    """

    n_items: int
    map: float
    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    knn_top1: float


@dataclass(frozen=True)
class RetrievalEvaluation:
    """Every labelled indexed image queried against the other labelled ones.

    ``metrics`` is the overall result and ``per_class`` the breakdown by label.
    ``n_unindexed`` labelled files are not in the index (unreadable, or outside it).
    Each query ranked ``depth`` neighbours; when that is below ``n_items - 1``, same-class
    images ranked further down count as missed, so ``map`` is a lower bound.
    """

    metrics: RetrievalMetrics
    per_class: dict[str, ClassRetrieval]
    n_items: int
    n_unindexed: int
    depth: int
    knn_k: int

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "images": self.n_items,
            "queries": m.n_queries,
            "unindexed": self.n_unindexed,
            "depth": self.depth,
            "knn_k": self.knn_k,
            "map": _number(m.map),
            "recall_at_1": _number(m.recall_at_1),
            "recall_at_5": _number(m.recall_at_5),
            "recall_at_10": _number(m.recall_at_10),
            "knn_top1": _number(m.knn_top1),
            "per_class": {
                name: {key: _number(value) for key, value in asdict(c).items()}
                for name, c in self.per_class.items()
            },
        }


@dataclass(frozen=True)
class TransformRecall:
    """Of ``n_pairs`` (original, copy made by one transform) pairs, ``n_found`` scored at or
    above the threshold; ``recall`` is their ratio."""

    n_pairs: int
    n_found: int
    recall: float


@dataclass(frozen=True)
class DuplicateEvaluation:
    """Candidate pairs (each image's ``k`` nearest neighbours) scored against true groups.

    ``pairs`` holds micro-AP, recall at precision 0.9/0.99 and precision/recall at
    ``pairs.threshold``; true pairs never proposed count as missed. ``per_transform`` is
    recall at that threshold (when None, at ``pairs.threshold_at_p99``) of the pairs
    (original, copy) by the copy's transform, for files named ``<stem>__<transform>.<ext>``.
    ``curve`` is the precision-recall curve. ``n_images`` were searched; ``n_unindexed``
    truth files are not in the index.
    """

    pairs: PairMetrics
    per_transform: dict[str, TransformRecall]
    curve: PRCurve
    n_images: int
    n_groups: int
    n_unindexed: int
    k: int

    def to_dict(self) -> dict[str, Any]:
        p = self.pairs
        return {
            "images": self.n_images,
            "groups": self.n_groups,
            "unindexed": self.n_unindexed,
            "k": self.k,
            "candidate_pairs": p.n_pairs,
            "positive_pairs": p.n_positive,
            "positive_pairs_retrieved": p.n_positive_retrieved,
            "micro_ap": _number(p.micro_ap),
            "recall_at_p99": _number(p.recall_at_p99),
            "threshold_at_p99": _number(p.threshold_at_p99),
            "recall_at_p90": _number(p.recall_at_p90),
            "threshold_at_p90": _number(p.threshold_at_p90),
            "threshold": _number(p.threshold),
            "precision": _number(p.precision),
            "recall": _number(p.recall),
            "per_transform": {
                name: {key: _number(value) for key, value in asdict(t).items()}
                for name, t in self.per_transform.items()
            },
        }


@dataclass(frozen=True)
class DuplicateTruth:
    """Truth groups over the rows of a searched set of images.

    ``group`` is each row's truth group (-1: in none). ``n_positive`` counts every true pair,
    those of the ``n_unsearched`` truth files not searched included, so that they count as
    missed. ``copies`` holds (original row, copy row, transform) of each pair of an original
    and a copy named ``<stem>__<transform>.<ext>``, row -1 for a file not searched.
    """

    group: np.ndarray
    n_positive: int
    copies: list[tuple[int, int, str]]
    n_groups: int
    n_unsearched: int


@dataclass(frozen=True)
class DuplicateCandidates:
    """Candidate duplicate pairs of the searched images and their truth.

    Row ``i`` is catalog id ``ids[i]`` with stored unit vector ``vectors[i]``. Pair ``j`` is
    rows ``a[j] < b[j]`` with duplicate score ``scores[j]`` (float64, higher = more alike);
    ``same[j]`` says whether the two are in one truth group. ``k`` nearest neighbours of
    each row were proposed.
    """

    ids: np.ndarray
    vectors: np.ndarray
    a: np.ndarray
    b: np.ndarray
    scores: np.ndarray
    truth: DuplicateTruth
    k: int

    @property
    def same(self) -> np.ndarray:
        group = self.truth.group
        return (group[self.a] == group[self.b]) & (group[self.a] >= 0)

    def rescored(self, a: np.ndarray, b: np.ndarray, scores: np.ndarray) -> DuplicateCandidates:
        """The same images and truth with other candidate pairs and scores: another
        scorer's (a baseline's), measured by the same rules."""
        return replace(self, a=a, b=b, scores=np.asarray(scores, dtype=np.float64))


@dataclass(frozen=True)
class GroupEvaluation:
    """The duplicate finder's groups against true groups: ``precision`` of the
    ``reported_pairs`` (kept, member) pairs, ``recall`` of copies put in the same group as
    their original (the first path of a truth group), and that recall ``per_transform``."""

    precision: float
    recall: float
    reported_pairs: int
    per_transform: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaptureEvaluation:
    """The finder's (kept, member) pairs by what the two files really are.

    ``copies`` show one capture (both in one truth group); ``other_shots`` are two
    captures of one scene (same ``scene_of`` label, different capture): a burst, a
    re-shoot; ``unrelated`` are the rest. ``other_shot_tiers`` counts the other-shot pairs
    by the tier they were given and ``other_shot_scores`` is their (lowest, highest) score
    (None when there are none). Of the ``captures`` of labelled scenes (a truth group, or
    a labelled file in none), ``captures_grouped`` have a file in a group with a file of
    another capture of their scene.
    """

    reported_pairs: int
    copies: int
    other_shots: int
    unrelated: int
    other_shot_tiers: dict[str, int]
    other_shot_scores: tuple[float, float] | None
    captures: int
    captures_grouped: int

    @property
    def precision(self) -> float:
        return self.copies / self.reported_pairs if self.reported_pairs else 1.0

    @property
    def other_shot_share(self) -> float:
        """Share of the reported pairs that are another shot, not a copy."""
        return self.other_shots / self.reported_pairs if self.reported_pairs else 0.0

    @property
    def captures_grouped_share(self) -> float:
        return self.captures_grouped / self.captures if self.captures else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "precision": _number(self.precision),
            "other_shot_share": _number(self.other_shot_share),
            "captures_grouped_share": _number(self.captures_grouped_share),
        }


@dataclass(frozen=True)
class LabelledPair:
    """Two images a person judged to be the same picture (``same``) or not; ``line`` is
    where the pair was read, for error messages."""

    a: Path
    b: Path
    same: bool
    line: int | None = None


# ---------------------------------------------------------------------------- ground truth


def labels_from_folders(root: Path) -> dict[Path, str]:
    """Each image below ``root`` labelled by the first folder under ``root`` holding it;
    images directly in ``root`` have no class and are left out."""
    top = Path(os.path.abspath(root))
    if not top.is_dir():
        raise GhostmatchError(f"{root} is not a folder")
    labels: dict[Path, str] = {}
    for entry in scan([top]):
        parts = entry.path.relative_to(top).parts
        if len(parts) > 1:
            labels[entry.path] = parts[0]
    return labels


def read_labels_csv(path: Path) -> dict[Path, str]:
    """Rows ``path,label`` (an optional ``path,label`` header); relative paths are relative
    to the CSV's folder."""
    base = Path(os.path.abspath(path)).parent
    labels: dict[Path, str] = {}
    for line, (name, label) in _csv_rows(path, ("path", "label")):
        if not label:
            raise GhostmatchError(f"{path} line {line}: the label is empty")
        labels[_existing(base, name, path, line)] = label
    if not labels:
        raise GhostmatchError(f"{path} has no rows; write one `path,label` row per image")
    return labels


def read_pairs_csv(path: Path) -> list[LabelledPair]:
    """Rows ``path,path,same|different`` (an optional header); relative paths are relative
    to the CSV's folder."""
    base = Path(os.path.abspath(path)).parent
    pairs: list[LabelledPair] = []
    for line, (first, second, verdict) in _csv_rows(path, ("path_a", "path_b", "label")):
        same = _SAME.get(verdict.lower())
        if same is None:
            raise GhostmatchError(
                f"{path} line {line}: the third field must be `same` or `different`, "
                f"got {verdict!r}"
            )
        a = _existing(base, first, path, line)
        b = _existing(base, second, path, line)
        pairs.append(LabelledPair(a, b, same, line))
    if not pairs:
        raise GhostmatchError(f"{path} has no rows; write one `path,path,same|different` row")
    return pairs


def read_truth_any(path: Path) -> list[list[Path]]:
    """Groups of paths that show the same image: a make-copies ``truth.json``, or a CSV of
    ``group_id,path`` rows (relative paths are relative to the file's folder)."""
    if not path.is_file():
        raise GhostmatchError(f"{path} does not exist; make one with `ghostmatch make-copies`")
    if path.suffix.lower() == ".json":
        return read_truth(path)
    base = Path(os.path.abspath(path)).parent
    groups: dict[str, list[Path]] = {}
    for line, (group, name) in _csv_rows(path, ("group_id", "path")):
        if not group:
            raise GhostmatchError(f"{path} line {line}: the group id is empty")
        groups.setdefault(group, []).append(_existing(base, name, path, line))
    if not groups:
        raise GhostmatchError(f"{path} has no rows; write one `group_id,path` row per image")
    return list(groups.values())


def _csv_rows(path: Path, header: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped fields) of each row with exactly ``len(header)`` fields,
    skipping blank lines, ``#`` comments and a first row that spells the header."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GhostmatchError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise GhostmatchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    reader = csv.reader(io.StringIO(text))
    first = True
    try:
        for row in reader:
            fields = [field.strip() for field in row]
            if not any(fields) or fields[0].startswith("#"):
                continue
            if first and [f.lower() for f in fields] == list(header):
                first = False
                continue
            first = False
            if len(fields) != len(header):
                raise GhostmatchError(
                    f"{path} line {reader.line_num}: expected {len(header)} comma-separated "
                    f"fields ({','.join(header)}), got {len(fields)}"
                )
            yield reader.line_num, fields
    except csv.Error as exc:
        raise GhostmatchError(f"{path} line {reader.line_num}: {exc}") from exc


def _existing(base: Path, name: str, source: Path, line: int) -> Path:
    if not name:
        raise GhostmatchError(f"{source} line {line}: the path is empty")
    path = Path(name).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else base / path))
    if not path.is_file():
        raise GhostmatchError(f"{source} line {line}: {path} does not exist")
    return path


# ---------------------------------------------------------------------------- retrieval


def evaluate_retrieval(
    lib: Library, labels: Mapping[Path, str], knn_k: int = 10, depth: int | None = None
) -> RetrievalEvaluation:
    """Query each labelled indexed image against the other labelled ones, exactly, with the
    stored vectors; same label = relevant. ``depth`` caps the neighbours ranked per query
    (default: all of them while n^2 <= ``MAX_RANKED``)."""
    if knn_k < 1:
        raise GhostmatchError(f"knn_k must be at least 1, got {knn_k}")
    found = _indexed_ids(lib, labels)
    label_of: dict[int, str] = {}
    for path, image_id in found.items():
        label_of.setdefault(image_id, labels[path])
    if len(label_of) < 2:
        raise GhostmatchError(
            f"only {len(label_of)} of {len(labels)} labelled images are indexed; retrieval "
            "needs at least two"
        )
    ids, vectors = lib.catalog.vectors(list(label_of))
    names = np.array([label_of[int(image_id)] for image_id in ids])
    n = len(ids)
    ranked = min(n - 1, depth if depth is not None else max(1, MAX_RANKED // n))
    neighbors, scores = _nearest(vectors, ranked + 1)
    overall = retrieval_metrics_from_neighbors(neighbors, scores, names, knn_k)
    return RetrievalEvaluation(
        metrics=overall,
        per_class=_per_class(neighbors, names, overall, knn_k),
        n_items=n,
        n_unindexed=len(labels) - len(found),
        depth=ranked,
        knn_k=knn_k,
    )


def _per_class(
    neighbors: np.ndarray, names: np.ndarray, overall: RetrievalMetrics, knn_k: int
) -> dict[str, ClassRetrieval]:
    """Recall@k and k-NN accuracy of each class's queries, by the rules of
    ``retrieval_metrics_from_neighbors`` (which gives the per-class mAP)."""
    rows: dict[str, list[tuple[bool, bool, bool, bool]]] = {}
    sizes: dict[str, int] = {}
    for name in names.tolist():
        sizes[name] = sizes.get(name, 0) + 1
    for query, row in enumerate(neighbors):
        own = names[query]
        found = names[row[(row >= 0) & (row != query)]]
        # Counter keeps first-seen order and max() returns the first best: ties go to
        # the class seen first, as in the overall vote.
        votes = Counter(found[:knn_k].tolist())
        winner = max(votes, key=votes.__getitem__, default=None)
        relevant = found == own
        rows.setdefault(str(own), []).append(
            (
                bool(relevant[:1].any()),
                bool(relevant[:5].any()),
                bool(relevant[:10].any()),
                winner == own,
            )
        )
    result: dict[str, ClassRetrieval] = {}
    for name in sorted(rows):
        outcomes = np.array(rows[name], dtype=np.float64)
        recalls = outcomes[:, :3].mean(axis=0) if sizes[name] > 1 else np.full(3, math.nan)
        result[name] = ClassRetrieval(
            n_items=sizes[name],
            map=overall.per_class.get(name, math.nan),
            recall_at_1=float(recalls[0]),
            recall_at_5=float(recalls[1]),
            recall_at_10=float(recalls[2]),
            knn_top1=float(outcomes[:, 3].mean()),
        )
    return result


def _nearest(vectors: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``keep`` best rows (itself included) by exact inner product, best first,
    equal scores by row order, computed one block of queries at a time."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    keep = min(keep, n)
    neighbors = np.empty((n, keep), dtype=np.int64)
    scores = np.empty((n, keep), dtype=np.float32)
    block = max(1, _SCORE_BLOCK // max(n, 1))
    for start in range(0, n, block):
        sim = x[start : start + block] @ x.T
        if keep < n:
            chosen = np.sort(np.argpartition(-sim, keep - 1, axis=1)[:, :keep], axis=1)
        else:
            chosen = np.broadcast_to(np.arange(n), sim.shape)
        chosen_scores = np.take_along_axis(sim, chosen, axis=1)
        order = np.argsort(-chosen_scores, axis=1, kind="stable")
        neighbors[start : start + block] = np.take_along_axis(chosen, order, axis=1)
        scores[start : start + block] = np.take_along_axis(chosen_scores, order, axis=1)
    return neighbors, scores


# ---------------------------------------------------------------------------- duplicates


def dupe_threshold(lib: Library, override: float | None = None) -> tuple[float, str]:
    """The duplicate threshold and where it came from: ``override`` ("option"), else the one
    ``Library.duplicate_threshold`` uses: "calibrated", "model card" or "default"."""
    if override is not None:
        return check_threshold(override, lib.normalised_scores), "option"
    card = lib.card
    extra = card.extra if card is not None else None
    return threshold_of(lib.catalog.get_meta(DUPE_THRESHOLD_META), extra, lib.normalised_scores)


def duplicate_candidates(
    lib: Library,
    groups: Sequence[Sequence[Path]],
    *,
    under: Path | None = None,
    k: int = DUPE_CANDIDATES,
) -> DuplicateCandidates:
    """Each searched image's ``k`` nearest neighbours (exact inner product of the stored
    vectors) as candidate pairs, scored as the duplicate finder scores them, against
    ``groups`` (paths showing the same image). The search set is the index (or the images
    below ``under``) plus every indexed truth image."""
    if k < 1:
        raise GhostmatchError(f"k must be at least 1, got {k}")
    members = {path for group in groups for path in group}
    found = _indexed_ids(lib, members)
    if under is not None:
        pool_ids = [
            image_id for image_id, _ in lib.catalog.paths_under(Path(os.path.abspath(under)))
        ]
    else:
        pool_ids = lib.catalog.ids().tolist()
    ids, vectors = lib.catalog.vectors(sorted(set(pool_ids) | set(found.values())))
    if len(ids) < 2:
        raise GhostmatchError(f"only {len(ids)} indexed images to compare; index more images")
    row_of_id = {int(image_id): row for row, image_id in enumerate(ids)}
    truth = duplicate_truth(groups, {path: row_of_id[i] for path, i in found.items()}, len(ids))
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    a, b, _ = neighbour_pairs(*_nearest(x, k + 1))
    # The duplicate finder's own scoring, so that thresholds mean the same thing here.
    scores = allpairs.pair_scores(x, a, b, lib.score_offsets(x)).astype(np.float64)
    return DuplicateCandidates(ids, x, a, b, scores, truth, k)


def duplicate_truth(
    groups: Sequence[Sequence[Path]], row_of: Mapping[Path, int], n_rows: int
) -> DuplicateTruth:
    """``groups`` of paths over ``n_rows`` searched images, ``row_of`` mapping the searched
    truth paths to their rows (a path not in it was not searched)."""
    pairs = {
        (min(a, b), max(a, b))
        for group in groups
        for i, a in enumerate(group)
        for b in group[i + 1 :]
        if a != b
    }
    group_of = np.full(n_rows, -1, dtype=np.int64)
    for g, group in enumerate(groups):
        for path in group:
            if path in row_of:
                group_of[row_of[path]] = g
    copies = []
    for a, b in sorted(pairs):
        kind_a, kind_b = transform_of(a), transform_of(b)
        if kind_a is None and kind_b is not None:
            original, copy, name = a, b, kind_b
        elif kind_b is None and kind_a is not None:
            original, copy, name = b, a, kind_a
        else:  # two originals, or two copies: not the recall of one transform
            continue
        copies.append((row_of.get(original, -1), row_of.get(copy, -1), name))
    members = {path for group in groups for path in group}
    return DuplicateTruth(
        group=group_of,
        n_positive=len(pairs),
        copies=copies,
        n_groups=len(groups),
        n_unsearched=len(members - set(row_of)),
    )


def neighbour_pairs(
    neighbors: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows a, rows b, scores) of the unordered pairs in k-NN lists ``neighbors`` (n, k)
    with their ``scores`` (n, k): a < b, each pair once in (a, b) order with the score where
    it was first listed, a row itself and -1 padding left out."""
    n = len(neighbors)
    queries = np.repeat(np.arange(n), neighbors.shape[1])
    partners = neighbors.reshape(-1)
    keep = (partners >= 0) & (partners != queries)
    a = np.minimum(queries[keep], partners[keep])
    b = np.maximum(queries[keep], partners[keep])
    keys, first = np.unique(a * n + b, return_index=True)
    return keys // n, keys % n, scores.reshape(-1)[keep][first].astype(np.float64)


def evaluate_candidates(
    candidates: DuplicateCandidates, threshold: float | None = None
) -> DuplicateEvaluation:
    """Micro-AP, recall at precision 0.9/0.99, the precision-recall curve and, at
    ``threshold`` (default: the lowest reaching precision 0.99), precision, recall and the
    recall of each transform's (original, copy) pairs."""
    c = candidates
    same = c.same
    metrics = pair_metrics(c.scores, same, c.truth.n_positive, threshold)
    cut = metrics.threshold_at_p99 if threshold is None else threshold
    return DuplicateEvaluation(
        pairs=metrics,
        per_transform=transform_recall(c, c.scores >= cut),
        curve=precision_recall_curve(c.scores, same, c.truth.n_positive),
        n_images=len(c.ids),
        n_groups=c.truth.n_groups,
        n_unindexed=c.truth.n_unsearched,
        k=c.k,
    )


def transform_recall(
    candidates: DuplicateCandidates, accepted: np.ndarray
) -> dict[str, TransformRecall]:
    """Of each transform's (original, copy) pairs, how many are ``accepted`` candidates
    (a boolean per candidate pair); a pair never proposed, or not searched, is missed."""
    c = candidates
    n = len(c.ids)
    kept = set((c.a * n + c.b)[accepted].tolist())
    counts: dict[str, list[int]] = {}
    for original, copy, name in c.truth.copies:
        hit = original >= 0 and copy >= 0 and min(original, copy) * n + max(original, copy) in kept
        tally = counts.setdefault(name, [0, 0])
        tally[0] += 1
        tally[1] += int(hit)
    # In make-copies' order of transforms, the order of its truth groups.
    return {
        name: TransformRecall(total, hits, hits / total)
        for name, (total, hits) in sorted(counts.items(), key=lambda item: _order(item[0]))
    }


def _order(transform: str) -> tuple[int, str]:
    names = list(TRANSFORMS)
    return (names.index(transform) if transform in names else len(names), transform)


def evaluate_duplicates(
    lib: Library,
    groups: Sequence[Sequence[Path]],
    threshold: float | None = None,
    *,
    under: Path | None = None,
    k: int = DUPE_CANDIDATES,
) -> DuplicateEvaluation:
    """``ghostmatch eval dupes``: ``evaluate_candidates`` of ``duplicate_candidates``."""
    return evaluate_candidates(duplicate_candidates(lib, groups, under=under, k=k), threshold)


def evaluate_groups(
    groups: Sequence[DuplicateGroup], truth: Sequence[Sequence[Path]]
) -> GroupEvaluation:
    """Score what ``Library.find_duplicates`` (``ghostmatch dupes``) reported against
    ``truth`` groups, whose first path is the original (as in a make-copies truth.json).
    Paths are compared with symlinks resolved; a file in no truth group is no one's copy."""
    group_of = {p.resolve(): g for g, members in enumerate(truth) for p in members}
    reported = correct = 0
    placed: dict[Path, int] = {}
    for n, group in enumerate(groups):
        keep = group.keep.path.resolve()
        placed[keep] = n
        for member in group.members:
            path = member.path.resolve()
            placed[path] = n
            reported += 1
            same = group_of.get(keep)
            correct += same is not None and same == group_of.get(path)
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for members in truth:
        original = members[0].resolve()
        for copy in members[1:]:
            name = transform_of(copy) or "?"
            total[name] += 1
            where = placed.get(copy.resolve())
            found[name] += where is not None and where == placed.get(original)
    return GroupEvaluation(
        precision=correct / reported if reported else 1.0,
        recall=sum(found.values()) / max(1, sum(total.values())),
        reported_pairs=reported,
        per_transform={name: found[name] / total[name] for name in total},
    )


def evaluate_captures(
    groups: Sequence[DuplicateGroup],
    truth: Sequence[Sequence[Path]],
    scene_of: Mapping[Path, str],
) -> CaptureEvaluation:
    """Sort what ``Library.find_duplicates`` reported into copies, other shots of one scene
    and unrelated pairs. ``truth`` groups hold the files of one capture (an original and its
    copies); ``scene_of`` labels files with their scene, so that two captures of one object
    share a label. A file in no truth group is a capture of its own. Paths are compared with
    symlinks resolved."""
    capture_of: dict[Path, object] = {
        p.resolve(): g for g, group in enumerate(truth) for p in group
    }
    scenes = {p.resolve(): label for p, label in scene_of.items()}

    def capture(path: Path) -> object:
        return capture_of.get(path, path)

    copies = others = unrelated = 0
    tiers: Counter[str] = Counter()
    scores: list[float] = []
    grouped: set[Path] = set()
    for group in groups:
        keep = group.keep.path.resolve()
        files = [keep] + [m.path.resolve() for m in group.members]
        for member, path in zip(group.members, files[1:], strict=True):
            if capture(keep) == capture(path):
                copies += 1
            elif keep in scenes and scenes.get(path) == scenes[keep]:
                others += 1
                tiers[member.tier] += 1
                scores.append(member.score)
            else:
                unrelated += 1
        # Members of one group are all reported as copies of one another's kept file.
        for path in files:
            if path in scenes and any(
                scenes.get(other) == scenes[path] and capture(other) != capture(path)
                for other in files
            ):
                grouped.add(path)
    captures = {capture(p) for p in scenes}
    return CaptureEvaluation(
        reported_pairs=copies + others + unrelated,
        copies=copies,
        other_shots=others,
        unrelated=unrelated,
        other_shot_tiers=dict(sorted(tiers.items())),
        other_shot_scores=(min(scores), max(scores)) if scores else None,
        captures=len(captures),
        captures_grouped=len({capture(p) for p in grouped}),
    )


# ---------------------------------------------------------------------------- calibration


def calibrate(
    lib: Library, pairs: Sequence[LabelledPair], precision: float, *, store: bool = True
) -> ThresholdChoice:
    """The lowest threshold reaching ``precision`` on labelled pairs, stored in the index
    (``DUPE_THRESHOLD_META``) unless ``store`` is False. Indexed, unchanged files use their
    stored vectors; others are embedded with the index's model."""
    check_precision(precision)  # before embedding any pair, which takes a while
    if not pairs:
        raise GhostmatchError("no labelled pairs given")
    if lib.card is None:
        raise GhostmatchError(
            f"index {lib.path} is empty; index the photos first, so that the threshold is "
            "calibrated for its model"
        )
    row_of: dict[Path, int] = {}
    vectors: list[np.ndarray] = []
    for pair in pairs:
        for path in (pair.a, pair.b):
            if path in row_of:
                continue
            try:
                vector, _ = lib.query_vector(path)
            except GhostmatchError as exc:
                where = f"line {pair.line}: " if pair.line is not None else ""
                raise GhostmatchError(f"{where}{exc}") from exc
            row_of[path] = len(vectors)
            vectors.append(vector)
    x = np.ascontiguousarray(np.stack(vectors), dtype=np.float32)
    rows_a = np.array([row_of[p.a] for p in pairs], dtype=np.int64)
    rows_b = np.array([row_of[p.b] for p in pairs], dtype=np.int64)
    scores = allpairs.pair_scores(x, rows_a, rows_b, lib.score_offsets(x))
    choice = pick_threshold(scores, [p.same for p in pairs], precision)
    if store:
        stored = lib.catalog.get_meta(DUPE_THRESHOLD_META)
        # Other settings kept there (the verifier's min_inliers) survive a recalibration.
        settings = dict(stored) if isinstance(stored, dict) else {}
        settings.update(
            {
                "threshold": choice.threshold,
                "precision": precision,
                "measured_precision": choice.precision,
                "precision_lower_bound": precision_lower_bound(choice),
                "confidence": CONFIDENCE,
                "recall": choice.recall,
                "support": choice.support,
                "n_same": choice.n_same,
                "n_different": choice.n_different,
            }
        )
        lib.catalog.set_meta(DUPE_THRESHOLD_META, settings)
    return choice


def precision_lower_bound(choice: ThresholdChoice, confidence: float = CONFIDENCE) -> float:
    """One-sided lower confidence bound on the precision at ``choice``'s threshold, from the
    ``support`` labelled pairs at or above it."""
    same_above = round(choice.recall * choice.n_same)
    return wilson_lower_bound(same_above, choice.support, confidence)


def wilson_lower_bound(successes: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Wilson score lower bound on a proportion; unlike the normal approximation
    it stays informative at 12 of 12 (0.82 at 95%), which is what small labelled sets give."""
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    p = successes / trials
    z2n = z * z / trials
    centre = p + z2n / 2
    margin = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    return max(0.0, (centre - margin) / (1 + z2n))


# ---------------------------------------------------------------------------- helpers


def _indexed_ids(lib: Library, paths: Iterable[Path]) -> dict[Path, int]:
    """Catalog ids of those ``paths`` that are indexed, keyed by the given path; a path is
    matched as written, then with symlinks resolved (a truth file may resolve its folder)."""
    given = list(dict.fromkeys(paths))
    absolute = {path: Path(os.path.abspath(path)) for path in given}
    records = lib.catalog.records_by_path(absolute.values())
    found = {path: records[absolute[path]].id for path in given if absolute[path] in records}
    if len(found) < len(given):
        real = {
            Path(os.path.realpath(path)): stat[0] for path, stat in lib.catalog.all_stat().items()
        }
        for path in given:
            image_id = real.get(Path(os.path.realpath(path)))
            if path not in found and image_id is not None:
                found[path] = image_id
    return found


def _number(value: float | int | None) -> float | int | None:
    """A JSON-safe number: nan and inf become None, floats are rounded to 6 places."""
    if value is None or isinstance(value, int):
        return value
    return round(float(value), 6) if math.isfinite(value) else None
