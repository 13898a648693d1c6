"""Moving and trashing duplicates: only members are touched, nothing is ever overwritten,
and the journal lets undo put every file back byte for byte, even after a crash."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path
from uuid import uuid4

import pytest
from PIL import Image
from skimage import data

from ghostmatch.dupes import actions
from ghostmatch.dupes.actions import (
    KEPT_ELSEWHERE,
    PROTECTED,
    Action,
    apply_actions,
    plan_actions,
    trash_folder,
    undo,
)
from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.scan import content_hash


@pytest.fixture(scope="module")
def encoded() -> dict[str, bytes]:
    """Small real photos as JPEG bytes; 'astronaut-small' is a re-encoded near copy."""
    out = {}
    for name, quality in (("astronaut", 90), ("coffee", 90)):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image.thumbnail((128, 128))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        out[name] = buffer.getvalue()
        if name == "astronaut":
            buffer = io.BytesIO()
            image.resize((96, 96)).save(buffer, "JPEG", quality=70)
            out["astronaut-small"] = buffer.getvalue()
    return out


@pytest.fixture
def library(tmp_path: Path, encoded: dict[str, bytes]) -> Path:
    """photos/2019 holds the originals; copies sit in photos/2020 and photos/backup."""
    photos = tmp_path / "photos"
    files = {
        "2019/astronaut.jpg": encoded["astronaut"],
        "2020/astronaut copy.jpg": encoded["astronaut"],
        "2020/astronaut-small.jpg": encoded["astronaut-small"],
        "2019/coffee.jpg": encoded["coffee"],
        "backup/coffee.jpg": encoded["coffee"],
    }
    for name, content in files.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(content)
    # Distinct, old mtimes, so a move that loses mtime shows.
    for number, name in enumerate(sorted(files)):
        os.utime(photos / name, ns=(1_500_000_000_000_000_000 + number, 1_500_000_000 * 10**9))
    (tmp_path / "state").mkdir()
    return photos


def member(path: Path, score: float = 1.0, tier: str = "exact") -> DuplicateMember:
    """``path`` as the catalog describes it, content hash included."""
    st = path.stat()
    with Image.open(path) as image:
        width, height = image.size
    digest = content_hash(path)
    return DuplicateMember(path, score, tier, width, height, st.st_size, st.st_mtime_ns, digest)


def groups_of(photos: Path) -> list[DuplicateGroup]:
    return [
        DuplicateGroup(
            member(photos / "2019/astronaut.jpg"),
            [
                member(photos / "2020/astronaut copy.jpg", 1.0, "exact"),
                member(photos / "2020/astronaut-small.jpg", 0.97, "near"),
            ],
        ),
        DuplicateGroup(member(photos / "2019/coffee.jpg"), [member(photos / "backup/coffee.jpg")]),
    ]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: content and mtime."""
    return {
        os.fsdecode(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def records(journal: Path) -> list[dict]:
    return [json.loads(line) for line in journal.read_text().splitlines()]


def test_dry_run_changes_nothing(library: Path) -> None:
    before = snapshot(library.parent)
    journal = library.parent / "state" / "journal.jsonl"
    for op, move_to in (("move", library.parent / "dupes"), ("delete", None)):
        planned, skipped = plan_actions(groups_of(library), op, move_to=move_to)
        report = apply_actions(planned, journal)
        assert report.dry_run and not report.failed and not skipped
        assert [a.source.name for a in report.done] == [
            "astronaut copy.jpg",
            "astronaut-small.jpg",
            "coffee.jpg",
        ]
        assert report.bytes == sum(a.bytes for a in planned)
    assert report.done[0].target == trash_folder(journal) / actions._rerooted(report.done[0].source)
    assert snapshot(library.parent) == before
    assert not journal.exists() and not (library.parent / "dupes").exists()


def test_move_touches_only_members_and_keeps_the_layout(library: Path) -> None:
    before = snapshot(library)
    dupes = library.parent / "dupes"
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=dupes)
    report = apply_actions(planned, journal, dry_run=False)

    assert not report.failed and len(report.done) == 3
    assert set(snapshot(library)) == {"2019/astronaut.jpg", "2019/coffee.jpg"}
    # Below the members' common root (photos/), the folders are kept.
    moved = snapshot(dupes)
    assert set(moved) == {
        "2020/astronaut copy.jpg",
        "2020/astronaut-small.jpg",
        "backup/coffee.jpg",
    }
    for name, content in moved.items():
        assert content == before[name]
    header, *rest = records(journal)
    # The run's record names the folder it moved into, the only place undo takes files from.
    assert header["event"] == "run" and header["moved_into"] == str(dupes)
    events = [(r["event"], r["id"]) for r in rest]
    ids = [i for e, i in events if e == "planned"]
    assert len(ids) == 3 and [i for e, i in events if e == "done"] == ids
    assert all(Path(r["target"]).is_relative_to(dupes) for r in records(journal) if "target" in r)


def test_undo_restores_every_file_byte_identical(library: Path) -> None:
    before = snapshot(library.parent)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=library.parent / "dupes")
    apply_actions(planned, journal, dry_run=False)

    report = undo(journal, [library])
    assert sorted(report.restored) == sorted(a.source for a in planned)
    assert not report.skipped and report.not_moved == 0
    after = {k: v for k, v in snapshot(library.parent).items() if not k.startswith("state/")}
    assert after == before


def test_undo_twice_is_harmless(library: Path) -> None:
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "delete")
    apply_actions(planned, journal, dry_run=False)
    undo(journal, [library])
    lines = journal.read_text()

    again = undo(journal, [library])
    assert again.restored == [] and again.skipped == [] and again.already_undone == 3
    assert journal.read_text() == lines
    assert snapshot(library) == before


def test_delete_moves_into_the_trash_and_undo_brings_it_back(library: Path) -> None:
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "delete")
    assert all(a.target is None for a in planned)
    report = apply_actions(planned, journal, dry_run=False)

    trash = library.parent / "state" / "journal.jsonl.trash"
    for action in report.done:
        assert not action.source.exists()
        assert action.target == trash / str(action.source).lstrip("/")
        assert (
            action.target.read_bytes() == before[os.fsdecode(action.source.relative_to(library))][0]
        )
    undo(journal, [library])
    assert snapshot(library) == before
    assert not trash.exists()  # emptied folders of the trash are removed


def test_protected_folders_are_left_untouched_and_reported(library: Path) -> None:
    backup = library / "backup"
    before = snapshot(backup)
    planned, skipped = plan_actions(
        groups_of(library), "move", move_to=library.parent / "dupes", protect=[backup]
    )
    assert skipped == [(backup / "coffee.jpg", PROTECTED)]
    assert all(not a.source.is_relative_to(backup) for a in planned)
    apply_actions(planned, library.parent / "state" / "journal.jsonl", dry_run=False)
    assert snapshot(backup) == before


def test_mistakes_a_user_can_make_are_ghostmatch_errors(library: Path, tmp_path: Path) -> None:
    groups = groups_of(library)
    a_file = library / "2019" / "coffee.jpg"
    cases = [
        dict(op="move", move_to=library / "backup" / "dupes", protect=[library / "backup"]),
        dict(op="move", move_to=a_file),
        dict(op="move", move_to=None),
        dict(op="delete", move_to=tmp_path / "dupes"),
        dict(op="shred"),
        dict(op="delete", protect=[tmp_path / "no-such-folder"]),
    ]
    for case in cases:
        with pytest.raises(GhostmatchError):
            plan_actions(groups, **case)  # type: ignore[arg-type]
    with pytest.raises(GhostmatchError, match="does not exist"):
        undo(tmp_path / "state" / "missing.jsonl", [tmp_path])
    with pytest.raises(GhostmatchError, match="does not exist"):
        apply_actions([], tmp_path / "nowhere" / "journal.jsonl")
    with pytest.raises(GhostmatchError, match="not a ghostmatch journal"):
        (tmp_path / "state" / "bad.jsonl").write_text("garbage\n{}\n")
        undo(tmp_path / "state" / "bad.jsonl", [tmp_path])


def test_collisions_get_a_numbered_name_and_nothing_is_overwritten(library: Path) -> None:
    dupes = library.parent / "dupes"
    (dupes / "2020").mkdir(parents=True)
    (dupes / "2020" / "astronaut copy.jpg").write_bytes(b"already here")
    planned, _ = plan_actions(groups_of(library), "move", move_to=dupes)
    assert planned[0].target == dupes / "2020" / "astronaut copy~1.jpg"
    # A file that appears after planning is not overwritten either.
    (dupes / "backup").mkdir()
    (dupes / "backup" / "coffee.jpg").write_bytes(b"arrived late")
    journal = library.parent / "state" / "journal.jsonl"
    report = apply_actions(planned, journal, dry_run=False)

    assert (dupes / "2020" / "astronaut copy.jpg").read_bytes() == b"already here"
    assert (dupes / "backup" / "coffee.jpg").read_bytes() == b"arrived late"
    assert {a.target for a in report.done} >= {dupes / "backup" / "coffee~1.jpg"}

    # Undo does not overwrite a file that now sits at the original place ...
    blocker = library / "2020" / "astronaut copy.jpg"
    blocker.write_bytes(b"new file")
    first = undo(journal, [library])
    assert [p for p, _ in first.skipped] == [blocker] and len(first.restored) == 2
    assert blocker.read_bytes() == b"new file"
    # ... and once it is out of the way, running undo again finishes the job.
    blocker.unlink()
    second = undo(journal, [library])
    assert second.restored == [blocker] and second.already_undone == 2
    assert blocker.read_bytes() != b"new file"


def test_a_crash_before_the_move_undoes_cleanly(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=library.parent / "dupes")
    real_move = actions._move_exclusive
    calls = []

    def crash_on_second(source: Path, target: Path) -> None:
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies with the action journaled as planned
        real_move(source, target)

    monkeypatch.setattr(actions, "_move_exclusive", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        apply_actions(planned, journal, dry_run=False)
    monkeypatch.undo()
    assert [r["event"] for r in records(journal)] == ["run", "planned", "done", "planned"]

    report = undo(journal, [library])
    assert len(report.restored) == 1 and report.not_moved == 1 and not report.skipped
    assert snapshot(library) == before
    assert undo(journal, [library]).already_undone == 2


def test_a_crash_after_the_move_undoes_cleanly(library: Path) -> None:
    """The file moved but "done" never reached the journal; one was even linked twice."""
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "delete")
    report = apply_actions(planned, journal, dry_run=False)
    kept = [line for line in journal.read_text().splitlines() if '"done"' not in line]
    journal.write_text("\n".join(kept) + '\n{"event": "do')  # the last write was cut short
    # Power lost between hard-linking the target and unlinking the source.
    first = report.done[0]
    assert first.target is not None
    os.link(first.target, first.source)

    result = undo(journal, [library])
    assert len(result.restored) == 2 and result.not_moved == 1 and not result.skipped
    assert snapshot(library) == before
    assert not trash_folder(journal).exists()


def test_changed_or_orphaned_files_are_left_alone(library: Path) -> None:
    groups = groups_of(library)
    changed = library / "2020" / "astronaut-small.jpg"
    with open(changed, "ab") as fp:
        fp.write(b"edited")
    (library / "2019" / "coffee.jpg").unlink()
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups, "delete")
    report = apply_actions(planned, journal, dry_run=False)

    failed = {a.source.name: reason for a, reason in report.failed}
    assert "changed since it was grouped" in failed["astronaut-small.jpg"]
    assert "kept file" in failed["coffee.jpg"]
    assert [a.source.name for a in report.done] == ["astronaut copy.jpg"]
    after = snapshot(library)
    assert after == {k: v for k, v in before.items() if k != "2020/astronaut copy.jpg"}
    assert undo(journal, [library]).restored == [library / "2020" / "astronaut copy.jpg"]


def test_a_kept_file_is_never_acted_on(library: Path) -> None:
    keep = member(library / "2019" / "astronaut.jpg")
    copy = member(library / "2020" / "astronaut copy.jpg")
    groups = [DuplicateGroup(keep, [copy, keep]), DuplicateGroup(copy, [copy])]
    planned, skipped = plan_actions(groups, "delete")
    assert planned == []
    assert skipped == [(p, KEPT_ELSEWHERE) for p in (copy.path, keep.path, copy.path)]
    # A hard link to the kept file is the same file: removing it would reclaim nothing.
    link = library / "2020" / "link.jpg"
    os.link(keep.path, link)
    report = apply_actions(
        plan_actions([DuplicateGroup(keep, [member(link)])], "delete")[0],
        library.parent / "state" / "journal.jsonl",
        dry_run=False,
    )
    assert "same file" in report.failed[0][1] and link.exists()


def test_moves_across_filesystems_keep_bytes_and_mtime(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_cross_device_links(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_cross_device_links)
    before = snapshot(library)
    dupes = library.parent / "dupes"
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=dupes)
    report = apply_actions(planned, journal, dry_run=False)
    assert len(report.done) == 3
    for action in report.done:
        assert action.target is not None
        name = os.fsdecode(action.source.relative_to(library))
        assert (action.target.read_bytes(), action.target.stat().st_mtime_ns) == before[name]
    undo(journal, [library])
    assert snapshot(library) == before


def test_undo_after_a_move_onto_coarser_timestamps(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drive that keeps mtimes to 2 s (FAT) rounds them; undo still knows the file."""
    real_copystat = shutil.copystat

    def no_cross_device_links(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def fat_copystat(source: Path, target: Path) -> None:
        real_copystat(source, target)
        mtime_ns = target.stat().st_mtime_ns // (2 * 10**9) * (2 * 10**9)
        os.utime(target, ns=(mtime_ns, mtime_ns))

    for file in library.rglob("*.jpg"):
        os.utime(file, ns=(0, file.stat().st_mtime_ns + 123_456_789))
    monkeypatch.setattr(os, "link", no_cross_device_links)
    monkeypatch.setattr(shutil, "copystat", fat_copystat)
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=library.parent / "dupes")
    report = apply_actions(planned, journal, dry_run=False)
    assert all(a.target and a.target.stat().st_mtime_ns != a.mtime_ns for a in report.done)

    result = undo(journal, [library])
    assert sorted(result.restored) == sorted(a.source for a in planned) and not result.rejected


def test_non_utf8_names_round_trip_through_the_journal(library: Path, encoded: dict) -> None:
    keep = library / "2019" / "astronaut.jpg"
    odd = library / os.fsdecode(b"caf\xe9 <copy>.jpg")
    try:
        odd.write_bytes(encoded["astronaut"])
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem cannot store non-UTF-8 names")
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions([DuplicateGroup(member(keep), [member(odd)])], "delete")
    assert json.loads(planned[0].to_json())["source"] == os.fsdecode(odd)
    apply_actions(planned, journal, dry_run=False)
    journal.read_text(encoding="ascii")  # surrogates are stored as escapes
    assert not odd.exists()
    assert undo(journal, [library]).restored == [odd]
    assert odd.read_bytes() == encoded["astronaut"]


def test_action_json_round_trips(library: Path) -> None:
    planned, _ = plan_actions(groups_of(library), "move", move_to=library.parent / "dupes")
    for action in planned:
        assert Action.from_dict(json.loads(action.to_json())) == action


def test_move_targets_keep_folders_below_the_common_root(library: Path) -> None:
    dupes = library.parent / "dupes"
    planned, _ = plan_actions([groups_of(library)[1]], "move", move_to=dupes)
    assert [a.target for a in planned] == [dupes / "coffee.jpg"]  # one folder: the name only
    assert actions._rerooted(Path("/a/b.jpg")) == Path("a/b.jpg")


def test_a_symlink_is_moved_as_a_link_and_its_file_stays(library: Path) -> None:
    link = library / "2020" / "coffee link.jpg"
    link.symlink_to(Path("..") / "backup" / "coffee.jpg")
    backup = snapshot(library / "backup")
    journal = library.parent / "state" / "journal.jsonl"
    group = DuplicateGroup(member(library / "2019" / "coffee.jpg"), [member(link)])
    report = apply_actions(plan_actions([group], "delete")[0], journal, dry_run=False)

    target = report.done[0].target
    assert target is not None and target.is_symlink() and not os.path.lexists(link)
    assert snapshot(library / "backup") == backup
    assert undo(journal, [library]).restored == [link]
    assert os.readlink(link) == os.path.join("..", "backup", "coffee.jpg")


def test_a_replaced_or_emptied_kept_file_leaves_its_copies_alone(library: Path) -> None:
    """The copies would be the only ones left: the group is skipped and reported."""
    groups = groups_of(library)
    astronaut, coffee = library / "2019" / "astronaut.jpg", library / "2019" / "coffee.jpg"
    # Another photo of exactly the same size and mtime: only the content hash tells.
    st = astronaut.stat()
    replacement = bytearray(astronaut.read_bytes())
    replacement[-3] ^= 0xFF
    astronaut.write_bytes(bytes(replacement))
    os.utime(astronaut, ns=(st.st_atime_ns, st.st_mtime_ns))
    coffee.write_bytes(b"")
    before = snapshot(library)
    journal = library.parent / "state" / "journal.jsonl"
    planned, skipped = plan_actions(groups, "delete")
    assert len(planned) == 3 and not skipped

    for dry_run in (True, False):
        report = apply_actions(planned, journal, dry_run=dry_run)
        assert report.done == []
        failed = {a.source: reason for a, reason in report.failed}
        assert set(failed) == {a.source for a in planned}
        assert all("kept file" in reason and "changed" in reason for reason in failed.values())
    assert snapshot(library) == before


def test_a_changed_copy_of_the_same_size_and_mtime_is_left_alone(library: Path) -> None:
    copy = library / "backup" / "coffee.jpg"
    groups = groups_of(library)
    st = copy.stat()
    content = bytearray(copy.read_bytes())
    content[-3] ^= 0xFF
    copy.write_bytes(bytes(content))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    planned, _ = plan_actions(groups, "delete")
    report = apply_actions(planned, library.parent / "state" / "journal.jsonl", dry_run=False)
    assert [(a.source, r) for a, r in report.failed] == [
        (copy, "the file changed since it was grouped; group again")
    ]
    assert copy.read_bytes() == bytes(content) and len(report.done) == 2


def forged(op: str, source: Path, target: Path, keep: Path, **fields: object) -> str:
    """A journal line as someone other than ghostmatch might write it."""
    action = Action(op, source, target, keep, 1.0, "exact", **fields)  # type: ignore[arg-type]
    return json.dumps({"event": "done", "id": uuid4().hex, **action.to_dict()}) + "\n"


def test_undo_rejects_forged_entries_and_restores_the_rest(library: Path) -> None:
    """A journal is data: no file is created or moved outside what the run itself did."""
    victim = library.parent / "victim"
    victim.mkdir()
    important = victim / "important.txt"
    important.write_bytes(b"keep me here")
    payload = library.parent / "payload"
    payload.write_bytes(b"* * * * * evil")
    keep = library / "2019" / "coffee.jpg"
    journal = library.parent / "state" / "journal.jsonl"
    dupes = library.parent / "dupes"
    planned, _ = plan_actions(groups_of(library), "move", move_to=dupes)
    honest = apply_actions(planned, journal, dry_run=False)
    trash = trash_folder(journal)
    trash.mkdir()
    (trash / "planted.jpg").write_bytes(b"planted")
    planted_fields = dict(bytes=7, content_hash=content_hash(trash / "planted.jpg"))
    moved = honest.done[0]
    assert moved.target is not None
    identity = dict(bytes=moved.bytes, mtime_ns=moved.mtime_ns, content_hash=moved.content_hash)
    lines = [
        # Put a payload into a folder outside the index, creating its parents.
        forged("move", victim / "newdir" / "sub" / "cron_evil", payload, keep),
        forged("delete", victim / "newdir" / "sub" / "cron_evil", payload, keep),
        # Take a file that ghostmatch never moved and "restore" it elsewhere.
        forged("move", library / "2020" / "stolen.txt", important, keep),
        forged("delete", library / "2020" / "stolen.txt", important, keep),
        # From the trash, but onto a kept file's place, or outside the index.
        forged("delete", keep, trash / "planted.jpg", keep, **planted_fields),
        forged("delete", victim / "planted.jpg", trash / "planted.jpg", keep, **planted_fields),
        forged("delete", library / "../victim/x.jpg", trash / "planted.jpg", keep),
        # The moved file itself, claimed for another place in the index.
        forged("move", library / "2019" / "other.jpg", moved.target, keep, **identity),
    ]
    with open(journal, "a") as fp:
        fp.writelines(lines)
    before = snapshot(library.parent)

    report = undo(journal, [library])
    assert len(report.rejected) == len(lines)
    assert all(reason for _, reason in report.rejected)
    assert sorted(report.restored) == sorted(a.source for a in planned)
    assert not (victim / "newdir").exists() and important.read_bytes() == b"keep me here"
    assert payload.exists() and (trash / "planted.jpg").exists()
    assert not (library / "2019" / "other.jpg").exists()
    assert not (library / "2020" / "stolen.txt").exists()
    untouched = ("victim/", "payload", "state/journal.jsonl.trash/")
    after = snapshot(library.parent)
    assert {k: v for k, v in after.items() if k.startswith(untouched)} == {
        k: v for k, v in before.items() if k.startswith(untouched)
    }


def test_undo_leaves_a_file_that_is_not_the_one_moved(library: Path) -> None:
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "delete")
    report = apply_actions(planned, journal, dry_run=False)
    swapped = report.done[0]
    assert swapped.target is not None
    st = swapped.target.stat()
    content = bytearray(swapped.target.read_bytes())
    content[-3] ^= 0xFF
    swapped.target.write_bytes(bytes(content))
    os.utime(swapped.target, ns=(st.st_atime_ns, st.st_mtime_ns))

    result = undo(journal, [library])
    assert len(result.restored) == 2
    assert [(p, "not the file" in r) for p, r in result.rejected] == [(swapped.source, True)]
    assert not swapped.source.exists() and swapped.target.read_bytes() == bytes(content)


def test_undo_rejects_a_journal_without_content_hashes(library: Path) -> None:
    """Without a recorded hash there is nothing to check a file against; say so."""
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "delete")
    apply_actions(planned, journal, dry_run=False)
    old = [json.loads(line) for line in journal.read_text().splitlines()]
    lines = [
        json.dumps({k: v for k, v in record.items() if k not in ("run", "content_hash")})
        for record in old
        if record["event"] != "run"
    ]
    journal.write_text("\n".join(lines) + "\n")

    report = undo(journal, [library])
    assert report.restored == [] and len(report.rejected) == 3
    assert all("no content hash" in reason for _, reason in report.rejected)


def test_undo_only_restores_into_the_indexed_folders(library: Path, tmp_path: Path) -> None:
    journal = library.parent / "state" / "journal.jsonl"
    planned, _ = plan_actions(groups_of(library), "move", move_to=library.parent / "dupes")
    apply_actions(planned, journal, dry_run=False)
    report = undo(journal, [library / "2019"])
    assert report.restored == [] and len(report.rejected) == 3
    assert all("outside the indexed folders" in reason for _, reason in report.rejected)
    assert len(undo(journal, [library]).restored) == 3


def test_a_later_run_in_the_same_journal_may_move_an_earlier_runs_kept_file(
    library: Path,
) -> None:
    keep, copy = library / "2019" / "coffee.jpg", library / "backup" / "coffee.jpg"
    journal = library.parent / "state" / "journal.jsonl"
    for kept, moved in ((keep, copy), (copy, keep)):
        group = DuplicateGroup(member(kept), [member(moved)])
        apply_actions(plan_actions([group], "delete")[0], journal, dry_run=False)
        report = undo(journal, [library])
        assert report.restored == [moved] and not report.rejected
