"""Indexing a 10,000-photo folder: peak memory of the whole process (target < 2 GB), the
rate, and how long an unchanged re-run takes (target: seconds, under 10) beside the first run."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps

from benchmarks.data import CALTECH, missing_caltech_note
from benchmarks.indexing import in_fresh_process
from benchmarks.measure import PeakRSS, Stopwatch, timed
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.ingest.scan import scan
from ghostmatch.library import Library

PHOTOS, PHOTOS_QUICK = 10_000, 1_000
TARGET_RSS = 2e9


@dataclass(frozen=True)
class ScaleRun:
    """One folder indexed from scratch in a fresh process, then again unchanged."""

    images: int
    seconds: float
    rerun_seconds: float
    rss_start: int
    rss_peak: int


def run(settings: Settings) -> Report:
    report = Report("scale", settings.quick)
    if not (CALTECH / "train.txt").exists():
        report.notes.append(missing_caltech_note("10k-photo indexing"))
        return report
    wanted = PHOTOS_QUICK if settings.quick else PHOTOS
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        folder = Path(tmp) / "photos"
        made = build_folder(folder, wanted)
        result = in_fresh_process(index_once, folder, Path(tmp) / "index", settings.weights)
    report.add(
        Figure(
            f"peak RSS of the whole process, indexing {made:,} photos",
            result.rss_peak / 1e6,
            "MB",
            "RSS of the process at start (model not loaded)",
            result.rss_start / 1e6,
            target="< 2000 MB",
            met=result.rss_peak < TARGET_RSS,
        )
    )
    report.add(
        Figure(
            f"unchanged re-run of {made:,} photos",
            result.rerun_seconds,
            "s",
            "first run",
            result.seconds,
            target="seconds",
            met=result.rerun_seconds < 10,
        )
    )
    report.details.update({**asdict(result), "weights": settings.weights, "photos": made})
    report.notes.append(
        f"weights {settings.weights!r}; every caltech101 photo (train and test: only speed and "
        "memory are measured) symlinked, topped up with mirrored copies to the count; indexed "
        "in a fresh process by Library.index with its defaults"
    )
    return report


def build_folder(folder: Path, wanted: int) -> int:
    """``wanted`` photos in ``folder``: caltech symlinks, then mirrored copies (new files)."""
    folder.mkdir(parents=True)
    sources = sorted(e.path for e in scan([CALTECH]))
    made = 0
    for path in sources[:wanted]:
        (folder / f"{made:05d}-{path.name}").symlink_to(path)
        made += 1
    for path in sources:
        if made >= wanted:
            break
        with Image.open(path) as image:
            ImageOps.mirror(image.convert("RGB")).save(folder / f"{made:05d}-flip.jpg")
        made += 1
    return made


def index_once(folder: Path, index: Path, weights: str) -> ScaleRun:
    with PeakRSS() as rss:
        start = rss.before
        with Library(index, weights=weights, device="cpu") as lib, Stopwatch() as clock:
            first = lib.index([folder])
        with Library(index, device="cpu") as lib:
            rerun = timed(lambda: lib.index([folder]))
    return ScaleRun(first.embedded, clock.seconds, rerun, start, rss.peak)
