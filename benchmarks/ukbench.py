"""Instance retrieval: UKBench N-S on ukbench-dev and class mAP on caltech101 test photos,
for each retrieval refinement of ``query`` beside a plain cosine and pHash, same run.

UKBench N-S (Nister and Stewenius, CVPR 2006): each of the 500 photos is queried against
the other 499 through ``Library.query`` (the real path: stored vector, augmentation,
shortlist, re-ranking); the score is how many of its object's four photos are in the top
four, the query included (4.0 is perfect). Objects 0-62 are the tuning half (where the
defaults were chosen), 63-124 the held-out half. Caltech: every ``--caltech-queries``-th
test photo queried against the whole test split, mean average precision over its class
in the top ``SHORTLIST`` results (a class photo outside them counts as not found).
Query cost: the mean of each configuration's ``Library.query`` calls, ms per query, and the
median of a few queries by new photos with nothing kept from earlier queries.

``python -m benchmarks.ukbench [--quick] [--caltech-queries N] [--rows NAME ...]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

import ghostmatch.retrieval.pipeline as pipeline
from benchmarks.data import REPO, caltech_test
from benchmarks.quality import _phash
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import Settings, benchmark_options, default_weights
from ghostmatch.eval.metrics import average_precision
from ghostmatch.library import Library
from ghostmatch.retrieval.refine import DEFAULT, PLAIN, Refinements

UKBENCH = REPO.parent / "shared" / "data" / "ukbench-dev"
SHOTS = 4
TUNING_OBJECTS = 63
OBJECTS_QUICK = 12
CALTECH_QUICK = 120
SHORTLIST = 200

DBA_QE = PLAIN.with_changes(dba=2, expand=2)
# Rows named by what they do; ``default_row`` says which one is ``DEFAULT``. Re-ranking rows
# come longest first, so that shorter ones find the local maps already kept.
CONFIGS: dict[str, Refinements] = {
    "plain cosine": PLAIN,
    "whiten (training photos)": PLAIN.with_changes(whiten="training"),
    "whiten (collection)": PLAIN.with_changes(whiten="collection"),
    "flip": PLAIN.with_changes(augment="flip"),
    "multiscale": PLAIN.with_changes(augment="multiscale"),
    "alpha-QE 2": PLAIN.with_changes(expand=2),
    "DBA 2": PLAIN.with_changes(dba=2),
    "DBA 2 + alpha-QE 2": DBA_QE,
    "flip + DBA 2 + alpha-QE 2": DBA_QE.with_changes(augment="flip"),
    "DBA 2 + alpha-QE 2 + whiten (training photos)": DBA_QE.with_changes(whiten="training"),
    "DBA 2 + alpha-QE 2 + re-rank 32": DBA_QE.with_changes(rerank=32),
    "re-rank 20": PLAIN.with_changes(rerank=20),
    "DBA 2 + alpha-QE 2 + re-rank 24": DBA_QE.with_changes(rerank=24),
    "DBA 2 + alpha-QE 2 + re-rank 20": DBA_QE.with_changes(rerank=20),
    "DBA 2 + alpha-QE 2 + re-rank 16": DBA_QE.with_changes(rerank=16),
    "DBA 2 + alpha-QE 2 + re-rank 12": DBA_QE.with_changes(rerank=12),
    "DBA 2 + alpha-QE 2 + re-rank 8": DBA_QE.with_changes(rerank=8),
}
# New photos timed per row for the cost of one query with nothing kept from earlier ones
# (what a ``ghostmatch query`` command of a photo not in the index pays, start-up aside).
COLD_QUERIES = 8


def chosen(only: Sequence[str] | None) -> dict[str, Refinements]:
    """The rows named in ``only`` (all when None), with the plain cosine (every figure's
    baseline) and the default always among them, in ``CONFIGS``' order."""
    if only is None:
        return dict(CONFIGS)
    unknown = [name for name in only if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"no such rows: {', '.join(unknown)}; rows are: {', '.join(CONFIGS)}")
    wanted = {*only, "plain cosine", default_row()}
    return {name: refine for name, refine in CONFIGS.items() if name in wanted}


def default_row() -> str:
    """The name of the row whose refinements are ``DEFAULT``."""
    return next(name for name, refine in CONFIGS.items() if refine == DEFAULT)


def ukbench_scores(
    lib: Library, paths: Sequence[Path], refine: Refinements
) -> tuple[np.ndarray, float]:
    """Each photo's N-S score and the mean ms per query."""
    index_of = {p.resolve(): n for n, p in enumerate(paths)}
    scores = np.zeros(len(paths))
    start = time.perf_counter()
    for n, path in enumerate(paths):
        matches = lib.query(path, SHOTS - 1, refine=refine)
        found = [index_of[m.path.resolve()] for m in matches if m.path.resolve() in index_of]
        scores[n] = 1 + sum(f // SHOTS == n // SHOTS for f in found)
    return scores, (time.perf_counter() - start) / len(paths) * 1000


def cold_ms(lib: Library, paths: Sequence[Path], refine: Refinements) -> tuple[float, float]:
    """Median ms and median CPU ms (every thread of this process) of a query of each photo
    given as a new image (decoded, not a path), with nothing kept from earlier queries
    (local maps, whitening); what was kept is put back. The CPU time is what a loaded
    machine inflates least."""
    kept = dict(lib.searcher.cache)
    times, cpu = [], []
    try:
        for path in paths:
            with Image.open(path) as image:
                photo = image.convert("RGB")
            lib.searcher.cache.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            lib.query(photo, 10, refine=refine)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    finally:
        lib.searcher.cache.clear()
        lib.searcher.cache.update(kept)
    return float(np.median(times)) * 1000, float(np.median(cpu)) * 1000


def phash_scores(paths: Sequence[Path]) -> np.ndarray:
    """N-S of pHash: the three nearest by Hamming distance, ties in file order."""
    codes = np.stack([_phash(p) for p in paths]).astype(np.int64)
    distances = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    np.fill_diagonal(distances, 10**6)
    top = np.argsort(distances, axis=1, kind="stable")[:, : SHOTS - 1]
    objects = np.arange(len(paths)) // SHOTS
    return 1 + (objects[top] == objects[:, None]).sum(axis=1)


def caltech_map(
    lib: Library, paths: Sequence[Path], labels: Sequence[str], every: int, refine: Refinements
) -> tuple[float, float]:
    """Class mAP of every ``every``-th photo's top ``SHORTLIST`` results, ms per query."""
    label_of = {p.resolve(): label for p, label in zip(paths, labels, strict=True)}
    sizes: dict[str, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    aps = []
    start = time.perf_counter()
    queries = paths[::every]
    for path in queries:
        own = label_of[path.resolve()]
        if sizes[own] < 2:
            continue
        matches = lib.query(path, SHORTLIST, refine=refine)
        relevant = np.array([label_of.get(m.path.resolve()) == own for m in matches], dtype=bool)
        scores = np.array([m.score for m in matches])
        aps.append(average_precision(scores, relevant, n_positive_total=sizes[own] - 1))
    return float(np.mean(aps)), (time.perf_counter() - start) / len(queries) * 1000


def run(
    settings: Settings,
    caltech_every: int = 40,
    part: str = "both",
    only: Sequence[str] | None = None,
) -> Report:
    report = Report("ukbench" if part != "caltech" else "ukbench_caltech", settings.quick)
    paths = sorted(UKBENCH.glob("ukbench*.jpg"))
    if not paths:
        report.notes.append(f"skipped: no ukbench-dev photos at {UKBENCH}")
        return report
    if settings.quick:
        paths = paths[: OBJECTS_QUICK * SHOTS]
    objects = np.arange(len(paths)) // SHOTS
    tuning = objects < (TUNING_OBJECTS if not settings.quick else OBJECTS_QUICK // 2)
    photos = (caltech_test() or []) if part != "ukbench" else []
    if settings.quick:
        photos = photos[:: max(1, len(photos) // CALTECH_QUICK)]
    configs = chosen(only)
    rows: dict[str, dict[str, float]] = {name: {} for name in configs}
    # Every photo's local maps are kept for the whole run (0.1 MB each): the rows share
    # them, which changes no answer (kept maps and fresh ones are the same half-precision
    # values), only how long the re-ranking rows take to compute.
    pipeline.MAP_CACHE_IMAGES = max(pipeline.MAP_CACHE_IMAGES, len(paths), len(photos)) + 1
    cold = paths[:: max(1, len(paths) // COLD_QUERIES)][:COLD_QUERIES]
    with tempfile.TemporaryDirectory(prefix="ghostmatch-ukbench-") as tmp:
        with Library(Path(tmp) / "ukbench", weights=settings.weights) as lib:
            if part != "caltech":
                lib.add(paths)
            for name, refine in configs.items():
                if part == "caltech":
                    break
                per, ms = ukbench_scores(lib, paths, refine)
                new_ms, new_cpu_ms = cold_ms(lib, cold, refine)
                rows[name] |= {
                    "all": float(per.mean()),
                    "tuning": float(per[tuning].mean()),
                    "heldout": float(per[~tuning].mean()),
                    "ms_per_query": ms,
                    "new_photo_ms": new_ms,
                    "new_photo_cpu_ms": new_cpu_ms,
                }
                print(f"ukbench {name}: {rows[name]}", flush=True)
        if photos:
            with Library(Path(tmp) / "caltech", weights=settings.weights) as lib:
                lib.add([p.path for p in photos])
                files = [p.path for p in photos]
                labels = [p.label for p in photos]
                every = 1 if settings.quick else caltech_every
                for name, refine in configs.items():
                    rows[name]["caltech_map"], rows[name]["caltech_ms"] = caltech_map(
                        lib, files, labels, every, refine
                    )
                    print(f"caltech {name}: {rows[name]}", flush=True)
    if part == "caltech":
        report.details = {"rows": rows, "caltech_photos": len(photos), "every": caltech_every}
        return report
    phash = phash_scores(paths)
    rows["pHash (64-bit)"] = {
        "all": float(phash.mean()),
        "tuning": float(phash[tuning].mean()),
        "heldout": float(phash[~tuning].mean()),
    }
    plain = rows["plain cosine"]
    for name in configs:
        if name == "plain cosine":
            continue
        report.add(
            Figure(f"UKBench N-S, {name}, all", rows[name]["all"], "", "plain cosine", plain["all"])
        )
    defaults = rows[default_row()]
    report.add(
        Figure(
            "UKBench N-S with the defaults, held-out objects",
            defaults["heldout"],
            "",
            "plain cosine, held-out objects",
            plain["heldout"],
            target=">= 3.6",
            met=defaults["heldout"] >= 3.6,
        )
    )
    report.add(
        Figure(
            "UKBench N-S, plain cosine, all",
            plain["all"],
            "",
            "pHash (64-bit)",
            rows["pHash (64-bit)"]["all"],
        )
    )
    report.details = {
        "rows": rows,
        "default": default_row(),
        "ukbench_photos": len(paths),
        "caltech_photos": len(photos),
    }
    report.notes.append(
        "ukbench-dev: each photo against the other photos through Library.query; tuning = "
        "objects 0-62, held-out = 63-124; caltech: class mAP in the top 200 of every "
        f"{caltech_every}-th test photo (all of them with --quick), same queries for every "
        "row; ms/query: the mean over the ukbench queries, local maps kept between rows; "
        f"new photo: the median of {len(cold)} queries by a decoded image with nothing kept "
        "(wall and CPU ms)"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_options(
        "ukbench", __doc__, quick="12 objects, 120 caltech photos", weights=True
    )
    parser.add_argument(
        "--caltech-queries",
        type=int,
        default=40,
        metavar="N",
        help="query every N-th caltech test photo (default 40)",
    )
    parser.add_argument(
        "--part",
        choices=("both", "ukbench", "caltech"),
        default="both",
        help="run one half only (two processes: results/ukbench.json and ukbench_caltech.json)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="NAME",
        help="run only these rows (the plain cosine and the default always run)",
    )
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick, weights=args.weights or default_weights(), out=args.out)
    report = run_and_save(
        "ukbench",
        argv,
        settings.out,
        lambda: run(settings, args.caltech_queries, args.part, args.rows),
    )
    print(table(report))
    return 0


def table(report: Report) -> str:
    """The rows as a Markdown table: N-S all / tuning / held-out, caltech mAP, ms/query."""
    lines = [
        "| query | N-S all | tuning 0-62 | held-out 63-124 | caltech mAP | ms/query "
        "| ms, new photo | CPU ms, new photo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    default = report.details.get("default")
    for name, row in report.details.get("rows", {}).items():
        cells = [
            f"{row[key]:.3f}" if key in row else ""
            for key in ("all", "tuning", "heldout", "caltech_map")
        ]
        costs = ("ms_per_query", "new_photo_ms", "new_photo_cpu_ms")
        cells += [f"{row[key]:,.0f}" if key in row else "" for key in costs]
        shown = f"**{name} (default)**" if name == default else name
        lines.append(f"| {shown} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
