"""The shipped duplicate rule on photos and copies it was not tuned on.

``dupes_stages`` picks the model's thresholds on seed-0 copies; here other caltech101 test
photos get copies made with another seed, and ``Library.find_duplicates`` runs exactly as
``ghostmatch dupes`` does (the model card's thresholds, both stages, grouping). Precision
counts the (kept, member) pairs of its groups that are truly the same photo; recall counts
the copies that landed in their original's group. Baseline: the same run without the
geometric stage (``--no-verify``)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from benchmarks import dupes_stages
from benchmarks.data import (
    caltech_test,
    copy_set,
    missing_caltech_note,
    sample,
    split_photos,
)
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.copies import read_truth, transform_of
from ghostmatch.dupes import DuplicateGroup
from ghostmatch.library import Library

SOURCES, SOURCES_QUICK = 300, 30
DISTRACTORS, DISTRACTORS_QUICK = 1500, 120
# Not dupes_stages' seeds: other photos, other random crops, texts and colours.
SEED = 11


def run(settings: Settings) -> Report:
    report = Report("heldout", settings.quick)
    photos = caltech_test()
    if photos is None:
        report.notes.append(missing_caltech_note("held-out duplicate check"))
        return report
    tuned = set(sample(photos, dupes_stages.SOURCES, dupes_stages.SEED))
    sources, distractors = split_photos(
        [p for p in photos if p not in tuned],
        SOURCES_QUICK if settings.quick else SOURCES,
        DISTRACTORS_QUICK if settings.quick else DISTRACTORS,
        SEED,
    )
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        folder = Path(tmp)
        copies, truth = copy_set(sources, distractors, folder, SEED)
        with Library(folder / "index", weights=settings.weights, device="cpu") as lib:
            lib.index([copies])
            threshold = lib.duplicate_threshold()
            two_stages = score(lib.find_duplicates(), read_truth(truth))
            one_stage = score(lib.find_duplicates(verify=False), read_truth(truth))
            normalised = lib.normalised_scores
    base = "stage 1 only (--no-verify)"
    for name in ("precision", "recall"):
        report.add(Figure(f"held-out {name}", two_stages[name], "", base, one_stage[name]))
    for name, recall in sorted(two_stages["per_transform"].items()):
        report.add(
            Figure(f"held-out recall, {name}", recall, "", base, one_stage["per_transform"][name])
        )
    report.details.update(
        {
            "weights": settings.weights,
            "threshold": threshold,
            "normalised_scores": normalised,
            "two_stages": two_stages,
            "stage1_only": one_stage,
            "sources": len(sources),
            "distractors": len(distractors),
        }
    )
    report.notes.append(
        f"weights {settings.weights!r}; {len(sources)} test photos not used by dupes_stages, "
        f"x 13 transforms (seed {SEED}), among {len(distractors)} other test photos; the "
        "model card's thresholds as `ghostmatch dupes` uses them; precision over reported "
        "(kept, member) pairs, recall = copies grouped with their original"
    )
    return report


def score(groups: list[DuplicateGroup], truth: list[list[Path]]) -> dict[str, object]:
    """Precision of the reported pairs and recall of copies found with their original."""
    group_of = {p.resolve(): g for g, members in enumerate(truth) for p in members}
    reported = correct = 0
    placed: dict[Path, int] = {}
    for n, group in enumerate(groups):
        keep = group.keep.path.resolve()
        placed[keep] = n
        for member in group.members:
            path = member.path.resolve()
            placed[path] = n
            reported += 1
            same = group_of.get(keep)
            correct += same is not None and same == group_of.get(path)
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for members in truth:
        original = members[0].resolve()
        for copy in members[1:]:
            name = transform_of(copy) or "?"
            total[name] += 1
            where = placed.get(copy.resolve())
            found[name] += where is not None and where == placed.get(original)
    return {
        "precision": correct / reported if reported else 1.0,
        "recall": sum(found.values()) / max(1, sum(total.values())),
        "reported_pairs": reported,
        "per_transform": {name: found[name] / total[name] for name in total},
    }
