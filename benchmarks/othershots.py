"""Copies or other shots: the shipped duplicate finder on photos that have second shots.

ukbench-dev photographs each of 125 objects four times in a row (the camera or the object
moved between shots). One shot per object, chosen by seed, is the source of 13 edited
copies (``ghostmatch.eval.copies``, as in the other benchmarks); the object's other three shots
stay in the set as negatives: another capture is not a copy. Seeded synthetic images
(shapes, smooth noise, textures, pages; ``benchmarks.synthetic``) and caltech101 test
photos are unrelated negatives. ``Library.find_duplicates`` runs with the defaults a user
gets; ``ghostmatch.eval.evaluation`` sorts its (kept, member) pairs into copies, other shots and
unrelated pairs. Objects 0-62 are the tuning half, 63-124 the held-out half: a rule chosen
on this set is chosen on the first and reported on the second. Baseline, in the same run on
the same candidate pairs: the rule before the same-capture decision (a pair is a duplicate
when it scores at least the threshold, or when its local features agree on one geometry).
The finder runs once with ``similar=True``: its groups without the similar lists are what
``dupes`` reports by default, and the lists give the ``similar`` recall (other shots listed
as similar to a capture of their object).

``python -m benchmarks.othershots --work DIR`` keeps the set, the index and the finder's
groups in DIR and reuses them (the figures then keep the timings measured when they were
made), so that analyses of the same groups need no second index or search.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import fresh, synthetic
from benchmarks.data import REPO, caltech_test, sample
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import RESULTS, Settings, default_weights
from ghostmatch.dupes.finder import one_thread
from ghostmatch.dupes.groups import (
    DEFAULT_MIN_INLIERS,
    DuplicateGroup,
    DuplicateMember,
    default_thresholds,
    group_judged,
    tier_of,
)
from ghostmatch.eval.copies import make_copies, read_truth
from ghostmatch.eval.evaluation import (
    CaptureEvaluation,
    GroupEvaluation,
    evaluate_captures,
    evaluate_groups,
)
from ghostmatch.library import Library

UKBENCH = REPO.parent / "shared" / "data" / "ukbench-dev"
SHOTS = 4
OBJECTS = 125
# Objects below this number tune a rule; the others are held out.
TUNING_OBJECTS = 63
OBJECTS_QUICK = 12
SYNTHETIC_PER_KIND, SYNTHETIC_QUICK = 20, 4
CALTECH_PHOTOS, CALTECH_QUICK = 250, 20
SEED = 7
# Timed runs of index and of dupes each (alternating, fresh processes): a figure is the
# median, as one run varies by a tenth on a shared machine.
ROUNDS = 3
TIMING_NOTE = (
    "times: the median of the timed runs of index (into a new index) and of dupes, "
    "alternating, each in a fresh process (benchmarks.fresh); every run is in the details"
)
HALVES = ("tuning", "heldout")


@dataclass(frozen=True)
class Item:
    """One file of the set: ``role`` is source, copy, shot (another shot of the object),
    synthetic or caltech; ``scene`` names its object (``ukbench-<n>``) or is None;
    ``half`` is tuning or heldout."""

    path: Path
    role: str
    scene: str | None
    half: str


@dataclass(frozen=True)
class OtherShotSet:
    """A built set: ``folder`` holds every file, ``truth`` the make-copies truth file
    (each source with its copies), ``items`` every file's role."""

    folder: Path
    truth: Path
    items: list[Item]

    # Cached: an analysis measures many rules on one set, and resolving every path each
    # time would cost more than the measuring.
    @functools.cached_property
    def groups(self) -> list[list[Path]]:
        """The truth groups: each source with its copies."""
        return read_truth(self.truth)

    def scene_of(self) -> dict[Path, str]:
        return {item.path: item.scene for item in self.items if item.scene is not None}

    @functools.cached_property
    def resolved(self) -> dict[Path, Path]:
        return {item.path: item.path.resolve() for item in self.items}

    def half_of(self) -> dict[Path, str]:
        return {self.resolved[item.path]: item.half for item in self.items}

    def paths(self, role: str) -> set[Path]:
        return {self.resolved[item.path] for item in self.items if item.role == role}


def shot_of(obj: int, seed: int) -> int:
    """The shot (0-3) of object ``obj`` that is the source of its copies."""
    return random.Random(f"{seed}:source:{obj}").randrange(SHOTS)


def quick_objects() -> list[int]:
    """The quick set's objects: the first and last few, so that both halves have some."""
    return [*range(OBJECTS_QUICK // 2), *range(OBJECTS - OBJECTS_QUICK // 2, OBJECTS)]


def half(obj: int) -> str:
    return HALVES[0] if obj < TUNING_OBJECTS else HALVES[1]


def build(
    folder: Path,
    ukbench: Path,
    objects: Sequence[int],
    seed: int,
    synthetic_per_kind: int,
    caltech: Sequence[Path] = (),
) -> OtherShotSet:
    """Write the set under ``folder`` (which must not exist or be empty): ``set/originals``
    and ``set/copies`` from make-copies, ``set/shots`` (links to the other shots),
    ``set/synthetic`` and ``set/caltech`` (links); ``set/items.json`` lists every file."""
    sources: list[Path] = []
    shots: list[tuple[Path, int]] = []
    for obj in objects:
        chosen = shot_of(obj, seed)
        for shot in range(SHOTS):
            path = ukbench / f"ukbench{obj * SHOTS + shot:05d}.jpg"
            if not path.is_file():
                raise FileNotFoundError(f"missing ukbench photo {path}")
            if shot == chosen:
                sources.append(path)
            else:
                shots.append((path, obj))
    (folder / "sources").mkdir(parents=True, exist_ok=True)
    links = []
    for path in sources:
        link = folder / "sources" / path.name
        link.symlink_to(path)
        links.append(link)
    root = folder / "set"
    truth = make_copies(links, root, seed=seed)
    object_of = {p.name: int(p.stem.removeprefix("ukbench")) // SHOTS for p in sources}
    items = []
    for group in read_truth(truth):
        obj = object_of[group[0].name]
        for n, path in enumerate(group):
            items.append(Item(path, "copy" if n else "source", f"ukbench-{obj}", half(obj)))
    (root / "shots").mkdir()
    for path, obj in shots:
        link = root / "shots" / path.name
        link.symlink_to(path)
        items.append(Item(link, "shot", f"ukbench-{obj}", half(obj)))
    for n, path in enumerate(synthetic.write_images(root / "synthetic", synthetic_per_kind, seed)):
        # Every kind's first images tune, the rest are held out.
        index = n % synthetic_per_kind
        items.append(Item(path, "synthetic", None, HALVES[index >= synthetic_per_kind / 2]))
    for n, path in enumerate(caltech):
        link = root / "caltech" / f"{path.parent.name}-{path.name}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(path)
        items.append(Item(link, "caltech", None, HALVES[n % 2]))
    listing = [
        {"path": str(i.path.relative_to(root)), "role": i.role, "scene": i.scene, "half": i.half}
        for i in items
    ]
    (root / "items.json").write_text(json.dumps(listing, indent=0))
    return OtherShotSet(root, truth, items)


def load(root: Path) -> OtherShotSet:
    """A set that ``build`` wrote to ``root``'s parent."""
    listing = json.loads((root / "items.json").read_text())
    items = [Item(root / r["path"], r["role"], r["scene"], r["half"]) for r in listing]
    return OtherShotSet(root, root / "truth.json", items)


def within(
    groups: Sequence[DuplicateGroup], keep: Callable[[Path, Path], bool]
) -> list[DuplicateGroup]:
    """The groups with only the (kept, member) pairs whose resolved paths ``keep`` accepts;
    groups left empty are dropped."""
    out = []
    for group in groups:
        kept = group.keep.path.resolve()
        members = [m for m in group.members if keep(kept, m.path.resolve())]
        similar = [m for m in group.similar if keep(kept, m.path.resolve())]
        if members or similar:
            out.append(DuplicateGroup(group.keep, members, similar))
    return out


@dataclass(frozen=True)
class Figures:
    """Everything measured on one part of the set from one run of the finder;
    ``similar_recall`` is the share of other shots listed as similar to a capture of their
    object (None when the run lists no similar files)."""

    groups: GroupEvaluation
    captures: CaptureEvaluation
    synthetic_pairs: int
    synthetic_grouped: int
    similar_recall: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups.to_dict(),
            "captures": self.captures.to_dict(),
            "synthetic_pairs": self.synthetic_pairs,
            "synthetic_grouped": self.synthetic_grouped,
            "similar_recall": self.similar_recall,
        }


def similar_recall(
    shots: OtherShotSet, groups: Sequence[DuplicateGroup], part: str | None
) -> float | None:
    """Share of the other shots (in ``part``) that some group lists as similar to a file of
    their object, or lists a file of their object as similar to them."""
    if not any(g.similar for g in groups):
        return None
    halves = shots.half_of()
    scene = {shots.resolved[p]: s for p, s in shots.scene_of().items()}
    others = {p for p in shots.paths("shot") if part in (None, halves.get(p))}
    found = set()
    for g in groups:
        kept = g.keep.path.resolve()
        for m in g.similar:
            other = m.path.resolve()
            if scene.get(kept) is not None and scene.get(kept) == scene.get(other):
                found.update({kept, other} & others)
    return len(found) / len(others) if others else None


def measure(shots: OtherShotSet, groups: Sequence[DuplicateGroup], part: str | None) -> Figures:
    """The figures of ``groups`` on one half of the set (``part``), or on all of it (None).
    A reported pair counts in a half when either of its files is in it, so a wrong pair
    across the halves counts against both."""
    halves = shots.half_of()
    if part is None:
        chosen = list(groups)
        truth = shots.groups
    else:
        chosen = within(groups, lambda a, b: part in (halves.get(a), halves.get(b)))
        truth = [g for g in shots.groups if halves.get(shots.resolved.get(g[0], g[0])) == part]
    scenes = {
        p: s for p, s in shots.scene_of().items() if part in (None, halves[shots.resolved[p]])
    }
    made = shots.paths("synthetic")
    among = within(chosen, lambda a, b: a in made and b in made)
    grouped = {
        path.resolve()
        for group in chosen
        if group.members
        for path in (group.keep.path, *(m.path for m in group.members))
        if path.resolve() in made
    }
    copies = [DuplicateGroup(g.keep, g.members) for g in chosen if g.members]
    return Figures(
        evaluate_groups(copies, truth),
        evaluate_captures(copies, truth, scenes),
        sum(len(g.members) for g in among),
        len(grouped),
        similar_recall(shots, groups, part),
    )


def run(
    settings: Settings, work: Path | None = None, reuse: bool = False, rounds: int = ROUNDS
) -> Report:
    report = Report("othershots", settings.quick)
    if not (UKBENCH / "ukbench00000.jpg").is_file():
        report.notes.append(f"skipped: no ukbench-dev photos at {UKBENCH}")
        return report
    if work is None:
        with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
            return measure_all(report, settings, Path(tmp), reuse=False, rounds=rounds)
    return measure_all(report, settings, work, reuse, rounds)


def measure_all(
    report: Report, settings: Settings, work: Path, reuse: bool, rounds: int = ROUNDS
) -> Report:
    quick = settings.quick
    root = work / "set"
    if (root / "items.json").is_file():
        shots = load(root)
    else:
        objects = quick_objects() if quick else list(range(OBJECTS))
        photos = caltech_test() or []
        n_caltech = CALTECH_QUICK if quick else CALTECH_PHOTOS
        chosen = [p.path for p in sample(photos, n_caltech, SEED)]
        per_kind = SYNTHETIC_QUICK if quick else SYNTHETIC_PER_KIND
        shots = build(work, UKBENCH, objects, SEED, per_kind, chosen)
    timings_file = work / "timings.json"
    # The index is reused whenever it is there; its time is the one measured when it was made.
    timings: dict[str, float] = (
        json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    )
    runs: dict[str, list[float]] | None = None
    with Library(work / "index", weights=settings.weights, device="cpu") as lib:
        lib.index([root])
        groups_file, shipped_file = work / "groups.json", work / "groups_shipped.json"
        if reuse and groups_file.is_file():
            groups = read_groups(groups_file)
        else:
            groups = lib.find_duplicates(similar=True)
            write_groups(groups_file, groups)
            # Timed apart, in fresh processes (``benchmarks.fresh``), as a user's commands run.
            timed = fresh.alternate(
                root, work / "index", work / "index-timed", settings.weights, rounds, True
            )
            timings.update(timed.timings())
            runs = timed.runs()
        if reuse and shipped_file.is_file():
            shipped = read_groups(shipped_file)
        else:
            start = time.perf_counter()
            with one_thread():  # as the finder runs its checks
                shipped = shipped_rule(lib)
            timings["shipped_dupes_s"] = time.perf_counter() - start
            write_groups(shipped_file, shipped)
        threshold = lib.duplicate_threshold()
        images = lib.catalog.count()
    timings_file.write_text(json.dumps(timings, indent=1))
    describe(report, shots, groups, shipped, timings)
    report.details.update(
        {
            "weights": settings.weights,
            "threshold": threshold,
            "images": images,
            "seed": SEED,
            "tuning_objects": f"0-{TUNING_OBJECTS - 1}",
            "roles": {
                role: sum(i.role == role for i in shots.items)
                for role in ("source", "copy", "shot", "synthetic", "caltech")
            },
            "timings_s": timings,
            # Every timed run of this search (none when its groups were reused).
            "timing_runs_s": runs,
        }
    )
    return report


def shipped_rule(lib: Library) -> list[DuplicateGroup]:
    """The groups of the rule before the same-capture decision, on the finder's candidate
    pairs: a pair is a duplicate when it scores at least the threshold, or when at least
    ``min_inliers`` local features agree on one geometry; tiers from that check."""
    finder = lib.finder
    card = lib.card
    extra = card.extra if card is not None else {}
    t = lib.duplicate_threshold()
    low = min(t, float(extra.get("verify_threshold", default_thresholds(lib.normalised_scores)[1])))
    needed = int(extra.get("min_inliers", DEFAULT_MIN_INLIERS))
    ids, vectors = lib.catalog.vectors()
    found, _ = finder.candidate_pairs(ids, vectors, lib.score_offsets(vectors), low)
    records = {r.id: r for r in lib.catalog.get(sorted({i for pair in found for i in pair}))}
    scores = {pair: float(s) for pair, s in found.items()}

    def judge(leader: int, others: list[int]) -> dict[int, str | None]:
        kept = records[leader]
        score = {j: scores.get((leader, j), scores.get((j, leader), 0.0)) for j in others}
        same = {j for j in others if records[j].content_hash == kept.content_hash}
        checks = lib.verify_pairs([(leader, j) for j in others if j not in same], records, needed)
        tiers: dict[int, str | None] = {}
        for j in others:
            check = checks.get((leader, j))
            if j in same or score[j] >= t or (check is not None and check.inliers >= needed):
                tiers[j] = tier_of(kept, records[j], score[j], t, check)
            else:
                tiers[j] = None
        return tiers

    members = {
        i: DuplicateMember(
            r.path, 1.0, "keep", r.width, r.height, r.size, r.mtime_ns, r.content_hash
        )
        for i, r in records.items()
    }
    groups = []
    for leader, taken in group_judged(members, [(i, j, s) for (i, j), s in scores.items()], judge):
        copies = [
            DuplicateMember(
                records[j].path,
                s,
                tier,
                records[j].width,
                records[j].height,
                records[j].size,
                records[j].mtime_ns,
                records[j].content_hash,
            )
            for j, s, tier in taken
        ]
        groups.append(DuplicateGroup(members[leader], copies))
    return groups


def describe(
    report: Report,
    shots: OtherShotSet,
    groups: Sequence[DuplicateGroup],
    shipped_groups: Sequence[DuplicateGroup],
    timings: dict[str, float],
) -> None:
    """The figures of both halves and the whole set, the finder beside the shipped rule."""
    base = "rule before the same-capture decision"
    for part in (*HALVES, None):
        name = part or "all"
        shipped, plain = measure(shots, groups, part), measure(shots, shipped_groups, part)
        report.details[name] = {"finder": shipped.to_dict(), "shipped_rule": plain.to_dict()}
        s, p = shipped.captures, plain.captures
        rows = [
            ("precision", s.precision, p.precision, ">= 0.99", s.precision >= 0.99),
            (
                "recall",
                shipped.groups.recall,
                plain.groups.recall,
                ">= 0.85",
                shipped.groups.recall >= 0.85,
            ),
            ("other-shot pairs", s.other_shots, p.other_shots, "", None),
            ("other-shot share of pairs", s.other_shot_share, p.other_shot_share, "", None),
            (
                "captures grouped with another shot",
                s.captures_grouped_share,
                p.captures_grouped_share,
                "<= 0.01",
                s.captures_grouped_share <= 0.01,
            ),
            ("unrelated pairs", s.unrelated, p.unrelated, "", None),
            (
                "pairs among synthetic images",
                shipped.synthetic_pairs,
                plain.synthetic_pairs,
                "0",
                shipped.synthetic_pairs == 0,
            ),
        ]
        if shipped.similar_recall is not None:
            rows.append(("similar recall", shipped.similar_recall, 0.0, "", None))
        for title, value, baseline, target, met in rows:
            report.add(
                Figure(f"{name}: {title}", float(value), "", base, float(baseline), target, met)
            )
        for edit, recall in shipped.groups.per_transform.items():
            report.add(
                Figure(
                    f"{name}: recall, {edit}",
                    recall,
                    "",
                    base,
                    plain.groups.per_transform.get(edit, float("nan")),
                )
            )
    if "dupes_s" in timings and "index_s" in timings:
        report.add(
            Figure(
                "dupes time",
                timings["dupes_s"],
                "s",
                "index time",
                timings["index_s"],
                "<= 1x",
                timings["dupes_s"] <= timings["index_s"],
            )
        )
    if "dupes_cpu_s" in timings and "index_cpu_s" in timings:
        # CPU seconds of the process (all its threads): on a shared machine the wall clock
        # mostly measures the other load.
        report.add(
            Figure(
                "dupes CPU time",
                timings["dupes_cpu_s"],
                "s",
                "index CPU time",
                timings["index_cpu_s"],
                "<= 1x",
                timings["dupes_cpu_s"] <= timings["index_cpu_s"],
            )
        )
    if "shipped_dupes_s" in timings:
        report.add(
            Figure(
                "shipped rule time",
                timings["shipped_dupes_s"],
                "s",
                "index time",
                timings.get("index_s", float("nan")),
            )
        )
    report.notes.append(
        f"ukbench-dev objects (seed {SEED} picks each one's source shot) x 13 edits, the other "
        "three shots of each object as negatives, synthetic images and caltech101 test photos "
        f"as unrelated ones; objects 0-{TUNING_OBJECTS - 1} are the tuning half, the rest "
        "held out; precision over reported (kept, member) pairs, recall = copies grouped "
        "with their source; similar recall = other shots listed as similar to a capture of their "
        "object (the shipped rule has no similar tier)"
    )
    report.notes.append(TIMING_NOTE)


# The synthetic-only timing: images the descriptor cannot tell apart well, half smooth
# noise and half random shapes, each drawn independently.
SYNTHETIC_TIMING_KINDS = ("noise", "shapes")


def synthetic_timing(
    settings: Settings,
    count: int,
    work: Path | None = None,
    seed: int = SEED,
    rounds: int = ROUNDS,
) -> Report:
    """``dupes`` time beside ``index`` time on ``count`` independent synthetic images
    (``SYNTHETIC_TIMING_KINDS``, drawn from ``seed``), with the defaults, and the pairs it
    wrongly reports."""
    report = Report("othershots_synthetic", settings.quick)
    with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
        # Each seed its own folder: the images in one are made once and then reused.
        name = f"synthetic-{count}" if seed == SEED else f"synthetic-{count}-seed{seed}"
        root = (work or Path(tmp)) / name
        folder = root / "images"
        folder.mkdir(parents=True, exist_ok=True)
        kinds = SYNTHETIC_TIMING_KINDS
        for n in range(count):
            kind = kinds[n % len(kinds)]
            path = folder / f"{kind}-{n:05d}.png"
            if not path.is_file():
                synthetic.make_image(kind, n, seed).save(path)
        # The index is made anew each run: an index already up to date would time nothing.
        shutil.rmtree(root / "index", ignore_errors=True)
        with Library(root / "index", weights=settings.weights, device="cpu") as lib:
            indexed = lib.index([folder]).embedded
            groups = lib.find_duplicates()
        # Timed apart, in fresh processes (``benchmarks.fresh``), as a user's commands run.
        timed = fresh.alternate(
            folder, root / "index", root / "index-timed", settings.weights, rounds
        )
    medians = timed.timings()
    index_s, index_cpu_s = medians["index_s"], medians["index_cpu_s"]
    dupes_s, dupes_cpu_s = medians["dupes_s"], medians["dupes_cpu_s"]
    pairs = sum(len(g.members) for g in groups)
    report.add(
        Figure(
            "synthetic: dupes time",
            dupes_s,
            "s",
            "index time",
            index_s,
            "<= 1x",
            dupes_s <= index_s,
        )
    )
    report.add(
        Figure(
            "synthetic: dupes CPU time",
            dupes_cpu_s,
            "s",
            "index CPU time",
            index_cpu_s,
            "<= 1x",
            dupes_cpu_s <= index_cpu_s,
        )
    )
    report.add(
        Figure("synthetic: pairs reported", float(pairs), "", "target", 0.0, "0", pairs == 0)
    )
    report.details.update(
        {
            "images": count,
            "embedded": indexed,
            "kinds": list(kinds),
            "seed": seed,
            "timings_s": {
                "index_s": index_s,
                "dupes_s": dupes_s,
                "index_cpu_s": index_cpu_s,
                "dupes_cpu_s": dupes_cpu_s,
            },
            "timing_runs_s": timed.runs(),
        }
    )
    report.notes.append(
        f"{count} independent seeded synthetic images ({', '.join(kinds)}), indexed and "
        "searched with the defaults; any reported pair is wrong"
    )
    report.notes.append(TIMING_NOTE)
    return report


def write_groups(path: Path, groups: Iterable[DuplicateGroup]) -> None:
    def row(m: DuplicateMember) -> dict[str, Any]:
        # The exact score, not to_dict's rounded one, so that groups read back compare equal.
        return {
            **m.to_dict(),
            "score": m.score,
            "mtime_ns": m.mtime_ns,
            "content_hash": m.content_hash,
        }

    data = [
        {
            "keep": row(g.keep),
            "members": [row(m) for m in g.members],
            "similar": [row(m) for m in g.similar],
        }
        for g in groups
    ]
    path.write_text(json.dumps(data))


def read_groups(path: Path) -> list[DuplicateGroup]:
    def member(r: dict[str, Any]) -> DuplicateMember:
        return DuplicateMember(
            Path(r["path"]),
            r["score"],
            r["tier"],
            r["width"],
            r["height"],
            r["bytes"],
            r["mtime_ns"],
            r["content_hash"],
        )

    data = json.loads(path.read_text())
    return [
        DuplicateGroup(
            member(g["keep"]),
            [member(m) for m in g["members"]],
            [member(m) for m in g.get("similar", [])],
        )
        for g in data
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.othershots", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="12 objects, a small set")
    parser.add_argument("--weights", help="default: bundled")
    parser.add_argument("--work", type=Path, help="keep the set, index and groups here")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse --work's groups instead of searching again"
    )
    parser.add_argument(
        "--synthetic-only",
        type=int,
        metavar="N",
        help="only time dupes against index on N independent synthetic images",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="the synthetic images' seed, with --synthetic-only (another seed: images no "
        "rule was tuned on)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"timed runs of index and of dupes, alternating, each figure their median "
        f"(default {ROUNDS})",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = Settings(quick=args.quick, weights=args.weights or default_weights(), out=args.out)

    def measured() -> Report:
        if args.synthetic_only is not None:
            return synthetic_timing(
                settings, args.synthetic_only, args.work, args.seed, args.rounds
            )
        return run(settings, args.work, args.reuse, args.rounds)

    run_and_save("othershots", argv, settings.out, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
