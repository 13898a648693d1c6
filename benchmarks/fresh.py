"""``index`` against ``dupes`` timed as a user runs them: whole commands, round after round.

One run of either varies by a tenth on a shared machine, more than the gap a target
between them asks about, so each is timed several times, alternating, and the medians are
compared. Each run is the command line itself (``ghostmatch index`` / ``ghostmatch
dupes``) in a process of its own, timed from outside, start-up included: nothing loaded by
one run (the model, ONNX Runtime's sessions, numba's kernels, decoded images) speeds up
the next, and neither command's imports fall outside its clock.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import median


@dataclass
class Rounds:
    """Wall and CPU seconds (this process and its workers) of each run, by command."""

    wall: dict[str, list[float]] = field(default_factory=lambda: {"index": [], "dupes": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"index": [], "dupes": []})

    def timings(self) -> dict[str, float]:
        """The medians, keyed as the benchmarks' timings files key them."""
        return {
            "index_s": median(self.wall["index"]),
            "index_cpu_s": median(self.cpu["index"]),
            "dupes_s": median(self.wall["dupes"]),
            "dupes_cpu_s": median(self.cpu["dupes"]),
        }

    def runs(self) -> dict[str, list[float]]:
        """Every run's seconds, for the report's details."""
        return {
            **{f"{kind}_s": seconds for kind, seconds in self.wall.items()},
            **{f"{kind}_cpu_s": seconds for kind, seconds in self.cpu.items()},
        }


def alternate(
    folder: Path,
    index: Path,
    scratch: Path,
    weights: str,
    rounds: int,
    similar: bool = False,
) -> Rounds:
    """``rounds`` times: index ``folder`` into a new index at ``scratch`` (removed after),
    then search ``index`` (an index of the same folder) for duplicates."""
    found = Rounds()
    for _ in range(rounds):
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            for kind, where in (("index", scratch), ("dupes", index)):
                wall, cpu = _one(kind, where, folder, weights, similar)
                found.wall[kind].append(wall)
                found.cpu[kind].append(cpu)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return found


def _one(kind: str, index: Path, folder: Path, weights: str, similar: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one command (its worker processes included)."""
    # The CLI of this interpreter's environment, as ``python -m`` runs it.
    command = [sys.executable, "-m", "ghostmatch.cli.app"]
    if kind == "index":
        command += ["index", str(folder), "--index", str(index), "--weights", weights]
        command += ["--device", "cpu"]
    else:
        command += ["dupes", "--index", str(index), "--json"] + (["--similar"] if similar else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"timed {kind} failed: {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu
