"""Duplicate groups: exact copies by content hash, near and edited copies by descriptor."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghostmatch.errors import GhostmatchError

if TYPE_CHECKING:
    # Only for annotations: the checks themselves need torch, which grouping does not.
    from ghostmatch.dupes.verify import Verification


@dataclass(frozen=True)
class DuplicateMember:
    """One file of a group; ``score`` is its duplicate score with the kept file: cosine
    similarity, less background offsets when the model has a score background.
    ``content_hash`` is the file's hash as indexed ("" when unknown), so that acting on a
    group can check that no file changed since. ``turn`` is the clockwise quarter-turn
    (0, 90, 180 or 270 degrees) that lines this file up with the kept one (then a mirror,
    for a mirror image); 0 for an upright copy."""

    path: Path
    score: float
    tier: str
    width: int
    height: int
    bytes: int
    mtime_ns: int
    content_hash: str = ""
    turn: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "score": round(self.score, 6),
            "tier": self.tier,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "turn": self.turn,
        }


@dataclass(frozen=True)
class DuplicateGroup:
    """A kept representative, the files that duplicate it (copies of the same capture,
    tiers exact / near / edited) and, when asked for, the files ``similar`` to it (other
    captures of the same scene). Actions only ever see ``members``; a group has at least
    one member or one similar file."""

    keep: DuplicateMember
    members: list[DuplicateMember] = field(default_factory=list)
    similar: list[DuplicateMember] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "keep": str(self.keep.path),
            "members": [m.to_dict() for m in self.members],
        }
        if self.similar:
            data["similar"] = [m.to_dict() for m in self.similar]
        return data


# The tiers of a duplicate (derived from the same capture), and of another capture of the
# same scene, which is listed apart and never acted on.
DUPLICATE_TIERS = ("exact", "near", "edited")
SIMILAR = "similar"
KEEP_RULES = ("pixels", "size", "oldest", "newest", "path")
# Until an index is calibrated, and for weights without a measured threshold in their model
# card, this cosine is the line between "duplicate" and "similar"; see README (duplicates).
DEFAULT_THRESHOLD = 0.90
THRESHOLD_META = "dupe_threshold"
# Stage 2: a candidate pair is a duplicate when this many stride-16 feature matches (that
# pass the ratio test; 196 cells at 224 px) agree on one affine transform. The bundled
# model's measured value.
DEFAULT_MIN_INLIERS = 36
# Stage 2 looks at pairs from this cosine up to the threshold.
DEFAULT_VERIFY_THRESHOLD = 0.75
# The same two lines for a model whose file carries a score background
# (ghostmatch.model.scorenorm): its duplicate scores are cosines less two background offsets.
# The bundled model's measured rule (README, duplicate thresholds).
DEFAULT_NORMALISED_THRESHOLD = 0.357
DEFAULT_NORMALISED_VERIFY_THRESHOLD = 0.264


def default_thresholds(normalised: bool) -> tuple[float, float]:
    """(duplicate threshold, stage-2 verify threshold) when nothing measured is known."""
    if normalised:
        return DEFAULT_NORMALISED_THRESHOLD, DEFAULT_NORMALISED_VERIFY_THRESHOLD
    return DEFAULT_THRESHOLD, DEFAULT_VERIFY_THRESHOLD


def threshold_of(
    stored: object, card_extra: Mapping[str, Any] | None, normalised: bool
) -> tuple[float, str]:
    """An index's duplicate threshold and where it comes from, first found wins: the one
    ``ghostmatch calibrate`` stored (``stored``, the index's THRESHOLD_META) "calibrated",
    the weights' measured one (their card's ``dupe_threshold``) "model card", else "default".
    The one place this order lives, so `dupes` and `eval dupes` cannot disagree."""
    if isinstance(stored, dict) and "threshold" in stored:
        return float(stored["threshold"]), "calibrated"
    if card_extra is not None and "dupe_threshold" in card_extra:
        return float(card_extra["dupe_threshold"]), "model card"
    return default_thresholds(normalised)[0], "default"


def keep_priority(rule: str) -> Callable[[DuplicateMember], tuple[Any, ...]]:
    """Sort key: the first member under ``rule`` is kept.

    ``pixels`` (the default): most pixels, then larger file, then oldest, then path.
    """
    if rule not in KEEP_RULES:
        raise GhostmatchError(f"the keep rule must be one of {', '.join(KEEP_RULES)}, not {rule!r}")

    def key(m: DuplicateMember) -> tuple[Any, ...]:
        pixels, size, age, path = -m.width * m.height, -m.bytes, m.mtime_ns, os.fsdecode(m.path)
        if rule == "size":
            return (size, pixels, age, path)
        if rule == "oldest":
            return (age, pixels, size, path)
        if rule == "newest":
            return (-age, pixels, size, path)
        if rule == "path":
            return (path,)
        return (pixels, size, age, path)

    return key


def group_pairs(
    members: dict[int, DuplicateMember],
    pairs: Iterable[tuple[int, int, float]],
    keep_rule: str = "pixels",
) -> list[tuple[int, list[tuple[int, float]]]]:
    """Groups that cannot chain: (kept id, [(member id, score to the kept one), ...]).

    Files are visited best-first under the keep rule; an unassigned file opens a group and
    takes every unassigned file that scores at or above the threshold *with it*. So every
    member is a duplicate of its group's kept file itself, and A~B~C~D chains of merely
    similar photos never merge into one group.
    """
    neighbours: dict[int, dict[int, float]] = {}
    for a, b, score in pairs:
        neighbours.setdefault(a, {})[b] = score
        neighbours.setdefault(b, {})[a] = score
    key = keep_priority(keep_rule)
    order = sorted(neighbours, key=lambda i: key(members[i]))
    assigned: set[int] = set()
    groups: list[tuple[int, list[tuple[int, float]]]] = []
    for leader in order:
        if leader in assigned:
            continue
        taken = [(j, s) for j, s in neighbours[leader].items() if j not in assigned]
        if not taken:
            continue
        assigned.add(leader)
        assigned.update(j for j, _ in taken)
        taken.sort(key=lambda js: (-js[1], key(members[js[0]])))
        groups.append((leader, taken))
    return groups


def group_judged(
    members: dict[int, DuplicateMember],
    candidates: Iterable[tuple[int, int, float]],
    judge: Callable[[int, list[int]], dict[int, str | None]],
    keep_rule: str = "pixels",
    progress: Callable[[int, int], None] | None = None,
    ahead: Callable[[int, list[int]], None] | None = None,
) -> list[tuple[int, list[tuple[int, float, str]]]]:
    """Groups as :func:`group_pairs` makes them, deciding each pair only when the grouping
    needs it: (kept id, [(other id, score, tier), ...]).

    Files are visited best-first under the keep rule; an unassigned file with candidates
    asks ``judge(it, [unassigned candidates])`` for each candidate's tier (None: not
    alike). The ones in ``DUPLICATE_TIERS`` join its group; ``similar`` ones are listed
    with it but stay free for other groups. A candidate already taken is never judged,
    so a file is only ever compared with kept files. ``progress(done, total)`` counts
    the files visited. ``ahead(file, [candidates])``, when given, hears of a file
    ``LOOKAHEAD`` visits before it is visited, with its candidates unassigned then, so that
    what judging them needs can be prepared meanwhile; it decides nothing. Only
    the candidates it can still be asked about are announced: after it in the order, and
    neither they nor it a candidate of a file visited before it and not yet visited.

    Each pair is judged once. A kept file that took no copy stays free, and when one of
    the files it was compared with is visited later, their pair keeps the tier it got (no
    copy: None or ``similar``): being one capture does not depend on which file is kept,
    and on independent synthetic images half of the comparisons were such second asks.
    """
    neighbours: dict[int, dict[int, float]] = {}
    for a, b, score in candidates:
        neighbours.setdefault(a, {})[b] = score
        neighbours.setdefault(b, {})[a] = score
    key = keep_priority(keep_rule)
    order = sorted(neighbours, key=lambda i: key(members[i]))
    place = {i: n for n, i in enumerate(order)}
    assigned: set[int] = set()
    groups: list[tuple[int, list[tuple[int, float, str]]]] = []
    # The tier of each pair judged so far (low id first).
    known: dict[tuple[int, int], str | None] = {}

    def between(i: int, current: int, position: int) -> bool:
        """Whether a file visited from ``current`` on, before ``position``, may take ``i``:
        looked up among those few files (at most ``LOOKAHEAD``), not among ``i``'s
        candidates, which are many for a crowded file."""
        near = neighbours[i]
        return any(order[p] in near for p in range(current, min(position, len(order))))

    def announce(position: int, current: int) -> None:
        if ahead is not None and position < len(order) and order[position] not in assigned:
            upcoming = order[position]
            # A file is only asked about candidates after it in the order (one before it
            # judged their pair when visited, or was taken by then), and about none that a
            # file visited meanwhile takes. Worker processes group small parts, whose files
            # come one after the other: announced regardless, on the full
            # ``benchmarks.othershots`` set over half the checks made ahead were of pairs
            # never asked about (about 10 CPU seconds).
            if between(upcoming, current, position):
                return
            open_ = [
                j
                for j in neighbours[upcoming]
                if place[j] > position
                and j not in assigned
                and (min(upcoming, j), max(upcoming, j)) not in known
                and not between(j, current, position)
            ]
            if open_:
                ahead(upcoming, open_)

    for position in range(LOOKAHEAD):
        announce(position, 0)
    for done, leader in enumerate(order, start=1):
        announce(done - 1 + LOOKAHEAD, done - 1)
        if leader not in assigned:
            open_ = [(j, s) for j, s in neighbours[leader].items() if j not in assigned]
            keys = {j: (min(leader, j), max(leader, j)) for j, _ in open_}
            fresh = [j for j, _ in open_ if keys[j] not in known]
            tiers = judge(leader, fresh) if fresh else {}
            known.update((keys[j], tiers.get(j)) for j in fresh)
            tiers = {j: known[keys[j]] for j, _ in open_}
            taken = [(j, s, tier) for j, s in open_ if (tier := tiers.get(j)) is not None]
            copies = {j for j, _, tier in taken if tier in DUPLICATE_TIERS}
            if copies:
                assigned.add(leader)
                assigned.update(copies)
            if taken:
                taken.sort(key=lambda jst: (-jst[1], key(members[jst[0]])))
                groups.append((leader, taken))
        if progress is not None:
            progress(done, len(order))
    return groups


def components(
    candidates: Iterable[tuple[int, int, float]],
) -> list[list[tuple[int, int, float]]]:
    """The candidate pairs split into the connected parts of their graph, each part's
    pairs in their given order, the parts in the order of their first pairs.
    :func:`group_judged` on one part gives the groups that the whole gives for its files:
    it never looks past a file's candidates, and the keep order of a part's files is the
    whole order restricted to them."""
    pairs = list(candidates)
    root: dict[int, int] = {}

    def find(i: int) -> int:
        root.setdefault(i, i)
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for a, b, _ in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            root[max(ra, rb)] = min(ra, rb)
    parts: dict[int, list[tuple[int, int, float]]] = {}
    for pair in pairs:
        parts.setdefault(find(pair[0]), []).append(pair)
    return list(parts.values())


# How many visits ahead group_judged announces a file (a few kept files' candidates: enough
# to keep one background thread busy making their local maps).
LOOKAHEAD = 4

# Without a geometric check, a copy is ``near`` when its score lies within this share of
# the band between the threshold and the score an identical copy would get. Measured with
# the bundled model on copies of 75 caltech101 test photos (make-copies, seed 3): about nine
# in ten re-encodes and resizes lie within it, and one crop, border, turn or flip in a
# hundred at most; recoloured and blurred copies straddle it (a score cannot tell them
# from a flip; the geometric check can).
NEAR_BAND = 0.1


def tier_of(
    kept: Any,
    other: Any,
    score: float,
    threshold: float,
    check: Verification | None = None,
    ceiling: float = 1.0,
) -> str:
    """``exact`` for the same bytes. With a geometric check: ``near`` when the copy maps
    onto the whole original unmirrored (re-encodes, resizes, colour changes), else
    ``edited`` (crops, borders, flips, turns). Without one, a guess from the score:
    ``near`` when it lies in the top ``NEAR_BAND`` of the band from the threshold up to
    ``ceiling``, the score the pair would get were the copy identical (1 for plain
    cosines; 1 less both offsets for normalised scores, ``ghostmatch.model.scorenorm``)."""
    if kept is not None and kept.content_hash == other.content_hash:
        return "exact"
    if check is not None:
        return "near" if check.is_identity() else "edited"
    return "near" if ceiling - score <= NEAR_BAND * (ceiling - threshold) else "edited"


def check_threshold(threshold: float, normalised: bool = False) -> float:
    """A duplicate threshold: a cosine in [-1, 1], or for background-normalised scores
    (a cosine less two offsets of at most 1 each) a number in [-3, 1]."""
    low, kind = (-3.0, "normalised score") if normalised else (-1.0, "cosine score")
    if not low <= threshold <= 1.0:
        raise GhostmatchError(f"a duplicate threshold is a {kind} in [{low:g}, 1], not {threshold}")
    return float(threshold)
