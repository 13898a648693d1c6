"""Opening the index a command names: one place for every command module, which
``app`` imports too (so this module imports none of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ghostmatch.cli.output import err


def open_library(index: Path | None, **options: Any) -> Any:
    """``ghostmatch.open(index, **options)``; a write that waits for another process
    writing the same index says so on stderr."""
    import ghostmatch

    options.setdefault("on_wait", lambda message: err.print(message, markup=False))
    return ghostmatch.open(index, **options)
