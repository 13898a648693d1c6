"""Latency of ``recognize`` at 100k labelled photos (synthetic vectors in a real catalog),
beside the same answer done by hand with a numpy brute-force search and the same vote:
of a descriptor, of one new photo alone, and per photo of new photos in one call.

    python -m benchmarks.recognition [--labelled 100000] [--queries 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.data import new_photos
from benchmarks.measure import Stopwatch, percentile_ms, timed
from benchmarks.query import fill_catalog
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import RESULTS, default_weights
from ghostmatch.library import Library
from ghostmatch.recognition.recognizer import DEFAULT_K
from ghostmatch.recognition.vote import label_scores

LABELLED = 100_000
CLASSES = 1000
QUERIES = 50
PHOTOS = 20
WARMUP = 3
TARGET_MS = 50.0
BATCH_REPEATS = 3


def labelled_vectors(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``CLASSES`` random centres and the centre of each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    members = rng.integers(0, CLASSES, n)
    vectors = centres[members] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), members


def by_hand(vectors: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """What a script would do: numpy inner products, the top k, the same vote."""
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    label_scores([(int(labels[i]),) for i in top], scores[top], k)
    return top


def measure(folder: Path, weights: str, n: int, n_queries: int) -> Report:
    report = Report("recognition", quick=n < LABELLED)
    with Library(folder / "index", weights=weights, device="cpu") as lib:
        dim = lib.embedder.dim
        vectors, members = labelled_vectors(n, dim, seed=0)
        fill_catalog(lib, vectors)
        paths = [Path(f"/synthetic/{i:07d}.jpg") for i in range(n)]
        with Stopwatch() as labelling:
            lib.set_labels({p: f"class{members[i]:04d}" for i, p in enumerate(paths)})
        calibration = lib.recognizer.calibration()
        with Stopwatch() as recalibration:
            lib.calibrate_recognition()
        recognizer = lib.recognizer
        fresh = Library(folder / "index", device="cpu")
        with Stopwatch() as first:
            fresh.recognizer.recognize_vector(vectors[0])
        fresh.close()
        rng = np.random.default_rng(1)
        queries = vectors[rng.integers(0, n, WARMUP + n_queries)] + rng.standard_normal(
            (WARMUP + n_queries, dim)
        ).astype(np.float32) / np.sqrt(dim)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for q in queries[:WARMUP]:
            recognizer.recognize_vector(q)
        ours, numpy_times = [], []
        same = 0
        for q in queries[WARMUP:]:
            ours.append(timed(partial(recognizer.recognize_vector, q)))
            numpy_times.append(timed(partial(by_hand, vectors, members, q, DEFAULT_K)))
            answer = recognizer.recognize_vector(q)
            expected = by_hand(vectors, members, q, DEFAULT_K) + 1  # catalog ids start at 1
            same += int([nb.id for nb in answer.neighbours] == expected.tolist())
        photos = new_photos(WARMUP + PHOTOS, seed=2)
        for photo in photos[:WARMUP]:
            lib.recognize(photo)
        whole, embed_and_numpy, embed_alone = [], [], []
        for photo in photos[WARMUP:]:
            whole.append(timed(partial(lib.recognize, photo)))
            with Stopwatch() as embedding:
                vector = lib.embed([photo])[0]
            embed_alone.append(embedding.seconds)
            embed_and_numpy.append(
                embedding.seconds + timed(partial(by_hand, vectors, members, vector, DEFAULT_K))
            )
        # The same photos in one call: one model call for all, one search.
        batch = photos[WARMUP:]
        batched, batched_by_hand = [], []
        for _ in range(BATCH_REPEATS):
            batched.append(timed(partial(lib.recognize_many, batch)) / len(batch))
            with Stopwatch() as embedding:
                embedded = lib.embed(batch)
            searched = sum(
                timed(partial(by_hand, vectors, members, v, DEFAULT_K)) for v in embedded
            )
            batched_by_hand.append((embedding.seconds + searched) / len(batch))
    p50 = percentile_ms(whole, 50)
    per_photo = percentile_ms(batched, 50)
    report.add(
        Figure(
            f"lib.recognize_many({PHOTOS} new photos) per photo, median of {BATCH_REPEATS}, "
            f"k={DEFAULT_K}, {n:,} labelled photos",
            per_photo,
            "ms",
            "by hand: embed in one batch + numpy brute force + vote, per photo",
            percentile_ms(batched_by_hand, 50),
            target=f"< {TARGET_MS:g} ms",
            met=per_photo < TARGET_MS,
        )
    )
    report.add(
        Figure(
            f"lib.recognize(one new photo alone) p50, k={DEFAULT_K}, {n:,} labelled photos",
            p50,
            "ms",
            "by hand: embed + numpy brute force + vote",
            percentile_ms(embed_and_numpy, 50),
            target=f"< {TARGET_MS:g} ms",
            met=p50 < TARGET_MS,
        )
    )
    report.add(
        Figure(
            "recognize a descriptor p50 (search, vote, neighbours' records)",
            percentile_ms(ours, 50),
            "ms",
            "numpy brute force + vote, p50",
            percentile_ms(numpy_times, 50),
        )
    )
    report.add(
        Figure(
            "recognize a descriptor p95",
            percentile_ms(ours, 95),
            "ms",
            "numpy brute force + vote, p95",
            percentile_ms(numpy_times, 95),
        )
    )
    report.details = {
        "labelled": n,
        "classes": CLASSES,
        "dim": dim,
        "queries": n_queries,
        "photos": PHOTOS,
        "label_seconds_with_calibration": round(labelling.seconds, 2),
        "recalibrate_seconds": round(recalibration.seconds, 2),
        "first_answer_of_a_fresh_open_seconds": round(first.seconds, 2),
        "calibration": calibration.to_dict(),
        "neighbours_equal_numpy": same / n_queries,
        "recognize_photo_ms": {"p50": p50, "p95": percentile_ms(whole, 95)},
        "embed_one_photo_ms": {"p50": percentile_ms(embed_alone, 50)},
        "recognize_many_per_photo_ms": [round(t * 1000, 2) for t in batched],
    }
    report.notes.append(
        f"weights {weights!r} ({dim}-d), synthetic labelled vectors in {CLASSES} classes, CPU; "
        f"the first answer after opening loads the labelled vectors from the catalog "
        f"({first.seconds:.2f} s); the k nearest equal numpy's for {same}/{n_queries} queries"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recognition", description=__doc__)
    parser.add_argument("--labelled", type=int, default=LABELLED)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    def measured() -> Report:
        with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
            return measure(
                Path(tmp), args.weights or default_weights(), args.labelled, args.queries
            )

    run_and_save("recognition", argv, args.out, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
