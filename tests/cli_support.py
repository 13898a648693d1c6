"""Running the real ``ghostmatch`` command in tests: its argv, an offline environment, a
run to completion, and an ``index`` run held mid-way, stopped and resumed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import URL, create_engine, text
from sqlalchemy.exc import ProgrammingError

import ghostmatch
from ghostmatch.library import Library

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


def run_cli(
    args: Sequence[object], model_cache: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``ghostmatch ARGS`` to completion, its output captured; ``extra``: environment."""
    return subprocess.run(
        [*CLI, *map(os.fspath, args)],  # type: ignore[arg-type]
        env=cli_env(model_cache, **extra),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------------------- stopped runs


def small_jpegs(folder: Path, n: int, seed: int = 0) -> set[Path]:
    """``n`` distinct 64x64 noise JPEGs in a new ``folder``: cheap, all different vectors."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=80)
    return set(folder.iterdir())


def catalog_count(index: Path, url: URL | None = None) -> int:
    """Images committed so far, read the way another process would: from the index's
    catalog.db, or from the catalog database at ``url``."""
    if url is not None:
        engine = create_engine(url)
        try:
            with engine.connect() as db:
                return int(db.execute(text("SELECT count(*) FROM images")).scalar_one())
        except ProgrammingError:
            return 0  # not created yet
        finally:
            engine.dispose()
    try:
        with sqlite3.connect(f"file:{index / 'catalog.db'}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def assert_consistent(lib: Library, files: set[Path]) -> None:
    ids, vectors = lib.catalog.vectors()
    paths = list(lib.catalog.all_stat())
    assert len(paths) == len(set(paths)) == len(ids) and set(paths) <= files
    index = lib.vector_index
    assert index is not None
    np.testing.assert_array_equal(index.ids(), ids)
    np.testing.assert_allclose(index.reconstruct(ids), vectors, atol=1e-6)


def paused_env(model_cache: Path, marker: Path) -> dict[str, str]:
    """The environment of an ``index`` run that commits every 20 images and, after 50,
    writes ``marker`` and holds still until it is stopped (the indexer's pause hook)."""
    return cli_env(
        model_cache,
        GHOSTMATCH_CHECKPOINT_IMAGES="20",
        GHOSTMATCH_CHECKPOINT_SECONDS="100000",  # checkpoints by count alone here
        GHOSTMATCH_PAUSE_AFTER_IMAGES="50",
        GHOSTMATCH_PAUSE_MARKER=str(marker),
    )


def stop_paused_run(
    argv: Sequence[object],
    env: dict[str, str],
    marker: Path,
    stop: signal.Signals,
    paused: Callable[[], None],
) -> tuple[int, str, str]:
    """Start ``argv``, wait until its pause hook holds it (``marker`` written), call
    ``paused``, then send ``stop``: (exit code, stdout, stderr). Held, not timed, so the
    signal always lands mid-run however loaded the machine is."""
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(
        list(map(os.fspath, argv)),  # type: ignore[arg-type]
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, proc)
        paused()
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def consistent_count(index: Path, files: set[Path], before: int) -> int:
    """The images of a stopped run's index, checked consistent, more than ``before`` and
    fewer than all."""
    with ghostmatch.open(index, create=False) as lib:
        assert_consistent(lib, files)
        committed = lib.catalog.count()
    assert before < committed < len(files)
    return committed


def assert_resumes(index: Path, folder: Path, files: set[Path], committed: int) -> None:
    """A last run over ``folder`` does only what the stopped runs left."""
    with ghostmatch.open(index, create=False) as lib:
        report = lib.index([folder], batch_size=8)
        assert (report.unchanged, report.added) == (committed, len(files) - committed)
        assert report.embedded == len(files) - committed  # committed work was not redone
        assert set(lib.catalog.all_stat()) == files
        assert_consistent(lib, files)
