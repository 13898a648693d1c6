"""Time and memory of similar_pairs (exact, IVF) against block brute force on synthetic
clustered unit vectors with planted near-duplicate pairs.

    python -m benchmarks.allpairs_bench --n 100000 --dim 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import psutil

from ghostmatch.indexes.allpairs import brute_force_pairs, similar_pairs
from ghostmatch.indexes.vector_index import build_index

RESULTS = Path(__file__).resolve().parent / "results" / "allpairs_bench.json"
# Brute force past this is hours on a laptop; the exact path is the reference then.
BRUTE_LIMIT = 100_000

T = TypeVar("T")
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def make_dataset(
    n: int, dim: int, clusters: int, planted: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors around random centres (cluster mates score ~0.5) where ``planted``
    rows are noisy copies of others at cosines uniform in [0.85, 0.995].
    Returns vectors, the planted (row, row) pairs and their cosines."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) / np.float32(math.sqrt(dim))
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    rows = rng.choice(n, size=2 * planted, replace=False).reshape(2, planted)
    cosines = rng.uniform(0.85, 0.995, planted)
    # x + s*u with unit u orthogonal to unit x has cosine 1/sqrt(1 + s^2) with x.
    originals = x[rows[0]].astype(np.float64)
    u = rng.standard_normal((planted, dim))
    u -= np.einsum("nd,nd->n", u, originals)[:, None] * originals
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    copies = originals + u * np.sqrt(1 / cosines**2 - 1)[:, None]
    x[rows[1]] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x, rows.T.copy(), cosines


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 5 ms; yields a dict filled with the peak and the
    growth over the starting RSS, in MiB, when the block ends."""
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        out["peak_rss_mib"] = peak[0] / 2**20
        out["rss_growth_mib"] = (peak[0] - start) / 2**20


def measure(label: str, run: Callable[[], T]) -> tuple[T, dict[str, float]]:
    with peak_rss() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        value = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # CPU time as well as wall time: on a shared machine it is the steadier of the two.
    stats = {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        **{k: round(v, 1) for k, v in memory.items()},
    }
    print(
        f"{label:<28} {seconds:8.2f} s wall {cpu:8.2f} s CPU   peak RSS "
        f"{memory['peak_rss_mib']:7.1f} MiB (+{memory['rss_growth_mib']:.1f})",
        flush=True,
    )
    return value, stats


def pair_set(result: Pairs) -> set[tuple[int, int]]:
    return set(zip(result[0].tolist(), result[1].tolist(), strict=True))


def compare(result: Pairs, reference: Pairs) -> dict[str, float | int | bool]:
    found, truth = pair_set(result), pair_set(reference)
    hits = len(found & truth)
    return {
        "pairs": len(found),
        "reference_pairs": len(truth),
        "recall": hits / len(truth) if truth else 1.0,
        "precision": hits / len(found) if found else 1.0,
        "identical": all(
            np.array_equal(got, want) for got, want in zip(result, reference, strict=True)
        ),
    }


def planted_recall(
    result: Pairs, planted: np.ndarray, cosines: np.ndarray, threshold: float
) -> float:
    """Share of the planted pairs above the threshold (beyond float32 rounding) found."""
    clear = planted[cosines >= threshold + 1e-4]
    found = pair_set(result)
    hits = sum((min(a, b), max(a, b)) in found for a, b in clear.tolist())
    return hits / len(clear) if len(clear) else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--planted", type=int, default=None, help="default n / 100")
    parser.add_argument("--clusters", type=int, default=None, help="default n / 100")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--max-neighbors", type=int, default=100)
    parser.add_argument("--ivf", default=None, help="IVF factory; default ~4*sqrt(n) lists")
    parser.add_argument("--no-brute", action="store_true", help="skip the brute-force reference")
    parser.add_argument(
        "--no-exact",
        action="store_true",
        help="skip the exact path too (1M+: hours on 2 cores); IVF is then measured against "
        "the planted pairs only",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    n, dim, threshold = args.n, args.dim, args.threshold
    planted_count = args.planted if args.planted is not None else max(1, n // 100)
    clusters = args.clusters if args.clusters is not None else max(1, n // 100)
    factory = args.ivf or f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))},Flat"
    print(
        f"n={n} dim={dim} threshold={threshold} planted={planted_count} clusters={clusters} "
        f"chunk={args.chunk} faiss={faiss.__version__} threads={faiss.omp_get_max_threads()}",
        flush=True,
    )
    (x, planted, cosines), data_stats = measure(
        "make dataset", lambda: make_dataset(n, dim, clusters, planted_count, args.seed)
    )
    report: dict[str, Any] = {
        "params": {
            "n": n,
            "dim": dim,
            "threshold": threshold,
            "planted": planted_count,
            "clusters": clusters,
            "chunk": args.chunk,
            "max_neighbors": args.max_neighbors,
            "ivf_factory": factory,
            "seed": args.seed,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "gpus": faiss.get_num_gpus(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "dataset": data_stats,
    }

    brute: Pairs | None = None
    if n <= BRUTE_LIMIT and not args.no_brute:
        result, stats = measure(
            "brute force (numpy blocks)", lambda: brute_force_pairs(x, threshold)
        )
        report["brute_force"] = {**stats, "pairs": len(result[0])}
        brute = result

    reference: Pairs | None = brute
    if not args.no_exact:
        exact, stats = measure(
            "similar_pairs exact", lambda: similar_pairs(x, threshold, chunk=args.chunk)
        )
        # Without brute force, the exact path is the reference (equal to it up to 100k here).
        reference = brute if brute is not None else exact
        report["exact"] = {
            **stats,
            "planted_recall": planted_recall(exact, planted, cosines, threshold),
            **compare(exact, reference),
        }

    index, build_stats = measure(
        f"build {factory}", lambda: build_index(np.arange(n), x, factory, device="auto")
    )
    approx, stats = measure(
        "similar_pairs IVF",
        lambda: similar_pairs(
            x, threshold, index=index, chunk=args.chunk, max_neighbors=args.max_neighbors
        ),
    )
    report["ivf"] = {
        "build": build_stats,
        "search_params": index.search_params,
        "on_gpu": index.on_gpu,
        **stats,
        "planted_recall": planted_recall(approx, planted, cosines, threshold),
        **(compare(approx, reference) if reference is not None else {}),
    }
    report["peak_rss_mib_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )

    for name in ("brute_force", "exact", "ivf"):
        if name in report:
            row = report[name]
            extra = "".join(
                f"  {key}={row[key]:.4f}" if isinstance(row[key], float) else f"  {key}={row[key]}"
                for key in ("pairs", "recall", "precision", "planted_recall", "identical")
                if key in row
            )
            print(f"{name:<12}{extra}")
    print(f"process peak RSS (ru_maxrss) {report['peak_rss_mib_process']} MiB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
