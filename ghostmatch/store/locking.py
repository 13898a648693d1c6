"""The writer lock of an index folder: one process at a time changes an index.

An OS lock (``flock``) on ``writer.lock`` in the folder, so the operating system releases
it when its holder dies, ``kill -9`` included; readers never take it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ghostmatch.errors import GhostmatchError, IndexBusyError

try:
    import fcntl
except ImportError:  # Windows: no flock; writers are not serialised there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "writer.lock"


class WriterLock:
    """Re-entrant within one object: nested writer steps (an index run that prunes) share
    one hold, released when the outermost one ends."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / LOCK_FILE
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock; when another process holds it, wait for it (saying so through
        ``on_wait``) or, with ``wait`` False, raise an IndexBusyError at once."""
        if self._depth:
            self._depth += 1
            return
        fd = self._open()
        if fd is None:
            self._depth = 1
            return
        try:
            if not _try_lock(fd):
                if not wait:
                    raise IndexBusyError(
                        f"another ghostmatch process is writing the index {self.file.parent}; "
                        "run again when it has finished"
                    )
                if on_wait is not None:
                    on_wait("another ghostmatch index is writing this index; waiting...")
                assert fcntl is not None
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._depth = fd, 1

    def try_acquire(self) -> bool:
        """Take the lock if that needs no waiting and the folder lets us; else False."""
        if self._depth:
            self._depth += 1
            return True
        try:
            fd = self._open()
        except GhostmatchError:
            return False
        if fd is not None and not _try_lock(fd):
            os.close(fd)
            return False
        self._fd, self._depth = fd, 1
        return True

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            # Closing the descriptor drops the flock.
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if fcntl is None:
            return None
        try:
            # The umask's mode, like every other file of the index; flock works on a
            # read-only descriptor too, so another user's lock file still serves.
            return os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            try:
                return os.open(self.file, os.O_RDONLY)
            except OSError as error:
                raise _cannot_lock(self.file, error) from error
        except OSError as error:
            raise _cannot_lock(self.file, error) from error


def _try_lock(fd: int) -> bool:
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _cannot_lock(file: Path, error: OSError) -> GhostmatchError:
    return GhostmatchError(
        f"cannot change the index {file.parent}: {error.strerror or error} ({file}); "
        "check that the folder is writable by you"
    )
