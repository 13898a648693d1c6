"""Turned copies: photos turned by a quarter-turn (with or without a mirror) or tilted onto
black or white corners, found by the duplicate finder and by ``query --rotations``.

Held-back caltech101 test photos (chosen by seed) each get nine copies: turned clockwise
by 90, 180 and 270 degrees, turned by 90 then mirrored, mirrored then turned by 90, and
tilted by 15 and 30 degrees
(either way, by seed) onto a larger canvas with black and with white corners. Against an
index of the originals, other test photos as distractors and the other-shots set
(``benchmarks.othershots``: ukbench-dev copies and the other shots of their objects,
seeded synthetic images), each copy is asked ``Library.duplicates_of`` and ``query``; then
the copies are indexed too and ``find_duplicates`` groups the whole collection. Every
figure is printed beside the same call without rotation handling (``turned=False``, a
plain query). Precision counts the (kept, member) pairs of one source; the others are
another shot of an object, a pair of synthetic images, or unrelated.

The tilt detector's constants were set on scikit-image photos and the screen's cut for
tilted images (``TILT_CUT``) on the first half (by file name) of the full run's sources;
the JSON gives the figures of ``dupes`` for that half and for the held-out rest.

The cost is measured a second way, on a library that is mostly not turned: 1,000
caltech101 test photos among which 27 (three per kind above) are copied, 2.6% turned or
tilted copies, ``find_duplicates`` with and without turns, CPU seconds of each (the
lower of two runs). Two more libraries part the handling's own cost from that of checking
the copies it finds, which plain ``dupes`` never pays there: the same 1,000 photos without
copies (both ways), and their upright twin, the same 27 copies re-encoded alike but not
turned, tilted or mirrored (plain ``dupes``, beside ``--turned`` on the turned library).
What indexing that library costs is given beside the CPU seconds that making each image's
turned-copy screen data (thumbnail and tilt, kept in the catalog) takes of it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from benchmarks import othershots
from benchmarks.data import caltech_test, link_photos, missing_caltech_note, split_photos
from benchmarks.report import Figure, Report, cpu_seconds, run_and_save
from benchmarks.settings import RESULTS, Settings, default_weights
from ghostmatch.dupes.groups import DuplicateGroup
from ghostmatch.dupes.turns import inverse_turn, turn_image, turn_screen
from ghostmatch.library import Library

SOURCES, SOURCES_QUICK = 100, 24
DISTRACTORS, DISTRACTORS_QUICK = 300, 60
OBJECTS_EVERY, OBJECTS_EVERY_QUICK = 4, 12
SYNTHETIC_PER_KIND, SYNTHETIC_QUICK = 8, 3
SEED = 23
JPEG_QUALITY = 90
LIBRARY_PHOTOS, LIBRARY_COPIES_PER_VARIANT, LIBRARY_SEED = 1000, 3, 41


@dataclass(frozen=True)
class Variant:
    """How a copy is made from its source, and how it lines up with it again: the copy
    turned clockwise by ``turn``, then mirrored when ``mirrored``, is the source."""

    name: str
    make: Callable[[Image.Image, random.Random], Image.Image]
    turn: int
    mirrored: bool = False


def _tilt(
    degrees: float, fill: tuple[int, int, int]
) -> Callable[[Image.Image, random.Random], Image.Image]:
    def make(image: Image.Image, rng: random.Random) -> Image.Image:
        angle = degrees * rng.choice((-1, 1))
        return image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)

    return make


VARIANTS = (
    Variant("turn 90", lambda im, _: turn_image(im, 90), 270),
    Variant("turn 180", lambda im, _: turn_image(im, 180), 180),
    Variant("turn 270", lambda im, _: turn_image(im, 270), 90),
    Variant("mirror + turn 90", lambda im, _: ImageOps.mirror(turn_image(im, 90)), 90, True),
    Variant("mirror, then turn 90", lambda im, _: turn_image(ImageOps.mirror(im), 90), 270, True),
    Variant("tilt 15, black", _tilt(15, (0, 0, 0)), 0),
    Variant("tilt 15, white", _tilt(15, (255, 255, 255)), 0),
    Variant("tilt 30, black", _tilt(30, (0, 0, 0)), 0),
    Variant("tilt 30, white", _tilt(30, (255, 255, 255)), 0),
)
QUARTER = VARIANTS[:5]
# The upright twin of every variant: the copy as it was, only re-encoded.
UPRIGHT = Variant("upright", lambda im, _: im, 0)


@dataclass(frozen=True)
class Copy:
    path: Path
    source: Path
    variant: Variant


def make_copies(sources: Sequence[Path], folder: Path, seed: int) -> list[Copy]:
    copies = []
    for n, variant in enumerate(VARIANTS):
        out = folder / variant.name.replace(" ", "").replace(",", "-").replace("+", "-")
        out.mkdir(parents=True)
        for source in sources:
            rng = random.Random(f"{seed}:{source.name}:{variant.name}")
            image = Image.open(source).convert("RGB")
            path = out / f"{source.stem}-{n}.jpg"
            variant.make(image, rng).save(path, quality=JPEG_QUALITY)
            copies.append(Copy(path, source, variant))
    return copies


def run(settings: Settings, work: Path | None = None) -> Report:
    report = Report("turns", settings.quick)
    photos = caltech_test()
    if photos is None:
        report.notes.append(missing_caltech_note("turned copies"))
        return report
    if work is None:
        with tempfile.TemporaryDirectory(prefix="ghostmatch-bench-") as tmp:
            return measure_all(report, settings, Path(tmp), photos)
    work.mkdir(parents=True, exist_ok=True)
    return measure_all(report, settings, work, photos)


def measure_library(report: Report, settings: Settings, work: Path, photos: Sequence[Any]) -> None:
    """``find_duplicates`` with and without turns on a library that is mostly upright:
    ``LIBRARY_PHOTOS`` test photos (chosen by their own seed), a few of them copied each
    way. Two more libraries separate the handling's own cost from that of the copies it
    finds: the same photos with no copies (what ``--turned`` costs where there is nothing
    turned), and their upright twin, the same photos copied the same way (re-encoded
    alike) but not turned, tilted or mirrored, which plain ``dupes`` finds and checks."""
    library, _ = split_photos(photos, LIBRARY_PHOTOS, 0, LIBRARY_SEED)
    links = link_photos(library, work / "photos")
    picked = random.Random(LIBRARY_SEED).sample(links, LIBRARY_COPIES_PER_VARIANT * len(VARIANTS))
    folder, twin = work / "copies", work / "upright"
    folder.mkdir(parents=True)
    twin.mkdir(parents=True)
    copies, upright = [], []
    for n, variant in enumerate(VARIANTS):
        for source in picked[n * LIBRARY_COPIES_PER_VARIANT : (n + 1) * LIBRARY_COPIES_PER_VARIANT]:
            rng = random.Random(f"{LIBRARY_SEED}:{source.name}:{variant.name}")
            image = Image.open(source).convert("RGB")
            path = folder / f"{source.stem}-{n}.jpg"
            variant.make(image, rng).save(path, quality=JPEG_QUALITY)
            copies.append(Copy(path, source, variant))
            # The twin: the same source through the same encoder, left as it was.
            path = twin / f"{source.stem}-{n}.jpg"
            image.save(path, quality=JPEG_QUALITY)
            upright.append(Copy(path, source, UPRIGHT))
    images, cpu, found = _dupes_cpu(work / "index", [work / "photos", folder], settings)
    bare_images, bare_cpu, _ = _dupes_cpu(work / "index-bare", [work / "photos"], settings)
    twin_images, twin_cpu, twin_found = _dupes_cpu(
        work / "index-upright", [work / "photos", twin], settings, (False, False)
    )
    index_cpu = cpu.pop("index")[0]
    screen_cpu = _screen_cpu([work / "photos", folder], settings)
    report.add(
        Figure(
            "mostly upright library: index CPU time",
            index_cpu,
            "s",
            "less the turned-copy screen's data",
            index_cpu - screen_cpu,
        )
    )
    turned_s, plain_s = min(cpu[True]), min(cpu[False])
    report.add(
        Figure(
            "mostly upright library: dupes CPU time",
            turned_s,
            "s",
            "without rotation handling",
            plain_s,
            "<= 1.3x",
            turned_s <= 1.3 * plain_s,
        )
    )
    bare_turned_s, bare_plain_s = min(bare_cpu[True]), min(bare_cpu[False])
    report.add(
        Figure(
            "library with no copies: dupes CPU time",
            bare_turned_s,
            "s",
            "without rotation handling",
            bare_plain_s,
            "<= 1.3x",
            bare_turned_s <= 1.3 * bare_plain_s,
        )
    )
    twin_s = min(twin_cpu[False])
    report.add(
        Figure(
            "mostly upright library: dupes --turned CPU time",
            turned_s,
            "s",
            "plain dupes, the same copies upright",
            twin_s,
            "<= 1.3x",
            turned_s <= 1.3 * twin_s,
        )
    )
    origin = origin_of(copies, None)
    share = {t: _share([grouped(found[t], c)[0] for c in copies]) for t in (False, True)}
    report.add(
        Figure(
            "mostly upright library: copies grouped with source",
            share[True],
            "",
            "without rotation handling",
            share[False],
        )
    )
    twin_share = _share([grouped(twin_found[False], c)[0] for c in upright])
    report.add(
        Figure(
            "upright twin: copies grouped with source (plain dupes)",
            twin_share,
            "",
            "turned copies, dupes --turned",
            share[True],
        )
    )
    kinds = {t: pair_kinds(found[t], origin, None) for t in (False, True)}
    report.details["library"] = {
        "seed": LIBRARY_SEED,
        "images": images,
        "copies": len(copies),
        "cpu_s": {"with_turns": cpu[True], "upright": cpu[False]},
        "index_cpu_s": index_cpu,
        "turn_screen_cpu_s": screen_cpu,
        "pairs": {"with_turns": kinds[True], "upright": kinds[False]},
        "no_copies": {
            "images": bare_images,
            "cpu_s": {"with_turns": bare_cpu[True], "upright": bare_cpu[False]},
        },
        "upright_twin": {
            "images": twin_images,
            "cpu_s": {"upright": twin_cpu[False]},
            "pairs": pair_kinds(twin_found[False], origin_of(upright, None), None),
        },
    }
    report.notes.append(
        f"mostly upright library: {images} images, {len(copies)} of them turned or tilted "
        "copies of others; unrelated pairs there are other caltech photos grouped; the "
        f"library with no copies holds its {bare_images} photos alone, the upright twin "
        f"({twin_images} images) the same copies re-encoded alike but not turned, tilted "
        "or mirrored"
    )


def _dupes_cpu(
    index: Path,
    roots: Sequence[Path],
    settings: Settings,
    runs: Sequence[bool] = (False, True, False, True),
) -> tuple[int, dict[Any, list[float]], dict[bool, list[DuplicateGroup]]]:
    """An index of ``roots`` and the CPU seconds of ``find_duplicates`` run with
    ``turned`` as each of ``runs`` says (and of the ``index`` run), with the groups each
    way found."""
    cpu: dict[Any, list[float]] = {False: [], True: []}
    found: dict[bool, list[DuplicateGroup]] = {}
    with Library(index, weights=settings.weights, device="cpu") as lib:
        start = cpu_seconds()
        lib.index(roots)
        cpu["index"] = [cpu_seconds() - start]
        images = lib.catalog.count()
        for turned in runs:
            start = cpu_seconds()
            found[turned] = lib.find_duplicates(turned=turned)
            cpu[turned].append(cpu_seconds() - start)
    return images, cpu, found


def _screen_cpu(roots: Sequence[Path], settings: Settings) -> float:
    """The CPU seconds that making the turned-copy screen's data (``turn_screen``) takes
    for the images under ``roots``, decoded as the indexer decodes them (the decode not
    counted: indexing decodes each image anyway)."""
    from ghostmatch.ingest.images import load_image
    from ghostmatch.model.weights import load_descriptor

    side = load_descriptor(settings.weights).card.input_size
    spent = 0.0
    for root in roots:
        for path in sorted(root.iterdir()):
            image = load_image(path, side).image
            start = time.process_time()
            turn_screen(image)
            spent += time.process_time() - start
    return spent


def measure_all(report: Report, settings: Settings, work: Path, photos: Sequence[Any]) -> Report:
    quick = settings.quick
    n_sources, n_distractors = (
        (SOURCES_QUICK, DISTRACTORS_QUICK) if quick else (SOURCES, DISTRACTORS)
    )
    chosen, others = split_photos(photos, n_sources, n_distractors, SEED)
    sources = link_photos(chosen, work / "originals")
    link_photos(others, work / "distractors")
    copies = make_copies(sources, work / "copies", SEED)
    roots = [work / "originals", work / "distractors"]
    shots: othershots.OtherShotSet | None = None
    if (othershots.UKBENCH / "ukbench00000.jpg").is_file():
        every = OBJECTS_EVERY_QUICK if quick else OBJECTS_EVERY
        per_kind = SYNTHETIC_QUICK if quick else SYNTHETIC_PER_KIND
        objects = list(range(0, othershots.OBJECTS, every))
        shots = othershots.build(work / "othershots", othershots.UKBENCH, objects, SEED, per_kind)
        roots.append(shots.folder)
    else:
        report.notes.append(
            f"no other-shot negatives: no ukbench-dev photos at {othershots.UKBENCH}"
        )
    timings: dict[str, float] = {}
    with Library(work / "index", weights=settings.weights, device="cpu") as lib:
        start = time.perf_counter()
        lib.index(roots)
        timings["index_s"] = time.perf_counter() - start
        one = measure_one_image(lib, copies, timings)
        lib.index([work / "copies"])
        # Wall time and the process's CPU time (all its threads): on a shared machine the
        # CPU time is the steadier figure of the two.
        start, cpu = time.perf_counter(), cpu_seconds()
        plain = lib.find_duplicates(turned=False)
        timings["dupes_upright_s"] = time.perf_counter() - start
        timings["dupes_upright_cpu_s"] = cpu_seconds() - cpu
        start, cpu = time.perf_counter(), cpu_seconds()
        turned = lib.find_duplicates(turned=True)
        timings["dupes_s"] = time.perf_counter() - start
        timings["dupes_cpu_s"] = cpu_seconds() - cpu
        images = lib.catalog.count()
    describe(report, copies, shots, one, plain, turned, timings, tuning_half(photos))
    measure_library(report, settings, work / "library", photos)
    report.details.update(
        {
            "weights": settings.weights,
            "seed": SEED,
            "sources": len(sources),
            "copies": len(copies),
            "images": images,
            "timings_s": timings,
        }
    )
    return report


def measure_one_image(
    lib: Library, copies: Sequence[Copy], timings: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Each copy (not indexed) asked ``duplicates_of`` and ``query -k 10`` with and without
    rotation handling: whether its source comes back, with the right turn."""
    results: dict[str, dict[str, Any]] = {v.name: {} for v in VARIANTS}
    times: dict[str, list[float]] = {"of": [], "of_upright": [], "query": [], "query_plain": []}
    for copy in copies:
        row = results[copy.variant.name].setdefault("rows", [])
        source = copy.source.resolve()
        start = time.perf_counter()
        members = lib.duplicates_of(copy.path, turned=True)
        times["of"].append(time.perf_counter() - start)
        start = time.perf_counter()
        upright = lib.duplicates_of(copy.path, turned=False)
        times["of_upright"].append(time.perf_counter() - start)
        start = time.perf_counter()
        matches = lib.query(copy.path, 10, rotations=True)
        times["query"].append(time.perf_counter() - start)
        start = time.perf_counter()
        plain = lib.query(copy.path, 10)
        times["query_plain"].append(time.perf_counter() - start)
        hit = next((m for m in members if m.path.resolve() == source), None)
        # The source lines up with the copy by the copy's own turn undone.
        expected = inverse_turn(copy.variant.turn, copy.variant.mirrored)
        row.append(
            {
                "found": hit is not None,
                "turn_right": hit is not None and hit.turn == expected,
                "found_upright": any(m.path.resolve() == source for m in upright),
                "wrong": sum(not _same(m.path, source) for m in members),
                "wrong_upright": sum(not _same(m.path, source) for m in upright),
                "rank": _rank([m.path for m in matches], source),
                "rank_plain": _rank([m.path for m in plain], source),
            }
        )
    for name, values in times.items():
        timings[f"{name}_p50_s"] = statistics.median(values)
    return results


def _same(path: Path, source: Path) -> bool:
    return path.resolve() == source


def _rank(paths: Sequence[Path], source: Path) -> int | None:
    for rank, path in enumerate(paths, start=1):
        if path.resolve() == source:
            return rank
    return None


def origin_of(copies: Sequence[Copy], shots: othershots.OtherShotSet | None) -> dict[Path, str]:
    """Each file of a source's family (the source and its copies) by its family's name;
    every other file stands alone."""
    origin = {}
    for copy in copies:
        origin[copy.path.resolve()] = origin[copy.source.resolve()] = f"caltech:{copy.source.name}"
    if shots is not None:
        for n, group in enumerate(shots.groups):
            for path in group:
                origin[path.resolve()] = f"ukbench:{n}"
    return origin


def pair_kinds(
    groups: Sequence[DuplicateGroup], origin: dict[Path, str], shots: othershots.OtherShotSet | None
) -> dict[str, int]:
    """(kept, member) pairs by kind: a copy of one source, another shot of an object, two
    synthetic images, or unrelated."""
    scenes = {p.resolve(): s for p, s in shots.scene_of().items()} if shots is not None else {}
    synthetic = shots.paths("synthetic") if shots is not None else set()
    kinds = {"copy": 0, "other shot": 0, "synthetic": 0, "unrelated": 0}
    for group in groups:
        kept = group.keep.path.resolve()
        for member in group.members:
            path = member.path.resolve()
            if kept in origin and origin.get(path) == origin[kept]:
                kinds["copy"] += 1
            elif kept in scenes and scenes.get(path) == scenes[kept]:
                kinds["other shot"] += 1
            elif kept in synthetic and path in synthetic:
                kinds["synthetic"] += 1
            else:
                kinds["unrelated"] += 1
    return kinds


def grouped(groups: Sequence[DuplicateGroup], copy: Copy) -> tuple[bool, bool]:
    """Whether ``copy`` shares a group with its source, and, when one of them is the kept
    file, whether the other carries the turn that lines it up with it."""
    source, path = copy.source.resolve(), copy.path.resolve()
    for group in groups:
        files = {m.path.resolve(): m for m in group.members}
        kept = group.keep.path.resolve()
        if {source, path} <= files.keys() | {kept}:
            if kept == source:
                return True, files[path].turn == copy.variant.turn
            if kept == path:
                expected = inverse_turn(copy.variant.turn, copy.variant.mirrored)
                return True, files[source].turn == expected
            return True, True
    return False, False


def describe(
    report: Report,
    copies: Sequence[Copy],
    shots: othershots.OtherShotSet | None,
    one: dict[str, dict[str, Any]],
    plain: Sequence[DuplicateGroup],
    turned: Sequence[DuplicateGroup],
    timings: dict[str, float],
    tuning: set[str],
) -> None:
    upright = "without rotation handling"
    details: dict[str, Any] = {}
    for variant in VARIANTS:
        rows = one[variant.name]["rows"]
        mine = [c for c in copies if c.variant is variant]
        found = [grouped(turned, c) for c in mine]
        found_plain = [grouped(plain, c) for c in mine]
        share = _share([f for f, _ in found])
        target = ">= 0.95" if variant in QUARTER else ">= 0.8"
        low = 0.95 if variant in QUARTER else 0.8
        report.add(
            Figure(
                f"dupes: {variant.name}, grouped with source",
                share,
                "",
                upright,
                _share([f for f, _ in found_plain]),
                target,
                share >= low,
            )
        )
        of = _share([r["found"] for r in rows])
        report.add(
            Figure(
                f"dupes --of: {variant.name}, source found",
                of,
                "",
                upright,
                _share([r["found_upright"] for r in rows]),
                target,
                of >= low,
            )
        )
        top = _share([r["rank"] == 1 for r in rows])
        report.add(
            Figure(
                f"query --rotations: {variant.name}, source ranked first",
                top,
                "",
                "plain query",
                _share([r["rank_plain"] == 1 for r in rows]),
            )
        )
        details[variant.name] = {
            "dupes_found_tuning": _share(
                [f for (f, _), c in zip(found, mine, strict=True) if c.source.name in tuning]
            ),
            "dupes_found_held_out": _share(
                [f for (f, _), c in zip(found, mine, strict=True) if c.source.name not in tuning]
            ),
            "dupes_turn_right": _share([t for f, t in found if f]),
            # Rows are in the copies' order, as ``mine`` is.
            "of_found_tuning": _share(
                [r["found"] for r, c in zip(rows, mine, strict=True) if c.source.name in tuning]
            ),
            "of_found_held_out": _share(
                [r["found"] for r, c in zip(rows, mine, strict=True) if c.source.name not in tuning]
            ),
            "of_turn_right": _share([r["turn_right"] for r in rows if r["found"]]),
            "of_wrong_members": sum(r["wrong"] for r in rows),
            "of_wrong_members_upright": sum(r["wrong_upright"] for r in rows),
            "query_in_top10": _share([r["rank"] is not None for r in rows]),
            "query_plain_in_top10": _share([r["rank_plain"] is not None for r in rows]),
        }
    origin = origin_of(copies, shots)
    kinds, kinds_plain = pair_kinds(turned, origin, shots), pair_kinds(plain, origin, shots)
    precision = kinds["copy"] / max(1, sum(kinds.values()))
    precision_plain = kinds_plain["copy"] / max(1, sum(kinds_plain.values()))
    report.add(
        Figure(
            "dupes: precision of the duplicate tiers",
            precision,
            "",
            upright,
            precision_plain,
            "unchanged",
            precision >= precision_plain - 0.002,
        )
    )
    for kind in ("other shot", "synthetic", "unrelated"):
        report.add(Figure(f"dupes: {kind} pairs", kinds[kind], "", upright, kinds_plain[kind]))
    report.add(
        Figure(
            "dupes time",
            timings["dupes_s"],
            "s",
            upright,
            timings["dupes_upright_s"],
            "<= 1.3x",
            timings["dupes_s"] <= 1.3 * timings["dupes_upright_s"],
        )
    )
    report.add(
        Figure(
            "dupes CPU time",
            timings["dupes_cpu_s"],
            "s",
            upright,
            timings["dupes_upright_cpu_s"],
            "<= 1.3x",
            timings["dupes_cpu_s"] <= 1.3 * timings["dupes_upright_cpu_s"],
        )
    )
    for name, base in (("of", "of_upright"), ("query", "query_plain")):
        report.add(
            Figure(
                f"{'dupes --of' if name == 'of' else 'query --rotations'} time, p50",
                timings[f"{name}_p50_s"] * 1000,
                "ms",
                upright if name == "of" else "plain query",
                timings[f"{base}_p50_s"] * 1000,
            )
        )
    details["pairs"] = {"with_turns": kinds, "upright": kinds_plain}
    report.details["by_variant"] = details
    report.notes.append(
        f"caltech101 test photos (seed {SEED}), nine copies each; the index also holds "
        "other test photos, ukbench-dev copies and other shots, synthetic images; found = "
        "grouped with its source (dupes) or listed (dupes --of); precision over all "
        "reported (kept, member) pairs"
    )


def tuning_half(photos: Sequence[Any]) -> set[str]:
    """The file names (as linked) of the first half, by name, of the full run's sources,
    on which the screen's cut for tilted images was set; the other sources, and those of
    ``--quick`` that are not among them, are held out."""
    sources, _ = split_photos(photos, SOURCES, DISTRACTORS, SEED)
    names = sorted(f"{p.label}-{p.path.name}" for p in sources)
    return set(names[: len(names) // 2])


def _share(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.turns", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="24 photos, a small set")
    parser.add_argument("--weights", help="default: bundled")
    parser.add_argument("--work", type=Path, help="keep the set and the index here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick, weights=args.weights or default_weights(), out=args.out)
    run_and_save("turns", argv, settings.out, lambda: run(settings, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
