"""Running the real ``ghostmatch`` command in tests: its argv and an offline environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "ghostmatch.cli.app"]


def cli_env(model_cache: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without GHOSTMATCH_* settings, offline, with the
    shared model cache and a private data folder; ``extra`` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(
        GHOSTMATCH_OFFLINE="1",
        GHOSTMATCH_CACHE=str(model_cache),
        XDG_DATA_HOME=str(model_cache.parent / "xdg-data"),
        # A strict UTF-8 stdout, as under the common en_US.UTF-8 locale (C.UTF-8 would
        # silently let non-UTF-8 file names through).
        PYTHONIOENCODING="utf-8",
        COLUMNS="250",  # one line per message and table row
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env
