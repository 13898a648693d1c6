"""Processes sharing one index: ``ghostmatch index`` runs write one at a time, the others
wait (or, with --no-wait, fail at once), every image ends up indexed once, and a reader
never needs write access."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_support import CLI, cli_env, small_jpegs

import ghostmatch
from ghostmatch.indexes.vector_index import VectorIndex
from ghostmatch.library import INDEX_FILE
from ghostmatch.store.locking import WriterLock

pytestmark = pytest.mark.usefixtures("shared_model_cache")


def start(args: list[object], env: dict[str, str], stderr: Path) -> subprocess.Popen[str]:
    with stderr.open("w") as err:
        return subprocess.Popen(
            [*CLI, *map(os.fspath, args)],  # type: ignore[arg-type]
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def assert_every_image_once(index: Path, files: set[Path]) -> None:
    """The catalog holds each file once, and the saved FAISS file is current as it is."""
    saved = VectorIndex.load(index / INDEX_FILE)
    mtime = (index / INDEX_FILE).stat().st_mtime_ns
    with ghostmatch.open(index, create=False) as lib:
        paths = list(lib.catalog.all_stat())
        assert len(paths) == len(set(paths)) and set(paths) == files
        ids, vectors = lib.catalog.vectors()
        np.testing.assert_array_equal(saved.ids(), ids)
        np.testing.assert_allclose(saved.reconstruct(ids), vectors, atol=1e-6)
        assert lib.vector_index is not None
    assert (index / INDEX_FILE).stat().st_mtime_ns == mtime, "the saved index was stale"


def test_concurrent_index_runs_keep_every_image_once(tmp_path: Path, model_cache: Path) -> None:
    """Two runs on one folder and two on others, all at once: no run fails, and the
    index ends with every image exactly once."""
    files = set()
    for name, n in (("a", 30), ("b", 20), ("c", 20)):
        files |= small_jpegs(tmp_path / name, n, seed=len(files))
    index = tmp_path / "index"
    env = cli_env(model_cache)
    procs = []
    for n, folder in enumerate(("a", "a", "b", "c")):
        args: list[object] = ["index", tmp_path / folder, "--index", index]
        args += ["--weights", "random", "--batch-size", "4", "--json"]
        procs.append(start(args, env, tmp_path / f"stderr{n}"))
    for n, proc in enumerate(procs):
        proc.communicate(timeout=600)
        assert proc.returncode == 0, (tmp_path / f"stderr{n}").read_text()
    assert_every_image_once(index, files)


def test_a_writer_waits_for_the_lock_or_fails_fast_with_no_wait(
    tmp_path: Path, model_cache: Path
) -> None:
    files = small_jpegs(tmp_path / "photos", 12, seed=0)
    index = tmp_path / "index"
    index.mkdir()
    env = cli_env(model_cache)
    args: list[object] = ["index", tmp_path / "photos", "--index", index, "--weights", "random"]
    held = WriterLock(index)  # another writer, as far as the commands can tell
    held.acquire()
    try:
        fast = start([*args, "--no-wait", "--quiet"], env, tmp_path / "fast")
        fast.communicate(timeout=300)
        lines = (tmp_path / "fast").read_text().strip().splitlines()
        # Only the random weights' own warning may come before the one error line.
        [message] = [line for line in lines if not line.startswith("warning: using RANDOM")]
        assert fast.returncode == 2, lines
        assert "another ghostmatch process is writing" in message and "--no-wait" in message

        patient = start(args, env, tmp_path / "patient")
        wait_for(lambda: "waiting..." in (tmp_path / "patient").read_text(), patient)
        assert patient.poll() is None
    finally:
        held.release()
    out, _ = patient.communicate(timeout=300)
    assert patient.returncode == 0, (tmp_path / "patient").read_text()
    assert "added 12" in out
    assert_every_image_once(index, files)


NOBODY = 65534
SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv to read an index as a user who cannot write it",
)
def test_a_reader_without_write_access_repairs_the_index_in_memory(
    photos: Path, model_cache: Path
) -> None:
    """A shared index whose folder only its owner may write, with a stale FAISS file:
    another user's query rebuilds it in memory, answers, and leaves the folder as it was."""
    shared = Path(tempfile.mkdtemp(prefix="ghostmatch-reader-"))
    try:
        shared.chmod(0o755)
        index = shared / "index"
        env = cli_env(model_cache)
        args = ["index", photos, "--index", index, "--weights", "random", "--quiet"]
        subprocess.run([*CLI, *map(os.fspath, args)], env=env, check=True, timeout=300)
        with ghostmatch.open(index, create=False) as lib:
            lib.catalog.close()  # folds the WAL into catalog.db
        (index / INDEX_FILE).unlink()  # lost: every open must rebuild it
        for path in index.iterdir():
            path.chmod(0o644)
        index.chmod(0o755)
        home = shared / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        reader_env = {**env, "HOME": str(home), "GHOSTMATCH_CACHE": str(home / "cache")}
        # The reader can see only the shared folder, so it asks with a copy placed there.
        asked = shutil.copy(photos / "rocket.jpg", shared / "rocket.jpg")
        os.chmod(asked, 0o644)
        query = [*CLI, "query", str(asked), "--index", str(index), "--json"]
        prefix = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
        probe = subprocess.run(
            [*prefix, "--clear-groups", sys.executable, "-c", "import ghostmatch.cli.app"],
            env=reader_env,
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot run this checkout's Python: {probe.stderr[-200:]}")
        before = sorted(os.listdir(index))
        done = subprocess.run(
            [*prefix, "--clear-groups", *query],
            env=reader_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        (result,) = json.loads(done.stdout)
        assert result["matches"] and all(-1 <= m["score"] <= 1 for m in result["matches"])
        assert sorted(os.listdir(index)) == before
    finally:
        shutil.rmtree(shared)
