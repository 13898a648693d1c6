"""The catalog on PostgreSQL beside SQLite, in the same run: index 10,000 caltech photos,
100,000 catalog lookups, and queries, each back end in a fresh process.

``python -m benchmarks.catalog_backends [--photos 10000] [--lookups 100000] [--queries 200]
[--catalog URL] [--weights W] [--caltech DIR]``

Without ``--catalog`` a throwaway PostgreSQL server runs in a temporary folder, on a unix
socket, with a real server's fsync at every commit (SQLite runs as ghostmatch sets it up:
WAL, synchronous=NORMAL).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.data import CALTECH, missing_caltech_note
from benchmarks.indexing import in_fresh_process
from benchmarks.measure import Stopwatch, percentile_ms, timed
from benchmarks.postgres import temporary_server, unavailable_reason
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import benchmark_options, default_weights

# Records per batched lookup: what a page of results or a duplicate group asks for at once.
BATCH = 1000


@dataclass(frozen=True)
class BackendRun:
    """One back end's figures; times per lookup in microseconds, per query in ms."""

    backend: str
    images: int
    index_seconds: float
    images_per_s: float
    rerun_seconds: float
    lookups: int
    lookup_one_us: float
    lookup_batched_us: float
    query_p50_ms: float
    query_p95_ms: float
    catalog_bytes: int | None
    failed: dict[str, int]


def caltech_photos(root: Path, n: int) -> list[Path] | None:
    """``n`` caltech101 photos, train and test split alike; the list again, under other
    names, where it holds fewer (same bytes: each is indexed as a file of its own)."""
    lines: list[str] = []
    for split in ("train.txt", "test.txt"):
        listing = root / split
        if not listing.is_file():
            return None
        lines += [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [root / lines[i % len(lines)] for i in range(n)]


def link(files: list[Path], folder: Path) -> None:
    """Symlink the photos into ``folder`` under unique names (copy number, class, file)."""
    folder.mkdir(parents=True)
    seen: dict[Path, int] = {}
    for file in files:
        copy = seen.get(file, 0)
        seen[file] = copy + 1
        (folder / f"{copy}-{file.parent.name}-{file.name}").symlink_to(file)


def measure(
    backend: str,
    folder: Path,
    index: Path,
    catalog: str | None,
    weights: str,
    lookups: int,
    queries: int,
) -> BackendRun:
    """Index ``folder`` into a new index (the model loaded before the clock starts), run it
    again unchanged, look records up by path one at a time and by id in batches, and time
    queries by indexed photos (their vectors come from the catalog)."""
    from ghostmatch.library import Library

    with Library(index, weights=weights, device="cpu", catalog=catalog) as lib:
        _ = lib.embedder
        with Stopwatch() as clock:
            report = lib.index([folder])
        rerun = timed(lambda: lib.index([folder]))
        stat = lib.catalog.all_stat()
        paths = sorted(stat)
        ids = [stat[path][0] for path in paths]
        rng = random.Random(0)
        by_path = [rng.choice(paths) for _ in range(lookups)]
        with Stopwatch() as one:
            for path in by_path:
                lib.catalog.records_by_path([path])
        by_id = [rng.choice(ids) for _ in range(lookups)]
        with Stopwatch() as batched:
            for start in range(0, lookups, BATCH):
                lib.catalog.get(by_id[start : start + BATCH])
        asked = rng.sample(paths, min(queries, len(paths)))
        lib.query(asked[0], k=10)  # the FAISS index and the model loaded, not timed
        seconds = [timed(lambda path=path: lib.query(path, k=10)) for path in asked]
        size = lib.catalog.disk_size()
    return BackendRun(
        backend=backend,
        images=report.embedded,
        index_seconds=round(clock.seconds, 2),
        images_per_s=round(report.embedded / clock.seconds, 1),
        rerun_seconds=round(rerun, 3),
        lookups=lookups,
        lookup_one_us=round(one.seconds / lookups * 1e6, 1),
        lookup_batched_us=round(batched.seconds / lookups * 1e6, 2),
        query_p50_ms=round(percentile_ms(seconds, 50), 2),
        query_p95_ms=round(percentile_ms(seconds, 95), 2),
        catalog_bytes=size,
        failed=dict(report.failed),
    )


def describe(report: Report, sqlite: BackendRun, postgres: BackendRun, where: str) -> None:
    baseline = "SQLite catalog, same run"
    rows = [
        (f"index {postgres.images:,} photos", "images_per_s", "img/s"),
        ("unchanged re-run of index", "rerun_seconds", "s"),
        (f"{postgres.lookups:,} lookups by path, one at a time", "lookup_one_us", "us each"),
        (f"{postgres.lookups:,} lookups by id, {BATCH} a batch", "lookup_batched_us", "us each"),
        ("query by an indexed photo, k=10, p50", "query_p50_ms", "ms"),
        ("query by an indexed photo, k=10, p95", "query_p95_ms", "ms"),
    ]
    for name, key, unit in rows:
        value, base = getattr(postgres, key), getattr(sqlite, key)
        report.add(Figure(f"{name}, PostgreSQL catalog", value, unit, baseline, base))
    report.details["runs"] = {"sqlite": asdict(sqlite), "postgresql": asdict(postgres)}
    report.notes.append(
        f"PostgreSQL: {where}; both on this machine, each back end's run in a fresh process, "
        "SQLite first; a query by an indexed photo reads its vector and its matches' records "
        "from the catalog"
    )


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_options("catalog_backends", __doc__.splitlines()[0], weights=True)
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--catalog", default=None, help="an empty PostgreSQL database's URL")
    parser.add_argument("--caltech", type=Path, default=CALTECH, help="caltech101 folder")
    options = parser.parse_args(argv)
    files = caltech_photos(options.caltech, options.photos)
    if files is None:
        sys.exit(missing_caltech_note("catalog_backends").replace("test photos", "photos"))
    if options.catalog is None and (reason := unavailable_reason()) is not None:
        sys.exit(f"catalog_backends: {reason}; or pass --catalog URL")
    weights = options.weights or default_weights()
    run_and_save(
        "catalog_backends", argv, options.out, lambda: measure_both(options, files, weights)
    )


def measure_both(options: argparse.Namespace, files: list[Path], weights: str) -> Report:
    """Both back ends, each indexing and querying in a fresh process."""
    report = Report("catalog_backends", quick=False)
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ghostmatch-cb-")))
        link(files, root / "photos")
        url, where = options.catalog, "the server at --catalog"
        if url is None:
            server = stack.enter_context(temporary_server(durable=True))
            url = server.new_database().render_as_string(hide_password=False)
            where = "a local server (unix socket, fsync on)"
        runs = {
            backend: in_fresh_process(
                measure,
                backend,
                root / "photos",
                root / f"index-{backend}",
                catalog,
                weights,
                options.lookups,
                options.queries,
            )
            for backend, catalog in (("sqlite", None), ("postgresql", url))
        }
    describe(report, runs["sqlite"], runs["postgresql"], where)
    report.details.update(photos=len(files), weights=weights, distinct=len(set(files)))
    return report


if __name__ == "__main__":
    main()
