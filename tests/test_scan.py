"""Contracts of ghostmatch.ingest.scan: which files a walk yields, in which order, and what it
reports instead of crashing."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ghostmatch.ingest.images import REASONS
from ghostmatch.ingest.scan import FileEntry, content_hash, is_under, scan
from ghostmatch.pathtext import path_text


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 40, 60)).save(buffer, fmt)
    return buffer.getvalue()


class Errors:
    """Collects ``on_error`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str, str]] = []

    def __call__(self, path: Path, reason: str, detail: str) -> None:
        self.calls.append((path, reason, detail))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A photo folder with every kind of entry a walk has to get right."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    files = {
        "a.jpg": _image_bytes("JPEG"),
        "B.PNG": _image_bytes("PNG"),
        "notes.txt": b"shopping list\n",
        "scan0001": _image_bytes("PNG"),  # no extension, found by content
        "README": b"just text\n",  # no extension, not an image
        "fake.jpg": b"text behind an image extension\n",  # trusted by name, never opened
        ".thumb.jpg": _image_bytes("JPEG"),
        ".hidden/inside.jpg": _image_bytes("JPEG"),
        "sub/c.gif": _image_bytes("GIF"),
        "sub/deeper/d.webp": _image_bytes("WEBP"),
        "sub/deeper/e.tiff": _image_bytes("TIFF"),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    (outside / "f.bmp").write_bytes(_image_bytes("BMP"))
    os.symlink(root, root / "sub" / "deeper" / "loop")  # back to the top
    os.symlink(".", root / "sub" / "self")
    os.symlink(outside, root / "linked")
    os.symlink("a.jpg", root / "alias.jpg")
    return root


def _relative(entries: list[FileEntry], root: Path) -> list[str]:
    return [entry.path.relative_to(root).as_posix() for entry in entries]


def test_walk_yields_each_image_once_in_sorted_order(tree: Path) -> None:
    # islice: a walk that loops through the symlinks fails here instead of hanging.
    entries = list(itertools.islice(scan([tree]), 100))
    assert _relative(entries, tree) == [
        "B.PNG",
        "a.jpg",
        "alias.jpg",
        "fake.jpg",
        "linked/f.bmp",
        "scan0001",
        "sub/c.gif",
        "sub/deeper/d.webp",
        "sub/deeper/e.tiff",
    ]


def test_entries_are_absolute_unresolved_and_stat_the_target(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree.parent)
    entries = {entry.path.name: entry for entry in scan([Path("photos")])}
    alias = entries["alias.jpg"]
    assert alias.path == tree / "alias.jpg"
    assert alias.path.is_absolute() and alias.path.is_symlink()
    target = os.stat(tree / "a.jpg")
    assert (alias.size, alias.mtime_ns) == (target.st_size, target.st_mtime_ns)
    assert entries["f.bmp"].path == tree / "linked" / "f.bmp"
    os.symlink(tree, tree.parent / "album")
    first = next(scan([Path("album")]))
    assert first.path == tree.parent / "album" / "B.PNG"


def test_root_given_twice_or_nested_is_walked_once(tree: Path) -> None:
    once = list(scan([tree]))
    assert list(scan([tree, tree / "sub", tree])) == once


def test_root_file_is_yielded_itself(tree: Path) -> None:
    entries = list(scan([tree / "notes.txt", tree / "a.jpg"]))
    assert [entry.path for entry in entries] == [tree / "notes.txt", tree / "a.jpg"]
    assert entries[1].size == (tree / "a.jpg").stat().st_size
    assert len(list(scan([tree / "a.jpg", tree / "a.jpg"]))) == 1


def test_broken_symlink_is_reported_and_walk_goes_on(tree: Path) -> None:
    os.symlink("gone.jpg", tree / "sub" / "broken.jpg")
    errors = Errors()
    entries = list(scan([tree], on_error=errors))
    assert errors.calls == [(tree / "sub" / "broken.jpg", "unreadable", "broken symbolic link")]
    assert "sub/deeper/e.tiff" in _relative(entries, tree)
    assert len(list(scan([tree]))) == len(entries)  # no on_error: skipped silently


def test_missing_root_is_reported(tmp_path: Path) -> None:
    errors = Errors()
    assert list(scan([tmp_path / "nowhere"], on_error=errors)) == []
    assert [(path, reason) for path, reason, _ in errors.calls] == [
        (tmp_path / "nowhere", "unreadable")
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_without_opening(tree: Path) -> None:
    os.mkfifo(tree / "pipe.jpg")
    os.mkfifo(tree / "pipe")
    names = _relative(list(scan([tree])), tree)
    assert "pipe.jpg" not in names and "pipe" not in names


def test_unreadable_directory_is_reported(tree: Path) -> None:
    locked = tree / "sub" / "deeper"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads")
        errors = Errors()
        names = _relative(list(scan([tree], on_error=errors)), tree)
        assert errors.calls[0][:2] == (locked, "unreadable")
        assert "sub/c.gif" in names and "sub/deeper/d.webp" not in names
    finally:
        locked.chmod(0o755)


def test_non_utf8_names_are_found_and_printable(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path) + b"/d\xe9j\xe0"
    try:
        os.mkdir(folder)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    with open(folder + b"/caf\xe9.jpg", "wb") as fp:
        fp.write(_image_bytes("JPEG"))
    [entry] = scan([tmp_path])
    assert os.fsencode(entry.path) == folder + b"/caf\xe9.jpg"
    shown = path_text(entry.path)
    # Each byte that is not UTF-8 shows as itself, escaped, not as an anonymous U+FFFD.
    assert shown.endswith("/d\\xe9j\\xe0/caf\\xe9.jpg")
    assert shown.encode("utf-8")
    with pytest.raises(UnicodeEncodeError):
        str(entry.path).encode("utf-8")


def test_path_text_keeps_valid_names() -> None:
    assert path_text(Path("/photos/été/Ünïcode 🐈.jpg")) == "/photos/été/Ünïcode 🐈.jpg"


def test_error_reasons_are_image_reasons(tree: Path) -> None:
    os.symlink("gone", tree / "dangling")
    errors = Errors()
    list(scan([tree, tree / "missing"], on_error=errors))
    assert len(errors.calls) == 2
    assert all(reason in REASONS for _, reason, _ in errors.calls)


def test_content_hash_is_blake2b_128_of_all_bytes(tmp_path: Path) -> None:
    content = np.random.default_rng(0).bytes(2_500_000)  # spans three 1 MiB chunks
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    digest = content_hash(path)
    assert digest == hashlib.blake2b(content, digest_size=16).hexdigest()
    assert digest == content_hash(path)
    assert len(digest) == 32
    changed = tmp_path / "changed.bin"
    changed.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    assert content_hash(changed) != digest


def test_entries_carry_the_ctime_that_a_chmod_changes(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(_image_bytes("JPEG"))
    [before] = scan([tmp_path])
    assert before.ctime_ns == os.stat(photo).st_ctime_ns
    photo.chmod(0o600)  # the kernel moves ctime, never size or mtime
    [after] = scan([tmp_path])
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.ctime_ns == os.stat(photo).st_ctime_ns


def test_is_under_compares_whole_path_parts() -> None:
    assert is_under(Path("/photos/2019/a.jpg"), Path("/photos"))
    assert is_under(Path("/photos"), Path("/photos"))
    assert not is_under(Path("/photos-old/a.jpg"), Path("/photos"))
    assert not is_under(Path("/photos"), Path("/photos/2019"))
