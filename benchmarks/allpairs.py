"""The colleague's all-pairs benchmark (``allpairs_bench``) at suite sizes: exact
``similar_pairs`` and its IVF path beside numpy block brute force, as a suite report."""

from __future__ import annotations

import math

import numpy as np

from benchmarks import allpairs_bench
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.indexes.allpairs import brute_force_pairs, similar_pairs
from ghostmatch.indexes.vector_index import build_index

N, N_QUICK = 100_000, 20_000
DIM = 256
THRESHOLD = 0.9
SEED = 0


def run(settings: Settings) -> Report:
    return measure(N_QUICK if settings.quick else N, DIM, settings.quick)


def measure(n: int, dim: int, quick: bool = False) -> Report:
    """Run ``allpairs_bench``'s steps with its defaults (n/100 clusters and planted pairs,
    IVF with ~4 sqrt(n) lists) and report each path against brute force."""
    report = Report("allpairs", quick)
    planted_count = clusters = max(1, n // 100)
    factory = f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))},Flat"
    (x, planted, cosines), _ = allpairs_bench.measure(
        "make dataset",
        lambda: allpairs_bench.make_dataset(n, dim, clusters, planted_count, SEED),
    )
    brute, brute_stats = allpairs_bench.measure(
        "brute force (numpy blocks)", lambda: brute_force_pairs(x, THRESHOLD)
    )
    exact, exact_stats = allpairs_bench.measure(
        "similar_pairs exact", lambda: similar_pairs(x, THRESHOLD)
    )
    index, build_stats = allpairs_bench.measure(
        f"build {factory}", lambda: build_index(np.arange(n), x, factory, device="cpu")
    )
    approx, ivf_stats = allpairs_bench.measure(
        "similar_pairs IVF", lambda: similar_pairs(x, THRESHOLD, index=index)
    )
    exact_vs_brute = allpairs_bench.compare(exact, brute)
    ivf_vs_brute = allpairs_bench.compare(approx, brute)
    where = f"@{n // 1000}k x {dim}"
    baseline = "brute_force_pairs (numpy blocks)"
    brute_s = brute_stats["seconds"]
    report.add(
        Figure(f"similar_pairs exact {where}", exact_stats["seconds"], "s", baseline, brute_s)
    )
    report.add(
        Figure(
            f"similar_pairs {factory} {where} (build + search)",
            build_stats["seconds"] + ivf_stats["seconds"],
            "s",
            baseline,
            brute_s,
        )
    )
    report.add(Figure(f"{factory}: recall of the pairs", ivf_vs_brute["recall"], "", baseline, 1.0))
    report.add(
        Figure(
            f"similar_pairs exact {where}: RSS growth",
            exact_stats["rss_growth_mib"],
            "MiB",
            baseline,
            brute_stats["rss_growth_mib"],
        )
    )
    report.details = {
        "n": n,
        "dim": dim,
        "threshold": THRESHOLD,
        "planted": planted_count,
        "clusters": clusters,
        "ivf_factory": factory,
        "ivf_search_params": index.search_params,
        "brute_force": {**brute_stats, "pairs": len(brute[0])},
        "exact": {
            **exact_stats,
            **exact_vs_brute,
            "planted_recall": allpairs_bench.planted_recall(exact, planted, cosines, THRESHOLD),
        },
        "ivf": {
            "build": build_stats,
            **ivf_stats,
            **ivf_vs_brute,
            "planted_recall": allpairs_bench.planted_recall(approx, planted, cosines, THRESHOLD),
        },
    }
    report.notes.append(
        f"benchmarks/allpairs_bench.py steps at threshold {THRESHOLD}, {planted_count:,} planted "
        f"pairs, {len(brute[0]):,} pairs in all; exact identical to brute force: "
        f"{exact_vs_brute['identical']}; CPU"
    )
    return report
