"""Run ghostmatch's benchmarks; write results/<name>.json per benchmark and results/summary.md."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import (
    allpairs,
    ann,
    descriptor,
    dupes_stages,
    heldout,
    indexing,
    othershots,
    quality,
    query,
    scale,
)
from benchmarks.report import ORDER, Report, environment, save, write_summary
from benchmarks.settings import RESULTS, Settings, default_weights

BENCHMARKS: dict[str, Callable[[Settings], Report]] = {
    "descriptor": descriptor.run,
    "index": indexing.run,
    "query": query.run,
    "ann": ann.run,
    "allpairs": allpairs.run,
    "quality": quality.run,
    "dupes_stages": dupes_stages.run,
    "heldout": heldout.run,
    "othershots": othershots.run,
    "scale": scale.run,
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: about 3 minutes")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS)
    )
    parser.add_argument(
        "--weights",
        help="weights for index, query and quality (default: bundled, else random)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="skip a size whose estimated run is longer (ann at 1M vectors; default 600)",
    )
    return parser.parse_args(argv)


def command(name: str, args: argparse.Namespace) -> str:
    parts = ["python -m benchmarks"]
    if args.quick:
        parts.append("--quick")
    parts += ["--only", name]
    if args.weights:
        parts += ["--weights", args.weights]
    if args.out != RESULTS:
        parts += ["--out", str(args.out)]
    if args.budget != 600.0:
        parts += ["--budget", f"{args.budget:g}"]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    weights = args.weights or default_weights()
    settings = Settings(quick=args.quick, weights=weights, out=args.out, budget_s=args.budget)
    settings.out.mkdir(parents=True, exist_ok=True)
    # Said once above; random weights warn again on every model load.
    warnings.filterwarnings("ignore", message="using RANDOM weights")
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        env = environment()
        start = time.perf_counter()
        try:
            report = BENCHMARKS[name](settings)
        except Exception as err:
            traceback.print_exc()
            report = Report(name, settings.quick, error=f"{type(err).__name__}: {err}")
            failed.append(name)
        report.seconds = time.perf_counter() - start
        report.command = command(name, args)
        report.environment = env
        save(report, settings.out)
        for figure in report.figures:
            print(
                f"   {figure.name}: {figure.value:.6g} {figure.unit} vs {figure.baseline} "
                f"{figure.baseline_value:.6g} -> {figure.ratio:.3g}x {figure.target}",
                flush=True,
            )
        for note in report.notes:
            print(f"   note: {note}", flush=True)
        print(f"   ({report.seconds:.1f} s)", flush=True)
    summary = write_summary(settings.out, ORDER)
    print(f"wrote {summary}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
