"""Near-duplicate detection (seeded edited copies among distractors) and class retrieval on
the caltech101 test photos: the chosen weights beside pHash and beside random weights."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict
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
from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.copies import read_truth, transform_of
from ghostmatch.eval.evaluation import (
    DuplicateEvaluation,
    DuplicateTruth,
    duplicate_candidates,
    evaluate_candidates,
    neighbour_pairs,
)
from ghostmatch.eval.metrics import RetrievalMetrics, plot_pr, retrieval_metrics
from ghostmatch.indexes.allpairs import pair_scores
from ghostmatch.ingest.images import load_image
from ghostmatch.library import Library
from ghostmatch.model.card import ModelCard
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.embedder import Embedder, prepare
from ghostmatch.model.weights import load_descriptor

SOURCES, SOURCES_QUICK = 500, 100
DISTRACTORS_QUICK = 400  # the full run uses every other test photo
KNN = 20
SEED = 0
POOLINGS = ("gem", "avg", "head")
STAGES = ("make copies", "index", "pHash", "random weights")
_BATCH = 32


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
    with Library(folder / "index", weights=weights, device="cpu") as lib:
        with stages["index"]:
            indexed = lib.index([copies])
        # What `ghostmatch eval dupes` measures, with the per-transform recall at each
        # scorer's own p99 threshold.
        candidates = duplicate_candidates(lib, read_truth(truth), k=KNN)
        paths = [r.path for r in lib.catalog.get(candidates.ids.tolist())]
        lib_card = lib.embedder.card
        normalised = lib.normalised_scores
    if indexed.failed:
        report.notes.append(f"files that failed to index: {dict(indexed.failed)}")
    vectors = candidates.vectors
    model = evaluate_candidates(candidates)
    if normalised:
        cosines = pair_scores(vectors, candidates.a, candidates.b)
        raw = evaluate_candidates(candidates.rescored(candidates.a, candidates.b, cosines))
        add_normalisation_figures(report, model, raw)
    with stages["pHash"]:
        phash = evaluate_candidates(candidates.rescored(*neighbour_pairs(*knn_by_phash(paths))))
    add_duplicate_figures(report, candidates.truth, model, phash)
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
                "model": {**asdict(model.pairs), "per_transform": recalls(model)},
                "phash": {**asdict(phash.pairs), "per_transform": recalls(phash)},
            },
            "class_retrieval": {"model": asdict(ours), "random_weights": asdict(baseline)},
            "stage_seconds": {name: round(clock.seconds, 1) for name, clock in stages.items()},
        }
    )
    report.notes.append(
        f"weights {weights!r}; {len(sources)} test photos x "
        f"{len(candidates.truth.copies) // len(sources)} "
        f"transforms (seed {SEED}) among {len(distractors)} distractor test photos; candidates "
        f"= each photo's {KNN} nearest (exact inner product for the model, Hamming for 64-bit "
        "pHash, score 1 - distance/64), measured by ghostmatch.eval.evaluation as `ghostmatch "
        "eval dupes` measures; model scores are the duplicate finder's (cosine, less the "
        "two background offsets when the model carries a score background); positives = "
        "pairs in one truth group, all of them counted "
        "in recall; per-transform recall = original-copy pairs at the p99 threshold; class "
        f"retrieval over the {len(rows)} original and distractor photos (BACKGROUND_Google "
        "counts as a class)"
    )


def knn_by_phash(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of each photo's KNN nearest by pHash Hamming distance, scored
    1 - distance / 64 so that higher = more alike, like the model's cosines."""
    codes = np.stack([np.packbits(_phash(p)) for p in paths])
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    distances, rows = index.search(codes, KNN + 1)
    return rows, 1.0 - distances / 64.0


def _phash(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(imagehash.phash(image).hash, dtype=bool).reshape(-1)


def recalls(result: DuplicateEvaluation) -> dict[str, float]:
    """Recall of each transform's (original, copy) pairs."""
    return {name: t.recall for name, t in result.per_transform.items()}


def add_duplicate_figures(
    report: Report, truth: DuplicateTruth, model: DuplicateEvaluation, phash: DuplicateEvaluation
) -> None:
    ours, theirs = model.pairs, phash.pairs
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
    theirs_by_transform = recalls(phash)
    for name, recall in recalls(model).items():
        report.add(
            Figure(f"recall @ p99 threshold: {name}", recall, "", base, theirs_by_transform[name])
        )
    report.details["thresholds_at_p99"] = {
        "model": ours.threshold_at_p99,
        "phash": theirs.threshold_at_p99,
    }
    report.details["true_pairs"] = truth.n_positive


def add_normalisation_figures(
    report: Report, normalised: DuplicateEvaluation, raw: DuplicateEvaluation
) -> None:
    """What the score background adds: the same candidates scored both ways."""
    base = "raw cosine"
    ours, theirs = normalised.pairs, raw.pairs
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
    report.details["raw_cosine"] = {**asdict(theirs), "per_transform": recalls(raw)}


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
