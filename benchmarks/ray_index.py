"""What indexing on Ray costs on one machine: ``ghostmatch index --ray`` with two actors
against the local indexer (threads) on the same caltech photos, in the same run.

Three ``ghostmatch index`` commands, each into a new index: the local indexer; ``--ray``
alone, which starts a cluster of this machine's CPUs for the run; and ``--ray ADDRESS`` on
a two-CPU cluster this script started before (what a running cluster costs, without its
start-up). Times are whole commands (imports, model load, cluster, actors); vectors are
compared with the local run's.

``python -m benchmarks.ray_index [--photos 1000] [--quick] [--caltech DIR]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import caltech_test, link_photos, missing_caltech_note, sample
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import benchmark_options, default_weights

CLI = [sys.executable, "-m", "ghostmatch.cli.app"]
ACTORS = 2


def _index(folder: Path, index: Path, weights: str, *extra: str) -> tuple[float, dict[str, Any]]:
    """One ``ghostmatch index`` command to its end: (wall seconds, its JSON report)."""
    args = [*CLI, "index", str(folder), "--index", str(index), "--weights", weights, "--json"]
    start = time.monotonic()
    done = subprocess.run([*args, *extra], capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'local'} run failed: {done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)


def _vectors(index: Path) -> dict[Path, np.ndarray]:
    import ghostmatch

    with ghostmatch.open(index, create=False) as lib:
        ids, vectors = lib.catalog.vectors()
        paths = {stat[0]: path for path, stat in lib.catalog.all_stat().items()}
    return {paths[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def run(photos: int, weights: str, caltech: Path | None, quick: bool) -> Report:
    report = Report("ray_index", quick)
    found = caltech_test(caltech)
    if found is None:
        report.notes.append(missing_caltech_note("ray_index"))
        return report
    import ray

    with tempfile.TemporaryDirectory(prefix="ghostmatch-ray-") as tmp:
        root = Path(tmp)
        folder = root / "photos"
        links = link_photos(sample(found, photos, seed=0), folder)
        # Warm the file cache for every run alike, and the model's ONNX export.
        for link in links:
            link.read_bytes()
        _index(folder / links[0].name, root / "warm-up", weights)

        local_wall, local = _index(folder, root / "local", weights)
        print(f"local: {local['added']} photos in {local_wall:.1f} s")
        bare_wall, bare = _index(folder, root / "ray-bare", weights, "--ray")
        print(f"--ray (cluster started for the run): {bare_wall:.1f} s")
        # A cluster already running, as on a real one: only connecting and actors count.
        ray.init(num_cpus=ACTORS, include_dashboard=False, log_to_driver=False)
        try:
            address = ray.get_runtime_context().gcs_address
            running_wall, running = _index(folder, root / "ray-running", weights, "--ray", address)
        finally:
            ray.shutdown()
        print(f"--ray ADDRESS ({ACTORS}-CPU cluster already running): {running_wall:.1f} s")

        want = _vectors(root / "local")
        cosines = []
        for name in ("ray-bare", "ray-running"):
            got = _vectors(root / name)
            if got.keys() != want.keys():
                raise RuntimeError(f"{name} indexed other files than the local run")
            cosines += [float(want[p] @ got[p]) for p in want]

    local_rate, running_rate = local["images_per_s"], running["images_per_s"]
    local_label = "local indexer (threads)"
    report.add(
        Figure(
            f"--ray ADDRESS, {ACTORS} actors on a running cluster: command wall time",
            running_wall,
            "s",
            local_label,
            local_wall,
            "overhead on one machine: near 1x expected",
        )
    )
    report.add(
        Figure(
            "--ray, cluster of this machine started for the run: command wall time",
            bare_wall,
            "s",
            local_label,
            local_wall,
            "includes the cluster's start-up",
        )
    )
    report.add(
        Figure(
            f"--ray ADDRESS, {ACTORS} actors: images/s over the run (actor start-up included)",
            running_rate,
            "img/s",
            local_label,
            local_rate,
        )
    )
    report.add(
        Figure(
            "vectors: min cosine of a Ray run's to the local run's",
            min(cosines),
            "",
            "identical",
            1.0,
            ">= 0.9999",
            min(cosines) >= 0.9999,
        )
    )
    report.details = {
        "photos": local["added"],
        "failed": local["failed"],
        "local": {"wall_s": local_wall, **local},
        "ray_bare": {"wall_s": bare_wall, **bare},
        "ray_running": {"wall_s": running_wall, **running},
        "actors": ACTORS,
        "load_average_1min_end": round(os.getloadavg()[0], 2),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_options("ray_index", __doc__, quick="100 photos", weights=True)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--caltech", type=Path, default=None, help="caltech101 folder")
    args = parser.parse_args(argv)
    photos = 100 if args.quick else args.photos
    weights = args.weights or default_weights()
    run_and_save(
        "ray_index", argv, args.out, lambda: run(photos, weights, args.caltech, args.quick)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
