"""``ghostmatch dupes`` actions and ``ghostmatch undo`` run as a subprocess on real photos:
which file each ``--keep`` rule keeps, dry runs, ``--move-to``, ``--delete``, ``--protect``,
``--journal``, ``--not-dup``, ``undo``, and exit code 1 when some actions fail.

The gallery holds exact copies (same bytes) and two PNGs of the same pixels (same
descriptor, different bytes), so with ``--threshold 0.9999 --no-verify`` the groups do not
depend on the (random) model."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_support import CLI, cli_env
from PIL import Image
from skimage import data

pytestmark = pytest.mark.filterwarnings("ignore:using RANDOM weights")

GROUPING = ["--threshold", "0.9999", "--no-verify"]
SECOND = 10**9
T0, T1, T2 = (1_600_000_000 * SECOND + n * 3600 * SECOND for n in range(3))


def _jpeg(name: str) -> bytes:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((96, 96))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png(name: str, compress_level: int) -> bytes:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((96, 96))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


def gallery_files() -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, mtime_ns).

    Four byte-identical astronauts: ``old/`` the oldest, ``new/`` and ``new2/`` tied as the
    newest, ``a.jpg`` between. Two coffees with the same pixels and mtime: ``x/c.png`` the
    larger file. A rocket that duplicates nothing.
    """
    astronaut = _jpeg("astronaut")
    return {
        "a.jpg": (astronaut, T1),
        "old/a.jpg": (astronaut, T0),
        "new/a.jpg": (astronaut, T2),
        "new2/a.jpg": (astronaut, T2),
        "c.png": (_png("coffee", 9), T0),
        "x/c.png": (_png("coffee", 0), T0),
        "r.jpg": (_jpeg("rocket"), T0),
    }


def write_gallery(folder: Path, files: dict[str, tuple[bytes, int]]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for name, (content, mtime_ns) in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, ns=(mtime_ns, mtime_ns))


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: content and mtime."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass(frozen=True)
class Gallery:
    """The gallery as indexed: every test starts from these very files."""

    photos: Path
    index: Path
    files: dict[str, tuple[bytes, int]]
    model_cache: Path

    def run(
        self, *args: object, cwd: Path | None = None, index: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [*CLI, *map(os.fspath, args), "--index", os.fspath(index or self.index)]  # type: ignore[arg-type]
        return subprocess.run(
            command,
            env=cli_env(self.model_cache),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def dupes(self, *args: object, **options: Path) -> subprocess.CompletedProcess[str]:
        return self.run("dupes", *GROUPING, *args, **options)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def failed(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The stderr lines of a run that exits 1 without a traceback, less the random
    weights' warning (a run that looks for turned copies may load the model)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if "RANDOM weights" not in line]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Gallery:
    root = tmp_path_factory.mktemp("cli-actions")
    files = gallery_files()
    write_gallery(root / "photos", files)
    gallery = Gallery(root / "photos", root / "index", files, model_cache)
    ok(gallery.run("index", gallery.photos, "--weights", "random", "--quiet"))
    return gallery


@pytest.fixture
def gallery(indexed: Gallery) -> Gallery:
    """The indexed gallery with every file as it was indexed (a test may have moved some)."""
    write_gallery(indexed.photos, indexed.files)
    return indexed


def groups(gallery: Gallery, *args: object) -> dict[str, set[str]]:
    """kept file -> its copies, as relative paths."""
    answer = json.loads(ok(gallery.dupes("--json", *args)).stdout)

    def name(path: str) -> str:
        return Path(path).relative_to(gallery.photos).as_posix()

    return {name(g["keep"]): {name(m["path"]) for m in g["members"]} for g in answer["groups"]}


ASTRONAUTS = {"a.jpg", "old/a.jpg", "new/a.jpg", "new2/a.jpg"}
COFFEES = {"c.png", "x/c.png"}


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        # Same pixels, same size: the oldest; of the coffees, the larger file.
        ("pixels", {"old/a.jpg", "x/c.png"}),
        ("size", {"old/a.jpg", "x/c.png"}),
        # Same mtime for both coffees: the larger file, as for every rule.
        ("oldest", {"old/a.jpg", "x/c.png"}),
        # new/ and new2/ are both newest: the first path wins.
        ("newest", {"new/a.jpg", "x/c.png"}),
        ("path", {"a.jpg", "c.png"}),
    ],
)
def test_keep_rules_and_their_tie_breaks(gallery: Gallery, rule: str, kept: set[str]) -> None:
    found = groups(gallery, "--keep", rule)
    assert set(found) == kept
    for keep, copies in found.items():
        family = ASTRONAUTS if keep.endswith(".jpg") else COFFEES
        assert copies == family - {keep}


def test_a_dry_run_changes_nothing(gallery: Gallery, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    for action in (["--move-to", tmp_path / "dupes"], ["--delete"]):
        result = ok(gallery.dupes(*action, "--journal", journal))
        assert "would " in result.stdout and "4 files" in result.stdout
        assert "dry run, add --apply" in result.stdout
    assert snapshot(gallery.photos) == gallery.files
    assert not journal.exists() and not (tmp_path / "dupes").exists()


def test_apply_without_an_action_is_refused_and_changes_nothing(
    gallery: Gallery, tmp_path: Path
) -> None:
    for extra in (["--apply"], ["--journal", tmp_path / "j.jsonl"], ["--protect", tmp_path]):
        result = gallery.dupes(*extra)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert "--move-to DIR or --delete" in line
    assert snapshot(gallery.photos) == gallery.files


def test_move_to_moves_only_the_copies_and_undo_puts_them_back(
    gallery: Gallery, tmp_path: Path
) -> None:
    dupes, journal = tmp_path / "dupes", tmp_path / "journal.jsonl"
    result = ok(gallery.dupes("--move-to", dupes, "--apply", "--journal", journal))
    assert "moved 4 files" in result.stdout
    assert f"ghostmatch undo {journal}" in result.stdout
    # The kept files stay; the copies keep their folders below the copies' common root.
    kept = {"old/a.jpg", "x/c.png", "r.jpg"}
    assert snapshot(gallery.photos) == {k: gallery.files[k] for k in kept}
    assert snapshot(dupes) == {k: v for k, v in gallery.files.items() if k not in kept}
    assert journal.is_file()

    result = ok(gallery.run("undo", journal))
    assert "restored 4 files" in result.stdout
    assert snapshot(gallery.photos) == gallery.files
    assert snapshot(dupes) == {}
    again = ok(gallery.run("undo", journal))
    assert "restored 0 files" in again.stdout and "4 were restored by an earlier" in again.stdout


def test_delete_trashes_into_the_journals_trash_and_undo_restores(
    gallery: Gallery, tmp_path: Path
) -> None:
    journal = tmp_path / "state" / "journal.jsonl"
    journal.parent.mkdir()
    ok(gallery.dupes("--delete", "--apply", "--journal", journal))
    trash = tmp_path / "state" / "journal.jsonl.trash"
    for name in ("a.jpg", "new/a.jpg", "new2/a.jpg", "c.png"):
        assert not (gallery.photos / name).exists()
        trashed = trash / os.fspath(gallery.photos / name).lstrip(os.sep)
        assert (trashed.read_bytes(), trashed.stat().st_mtime_ns) == gallery.files[name]

    ok(gallery.run("undo", journal))
    assert snapshot(gallery.photos) == gallery.files
    assert not trash.exists()


def test_the_default_journal_is_written_in_the_working_folder(
    gallery: Gallery, tmp_path: Path
) -> None:
    result = ok(gallery.dupes("--delete", "--apply", cwd=tmp_path))
    (journal,) = tmp_path.glob("ghostmatch-journal-*.jsonl")
    assert f"journal: {journal.name}" in result.stdout
    ok(gallery.run("undo", journal.name, cwd=tmp_path))
    assert snapshot(gallery.photos) == gallery.files


def test_protected_folders_are_left_alone(gallery: Gallery, tmp_path: Path) -> None:
    protected = gallery.photos / "new"
    result = ok(
        gallery.dupes(
            "--delete", "--apply", "--protect", protected, "--journal", tmp_path / "j.jsonl"
        )
    )
    assert f"skip {protected / 'a.jpg'}: protected" in result.stderr
    assert "deleted 3 files" in result.stdout
    assert (protected / "a.jpg").read_bytes() == gallery.files["new/a.jpg"][0]
    assert set(snapshot(gallery.photos)) == {"old/a.jpg", "new/a.jpg", "x/c.png", "r.jpg"}


def test_a_copy_changed_since_indexing_is_left_and_the_exit_code_is_1(
    gallery: Gallery, tmp_path: Path
) -> None:
    changed = gallery.photos / "new" / "a.jpg"
    changed.write_bytes(gallery.files["r.jpg"][0])
    lines = failed(gallery.dupes("--delete", "--apply", "--journal", tmp_path / "j.jsonl"))
    assert f"cannot delete {changed}: the file changed since it was grouped; group again" in lines
    assert changed.read_bytes() == gallery.files["r.jpg"][0]
    assert set(snapshot(gallery.photos)) == {"old/a.jpg", "new/a.jpg", "x/c.png", "r.jpg"}


def test_copies_of_a_replaced_or_emptied_kept_file_are_left(
    gallery: Gallery, tmp_path: Path
) -> None:
    """Otherwise the copies, then the only ones left, would be thrown away."""
    replaced, emptied = gallery.photos / "old" / "a.jpg", gallery.photos / "x" / "c.png"
    replaced.write_bytes(gallery.files["r.jpg"][0])
    emptied.write_bytes(b"")
    before = snapshot(gallery.photos)
    for apply in ([], ["--apply"]):
        result = gallery.dupes("--delete", *apply, "--journal", tmp_path / "j.jsonl")
        lines = failed(result)
        assert len([line for line in lines if line.startswith("cannot delete")]) == 4
        assert all("changed since it was grouped" in line for line in lines)
    assert snapshot(gallery.photos) == before


def test_not_dup_keeps_two_files_out_of_one_group(gallery: Gallery, tmp_path: Path) -> None:
    index = tmp_path / "index"  # its own index: the shared one keeps no judgement
    ok(gallery.run("index", gallery.photos, "--weights", "random", "--quiet", index=index))
    assert set(groups(gallery)) == {"old/a.jpg", "x/c.png"}
    a, b = gallery.photos / "c.png", gallery.photos / "x" / "c.png"
    assert "recorded" in ok(gallery.run("dupes", "--not-dup", a, b, index=index)).stdout
    answer = json.loads(ok(gallery.dupes("--json", index=index)).stdout)
    assert [g["keep"] for g in answer["groups"]] == [str(gallery.photos / "old" / "a.jpg")]
    # The judgement is the index's: the shared index still groups them.
    assert set(groups(gallery)) == {"old/a.jpg", "x/c.png"}


def test_undo_rejects_a_forged_journal(gallery: Gallery, tmp_path: Path) -> None:
    """A journal is data: it cannot make undo create or move files outside what was moved."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_bytes(b"stays here")
    payload = tmp_path / "payload"
    payload.write_bytes(b"* * * * * root evil")
    keep = gallery.photos / "old" / "a.jpg"
    journal = tmp_path / "forged.jsonl"
    lines = [
        {"source": victim / "newdir" / "sub" / "cron_evil", "target": payload},
        {"source": gallery.photos / "moved.txt", "target": victim / "important.txt"},
    ]
    with open(journal, "w") as fp:
        for number, line in enumerate(lines):
            record = {"event": "done", "id": f"x-{number}", "op": "move", "keep": keep}
            fp.write(json.dumps({k: os.fspath(v) for k, v in {**record, **line}.items()}) + "\n")

    stderr = failed(gallery.run("undo", journal))
    assert [line.split(":")[0] for line in stderr] == [
        f"rejected {gallery.photos / 'moved.txt'}",
        f"rejected {victim / 'newdir' / 'sub' / 'cron_evil'}",
    ]
    assert [p.name for p in victim.rglob("*")] == ["important.txt"]
    assert (victim / "important.txt").read_bytes() == b"stays here"
    assert payload.read_bytes() == b"* * * * * root evil"
    assert snapshot(gallery.photos) == gallery.files


def test_undo_restores_only_into_the_folders_of_the_given_index(
    gallery: Gallery, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    ok(gallery.dupes("--delete", "--apply", "--journal", journal))
    elsewhere = tmp_path / "other"
    (elsewhere / "photos").mkdir(parents=True)
    shutil.copy2(gallery.photos / "r.jpg", elsewhere / "photos" / "r.jpg")
    other_index = tmp_path / "other-index"
    ok(
        gallery.run(
            "index", elsewhere / "photos", "--weights", "random", "--quiet", index=other_index
        )
    )

    lines = failed(gallery.run("undo", journal, index=other_index))
    assert len(lines) == 4 and all("outside the indexed folders" in line for line in lines)
    ok(gallery.run("undo", journal))
    assert snapshot(gallery.photos) == gallery.files
