"""Acting on duplicate groups: move or trash every file but the kept one, journaled so that
``undo`` can put each file back, even after a crash halfway through.

Layout choices:

- ``move`` keeps the folder structure below the common root of the files being moved:
  with members under /photos/2019/a.jpg and /photos/2020/b.jpg and ``move_to=/dupes``
  they land at /dupes/2019/a.jpg and /dupes/2020/b.jpg. Files on different drives share
  no root; then the whole path is re-rooted (C:\\x\\a.jpg -> /dupes/C/x/a.jpg).
- ``delete`` never unlinks: it moves the file into the ghostmatch trash, the folder
  ``<journal>.trash`` beside the journal, at its re-rooted absolute path
  (/photos/2019/a.jpg -> <journal>.trash/photos/2019/a.jpg).
- A name that is taken gets a numbered suffix (a.jpg -> a~1.jpg, a~2.jpg, ...); no
  existing file is ever replaced, neither by an action nor by ``undo``.

The journal is JSON lines, one record per event, fsynced before the next step: "run" (once
per applied run: the folder it moves files into), "planned" (the whole action, with the
file's size, mtime and content hash, written before the file is touched), then "done" or
"failed", later "undone" ("purged" in journals of older versions). Paths are stored with
non-UTF-8 bytes as escaped surrogates, so every file name round-trips.

A journal is data, not instructions: ``undo`` moves a file back only from this journal's
trash or its run's move-to folder, only to a place inside the indexed folders that was not
a kept file, and only when the file still has the recorded size, mtime and content hash.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ghostmatch.dupes.groups import SIMILAR, DuplicateGroup
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.scan import content_hash, is_under

OPS = ("move", "delete")
TRASH_SUFFIX = ".trash"
# Journals with "run" records and per-file content hashes; undo needs both.
JOURNAL_FORMAT = 2

# Why plan_actions leaves a member alone; the second list it returns carries these.
PROTECTED = "protected"
KEPT_ELSEWHERE = "kept file of a group"
LISTED_TWICE = "listed twice"
NOT_A_COPY = "similar: another capture, not a copy"
ALREADY_MOVED = "already in move_to"
PROTECTED_TARGET = "destination is in a protected folder"

_COPY_CHUNK = 1 << 20

Record = dict[str, Any]


@dataclass(frozen=True)
class Action:
    """Move ``source``, a duplicate of ``keep``, to ``target``.

    For "delete" the target is the trash location; ``plan_actions`` leaves it None and
    ``apply_actions`` fills it in. ``bytes``, ``mtime_ns`` and ``content_hash`` describe the
    file as it was grouped, the ``keep_*`` fields the kept file: when either file changed
    since, the action is left alone (0, None or "" skip that check).
    """

    op: str
    source: Path
    target: Path | None
    keep: Path
    score: float
    tier: str
    bytes: int = 0
    mtime_ns: int = 0
    content_hash: str = ""
    keep_bytes: int | None = None
    keep_mtime_ns: int | None = None
    keep_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "source": os.fsdecode(self.source),
            "target": None if self.target is None else os.fsdecode(self.target),
            "keep": os.fsdecode(self.keep),
            "score": round(self.score, 6),
            "tier": self.tier,
            "bytes": self.bytes,
            "mtime_ns": self.mtime_ns,
            "content_hash": self.content_hash,
            "keep_bytes": self.keep_bytes,
            "keep_mtime_ns": self.keep_mtime_ns,
            "keep_hash": self.keep_hash,
        }

    def to_json(self) -> str:
        """One JSON line; non-UTF-8 bytes in paths are kept as ``\\udcXX`` escapes."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        target = data.get("target")
        keep_bytes, keep_mtime_ns = data.get("keep_bytes"), data.get("keep_mtime_ns")
        return cls(
            op=data["op"],
            source=Path(data["source"]),
            target=None if target is None else Path(target),
            keep=Path(data["keep"]),
            score=float(data.get("score", 0.0)),
            tier=str(data.get("tier", "")),
            bytes=int(data.get("bytes", 0)),
            mtime_ns=int(data.get("mtime_ns", 0)),
            content_hash=str(data.get("content_hash") or ""),
            keep_bytes=None if keep_bytes is None else int(keep_bytes),
            keep_mtime_ns=None if keep_mtime_ns is None else int(keep_mtime_ns),
            keep_hash=str(data.get("keep_hash") or ""),
        )


@dataclass
class ActionReport:
    """What ``apply_actions`` did; for a dry run, what it would do (nothing is touched).

    ``done`` carries each action with its final target; ``failed`` pairs an action with
    the reason it was not (or would not be) carried out.
    """

    dry_run: bool
    journal: Path
    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes moved out of the photo folders (reclaimed once the target is emptied)."""
        return sum(action.bytes for action in self.done)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "journal": os.fsdecode(self.journal),
            "done": [action.to_dict() for action in self.done],
            "failed": [{**action.to_dict(), "error": error} for action, error in self.failed],
            "bytes": self.bytes,
        }


@dataclass
class UndoReport:
    """What ``undo`` did.

    ``restored``: files moved back to where they were. ``not_moved``: actions a crash cut
    short before the file moved, now closed. ``skipped``: files left where they are, with
    the reason; fix that and run ``undo`` again, which retries exactly these.
    ``already_undone``: actions an earlier ``undo`` reverted. ``rejected``: journal entries
    that fail the checks in the module docstring (a forged or edited journal, or a file that
    is not the one moved), by their original path, with the reason; nothing is done for them.
    """

    restored: list[Path] = field(default_factory=list)
    not_moved: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    already_undone: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "restored": [os.fsdecode(path) for path in self.restored],
            "not_moved": self.not_moved,
            "skipped": [{"path": os.fsdecode(p), "reason": r} for p, r in self.skipped],
            "already_undone": self.already_undone,
            "rejected": [{"path": os.fsdecode(p), "reason": r} for p, r in self.rejected],
        }


def trash_folder(journal: Path) -> Path:
    """The ghostmatch trash of ``journal``: where "delete" puts files, ``<journal>.trash``."""
    journal = Path(os.path.abspath(journal))
    return journal.with_name(journal.name + TRASH_SUFFIX)


def plan_actions(
    groups: Sequence[DuplicateGroup],
    op: str,
    move_to: Path | None = None,
    protect: Sequence[Path] = (),
) -> tuple[list[Action], list[tuple[Path, str]]]:
    """One action per non-kept member of ``groups``, and the members left alone with why.

    A member is left alone when it is under a ``protect`` folder ("protected"), is the kept
    file of some group (acting on it would orphan that group), is listed twice, or is
    already inside ``move_to``. ``move_to`` may not exist yet (``apply_actions`` creates
    it) but must not be a file or lie inside a protected folder. Move targets follow the
    layout in the module docstring, with a numbered suffix where a name is taken.
    """
    if op not in OPS:
        raise GhostmatchError(f"unknown action {op!r}; use one of {', '.join(OPS)}")
    if op == "move" and move_to is None:
        raise GhostmatchError("moving duplicates needs a destination folder (move_to)")
    if op == "delete" and move_to is not None:
        raise GhostmatchError("a destination folder (move_to) is only for moving, not for deleting")
    guarded = []
    for folder in protect:
        if not os.path.exists(folder):
            raise GhostmatchError(
                f"protected folder {os.fsdecode(folder)} does not exist; check the protected paths"
            )
        guarded.append(Path(os.path.realpath(folder)))
    destination: Path | None = None
    real_destination: Path | None = None
    if move_to is not None:
        if os.path.exists(move_to) and not os.path.isdir(move_to):
            raise GhostmatchError(
                f"{os.fsdecode(move_to)} is not a directory; move_to needs a folder"
            )
        destination = Path(os.path.abspath(move_to))
        real_destination = Path(os.path.realpath(move_to))
        for folder in guarded:
            if is_under(real_destination, folder):
                raise GhostmatchError(
                    f"{os.fsdecode(move_to)} is inside the protected folder "
                    f"{os.fsdecode(folder)}; choose a destination outside it"
                )

    kept = {_real_file(Path(os.path.abspath(group.keep.path))) for group in groups}
    seen: set[Path] = set()
    chosen: list[Action] = []
    skipped: list[tuple[Path, str]] = []
    for group in groups:
        keep = Path(os.path.abspath(group.keep.path))
        for member in group.members:
            source = Path(os.path.abspath(member.path))
            real = _real_file(source)
            reason = None
            if member.tier == SIMILAR:
                # Another capture of the scene is not a copy, whoever put it in a group.
                reason = NOT_A_COPY
            elif real in kept:
                reason = KEPT_ELSEWHERE
            elif real in seen:
                reason = LISTED_TWICE
            elif any(is_under(real, folder) for folder in guarded):
                reason = PROTECTED
            elif real_destination is not None and is_under(real, real_destination):
                reason = ALREADY_MOVED
            if reason is not None:
                skipped.append((source, reason))
                continue
            seen.add(real)
            chosen.append(
                Action(
                    op=op,
                    source=source,
                    target=None,
                    keep=keep,
                    score=member.score,
                    tier=member.tier,
                    bytes=member.bytes,
                    mtime_ns=member.mtime_ns,
                    content_hash=member.content_hash,
                    keep_bytes=group.keep.bytes,
                    keep_mtime_ns=group.keep.mtime_ns,
                    keep_hash=group.keep.content_hash,
                )
            )
    if destination is None:
        return chosen, skipped

    root = _common_folder([action.source for action in chosen])
    claimed: set[Path] = set()
    actions: list[Action] = []
    for action in chosen:
        relative = action.source.relative_to(root) if root else _rerooted(action.source)
        target = _free_name(destination / relative, claimed)
        real_target = _real_file(target)
        if any(is_under(real_target, folder) for folder in guarded):
            skipped.append((action.source, PROTECTED_TARGET))
            continue
        claimed.add(target)
        actions.append(replace(action, target=target))
    return actions, skipped


def apply_actions(actions: Sequence[Action], journal: Path, dry_run: bool = True) -> ActionReport:
    """Carry out ``actions``, journaling each one; with ``dry_run`` only say what would happen.

    Before a file is touched its action is appended to ``journal`` as "planned" (fsynced),
    then "done" or "failed" follows, so ``undo`` can always finish the job. A file is left
    alone (and reported as failed) when it is missing or changed since it was grouped (size,
    mtime or content hash), or when its kept file is gone or changed: then the copies are
    the only ones left. "delete" moves the file into ``trash_folder(journal)``. Moves never
    replace an existing file, work across filesystems and keep mtime.
    """
    journal = Path(os.path.abspath(journal))
    if not journal.parent.is_dir():
        raise GhostmatchError(
            f"folder {os.fsdecode(journal.parent)} for the journal does not exist; create it"
        )
    if journal.exists() and not journal.is_file():
        raise GhostmatchError(f"journal {os.fsdecode(journal)} is not a file")
    trash = trash_folder(journal)
    report = ActionReport(dry_run=dry_run, journal=journal)
    run = uuid.uuid4().hex[:12]
    claimed: set[Path] = set()
    kept_hashes: dict[Path, str] = {}
    with _journal_appender(journal, enabled=not dry_run) as append:
        if actions:
            # Undo trusts no path in the journal by itself: this says where this run's moves
            # may be taken back from.
            moved_into = _common_folder(
                [
                    Path(os.path.abspath(a.target))
                    for a in actions
                    if a.op == "move" and a.target is not None
                ]
            )
            folder = None if moved_into is None else os.fsdecode(moved_into)
            append({"event": "run", "run": run, "format": JOURNAL_FORMAT, "moved_into": folder})
        for number, given in enumerate(actions):
            entry = f"{run}-{number}"
            # Absolute paths, so that undo works from any working directory.
            planned = replace(
                given,
                source=Path(os.path.abspath(given.source)),
                keep=Path(os.path.abspath(given.keep)),
                target=None if given.target is None else Path(os.path.abspath(given.target)),
            )
            problem, found = _problem(planned, kept_hashes)
            if found is not None:
                # The journal records the file as it is moved, for undo to check against.
                size, mtime_ns, digest = found
                planned = replace(planned, bytes=size, mtime_ns=mtime_ns, content_hash=digest)
            target = planned.target
            if problem is None:
                if planned.op == "delete":
                    target = trash / _rerooted(planned.source)
                if target is None:
                    problem = "a move needs a target"
                else:
                    target = _free_name(target, claimed)
                    claimed.add(target)
            action = replace(planned, target=target)
            if problem is not None:
                report.failed.append((action, problem))
                failed = {"event": "failed", "id": entry, "run": run, **action.to_dict()}
                append({**failed, "error": problem})
                continue
            if dry_run:
                report.done.append(action)
                continue
            assert action.target is not None
            append({"event": "planned", "id": entry, "run": run, **action.to_dict()})
            try:
                _move_exclusive(action.source, action.target)
            except OSError as error:
                message = _describe(error)
                append({"event": "failed", "id": entry, "error": message})
                report.failed.append((action, message))
                continue
            done: Record = {"event": "done", "id": entry}
            try:
                if not os.path.islink(action.target):
                    # A filesystem with coarser timestamps (FAT, NTFS) rounds the mtime on a
                    # move across drives; undo checks the file against the mtime it has there.
                    done["mtime_ns"] = os.stat(action.target).st_mtime_ns
            except OSError:
                pass
            append(done)
            report.done.append(action)
    return report


def undo(journal: Path, roots: Sequence[Path]) -> UndoReport:
    """Put back every file ``journal`` moved or trashed, the latest first.

    ``roots`` are the indexed folders (``Catalog.roots()``): a file goes back only to a
    place inside one of them. Entries that fail the checks of the module docstring are
    ``rejected`` and left alone; the rest are restored. Nothing is overwritten: a file that
    now sits at the original place keeps both files where they are and is reported in
    ``skipped``. Each reverted action gets an "undone" record, so running ``undo`` again
    does nothing new (and retries only the skipped). Actions a crash left "planned" are
    reverted if their file moved, closed if it did not.
    """
    journal = _existing_journal(journal)
    entries, runs = _read_journal(journal)
    report = UndoReport()
    trash = trash_folder(journal)
    rules = _UndoRules.make(trash, roots, runs, entries)
    with _journal_appender(journal) as append:
        for entry in reversed(entries):
            action = entry.action
            if entry.status == "undone":
                report.already_undone += 1
                continue
            if entry.status == "failed":
                continue
            if entry.status == "purged":
                report.skipped.append((action.source, "purged from the ghostmatch trash"))
                continue
            rejected = rules.problem(entry)
            if rejected is None:
                outcome, reason = _restore(action, moved=entry.status == "done")
            else:
                outcome, reason = "rejected", rejected
            if outcome == "rejected":
                report.rejected.append((action.source, reason))
                continue
            if outcome == "skipped":
                report.skipped.append((action.source, reason))
                continue
            if outcome == "restored":
                report.restored.append(action.source)
            else:
                report.not_moved += 1
            if action.op == "delete" and action.target is not None:
                _remove_empty_folders(action.target.parent, trash)
            append({"event": "undone", "id": entry.id})
    return report


@dataclass
class _Entry:
    id: str
    action: Action
    status: str
    run: str | None = None


@dataclass(frozen=True)
class _UndoRules:
    """What ``undo`` may do, from what it can trust: the journal's own location (its
    trash), the indexed folders, and each run's record of the folder it moved files into."""

    trash: Path
    roots: list[tuple[Path, Path]]  # (as given, symlinks resolved)
    kept: dict[str | None, set[Path]]  # each run's kept files
    runs: dict[str, Path | None]

    @classmethod
    def make(
        cls,
        trash: Path,
        roots: Sequence[Path],
        runs: dict[str, Path | None],
        entries: Sequence[_Entry],
    ) -> _UndoRules:
        folders = [Path(os.path.abspath(root)) for root in roots]
        kept: dict[str | None, set[Path]] = {}
        for entry in entries:
            keep = Path(os.path.abspath(entry.action.keep))
            kept.setdefault(entry.run, set()).update((keep, _real_file(keep)))
        return cls(
            trash=Path(os.path.realpath(trash)),
            roots=[(folder, Path(os.path.realpath(folder))) for folder in folders],
            kept=kept,
            runs=runs,
        )

    def problem(self, entry: _Entry) -> str | None:
        """Why ``entry`` must not be undone, or None."""
        action = entry.action
        source, target = action.source, action.target
        if target is None or not (_is_clean_absolute(source) and _is_clean_absolute(target)):
            return "its paths are not absolute, normalised paths"
        real_source = _real_file(source)
        # Within a run no kept file is acted on (plan_actions); a later run may keep another.
        kept = self.kept.get(entry.run, set())
        if source in kept or real_source in kept:
            return "it is the kept file of a group of its run"
        root = next(
            (
                folder
                for folder, real in self.roots
                if is_under(source, folder) and is_under(real_source, real)
            ),
            None,
        )
        if root is None:
            folders = ", ".join(os.fsdecode(folder) for folder, _ in self.roots) or "none"
            return (
                f"its original place is outside the indexed folders ({folders}); use the "
                "index its duplicates were found in"
            )
        if not root.is_dir():
            return f"the indexed folder {os.fsdecode(root)} is missing"
        if action.op == "delete":
            home, name = self.trash, f"this journal's trash {os.fsdecode(self.trash)}"
        elif action.op == "move":
            moved_into = self.runs.get(entry.run or "")
            if moved_into is None:
                return (
                    "the journal does not say which folder its run moved files into (a "
                    f"journal of an older ghostmatch); move {os.fsdecode(target)} back by hand"
                )
            home = Path(os.path.realpath(moved_into))
            if any(is_under(real, home) for _, real in self.roots):
                return f"its move-to folder {os.fsdecode(moved_into)} holds an indexed folder"
            name = f"the move-to folder {os.fsdecode(moved_into)}"
        else:
            return f"unknown action {action.op!r}"
        if is_under(real_source, home) or is_under(real_source, self.trash):
            return "its original place is inside a trash or move-to folder"
        if not is_under(_real_file(target), home):
            return f"{os.fsdecode(target)} is outside {name}"
        if not action.content_hash:
            return (
                "the journal records no content hash for it (a journal of an older "
                f"ghostmatch); check {os.fsdecode(target)} and move it back by hand"
            )
        return None


def _problem(
    action: Action, kept_hashes: dict[Path, str]
) -> tuple[str | None, tuple[int, int, str] | None]:
    """Why ``action`` must not run now (or None), and its file's (size, mtime, hash)."""
    if action.op not in OPS:
        return f"unknown action {action.op!r}", None
    try:
        st = os.stat(action.source)
    except FileNotFoundError:
        return "the file is missing", None
    except OSError as error:
        return _describe(error), None
    changed = "the file changed since it was grouped; group again"
    if st.st_size != action.bytes or (action.mtime_ns and st.st_mtime_ns != action.mtime_ns):
        return changed, None
    kept = _kept_problem(action, kept_hashes)
    if kept is not None:
        return kept, None
    # The kept file may be a link to this one; moving it away would break the kept copy.
    if _same_file(action.source, action.keep):
        return "it is the same file as the kept one", None
    try:
        digest = content_hash(action.source)
    except OSError as error:
        return _describe(error), None
    if action.content_hash and digest != action.content_hash:
        return changed, None
    return None, (st.st_size, st.st_mtime_ns, digest)


def _kept_problem(action: Action, kept_hashes: dict[Path, str]) -> str | None:
    """Why ``action``'s kept file no longer stands for its group, or None.

    Replaced or emptied since it was grouped, the kept file is no copy of the others, which
    are then the only copies left; ``kept_hashes`` saves hashing it once per copy.
    """
    keep = action.keep
    try:
        st = os.stat(keep)
    except FileNotFoundError:
        return f"its kept file {os.fsdecode(keep)} is missing"
    except OSError as error:
        return f"its kept file cannot be read: {_describe(error)}"
    changed = f"its kept file {os.fsdecode(keep)} changed since it was grouped; group again"
    if action.keep_bytes is not None and st.st_size != action.keep_bytes:
        return changed
    if action.keep_mtime_ns and st.st_mtime_ns != action.keep_mtime_ns:
        return changed
    if action.keep_hash:
        digest = kept_hashes.get(keep)
        if digest is None:
            try:
                digest = kept_hashes[keep] = content_hash(keep)
            except OSError as error:
                return f"its kept file cannot be read: {_describe(error)}"
        if digest != action.keep_hash:
            return changed
    return None


def _identity_problem(action: Action) -> str | None:
    """Why the file at ``action.target`` is not the one the action moved there, or None."""
    assert action.target is not None
    target = action.target
    file = target
    if os.path.islink(target):
        # A link was moved as a link: check what it will point to once back in place.
        file = Path(os.path.join(os.path.dirname(action.source), os.readlink(target)))
    try:
        st = os.stat(file)
        digest = content_hash(file)
    except OSError as error:
        return f"cannot check {os.fsdecode(target)}: {_describe(error)}"
    recorded = (action.bytes, action.mtime_ns, action.content_hash)
    if (st.st_size, st.st_mtime_ns, digest) != recorded:
        return (
            f"{os.fsdecode(target)} is not the file that was moved there (its size, mtime or "
            "content differ)"
        )
    return None


def _restore(action: Action, moved: bool) -> tuple[str, str]:
    """Move ``action``'s file back: ("restored" | "not-moved" | "skipped" | "rejected",
    reason)."""
    source, target = action.source, action.target
    at_source = os.path.lexists(source)
    at_target = target is not None and os.path.lexists(target)
    if target is not None and at_target and not at_source:
        problem = _identity_problem(action)
        if problem is not None:
            return "rejected", problem
        try:
            _move_exclusive(target, source)
        except OSError as error:
            return "skipped", f"cannot move it back: {_describe(error)}"
        return "restored", ""
    if target is not None and at_target and at_source:
        if _second_name(target, source):
            # A crash between linking the target and unlinking the source.
            os.unlink(target)
            return "not-moved", ""
        return "skipped", (
            f"a file now exists at the original place; {os.fsdecode(target)} is left as it is"
        )
    if at_source and not moved:
        return "not-moved", ""
    where = "" if target is None else f" at {os.fsdecode(target)}"
    return "skipped", f"the moved file is no longer{where}"


def _move_exclusive(source: Path, target: Path) -> None:
    """Move a file to ``target``; FileExistsError rather than ever replacing a file there.

    Not shutil.move: its os.rename silently replaces an existing target on POSIX. A hard
    link fails if the target exists, so link-then-unlink is an atomic no-overwrite move on
    one filesystem; across filesystems, or where hard links are not supported, the bytes go
    into a file created with O_EXCL. Either way mtime (and mode) are kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    else:
        try:
            os.link(source, target)
        except FileExistsError:
            raise
        except OSError:
            _copy_exclusive(source, target)
    try:
        os.unlink(source)
    except BaseException:
        os.unlink(target)
        raise


def _copy_exclusive(source: Path, target: Path) -> None:
    created = False
    try:
        with open(source, "rb") as reader, open(target, "xb") as writer:
            created = True
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            writer.flush()
            os.fsync(writer.fileno())
        shutil.copystat(source, target)
    except BaseException:
        if created:  # never a file that was there before
            os.unlink(target)
        raise


def _free_name(target: Path, claimed: set[Path]) -> Path:
    """``target``, or ``stem~N.ext`` with the smallest N that no file (or plan) takes."""
    candidate = target
    number = 0
    while candidate in claimed or os.path.lexists(candidate):
        number += 1
        candidate = target.with_name(f"{target.stem}~{number}{target.suffix}")
    return candidate


def _common_folder(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding all ``paths``; None when they share none (two drives)."""
    if not paths:
        return None
    try:
        return Path(os.path.commonpath([os.fspath(path.parent) for path in paths]))
    except ValueError:
        return None


def _rerooted(path: Path) -> Path:
    """``path`` as a relative path: /a/b.jpg -> a/b.jpg, C:\\a\\b.jpg -> C/a/b.jpg."""
    drive = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.drive).strip("_")
    parts = path.parts[1:]
    return Path(drive, *parts) if drive else Path(*parts)


def _real_file(path: Path) -> Path:
    """``path`` with symlinked folders resolved but the file's own symlink kept."""
    return Path(os.path.realpath(path.parent)) / path.name


def _is_clean_absolute(path: Path) -> bool:
    """Absolute, without "." or ".." parts or doubled separators."""
    return path.is_absolute() and os.path.normpath(path) == os.fspath(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _second_name(extra: Path, original: Path) -> bool:
    """Whether ``extra`` is another directory entry for ``original``'s file (a hard link,
    or a symlink with the same destination), so that removing ``extra`` loses nothing."""
    if _real_file(extra) == _real_file(original):
        return False  # one entry reached by two paths: removing it would remove the file
    try:
        a, b = os.lstat(extra), os.lstat(original)
        if os.path.islink(extra) and os.path.islink(original):
            return os.readlink(extra) == os.readlink(original)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink > 1


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while empty, up to and including ``stop``."""
    while is_under(folder, stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _describe(error: OSError) -> str:
    text = error.strerror or str(error)
    return f"{text}: {os.fsdecode(error.filename)}" if error.filename else text


def _existing_journal(journal: Path) -> Path:
    journal = Path(os.path.abspath(journal))
    if not journal.is_file():
        raise GhostmatchError(
            f"journal {os.fsdecode(journal)} does not exist; pass the journal that the "
            "applied run wrote"
        )
    return journal


def _read_journal(journal: Path) -> tuple[list[_Entry], dict[str, Path | None]]:
    """The actions in ``journal`` in the order they were planned, each with its last event,
    and each run's folder it moved files into (None: it moved none).

    A last line cut short by a crash is ignored; any other unreadable line is an error.
    """
    entries: dict[str, _Entry] = {}
    runs: dict[str, Path | None] = {}
    with open(journal, encoding="utf-8", errors="surrogateescape") as reader:
        lines = reader.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            event = str(record["event"])
            if event == "run":
                folder = record.get("moved_into")
                runs[str(record["run"])] = None if folder is None else Path(str(folder))
                continue
            entry_id = str(record["id"])
            entry = entries.get(entry_id)
            if entry is None:
                run = record.get("run")
                action = Action.from_dict(record)
                entries[entry_id] = _Entry(
                    entry_id, action, event, None if run is None else str(run)
                )
            else:
                entry.status = event
                if event == "done" and "mtime_ns" in record:
                    mtime_ns = int(record["mtime_ns"])
                    entry.action = replace(entry.action, mtime_ns=mtime_ns)
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines):
                break
            raise GhostmatchError(
                f"{os.fsdecode(journal)} line {number} is not a ghostmatch journal record "
                f"({error}); pass the journal that the applied run wrote"
            ) from error
    return list(entries.values()), runs


@contextmanager
def _journal_appender(journal: Path, enabled: bool = True) -> Iterator[Callable[[Record], None]]:
    """Append records to ``journal``, each fsynced before the call returns."""
    if not enabled:
        yield lambda record: None
        return
    created = not journal.exists()
    with open(journal, "a", encoding="utf-8") as writer:
        if created:
            _fsync_folder(journal.parent)

        def append(record: Record) -> None:
            record["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            # ensure_ascii keeps non-UTF-8 names (lone surrogates) as escapes that round-trip.
            writer.write(json.dumps(record, ensure_ascii=True) + "\n")
            writer.flush()
            os.fsync(writer.fileno())

        yield append


def _fsync_folder(folder: Path) -> None:
    """Make a new file's directory entry durable; not possible (or needed) on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
