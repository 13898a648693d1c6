"""Opening a saved FAISS index: checked by the file's recorded state (inode, size, mtime,
ctime, from its stamp) against hashing every byte (sha256) as every open used to, on a Flat
index of 1M 256-d unit vectors (a 1 GB file, in the page cache: the cost of the check, not
of the disk)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import benchmark_options
from ghostmatch.indexes.vector_index import VectorIndex

DIM = 256
CHUNK = 100_000


def measure(n: int, rounds: int, folder: Path) -> Report:
    report = Report("index_open", quick=n < 1_000_000)
    rng = np.random.default_rng(0)
    index = VectorIndex(DIM, "Flat", device="cpu")
    for start in range(0, n, CHUNK):
        x = rng.standard_normal((min(CHUNK, n - start), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index.add(np.arange(start, start + len(x), dtype=np.int64), x)
    path = folder / "vectors.faiss"
    checksum = index.save(path)
    identity = index.identity
    assert identity is not None
    del index
    times: dict[str, list[float]] = {"recorded state": [], "sha256": [], "read_index": []}
    known = (identity, checksum)
    for _ in range(rounds):
        times["recorded state"].append(_seconds(lambda: VectorIndex.load(path, "cpu", known)))
        times["sha256"].append(_seconds(lambda: VectorIndex.load(path, "cpu")))
        times["read_index"].append(_seconds(lambda: faiss.read_index(str(path))))
    median = {name: statistics.median(values) for name, values in times.items()}
    size = path.stat().st_size
    report.add(
        Figure(
            f"open a {size / 1e9:.2f} GB Flat index ({n:,} x {DIM}), its file state recorded",
            median["recorded state"],
            "s",
            "every byte hashed (sha256)",
            median["sha256"],
        )
    )
    report.add(
        Figure(
            "the same, against faiss reading the file alone",
            median["recorded state"],
            "s",
            "faiss.read_index",
            median["read_index"],
        )
    )
    report.details.update(bytes=size, n=n, dim=DIM, rounds=rounds, seconds=times)
    report.notes.append(
        f"median of {rounds} opens each, one after another, the file in the page cache"
    )
    return report


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_options("index_open", __doc__, quick="100,000 vectors")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n = 100_000 if args.quick else args.n
    with tempfile.TemporaryDirectory(prefix="ghostmatch-open-") as tmp:
        run_and_save("index_open", argv, args.out, lambda: measure(n, args.rounds, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
