"""End-to-end ``Library.index`` throughput on real photos and on 12-megapixel JPEGs, beside
the model alone and a naive sequential pipeline, with peak memory and an unchanged re-run."""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from benchmarks.data import (
    caltech_test,
    link_photos,
    make_large_jpegs,
    missing_caltech_note,
    sample,
)
from benchmarks.measure import PeakRSS, Stopwatch, timed
from benchmarks.plots import bar_chart
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.ingest.images import load_image
from ghostmatch.library import Library
from ghostmatch.model.embedder import Embedder, prepare
from ghostmatch.model.weights import load_descriptor

BATCH = 32
CALTECH_PHOTOS, CALTECH_PHOTOS_QUICK = 1000, 200
LARGE_PHOTOS, LARGE_PHOTOS_QUICK = 200, 30
# The naive pipeline's cost per photo is fixed (full decode, resize, forward), so a subset
# measures its rate as well as all of them would, in a quarter of the time.
NAIVE_PHOTOS, NAIVE_PHOTOS_QUICK = 50, 15
TARGET_VS_MODEL = 0.8
TARGET_VS_NAIVE = 4.0
_MB = 1e6
Result = TypeVar("Result")


@dataclass(frozen=True)
class FolderRun:
    """One folder indexed from scratch, then again unchanged, and its baselines (img/s)."""

    images: int
    images_per_s: float
    seconds: float
    rerun_seconds: float
    rss_before: int
    rss_peak: int
    model_images_per_s: float
    naive_images_per_s: float | None
    naive_images: int
    failed: dict[str, int]


def run(settings: Settings) -> Report:
    report = Report("index", settings.quick)
    runs: dict[str, FolderRun] = {}
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        root = Path(tmp)
        photos = caltech_test()
        if photos is None:
            report.notes.append(missing_caltech_note("(a) caltech photos"))
        else:
            n = CALTECH_PHOTOS_QUICK if settings.quick else CALTECH_PHOTOS
            link_photos(sample(photos, n, seed=0), root / "caltech")
            runs["caltech"] = in_fresh_process(
                index_folder, root / "caltech", root / "index-a", settings.weights
            )
        n = LARGE_PHOTOS_QUICK if settings.quick else LARGE_PHOTOS
        with Stopwatch() as making:
            make_large_jpegs(root / "large", n)
        report.details["large_jpegs_make_seconds"] = round(making.seconds, 1)
        naive = NAIVE_PHOTOS_QUICK if settings.quick else NAIVE_PHOTOS
        runs["12 MP"] = in_fresh_process(
            index_folder, root / "large", root / "index-b", settings.weights, naive
        )
    describe(report, runs, settings.weights)
    report.plots.append(
        bar_chart(_rates(runs), "images/s", "indexing throughput", settings.out / "index.png")
    )
    return report


def in_fresh_process(work: Callable[..., Result], *args: object) -> Result:
    """Run ``work`` in a new interpreter, so that its peak RSS is its own and not what
    earlier benchmarks left behind in this process's allocators."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(work, *args).result()


def index_folder(folder: Path, index: Path, weights: str, naive: int = 0) -> FolderRun:
    """Index ``folder`` into a new index at ``index`` and re-run it unchanged; time the
    model alone on the same photos pre-decoded, and the naive pipeline on the first ``naive``.

    The model is loaded before the clock starts: that is a one-off cost, not indexing.
    """
    files = sorted(folder.iterdir())
    with Library(index, weights=weights, device="cpu") as lib:
        embedder = lib.embedder
        card = embedder.card
        # Decoding first also brings the files into the page cache for every contender.
        arrays = [prepare(load_image(path, card.input_size).image, card) for path in files]
        # Half the photos through the model alone before indexing and half after, so a
        # change of load during the run falls on the baseline too.
        model_before = timed(lambda: _embed_in_batches(embedder, arrays[::2]))
        with PeakRSS() as rss, Stopwatch() as clock:
            first = lib.index([folder])
        model_after = timed(lambda: _embed_in_batches(embedder, arrays[1::2]))
        rerun = timed(lambda: lib.index([folder]))
    naive_rate = None
    if naive:
        eager = Embedder(load_descriptor(weights), runtime="eager", device="cpu")
        some = files[:naive]
        naive_rate = len(some) / timed(lambda: naive_pipeline(some, eager))
    return FolderRun(
        images=first.embedded,
        images_per_s=first.embedded / clock.seconds,
        seconds=clock.seconds,
        rerun_seconds=rerun,
        rss_before=rss.before,
        rss_peak=rss.peak,
        model_images_per_s=len(arrays) / (model_before + model_after),
        naive_images_per_s=naive_rate,
        naive_images=min(naive, len(files)),
        failed=dict(first.failed),
    )


def naive_pipeline(files: Sequence[Path], eager: Embedder) -> None:
    """What a first script does: decode each file at full size with Pillow, resize it to the
    model input, and run the unfused eager model one batch at a time, all sequentially."""
    size = eager.card.input_size
    for start in range(0, len(files), BATCH):
        arrays = []
        for path in files[start : start + BATCH]:
            with Image.open(path) as image:
                small = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(small))
        eager.embed_arrays(arrays)


def _embed_in_batches(embedder: Embedder, arrays: Sequence[np.ndarray]) -> None:
    for start in range(0, len(arrays), BATCH):
        embedder.embed_arrays(arrays[start : start + BATCH])


def describe(report: Report, runs: dict[str, FolderRun], weights: str) -> None:
    for label, r in runs.items():
        name = f"Library.index, {r.images} {label} photos"
        model_baseline = "model alone on the same photos, pre-decoded to its input size"
        if r.naive_images_per_s is None:
            report.add(
                Figure(
                    name,
                    r.images_per_s,
                    "img/s",
                    model_baseline,
                    r.model_images_per_s,
                    target=f">= {TARGET_VS_MODEL}x",
                    met=r.images_per_s >= TARGET_VS_MODEL * r.model_images_per_s,
                )
            )
        else:
            report.add(
                Figure(
                    name,
                    r.images_per_s,
                    "img/s",
                    f"naive, first {r.naive_images}: full Pillow decode, resize, eager, sequential",
                    r.naive_images_per_s,
                    target=f">= {TARGET_VS_NAIVE}x",
                    met=r.images_per_s >= TARGET_VS_NAIVE * r.naive_images_per_s,
                )
            )
            report.add(Figure(name, r.images_per_s, "img/s", model_baseline, r.model_images_per_s))
        report.add(
            Figure(
                f"peak RSS while indexing {label} photos",
                r.rss_peak / _MB,
                "MB",
                "RSS before indexing (model loaded)",
                r.rss_before / _MB,
            )
        )
        report.add(
            Figure(
                f"unchanged re-run, {label} photos", r.rerun_seconds, "s", "first run", r.seconds
            )
        )
        if r.failed:
            report.notes.append(f"{label}: files that failed to index: {r.failed}")
    report.details["runs"] = {label: vars(r) for label, r in runs.items()}
    report.notes.append(
        f"weights {weights!r}, CPU, batch {BATCH}, the Library's default runtime and decode "
        "threads; each folder in a fresh process (RSS is its own); the photos were decoded "
        "once before timing, so every contender reads from the page cache"
    )


def _rates(runs: dict[str, FolderRun]) -> dict[str, float]:
    rates = {}
    for label, r in runs.items():
        rates[f"{label}: Library.index"] = r.images_per_s
        rates[f"{label}: model alone"] = r.model_images_per_s
        if r.naive_images_per_s is not None:
            rates[f"{label}: naive"] = r.naive_images_per_s
    return rates
