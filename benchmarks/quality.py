"""Near-duplicate detection (seeded edited copies among distractors) and class retrieval on
the caltech101 test photos: the chosen weights beside pHash and beside random weights."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import imagehash
import numpy as np
from PIL import Image

from benchmarks.data import (
    Photo,
    caltech_test,
    copy_set,
    missing_caltech_note,
    split_photos,
)
from benchmarks.measure import Stopwatch
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.copies import read_truth, transform_of
from ghostmatch.descriptor import Descriptor
from ghostmatch.embedder import Embedder, prepare
from ghostmatch.errors import GhostmatchError
from ghostmatch.images import load_image
from ghostmatch.library import Library
from ghostmatch.metrics import (
    PairMetrics,
    PRCurve,
    RetrievalMetrics,
    pair_metrics,
    plot_pr,
    precision_recall_curve,
    retrieval_metrics,
)
from ghostmatch.modelcard import ModelCard
from ghostmatch.weights import load_descriptor

SOURCES, SOURCES_QUICK = 500, 100
DISTRACTORS_QUICK = 400  # the full run uses every other test photo
KNN = 20
SEED = 0
POOLINGS = ("gem", "avg", "head")
STAGES = ("make copies", "index", "pHash", "random weights")
_BATCH = 32


@dataclass(frozen=True)
class Candidates:
    """Unordered candidate pairs (row ``a`` < row ``b``) with their scores (higher = more
    alike) and whether they are true duplicates."""

    a: np.ndarray
    b: np.ndarray
    scores: np.ndarray
    same: np.ndarray


@dataclass(frozen=True)
class DuplicateSet:
    """The indexed photos: ``paths`` in row order, ``group`` of each row (its truth group,
    -1 for a distractor), the true pairs in all and each copy's (original row, transform)."""

    paths: list[Path]
    group: np.ndarray
    n_positive: int
    copies: list[tuple[int, int, str]]  # (original row, copy row, transform)


def run(settings: Settings) -> Report:
    report = Report("quality", settings.quick)
    photos = caltech_test()
    if photos is None:
        report.notes.append(missing_caltech_note("near-duplicate and class retrieval"))
        return report
    sources, distractors = split_photos(
        photos,
        SOURCES_QUICK if settings.quick else SOURCES,
        DISTRACTORS_QUICK if settings.quick else None,  # the full run: every other photo
        SEED,
    )
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        evaluate(report, sources, distractors, Path(tmp), settings.weights, settings.out)
    if settings.quick:
        report.notes.append("--quick: pooling variants are compared in the full run only")
    else:
        compare_pooling(report, sources + distractors, settings.weights)
    return report


def evaluate(
    report: Report,
    sources: Sequence[Photo],
    distractors: Sequence[Photo],
    folder: Path,
    weights: str,
    out: Path,
) -> None:
    """Copy ``sources`` with every transform (seed 0), index them with ``distractors``
    through the Library, and add the near-duplicate and class-retrieval figures."""
    stages: dict[str, Stopwatch] = {name: Stopwatch() for name in STAGES}
    with stages["make copies"]:
        copies, truth = copy_set(sources, distractors, folder, SEED)
    label_of = {f"{p.label}-{p.path.name}": p.label for p in (*sources, *distractors)}
    with stages["index"], Library(folder / "index", weights=weights, device="cpu") as lib:
        indexed = lib.index([copies])
        ids, vectors = lib.catalog.vectors()
        paths = [r.path for r in lib.catalog.get(ids.tolist())]
        lib_card = lib.embedder.card
        offsets = lib.score_offsets(vectors)
    if indexed.failed:
        report.notes.append(f"files that failed to index: {dict(indexed.failed)}")
    dataset = duplicate_set(paths, read_truth(truth))
    model = evaluate_pairs(dataset, knn_by_vectors(vectors, offsets))
    if offsets is not None:
        raw = evaluate_pairs(dataset, knn_by_vectors(vectors))
        add_normalisation_figures(report, model, raw)
    with stages["pHash"]:
        phash = evaluate_pairs(dataset, knn_by_phash(paths))
    add_duplicate_figures(report, dataset, model, phash)
    plot_pr(
        {"model": model.curve, "pHash": phash.curve},
        out / "quality_pr.png",
        title=f"near-duplicates among {len(paths):,} photos",
    )
    report.plots.append("quality_pr.png")

    rows = [i for i, p in enumerate(paths) if p.name in label_of and transform_of(p) is None]
    labels = [label_of[paths[i].name] for i in rows]
    ours = retrieval_metrics(_similarity(vectors[rows]), labels)
    if weights == "random":
        baseline = ours
        report.notes.append("weights are random: the class-retrieval baseline is the model itself")
    else:
        with stages["random weights"]:
            untrained = random_twin(lib_card)
            random_vectors = embed_files(untrained, [paths[i] for i in rows])
        baseline = retrieval_metrics(_similarity(random_vectors), labels)
    add_retrieval_figures(report, ours, baseline)
    report.details.update(
        {
            "weights": weights,
            "photos_indexed": len(paths),
            "sources": len(sources),
            "distractors": len(distractors),
            "class_retrieval_photos": len(rows),
            "knn": KNN,
            "near_duplicates": {
                "model": {**asdict(model.metrics), "per_transform": model.per_transform},
                "phash": {**asdict(phash.metrics), "per_transform": phash.per_transform},
            },
            "class_retrieval": {"model": asdict(ours), "random_weights": asdict(baseline)},
            "stage_seconds": {name: round(clock.seconds, 1) for name, clock in stages.items()},
        }
    )
    report.notes.append(
        f"weights {weights!r}; {len(sources)} test photos x {len(dataset.copies) // len(sources)} "
        f"transforms (seed {SEED}) among {len(distractors)} distractor test photos; candidates "
        f"= each photo's {KNN} nearest (faiss for the model, Hamming for 64-bit pHash, "
        "score 1 - distance/64); model scores are the duplicate finder's (cosine, less the "
        "two background offsets when the model carries a score background); positives = "
        "pairs in one truth group, all of them counted "
        "in recall; per-transform recall = original-copy pairs at the p99 threshold; class "
        f"retrieval over the {len(rows)} original and distractor photos (BACKGROUND_Google "
        "counts as a class)"
    )


def duplicate_set(paths: Sequence[Path], groups: Sequence[Sequence[Path]]) -> DuplicateSet:
    row_of = {p.resolve(): i for i, p in enumerate(paths)}
    group = np.full(len(paths), -1, np.int64)
    copies = []
    n_positive = 0
    for g, members in enumerate(groups):
        n_positive += len(members) * (len(members) - 1) // 2
        rows = [row_of.get(m.resolve()) for m in members]
        for row in rows:
            if row is not None:
                group[row] = g
        original = rows[0]
        for member, row in zip(members[1:], rows[1:], strict=True):
            name = transform_of(member)
            if original is not None and row is not None and name is not None:
                copies.append((original, row, name))
    return DuplicateSet(list(paths), group, n_positive, copies)


def knn_by_vectors(
    vectors: np.ndarray, offsets: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each row's KNN nearest others by inner product (exact); with
    ``offsets`` (the model's score background) the scores are the duplicate finder's
    normalised ones, cosine less both offsets."""
    scores, rows = faiss.knn(vectors, vectors, KNN + 1, faiss.METRIC_INNER_PRODUCT)
    if offsets is not None:
        scores = scores - offsets[:, None] - np.where(rows >= 0, offsets[rows], 0.0)
    return scores, rows


def knn_by_phash(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each photo's KNN nearest by pHash Hamming distance, scored
    1 - distance / 64 so that higher = more alike, like the model's cosines."""
    codes = np.stack([np.packbits(_phash(p)) for p in paths])
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    distances, rows = index.search(codes, KNN + 1)
    return 1.0 - distances / 64.0, rows


def _phash(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(imagehash.phash(image).hash, dtype=bool).reshape(-1)


def candidate_pairs(scores: np.ndarray, rows: np.ndarray, group: np.ndarray) -> Candidates:
    """Unique unordered pairs from k-NN lists (a row's own entry dropped)."""
    n = len(rows)
    queries = np.repeat(np.arange(n), rows.shape[1])
    found, score = rows.reshape(-1), scores.reshape(-1).astype(np.float64)
    keep = (found >= 0) & (found != queries)
    a = np.minimum(queries[keep], found[keep])
    b = np.maximum(queries[keep], found[keep])
    _, first = np.unique(a * n + b, return_index=True)
    a, b, score = a[first], b[first], score[keep][first]
    same = (group[a] == group[b]) & (group[a] >= 0)
    return Candidates(a, b, score, same)


@dataclass(frozen=True)
class PairResult:
    """One scorer's near-duplicate quality: metrics, its precision-recall curve (recall over
    all true pairs) and, per transform, the share of original-copy pairs at the p99 threshold."""

    metrics: PairMetrics
    curve: PRCurve
    per_transform: dict[str, float]


def evaluate_pairs(dataset: DuplicateSet, knn: tuple[np.ndarray, np.ndarray]) -> PairResult:
    candidates = candidate_pairs(knn[0], knn[1], dataset.group)
    metrics = pair_metrics(candidates.scores, candidates.same, dataset.n_positive)
    curve = precision_recall_curve(candidates.scores, candidates.same, dataset.n_positive)
    n = len(dataset.paths)
    keys = candidates.a * n + candidates.b
    accepted = set(keys[candidates.scores >= metrics.threshold_at_p99].tolist())
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for original, copy, name in dataset.copies:
        total[name] += 1
        found[name] += (min(original, copy) * n + max(original, copy)) in accepted
    return PairResult(metrics, curve, {name: found[name] / total[name] for name in total})


def add_duplicate_figures(
    report: Report, dataset: DuplicateSet, model: PairResult, phash: PairResult
) -> None:
    ours, theirs = model.metrics, phash.metrics
    base = "pHash (64-bit)"
    report.add(Figure("near-duplicates: micro-AP", ours.micro_ap, "", base, theirs.micro_ap))
    report.add(
        Figure(
            "near-duplicates: recall @ precision 0.99",
            ours.recall_at_p99,
            "",
            base,
            theirs.recall_at_p99,
        )
    )
    report.add(
        Figure(
            "near-duplicates: recall @ precision 0.90",
            ours.recall_at_p90,
            "",
            base,
            theirs.recall_at_p90,
        )
    )
    for name, recall in model.per_transform.items():
        report.add(
            Figure(f"recall @ p99 threshold: {name}", recall, "", base, phash.per_transform[name])
        )
    report.details["thresholds_at_p99"] = {
        "model": ours.threshold_at_p99,
        "phash": theirs.threshold_at_p99,
    }
    report.details["true_pairs"] = dataset.n_positive


def add_normalisation_figures(report: Report, normalised: PairResult, raw: PairResult) -> None:
    """What the score background adds: the same candidates scored both ways."""
    base = "raw cosine"
    ours, theirs = normalised.metrics, raw.metrics
    report.add(Figure("normalised scores: micro-AP", ours.micro_ap, "", base, theirs.micro_ap))
    report.add(
        Figure(
            "normalised scores: recall @ precision 0.99",
            ours.recall_at_p99,
            "",
            base,
            theirs.recall_at_p99,
        )
    )
    report.details["raw_cosine"] = {**asdict(theirs), "per_transform": raw.per_transform}


def add_retrieval_figures(report: Report, ours: RetrievalMetrics, random: RetrievalMetrics) -> None:
    base = "random weights"
    for label, value, baseline in (
        ("class retrieval: mAP", ours.map, random.map),
        ("class retrieval: recall@1", ours.recall_at_1, random.recall_at_1),
        ("class retrieval: recall@5", ours.recall_at_5, random.recall_at_5),
        ("class retrieval: recall@10", ours.recall_at_10, random.recall_at_10),
        ("class retrieval: kNN top-1", ours.knn_top1, random.knn_top1),
    ):
        report.add(Figure(label, value, "", base, baseline))


def compare_pooling(report: Report, photos: Sequence[Photo], weights: str) -> None:
    """Class-retrieval mAP of the same weights with each pooling (model-card override).
    Weights trained with one pooling (a learnt GeM p, a projection) cannot take another."""
    models: dict[str, Descriptor] = {}
    for pooling in POOLINGS:
        try:
            models[pooling] = load_descriptor(weights, pooling=pooling)
        except GhostmatchError as err:
            reason = str(err).splitlines()[-1].strip()
            report.notes.append(f"pooling {pooling}: not loadable with these weights ({reason})")
    if len(models) < 2:
        report.notes.append("pooling comparison skipped: these weights take only their own pooling")
        return
    paths = [p.path for p in photos]
    labels = [p.label for p in photos]
    maps = {
        pooling: retrieval_metrics(_similarity(embed_files(model, paths)), labels).map
        for pooling, model in models.items()
    }
    report.details["pooling_map"] = maps
    reference = next(iter(maps))
    for pooling, value in maps.items():
        if pooling != reference:
            report.add(
                Figure(
                    f"class mAP, {pooling} pooling",
                    value,
                    "",
                    f"{reference} pooling",
                    maps[reference],
                )
            )


def random_twin(card: ModelCard) -> Descriptor:
    """The same network and preprocessing as ``card`` with random weights: what training
    adds is then the only difference."""
    keep = ("width", "input_size", "resize", "crop_fraction", "interpolation", "mean", "std")
    shape = ("pooling", "gem_p", "projection", "dim")
    return load_descriptor("random", **{name: getattr(card, name) for name in keep + shape})


def embed_files(model: Descriptor, paths: Sequence[Path]) -> np.ndarray:
    """Descriptors of image files with ``model``'s own preprocessing. Speed is not measured
    here, so one thread: it never waits on a core that another process holds."""
    embedder = Embedder(model, device="cpu", threads=1)
    size = embedder.card.input_size
    out = []
    for start in range(0, len(paths), _BATCH):
        arrays = [
            prepare(load_image(p, size).image, embedder.card) for p in paths[start : start + _BATCH]
        ]
        out.append(embedder.embed_arrays(arrays))
    return np.concatenate(out)


def _similarity(vectors: np.ndarray) -> np.ndarray:
    return vectors @ vectors.T
