"""A few copies among other shots: the shipped duplicate finder on a folder such as a
person keeps, where copies do not outnumber second shots.

``benchmarks.othershots`` gives each source 13 edited copies, so copies make most of the
pairs it counts and a few other shots called copies hardly move its precision. Here each
ukbench-dev object keeps its four shots, and one of them (chosen by seed, as there) gets
three copies: half size at JPEG quality 70, mirrored as PNG, and its central 80% as JPEG.
Each half of the objects (0-62 tuning, 63-124 held out, as in ``benchmarks.othershots``)
is a folder of its own, indexed and searched with the defaults a new user gets
(``similar=True``, so that the ``similar`` lists count too).

Figures per half: precision over the reported (kept, member) pairs, other-shot pairs
(another shot of the same object), the share of reported pairs they are and the share of
all pairs of shots of one object (six per object), unrelated pairs, copies grouped with
their source, and other shots listed as ``similar``. Baseline, in the same run: the same
search without the look at how a pair moves (``ghostmatch.dupes.parallax``: its cut set
out of reach).

``python -m benchmarks.fewcopies --work DIR`` keeps the folders and indexes in DIR.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from benchmarks.othershots import HALVES, OBJECTS, SEED, SHOTS, UKBENCH, half, shot_of
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import RESULTS, Settings, default_weights
from ghostmatch.dupes import parallax
from ghostmatch.dupes.groups import DuplicateGroup
from ghostmatch.eval.evaluation import CaptureEvaluation, evaluate_captures
from ghostmatch.library import Library

COPIES = ("small", "flipped", "crop")
QUICK_OBJECTS = 6


@dataclass(frozen=True)
class Counts:
    """What one search reported on one folder: its (kept, member) pairs sorted into
    copies, other shots and unrelated pairs (``captures``), and per object the pairs of
    shots, the copies made and found with their source, and the other shots listed as
    ``similar``."""

    captures: CaptureEvaluation
    shot_pairs: int
    copies_found: int
    copies_made: int
    similar_found: int
    other_shot_files: int

    @property
    def other_shot_rate(self) -> float:
        """Other shots called copies, of all pairs of shots of one object."""
        return self.captures.other_shots / self.shot_pairs if self.shot_pairs else 0.0

    @property
    def recall(self) -> float:
        return self.copies_found / self.copies_made if self.copies_made else 1.0

    @property
    def similar_recall(self) -> float:
        """Shots other than the copies' source listed as ``similar`` to a file of their
        object."""
        return self.similar_found / self.other_shot_files if self.other_shot_files else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "captures": self.captures.to_dict(),
            **{k: v for k, v in asdict(self).items() if k != "captures"},
        }


def name_of(obj: int, shot: int, copy: str | None = None) -> str:
    base = f"object {obj:03d} shot {shot}"
    if copy is None:
        return f"{base}.jpg"
    return f"{base} {copy}.{'png' if copy == 'flipped' else 'jpg'}"


def build(folder: Path, objects: Sequence[int], seed: int, ukbench: Path = UKBENCH) -> None:
    """Each object's four shots (re-saved at JPEG quality 92) and three copies of the
    seed's shot, in ``folder``; kept when already made."""
    folder.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        for shot in range(SHOTS):
            image = Image.open(ukbench / f"ukbench{obj * SHOTS + shot:05d}.jpg").convert("RGB")
            target = folder / name_of(obj, shot)
            if not target.exists():
                image.save(target, quality=92)
            if shot != shot_of(obj, seed):
                continue
            for copy in COPIES:
                target = folder / name_of(obj, shot, copy)
                if not target.exists():
                    copied(image, copy).save(target, **({"quality": 70} if copy == "small" else {}))


def copied(image: Image.Image, copy: str) -> Image.Image:
    """One of ``COPIES`` of ``image``."""
    w, h = image.size
    if copy == "small":
        return image.resize((w // 2, h // 2))
    if copy == "flipped":
        return ImageOps.mirror(image)
    return image.crop((w // 10, h // 10, w - w // 10, h - h // 10))


def _capture(path: Path) -> tuple[int, int]:
    """(object, shot) of a file of :func:`build`."""
    parts = path.name.split()
    return int(parts[1]), int(parts[3].split(".")[0])


def count(
    groups: Sequence[DuplicateGroup], folder: Path, objects: Sequence[int], seed: int
) -> Counts:
    """:class:`Counts` of ``groups``, a search of ``folder`` made by :func:`build`."""
    truth: list[list[Path]] = []
    scene_of: dict[Path, str] = {}
    for obj in objects:
        shot = shot_of(obj, seed)
        truth.append(
            [folder / name_of(obj, shot), *(folder / name_of(obj, shot, c) for c in COPIES)]
        )
        for path in [*(folder / name_of(obj, s) for s in range(SHOTS)), *truth[-1][1:]]:
            scene_of[path] = f"object-{obj}"
    grouped: set[tuple[str, str]] = set()
    listed: set[tuple[int, int]] = set()
    for group in groups:
        members = [group.keep.path.name, *(m.path.name for m in group.members)]
        grouped.update(itertools.permutations(members, 2))
        kept = _capture(group.keep.path)
        for m in group.similar:
            theirs = _capture(m.path)
            if theirs[0] == kept[0] and theirs[1] != kept[1]:
                listed.add(theirs)
    found = sum((source.name, copy.name) in grouped for source, *copies in truth for copy in copies)
    others = {(obj, s) for obj in objects for s in range(SHOTS) if s != shot_of(obj, seed)}
    return Counts(
        evaluate_captures(groups, truth, scene_of),
        len(objects) * 6,
        found,
        len(truth) * len(COPIES),
        len(listed & others),
        len(others),
    )


def search(folder: Path, index: Path, weights: str, look: bool) -> list[DuplicateGroup]:
    cut = parallax.SPREAD_CUT
    if not look:
        parallax.SPREAD_CUT = float("inf")
    try:
        with Library(index, weights=weights) as lib:
            lib.index([folder])
            return lib.find_duplicates(similar=True)
    finally:
        parallax.SPREAD_CUT = cut


def run(settings: Settings, work: Path | None, seed: int = SEED) -> Report:
    report = Report("fewcopies", quick=settings.quick)
    if not (UKBENCH / "ukbench00000.jpg").exists():
        report.notes.append(f"skipped: no ukbench-dev photos at {UKBENCH}")
        return report
    every = range(OBJECTS)
    if settings.quick:
        every = [*range(QUICK_OBJECTS // 2), *range(OBJECTS - QUICK_OBJECTS // 2, OBJECTS)]
    with tempfile.TemporaryDirectory() as scratch:
        root = work or Path(scratch)
        for part in HALVES:
            objects = [obj for obj in every if half(obj) == part]
            folder = root / f"{part}-photos"
            build(folder, objects, seed)
            index = root / f"{part}-index"
            found = count(search(folder, index, settings.weights, True), folder, objects, seed)
            before = count(search(folder, index, settings.weights, False), folder, objects, seed)
            report.details[part] = {
                "objects": len(objects),
                "photos": len(objects) * (SHOTS + len(COPIES)),
                "finder": found.to_dict(),
                "without the look": before.to_dict(),
            }
            base = "the same search without the look at how a pair moves"
            rows = [
                (
                    "precision",
                    found.captures.precision,
                    before.captures.precision,
                    ">= 0.99",
                    found.captures.precision >= 0.99,
                ),
                (
                    "other-shot pairs",
                    found.captures.other_shots,
                    before.captures.other_shots,
                    "",
                    None,
                ),
                (
                    "other-shot share of pairs",
                    found.captures.other_shot_share,
                    before.captures.other_shot_share,
                    "",
                    None,
                ),
                (
                    "other shots called copies, of all pairs of shots",
                    found.other_shot_rate,
                    before.other_shot_rate,
                    "<= 0.01",
                    found.other_shot_rate <= 0.01,
                ),
                ("unrelated pairs", found.captures.unrelated, before.captures.unrelated, "", None),
                ("copies found", found.recall, before.recall, ">= 0.85", found.recall >= 0.85),
                ("similar recall", found.similar_recall, before.similar_recall, "", None),
            ]
            for title, value, baseline, target, met in rows:
                report.add(
                    Figure(f"{part}: {title}", float(value), "", base, float(baseline), target, met)
                )
    report.notes.append(
        "each ukbench-dev object's four shots plus three copies of one (seed 7): half size at "
        "JPEG q70, mirrored PNG, central 80% crop; objects 0-62 the tuning half, 63-124 held "
        "out, each half a folder searched with the defaults; other-shot pairs are (kept, member) "
        "pairs of two shots of one object, six pairs of shots per object"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewcopies", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_OBJECTS} objects")
    parser.add_argument("--weights", help="default: bundled")
    parser.add_argument("--work", type=Path, help="keep the folders and indexes here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick, weights=args.weights or default_weights(), out=args.out)
    run_and_save("fewcopies", argv, settings.out, lambda: run(settings, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
