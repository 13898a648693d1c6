"""Start-up of the quick commands: ``--help``, ``info``, an unchanged re-run of ``index`` over
1,000 photos and ``remove`` of one photo, each the median wall time of several runs of the
real command, beside the bare interpreter and the imports those commands avoid (torch,
ONNX Runtime, faiss), measured in the same run.

``python -m benchmarks.startup [--photos 1000] [--runs 7]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.report import Figure, Report, environment, save
from benchmarks.settings import RESULTS

CLI = [sys.executable, "-m", "ghostmatch.cli.app"]
TARGET_S = 0.5


def _wall(args: Sequence[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _median(args_of_run: Sequence[Sequence[str]], env: dict[str, str]) -> float:
    return statistics.median(_wall(args, env) for args in args_of_run)


def _photos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    options = parser.parse_args(argv)
    report = Report("startup", quick=False, command="python -m benchmarks.startup")
    began = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env["GHOSTMATCH_OFFLINE"] = "1"
    # As after a pip install: compiled modules are cached (the first, untimed run writes
    # them), even where the shell sets PYTHONDONTWRITEBYTECODE.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = options.runs
    with tempfile.TemporaryDirectory(prefix="ghostmatch-startup-") as tmp:
        photos, index = Path(tmp) / "photos", Path(tmp) / "index"
        _photos(photos, options.photos)
        subprocess.run(
            [*CLI, "index", str(photos), "--index", str(index), "--quiet"], env=env, check=True
        )
        bare = _median([[sys.executable, "-c", "pass"]] * runs, env)
        heavy = _median([[sys.executable, "-c", "import torch, onnxruntime, faiss"]] * runs, env)
        timed = {
            "--help": _median([[*CLI, "--help"]] * runs, env),
            "info": _median([[*CLI, "info", "--index", str(index)]] * runs, env),
            f"index, unchanged ({options.photos} photos)": _median(
                [[*CLI, "index", str(photos), "--index", str(index), "--quiet"]] * runs, env
            ),
            "remove (one photo)": _median(
                [
                    [*CLI, "remove", str(photos / f"{i:05d}.jpg"), "--index", str(index)]
                    for i in range(runs)
                ],
                env,
            ),
        }
    for name, seconds in timed.items():
        report.add(
            Figure(
                f"{name}: wall time",
                seconds,
                "s",
                "import torch, onnxruntime, faiss",
                heavy,
                target=f"< {TARGET_S} s",
                met=seconds < TARGET_S,
            )
        )
    report.details = {
        "python_bare_s": bare,
        "heavy_imports_s": heavy,
        "commands_s": timed,
        "runs": runs,
    }
    report.environment = environment()
    report.seconds = time.monotonic() - began
    print(f"bare interpreter {bare:.3f} s; import torch, onnxruntime, faiss {heavy:.3f} s")
    for name, seconds in timed.items():
        print(f"{name:<36} {seconds:.3f} s  (target < {TARGET_S} s)")
    save(report, RESULTS)


if __name__ == "__main__":
    main()
