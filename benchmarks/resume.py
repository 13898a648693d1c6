"""How much work ``kill -9`` costs an indexing run: a clean ``ghostmatch index`` of 2,000
caltech photos, then the same folder into a new index killed at several points and
resumed (each run killed ``--kills`` of the way through the work it has left), with
the work each kill lost beside the clean run's time.

``python -m benchmarks.resume [--photos N] [--kills 0.7 0.7 0.7] [--caltech DIR]``
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.data import caltech_test, link_photos, missing_caltech_note, sample
from benchmarks.settings import default_weights

CLI = [sys.executable, "-m", "ghostmatch.cli.app"]


def _committed(index: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{index / 'catalog.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def _run(folder: Path, index: Path, weights: str) -> tuple[float, dict]:
    """One ``ghostmatch index`` run to its end: (wall seconds, its JSON report)."""
    args = [*CLI, "index", str(folder), "--index", str(index), "--weights", weights, "--json"]
    start = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return time.monotonic() - start, json.loads(done.stdout)


def _killed_run(
    folder: Path, index: Path, weights: str, kill_after: float, startup: float
) -> tuple[float, int, float]:
    """A run killed ``kill_after`` s after its start: (wall seconds, photos it committed,
    seconds of work lost: from its last commit, or from the end of its start-up when it
    committed nothing, to the kill). Commits are seen by polling the catalog."""
    args = [*CLI, "index", str(folder), "--index", str(index), "--weights", weights, "--json"]
    before = _committed(index)
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last_count, last_change = before, start + startup
    while proc.poll() is None and time.monotonic() - start < kill_after:
        count = _committed(index)
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        time.sleep(0.2)
    killed = time.monotonic()
    if proc.poll() is not None:  # finished first: nothing lost
        return killed - start, _committed(index) - before, 0.0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed - start, _committed(index) - before, max(0.0, killed - last_change)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--kills", type=float, nargs="+", default=[0.7, 0.7, 0.7])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--caltech", type=Path, default=None, help="caltech101 folder")
    options = parser.parse_args(argv)
    photos = caltech_test(options.caltech)
    if photos is None:
        sys.exit(missing_caltech_note("resume"))
    weights = options.weights or default_weights()
    with tempfile.TemporaryDirectory(prefix="ghostmatch-resume-") as tmp:
        root = Path(tmp)
        folder = root / "photos"
        link_photos(sample(photos, options.photos, seed=0), folder)
        # A first run warms the file cache and the model's ONNX export; the second is timed.
        _run(folder, root / "warm-up", weights)
        clean_wall, clean = _run(folder, root / "clean", weights)
        # The clean run's own start-up (imports, model load, scan) is no work a kill loses.
        startup = clean_wall - clean["seconds"]
        print(
            f"clean run: {clean['added']} photos in {clean_wall:.1f} s "
            f"({clean['seconds']:.1f} s of it indexing)"
        )
        index = root / "killed"
        total = 0.0
        lost = []
        rate = clean["added"] / clean["seconds"]
        for fraction in options.kills:
            # Killed this far into the work left, as long as the clean run took for it.
            left = (clean["added"] - _committed(index)) / rate
            wall, kept, lost_s = _killed_run(
                folder, index, weights, startup + fraction * left, startup
            )
            total += wall
            lost.append(lost_s)
            print(f"killed after {wall:.1f} s: {kept} photos committed, {lost_s:.1f} s lost")
        wall, last = _run(folder, index, weights)
        total += wall
        print(
            f"resumed: {last['added']} photos left, {wall:.1f} s; all {len(options.kills) + 1} "
            f"runs {total:.1f} s against {clean_wall:.1f} s for the clean run; "
            f"work lost per kill at most {max(lost):.1f} s"
        )


if __name__ == "__main__":
    main()
