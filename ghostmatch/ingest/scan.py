"""Finding image files under folders: a sorted, symlink-loop-safe walk that reads only files
without an image extension, so rescanning an unchanged photo folder opens no file."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ghostmatch.ingest.images import SNIFF_BYTES, describe_os_error, sniff_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileEntry",
    "content_hash",
    "scan",
    "sniff_image",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".bmp",
        ".heic",
        ".heif",
        ".avif",
    }
)

_HASH_CHUNK = 1 << 20

ErrorHandler = Callable[[Path, str, str], None]
"""Called as ``on_error(path, reason, detail)``; ``reason`` is one of ``images.REASONS``."""


@dataclass(frozen=True)
class FileEntry:
    """A candidate image file: ``path`` is absolute but keeps the file's own symlink.

    ``size``, ``mtime_ns`` and ``ctime_ns`` are of the file a symlink points to, so
    incremental indexing notices when the target changes; ``ctime_ns`` also changes with
    the file's permissions, so a file that could not be read is tried again after a chmod.
    """

    path: Path
    size: int
    mtime_ns: int
    ctime_ns: int


def scan(roots: Sequence[Path], on_error: ErrorHandler | None = None) -> Iterator[FileEntry]:
    """Yield the image files under ``roots``, recursively, in sorted order.

    A root that is a file is yielded whatever its name. Below the roots, hidden entries
    (names starting with '.') are skipped, symlinked directories are followed, and a
    directory reached twice (symlink loop, nested roots) is walked once. Broken symlinks
    and unreadable directories go to ``on_error`` and the walk goes on.
    """
    report: ErrorHandler = on_error if on_error is not None else _ignore_error
    visited: set[tuple[int, int]] = set()
    root_files: set[str] = set()
    for root in roots:
        top = os.path.abspath(root)
        try:
            st = os.stat(top)
        except OSError as e:
            report(Path(top), "unreadable", describe_os_error(top, e))
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(top, (st.st_dev, st.st_ino), visited, report)
        elif not stat.S_ISREG(st.st_mode):
            report(Path(top), "unreadable", "not a regular file or directory")
        elif top not in root_files:
            root_files.add(top)
            yield FileEntry(Path(top), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _walk(
    top: str, key: tuple[int, int], visited: set[tuple[int, int]], report: ErrorHandler
) -> Iterator[FileEntry]:
    """Depth-first walk with a stack of sorted listings, so deep trees need no recursion."""
    if key in visited:
        return
    visited.add(key)
    stack = [iter(_sorted_listing(top, report))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
            target = entry.stat() if is_dir else None
        except OSError as e:
            report(Path(entry.path), "unreadable", describe_os_error(entry.path, e))
            continue
        if target is not None:
            dir_key = (target.st_dev, target.st_ino)
            if dir_key not in visited:
                visited.add(dir_key)
                stack.append(iter(_sorted_listing(entry.path, report)))
            continue
        found = _file_entry(entry, report)
        if found is not None:
            yield found


def _sorted_listing(directory: str, report: ErrorHandler) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as listing:
            return sorted(listing, key=lambda entry: entry.name)
    except OSError as e:
        report(Path(directory), "unreadable", describe_os_error(directory, e))
        return []


def _file_entry(entry: os.DirEntry[str], report: ErrorHandler) -> FileEntry | None:
    try:
        st = entry.stat()  # follows symlinks: fails for broken or looping ones
    except OSError as e:
        report(Path(entry.path), "unreadable", describe_os_error(entry.path, e))
        return None
    # FIFOs, sockets and devices are never opened: reading one could block forever.
    if not stat.S_ISREG(st.st_mode):
        return None
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        try:
            with open(entry.path, "rb") as fp:
                head = fp.read(SNIFF_BYTES)
        except OSError as e:
            # It might be an image we cannot see, so say so rather than drop it silently.
            report(Path(entry.path), "unreadable", describe_os_error(entry.path, e))
            return None
        if sniff_image(head) is None:
            return None
    return FileEntry(Path(entry.path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_hash(path: Path) -> str:
    """Hex BLAKE2b-128 of the file's bytes: recognises a moved or renamed file."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fp:
        while chunk := fp.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_under(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it, by their names (no symlinks followed)."""
    return path == folder or folder in path.parents


def _ignore_error(path: Path, reason: str, detail: str) -> None:
    """The default ``on_error``: skip silently."""
