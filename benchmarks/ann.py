"""Recall@10 and queries/s of FAISS indexes (Flat, IVF, HNSW) against exact brute-force
search, built through ``build_index`` on clustered synthetic descriptors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import faiss
import numpy as np
import psutil

from benchmarks.data import clustered_unit_vectors
from benchmarks.measure import Stopwatch, timed
from benchmarks.plots import scatter_chart
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.indexes.vector_index import FLAT_LIMIT, build_index, default_factory

K = 10
SIZES = (100_000, 1_000_000)
DIMS, DIMS_QUICK = (256, 960), (256,)
QUERIES, QUERIES_QUICK = 1000, 300
# A size is skipped when the estimate of its run, from the size before it, exceeds the
# settings' budget (``--budget``, 600 s by default).
# How build time grows from 100k to 1M vectors: IVF k-means and assignment scale with
# vectors x lists (10x the vectors, 4x the lists); HNSW insertion with about n log n.
_IVF_GROWTH, _HNSW_GROWTH, _LINEAR_GROWTH = 40.0, 12.0, 10.0


@dataclass(frozen=True)
class Measured:
    """One index over ``n`` vectors of ``dim``: build seconds, batch queries/s, recall@10."""

    n: int
    dim: int
    factory: str
    build_seconds: float
    queries_per_s: float
    recall_at_10: float
    search_params: dict[str, int]


def run(settings: Settings) -> Report:
    report = Report("ann", settings.quick)
    dims = DIMS_QUICK if settings.quick else DIMS
    sizes = SIZES[:1] if settings.quick else SIZES
    queries = QUERIES_QUICK if settings.quick else QUERIES
    results: list[Measured] = []
    for dim in dims:
        previous: list[Measured] = []
        generation = 0.0
        for n in sizes:
            if previous:
                estimate = estimate_seconds(previous, generation * n / previous[0].n)
                memory = 4 * n * dim * 4  # data, Flat, the index under test and a copy
                if estimate > settings.budget_s or memory > psutil.virtual_memory().available:
                    report.notes.append(
                        f"{n:,} x {dim}: skipped, estimated {estimate / 60:.0f} min and "
                        f"{memory / 1e9:.1f} GB on this machine (budget "
                        f"{settings.budget_s / 60:.0f} min, --budget)"
                    )
                    continue
            with Stopwatch() as making:
                x = clustered_unit_vectors(n + queries, dim, seed=dim)
            generation = making.seconds
            previous = measure(x[:n], x[n:], factories(n, dim))
            results += previous
            del x
    if settings.quick:
        report.notes.append(
            f"--quick: {SIZES[0]:,} vectors, dim {', '.join(map(str, dims))} only (dim 960 "
            "and 1M vectors are in the full run)"
        )
    describe(report, results, queries)
    report.plots.append(
        scatter_chart(
            {
                f"dim {dim}": [
                    (r.queries_per_s, r.recall_at_10, f"{r.factory} @{r.n // 1000}k")
                    for r in results
                    if r.dim == dim
                ]
                for dim in dims
            },
            "queries/s (batch, log scale)",
            f"recall@{K}",
            "approximate vs exact search",
            settings.out / "ann.png",
        )
    )
    return report


def factories(n: int, dim: int) -> list[str]:
    """Flat (the reference), the IVF the library picks for this size, and HNSW32."""
    if n > FLAT_LIMIT:
        ivf = default_factory(n, dim)
    else:
        # Below FLAT_LIMIT the library stays exact; measure the IVF it would pick above,
        # with about 4 sqrt(n) lists.
        ivf = f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))},Flat"
    return ["Flat", ivf, "HNSW32"]


def measure(base: np.ndarray, queries: np.ndarray, names: list[str]) -> list[Measured]:
    """Build each index over ``base`` (ids 0..n-1) and search ``queries`` in one batch;
    recall@10 is against exact inner-product search (``faiss.knn``, brute force), so the
    Flat index is checked too rather than taken as the truth."""
    ids = np.arange(len(base), dtype=np.int64)
    _, truth = faiss.knn(queries, base, K, faiss.METRIC_INNER_PRODUCT)
    results = []
    for name in names:
        with Stopwatch() as building:
            index = build_index(ids, base, name, device="cpu")
        seconds = timed(partial(index.search, queries, K))
        _, found = index.search(queries, K)
        hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum()
        results.append(
            Measured(
                n=len(base),
                dim=base.shape[1],
                factory=name,
                build_seconds=building.seconds,
                queries_per_s=len(queries) / seconds,
                recall_at_10=float(hits) / truth.size,
                search_params=index.search_params,
            )
        )
        del index
    return results


def estimate_seconds(previous: list[Measured], generation: float) -> float:
    """Time for the next size (10x the vectors), scaled from the measured one."""
    total = generation
    for r in previous:
        search = 1.0 / r.queries_per_s * QUERIES
        if r.factory == "Flat":
            total += _LINEAR_GROWTH * (r.build_seconds + search)
        elif r.factory.startswith("IVF"):
            total += _IVF_GROWTH * r.build_seconds + search
        else:
            total += _HNSW_GROWTH * r.build_seconds + search
    return total


def describe(report: Report, results: list[Measured], queries: int) -> None:
    flat = {(r.n, r.dim): r for r in results if r.factory == "Flat"}
    for r in results:
        if r.factory == "Flat":
            continue
        exact = flat[(r.n, r.dim)]
        where = f"{r.n // 1000}k x {r.dim}"
        report.add(
            Figure(
                f"{r.factory} @{where}: queries/s",
                r.queries_per_s,
                "q/s",
                "Flat (exact)",
                exact.queries_per_s,
            )
        )
        report.add(
            Figure(f"{r.factory} @{where}: recall@{K}", r.recall_at_10, "", "Flat (exact)", 1.0)
        )
    report.details = {"queries": queries, "k": K, "results": [vars(r) for r in results]}
    report.notes.append(
        f"{queries} held-out queries searched in one batch (all faiss threads); clustered "
        "unit vectors (1000 centres); search parameters as tuned by build_index: "
        + "; ".join(f"{r.factory} {r.search_params}" for r in results if r.search_params)
    )
