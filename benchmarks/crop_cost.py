"""What the candidates of heavily cropped copies (``ghostmatch.dupes.regions``) cost
``dupes``: CPU seconds of the finder with them and with them left out, on the index of a
``python -m benchmarks.othershots --work DIR`` run, beside that index's own CPU seconds,
and how many candidate pairs and grouped copies they add.

Each search runs on one thread for BLAS and torch, as the finder decides pairs; the CPU
seconds are the process's, so other load on the machine does not count.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import Figure, Report, cpu_seconds, run_and_save
from benchmarks.settings import RESULTS
from ghostmatch.dupes.finder import DuplicateFinder, one_thread
from ghostmatch.library import Library


def timed_search(lib: Library, crops: bool) -> dict[str, Any]:
    """One ``find_duplicates(similar=True)``, with or without the crop candidates."""
    finder = lib.finder
    added: list[int] = []

    def crop_pairs(*args: Any, **kwargs: Any) -> dict[tuple[int, int], float]:
        pairs = DuplicateFinder.crop_pairs(finder, *args, **kwargs) if crops else {}
        added.append(len(pairs))
        return pairs

    # Left out on this finder only, for this search: the ablation the figure is about.
    finder.crop_pairs = crop_pairs  # type: ignore[method-assign]
    try:
        cpu = cpu_seconds()
        with one_thread():
            groups = lib.find_duplicates(similar=True)
        seconds = cpu_seconds() - cpu
    finally:
        del finder.crop_pairs
    return {
        "cpu_s": seconds,
        "copies": sum(len(g.members) for g in groups),
        "crop_candidates": sum(added),
    }


def measure(work: Path) -> Report:
    report = Report("crop_cost", quick=False)
    timings = work / "timings.json"
    if not (work / "index").is_dir() or not timings.is_file():
        report.error = f"no othershots index at {work}: run python -m benchmarks.othershots first"
        return report
    index_cpu_s = float(json.loads(timings.read_text())["index_cpu_s"])
    with Library(work / "index", device="cpu") as lib:
        # With the crop candidates first: the model's loading then counts against them.
        with_crops = timed_search(lib, crops=True)
        without = timed_search(lib, crops=False)
        images = lib.catalog.count()
    report.add(
        Figure(
            "dupes CPU time with crop candidates",
            with_crops["cpu_s"],
            "s",
            "without them",
            without["cpu_s"],
        )
    )
    report.add(
        Figure(
            "dupes CPU time with crop candidates",
            with_crops["cpu_s"],
            "s",
            "index CPU time",
            index_cpu_s,
            "<= index",
            with_crops["cpu_s"] <= index_cpu_s,
        )
    )
    report.add(
        Figure(
            "copies grouped with crop candidates",
            with_crops["copies"],
            "",
            "without them",
            without["copies"],
        )
    )
    report.details.update(
        {
            "images": images,
            "crop_candidates": with_crops["crop_candidates"],
            "with_crops": with_crops,
            "without_crops": without,
            "index_cpu_s": index_cpu_s,
        }
    )
    report.notes.append(
        f"{with_crops['crop_candidates']} candidate pairs from the regional descriptors "
        f"on {images} images"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crop_cost", description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="a benchmarks.othershots --work")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_and_save("crop_cost", argv, args.out, lambda: measure(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
