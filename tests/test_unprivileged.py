"""Unreadable files and folders, and indexes that may not be written, as an ordinary user
sees them.

Root reads and writes through any chmod, so the permission cases in test_scan and
test_images skip under root. Here, when the tests run as root and ``setpriv`` exists,
``ghostmatch index`` runs as the unprivileged user ``nobody`` on a folder with an unreadable
file and an unreadable sub-folder: both must be reported with a reason while the rest is
indexed. The other tests run the command with the permission checks of an ordinary user:
as root, without the capabilities that override them (so the checkout's Python stays
reachable however private its folder), else as the user the tests run as.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import CLI

NOBODY = 65534
SETPRIV = shutil.which("setpriv")

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
as_nobody_only = pytest.mark.skipif(
    not IS_ROOT or SETPRIV is None,
    reason="needs root and setpriv to run a command as an unprivileged user "
    "(as a normal user, test_scan and test_images cover unreadable files directly)",
)
ordinary = pytest.mark.skipif(
    IS_ROOT and SETPRIV is None, reason="as root, needs setpriv to drop its override of permissions"
)
# Root's capabilities that skip permission checks on files and folders.
_OVERRIDES = "-dac_override,-dac_read_search"


def _as_nobody(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    prefix = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        prefix + command, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder that ``nobody`` can reach (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="ghostmatch-nobody-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in folder.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)


@as_nobody_only
def test_index_as_nobody_reports_unreadable_file_and_folder(shared_dir: Path, photos: Path) -> None:
    gallery = shared_dir / "gallery"
    (gallery / "locked").mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(photos / name, gallery / name)
    shutil.copy(photos / "rocket.jpg", gallery / "locked" / "rocket.jpg")
    shutil.copy(photos / "astronaut.jpg", gallery / "secret.jpg")
    work = shared_dir / "work"  # index, caches and home of the unprivileged run
    work.mkdir()
    for path in (gallery, gallery / "locked", work):
        path.chmod(0o755)
    for path in gallery.rglob("*.jpg"):
        path.chmod(0o644)
    (gallery / "secret.jpg").chmod(0)
    (gallery / "locked").chmod(0)
    os.chown(work, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(
        HOME=str(work),
        GHOSTMATCH_OFFLINE="1",
        GHOSTMATCH_CACHE=str(work / "cache"),
        XDG_DATA_HOME=str(work / "data"),
        PYTHONIOENCODING="utf-8",
    )
    probe = _as_nobody([sys.executable, "-c", "import ghostmatch.cli.app"], env=env)
    if probe.returncode != 0:
        pytest.skip(
            f"nobody cannot run this checkout's Python (a private folder on the path?): "
            f"{probe.stderr.strip().splitlines()[-1:]}"
        )
    command = [sys.executable, "-m", "ghostmatch.cli.app", "index", str(gallery)]
    command += ["--index", str(work / "index"), "--weights", "random", "--json"]
    done = _as_nobody(command, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["added"] == 2
    reasons = {Path(f["path"]).name: f["reason"] for f in report["failures"]}
    assert reasons == {"secret.jpg": "unreadable", "locked": "unreadable"}


def _ordinary_cli(args: list[object], model_cache: Path) -> subprocess.CompletedProcess[str]:
    """``ghostmatch ARGS`` subject to the permission checks an ordinary user gets."""
    prefix = [SETPRIV or "setpriv", f"--inh-caps={_OVERRIDES}", f"--bounding-set={_OVERRIDES}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(GHOSTMATCH_OFFLINE="1", GHOSTMATCH_CACHE=str(model_cache))
    env.update(PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run(
        [*(prefix if IS_ROOT else []), *CLI, *map(os.fspath, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@ordinary
@pytest.mark.usefixtures("shared_model_cache")
def test_a_read_only_index_answers_reading_commands(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    built = _ordinary_cli(["index", photos, "--index", index, "--weights", "random"], model_cache)
    assert built.returncode == 0, built.stderr
    before = _files(index)
    for path in index.iterdir():
        path.chmod(0o444)
    index.chmod(0o555)
    try:
        info = _ordinary_cli(["info", "--index", index, "--json"], model_cache)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["images"] == len(list(photos.iterdir()))
        query = _ordinary_cli(
            ["query", photos / "rocket.jpg", "--index", index, "--json"], model_cache
        )
        assert query.returncode == 0, query.stderr
        assert len(json.loads(query.stdout)[0]["matches"]) == len(list(photos.iterdir())) - 1
        dupes = _ordinary_cli(["dupes", "--index", index, "--json"], model_cache)
        assert dupes.returncode == 0, dupes.stderr
        # A command that writes says in one line that it cannot.
        removed = _ordinary_cli(["remove", photos / "rocket.jpg", "--index", index], model_cache)
        lines = removed.stderr.strip().splitlines()
        assert removed.returncode == 2 and len(lines) == 1, removed.stderr
        assert lines[0].startswith("error: cannot write the catalog"), lines
        assert "attempt to write a readonly database" in lines[0]
        assert _files(index) == before  # nothing was written, not even a WAL file
    finally:
        index.chmod(0o755)
        for path in index.iterdir():
            path.chmod(0o644)


@ordinary
@pytest.mark.usefixtures("shared_model_cache")
def test_an_older_read_only_catalog_is_read_without_migrating(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    built = _ordinary_cli(["index", photos, "--index", index, "--weights", "random"], model_cache)
    assert built.returncode == 0, built.stderr
    with sqlite3.connect(index / "catalog.db") as raw:  # back to schema version 1
        raw.execute("DELETE FROM schema_version WHERE version > 1")
        raw.execute("ALTER TABLE failures DROP COLUMN ctime_ns")
        raw.execute("ALTER TABLE failures DROP COLUMN max_megapixels")
    raw.close()
    (index / "catalog.db").chmod(0o444)
    index.chmod(0o555)
    try:
        info = _ordinary_cli(["info", "--index", index, "--json"], model_cache)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["images"] == len(list(photos.iterdir()))
    finally:
        index.chmod(0o755)
        (index / "catalog.db").chmod(0o644)
    with sqlite3.connect(index / "catalog.db") as raw:
        assert raw.execute("SELECT max(version) FROM schema_version").fetchone() == (1,)
    raw.close()


@ordinary
@pytest.mark.usefixtures("shared_model_cache")
def test_a_file_that_was_unreadable_is_indexed_once_readable(
    tmp_path: Path, photos: Path, model_cache: Path
) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shutil.copy(photos / "chelsea.jpg", gallery)
    secret = gallery / "secret.jpg"
    shutil.copy(photos / "coffee.jpg", secret)
    secret.chmod(0)
    args: list[object] = ["index", gallery, "--index", tmp_path / "index", "--json"]
    first = _ordinary_cli([*args, "--weights", "random"], model_cache)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["added"] == 1 and report["failed"] == {"unreadable": 1}
    unchanged = json.loads(_ordinary_cli(args, model_cache).stdout)
    assert unchanged["skipped_known_bad"] == 1  # nothing changed: not read again
    secret.chmod(0o644)  # changes neither size nor mtime, only ctime
    readable = _ordinary_cli(args, model_cache)
    assert readable.returncode == 0, readable.stderr
    report = json.loads(readable.stdout)
    assert (report["added"], report["skipped_known_bad"], report["failed"]) == (1, 0, {})
