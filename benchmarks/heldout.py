"""The shipped duplicate rule on photos and copies it was not tuned on.

``dupes_stages`` picks the model's thresholds on seed-0 copies of 300 caltech101 test
photos among 1,500 others; here copies made with another seed of other test photos, among
the remaining test photos, none of them in those sets nor in the model's training split.
``Library.find_duplicates`` runs exactly as ``ghostmatch dupes`` does (the model card's
thresholds, both stages, grouping) and ``ghostmatch.eval.evaluation.evaluate_groups`` scores its
groups: precision counts the (kept, member) pairs that are truly the same photo; recall
counts the copies that landed in their original's group. Baseline: the same run without the
geometric stage (``--no-verify``)."""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from benchmarks import dupes_stages
from benchmarks.data import (
    CALTECH,
    Photo,
    caltech_test,
    copy_set,
    missing_caltech_note,
    split_photos,
)
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.eval.copies import read_truth
from ghostmatch.eval.evaluation import evaluate_groups
from ghostmatch.library import Library

SOURCES, SOURCES_QUICK = 300, 30
# The full run takes every test photo left as a distractor (about 630).
DISTRACTORS_QUICK = 120
# Not dupes_stages' seeds: other random crops, texts and colours.
SEED = 11


def run(settings: Settings) -> Report:
    report = Report("heldout", settings.quick)
    photos = caltech_test()
    if photos is None:
        report.notes.append(missing_caltech_note("held-out duplicate check"))
        return report
    sources, distractors = split(photos, settings.quick, trained_photos(CALTECH))
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        folder = Path(tmp)
        copies, truth = copy_set(sources, distractors, folder, SEED)
        with Library(folder / "index", weights=settings.weights, device="cpu") as lib:
            lib.index([copies])
            threshold = lib.duplicate_threshold()
            two_stages = evaluate_groups(lib.find_duplicates(), read_truth(truth))
            one_stage = evaluate_groups(lib.find_duplicates(verify=False), read_truth(truth))
            normalised = lib.normalised_scores
    base = "stage 1 only (--no-verify)"
    for name in ("precision", "recall"):
        report.add(
            Figure(
                f"held-out {name}", getattr(two_stages, name), "", base, getattr(one_stage, name)
            )
        )
    for name, recall in sorted(two_stages.per_transform.items()):
        report.add(
            Figure(f"held-out recall, {name}", recall, "", base, one_stage.per_transform[name])
        )
    report.details.update(
        {
            "weights": settings.weights,
            "threshold": threshold,
            "normalised_scores": normalised,
            "two_stages": two_stages.to_dict(),
            "stage1_only": one_stage.to_dict(),
            "sources": len(sources),
            "distractors": len(distractors),
            "disjoint_from_tuning": True,
        }
    )
    report.notes.append(
        f"weights {settings.weights!r}; {len(sources)} test photos x 13 transforms (seed "
        f"{SEED}) among {len(distractors)} other test photos, none of them in dupes_stages' "
        "sources or distractors (where the rule was tuned) nor in the training split; the "
        "model card's thresholds as `ghostmatch dupes` uses them; precision over reported "
        "(kept, member) pairs, recall = copies grouped with their original"
    )
    return report


def tuning_photos(photos: Sequence[Photo]) -> set[Path]:
    """Every photo of the sets the shipped rule was tuned on: dupes_stages' full-run
    sources and distractors, drawn from the same ``photos``."""
    sources, distractors = dupes_stages.choose(photos, quick=False)
    return {p.path for p in (*sources, *distractors)}


def trained_photos(root: Path) -> set[Path]:
    """The photos of caltech101's training split (the model's), or none when it is absent."""
    listing = root / "train.txt"
    if not listing.is_file():
        return set()
    return {root / line.strip() for line in listing.read_text().splitlines() if line.strip()}


def split(
    photos: Sequence[Photo], quick: bool, trained: Collection[Path] = ()
) -> tuple[list[Photo], list[Photo]]:
    """(sources, distractors) drawn from those ``photos`` that are in no tuning set and
    not ``trained`` on; the full run takes every such photo. Raises if any overlap remains,
    since a figure measured on tuning photos would not be a held-out one."""
    excluded = tuning_photos(photos) | set(trained)
    free = [p for p in photos if p.path not in excluded]
    sources, distractors = split_photos(
        free,
        SOURCES_QUICK if quick else SOURCES,
        DISTRACTORS_QUICK if quick else None,
        SEED,
    )
    overlap = excluded & {p.path for p in (*sources, *distractors)}
    if overlap:
        raise RuntimeError(f"held-out photos in a tuning set: {sorted(overlap)[:5]}")
    return sources, distractors
