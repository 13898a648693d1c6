"""The thumbnail screen of turned copies (``ghostmatch.dupes.turns.screen_pairs``): which
share of quarter-turned (and mirrored and turned) copies it passes on to their views, and
how many images without a turned partner it passes too (each costs one embedded view).

Caltech101 *train* photos (chosen by seed), each source with five copies (the quarter-turn
variants of ``benchmarks.turns``, JPEG quality 90) among other train photos. The sources
are split in two halves: the cut is chosen on the tuning half (one step below the highest
that passes as many copies there as any cut does) and reported on the held-out half as well.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.data import CALTECH, Photo, sample
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import RESULTS, Settings, default_weights
from benchmarks.turns import QUARTER
from ghostmatch.dupes.turns import (
    SCREEN_SIDE,
    THUMB_CUT,
    THUMB_MARGIN,
    decode,
    screen_pairs,
    thumbnail,
)

SOURCES, SOURCES_QUICK = 200, 80
OTHERS, OTHERS_QUICK = 800, 240
SEED = 29
CUTS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def caltech_train(root: Path = CALTECH) -> list[Photo] | None:
    listing = root / "train.txt"
    if not listing.is_file():
        return None
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [Photo(root / line, line.split("/")[0]) for line in lines]


def thumbnails(paths: Sequence[Path]) -> np.ndarray:
    """Each file's thumbnail as the finder's screen decodes it."""
    rows = []
    for path in paths:
        image = decode(path, SCREEN_SIDE)
        rows.append(thumbnail(image) if image is not None else np.zeros(256, np.float32))
    return np.stack(rows)


def measure_half(
    sources: Sequence[Path], others: Sequence[Path], folder: Path, cuts: Sequence[float]
) -> dict[float, dict[str, float]]:
    """For each cut: the share of (source, copy) pairs screened, and views embedded per
    image for images with no turned partner."""
    folder.mkdir(parents=True)
    files, family = list(sources), list(range(len(sources)))
    for n, source in enumerate(sources):
        image = Image.open(source).convert("RGB")
        for v, variant in enumerate(QUARTER):
            path = folder / f"{n}-{v}.jpg"
            variant.make(image, random.Random(SEED)).save(path, quality=90)
            files.append(path)
            family.append(n)
    files += list(others)
    family += [-1 - n for n in range(len(others))]
    thumbs = thumbnails(files)
    pairs = {(s, c) for c in range(len(family)) for s in [family[c]] if s >= 0 and c != s}
    found = {}
    for cut in cuts:
        screened = screen_pairs(thumbs, cut, THUMB_MARGIN)
        kin = [(a, b) for a, b in pairs if (min(a, b), max(a, b)) in screened]
        stray = [k for k, _ in screened.items() if family[k[0]] != family[k[1]]]
        found[cut] = {
            "copies_screened": len(kin) / len(pairs),
            "stray_views_per_image": len(stray) / len(files),
        }
    return found


def run(settings: Settings) -> Report:
    report = Report("turn_screen", settings.quick)
    photos = caltech_train()
    if photos is None:
        report.notes.append(f"skipped: no caltech101 train photos at {CALTECH}")
        return report
    n_sources, n_others = (SOURCES_QUICK, OTHERS_QUICK) if settings.quick else (SOURCES, OTHERS)
    chosen = sample(photos, n_sources + n_others, SEED)
    sources, others = chosen[:n_sources], chosen[n_sources:]
    half, rest = n_sources // 2, n_others // 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        for name, part, distractors in (
            ("tuning", sources[:half], others[:rest]),
            ("held-out", sources[half:], others[rest:]),
        ):
            results[name] = measure_half(
                [p.path for p in part], [p.path for p in distractors], Path(tmp) / name, CUTS
            )
    tuning = results["tuning"]
    # The highest cut that screens as many copies as any cut does, then one step lower:
    # these copies are clean re-encodes, a copy resized or re-encoded harder correlates
    # less.
    best = max(tuning[c]["copies_screened"] for c in CUTS)
    top = max(n for n, c in enumerate(CUTS) if tuning[c]["copies_screened"] >= best)
    chosen_cut = CUTS[max(0, top - 1)]
    for name in ("tuning", "held-out"):
        figures = results[name][chosen_cut]
        report.add(
            Figure(
                f"{name}: turned copies screened at cut {chosen_cut}",
                figures["copies_screened"],
                "",
                f"finder's cut {THUMB_CUT}",
                results[name][THUMB_CUT]["copies_screened"],
                "1.0",
                figures["copies_screened"] >= 1.0,
            )
        )
        report.add(
            Figure(
                f"{name}: stray views per image at cut {chosen_cut}",
                figures["stray_views_per_image"],
                "",
                f"finder's cut {THUMB_CUT}",
                results[name][THUMB_CUT]["stray_views_per_image"],
            )
        )
    report.details.update(
        {
            "seed": SEED,
            "sources": n_sources,
            "others": n_others,
            "margin": THUMB_MARGIN,
            "chosen_cut": chosen_cut,
            "by_cut": {n: {str(c): v for c, v in r.items()} for n, r in results.items()},
        }
    )
    report.notes.append(
        "caltech101 train photos; each source has five quarter-turned copies (with and "
        "without a mirror); stray views: screened pairs of two unrelated images, per image"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.turn_screen", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="80 sources, 240 other photos")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick, weights=default_weights(), out=args.out)
    run_and_save("turn_screen", argv, settings.out, lambda: run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
