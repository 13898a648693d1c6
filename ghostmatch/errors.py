"""The one exception type for mistakes a user can fix, and the kinds a caller may tell apart."""

from __future__ import annotations

from pathlib import Path


class GhostmatchError(Exception):
    """A user-caused error (missing file, wrong model, bad option).

    The message says what to do; the CLI prints it on one line without a traceback and
    exits with ``exit_code``.
    """

    exit_code = 2


class NoIndexError(GhostmatchError):
    """A folder opened as an index holds no catalog, and ``create`` was not asked for."""

    def __init__(self, path: Path, catalog: str | None = None) -> None:
        where = f"{path} (catalog {catalog})" if catalog else str(path)
        super().__init__(f"no index at {where}; open it with create=True to make one")
        self.path = path
        self.catalog = catalog  # the catalog database's URL (no password), if not a file


class IndexBusyError(GhostmatchError):
    """Another process is writing the index and ``wait=False`` forbade waiting for it."""
