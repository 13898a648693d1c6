"""Unreadable files and folders as an ordinary user sees them.

Root reads through chmod 000, so the permission cases in test_scan and test_images skip
under root. Here, when the tests run as root and ``setpriv`` exists, ``ghostmatch index``
runs as the unprivileged user ``nobody`` on a folder with an unreadable file and an
unreadable sub-folder: both must be reported with a reason while the rest is indexed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv to run a command as an unprivileged user "
    "(as a normal user, test_scan and test_images cover unreadable files directly)",
)


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
