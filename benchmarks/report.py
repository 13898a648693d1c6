"""Benchmark results: each figure beside its same-run baseline, saved as JSON per benchmark
and gathered into one Markdown summary."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUMMARY = "summary.md"
# The summary's order: the benchmarks ``python -m benchmarks`` runs, then the others by name.
ORDER = (
    "descriptor",
    "index",
    "query",
    "ann",
    "allpairs",
    "quality",
    "dupes_stages",
    "heldout",
    "othershots",
    "scale",
)


@dataclass(frozen=True)
class Figure:
    """A measured ``value`` beside ``baseline_value``, the same quantity for ``baseline``
    measured in the same run; ``ratio`` is value / baseline_value.

    ``target`` states the goal in words (">= 1.8x eager", "< 30 ms"); ``met`` says whether
    this run reached it, None when the figure has no target.
    """

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float:
        if self.baseline_value == 0 or not math.isfinite(self.baseline_value):
            return math.nan
        return self.value / self.baseline_value


@dataclass
class Report:
    """One benchmark's run: figures, notes (what was skipped or caveats), ``details`` with
    every raw measurement for the JSON, and plot file names relative to the results folder."""

    name: str
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0
    error: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for figure, row in zip(self.figures, data["figures"], strict=True):
            row["ratio"] = figure.ratio
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        known = {f.name for f in fields(Figure)}
        figures = [
            Figure(**{k: v for k, v in row.items() if k in known}) for row in data["figures"]
        ]
        return cls(**{**data, "figures": figures})


def cpu_seconds() -> float:
    """CPU seconds of this process, all its threads, and of its child processes that have
    ended (``dupes`` decides pairs on worker processes): time spent is the difference of
    two readings."""
    import resource

    own = time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + children.ru_utime + children.ru_stime


def environment() -> dict[str, Any]:
    """The machine as the benchmark saw it; the load average shows a busy machine."""
    import faiss
    import numpy
    import onnxruntime
    import torch

    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
    }


def run_and_save(
    name: str, argv: Sequence[str] | None, out: Path, measure: Callable[[], Report]
) -> Report:
    """Run ``measure`` (benchmark ``name``'s work), timed and with the machine it ran on and
    the command that repeats it (``argv``: its arguments, default the process's); save the
    report under ``out`` and print its figures and notes."""
    env = environment()
    start = time.perf_counter()
    report = measure()
    report.seconds = time.perf_counter() - start
    report.command = " ".join([f"python -m benchmarks.{name}", *(argv or sys.argv[1:])])
    report.environment = env
    path = save(report, out)
    for figure in report.figures:
        print(figure_line(figure))
    for note in report.notes:
        print(f"note: {note}")
    # The summary gathers every report in the folder: refreshed here, it never lags behind
    # a benchmark run on its own.
    summary = write_summary(out, ORDER)
    print(f"wrote {path} and {summary}")
    return report


def figure_line(figure: Figure) -> str:
    """A figure on one line, beside its baseline, with the ratio and verdict."""
    verdict = "" if figure.met is None else (" (met)" if figure.met else " (missed)")
    ratio = f", {figure.ratio:.3g}x" if math.isfinite(figure.ratio) else ""
    return (
        f"{figure.name}: {figure.value:.4g} {figure.unit}; {figure.baseline}: "
        f"{figure.baseline_value:.4g} {figure.unit}{ratio}{verdict}"
    )


def save(report: Report, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{report.name}.json"
    path.write_text(json.dumps(report.to_dict(), indent=1, default=_jsonable) + "\n")
    return path


def write_summary(folder: Path, order: Sequence[str]) -> Path:
    """``summary.md`` from the reports saved in ``folder``, in ``order`` then by name, so a
    partial run (``--only``) keeps the other benchmarks' latest tables. JSON files that are
    not reports (a standalone script's output) are left out."""
    reports = {}
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and {"name", "figures"} <= data.keys():
            reports[path.stem] = Report.from_dict(data)
    names = [n for n in order if n in reports] + sorted(set(reports) - set(order))
    lines = [
        "# ghostmatch benchmarks",
        "",
        "Every figure is measured beside its baseline in the same run, so the ratio holds even "
        "when absolute figures move with the machine's load. ratio = figure / baseline.",
        "",
    ]
    for name in names:
        lines += _section(reports[name])
    path = folder / SUMMARY
    path.write_text("\n".join(lines))
    return path


def _section(report: Report) -> list[str]:
    env = report.environment
    mode = "quick" if report.quick else "full"
    lines = [
        f"## {report.name} ({mode}, {report.seconds:.0f} s)",
        "",
        f"`{report.command}` — {env.get('time', '?')}, {env.get('cpu', '?')}, "
        f"{env.get('cpus', '?')} CPUs, load average {env.get('load_average_1min', '?')} at start",
        "",
    ]
    if report.error:
        lines += [f"**Failed:** {report.error}", ""]
    if report.figures:
        lines += [
            "| figure | value | baseline | baseline value | ratio | target |",
            "|---|---|---|---|---|---|",
        ]
        lines += [_row(f) for f in report.figures]
        lines.append("")
    lines += [f"- {note}" for note in report.notes]
    if report.notes:
        lines.append("")
    lines += [f"![{Path(plot).stem}]({plot})" for plot in report.plots]
    if report.plots:
        lines.append("")
    return lines


def _row(figure: Figure) -> str:
    target = figure.target
    if figure.met is not None:
        target = f"{target}: {'met' if figure.met else '**missed**'}"
    value = f"{_number(figure.value, figure.unit)} {figure.unit}".strip()
    baseline = f"{_number(figure.baseline_value, figure.unit)} {figure.unit}".strip()
    ratio = f"{figure.ratio:.3g}x" if math.isfinite(figure.ratio) else "n/a"
    return f"| {figure.name} | {value} | {figure.baseline} | {baseline} | {ratio} | {target} |"


def _number(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if not unit:  # recalls, precisions, cosines
        # Cosines near 1 need the digits that tell 0.9999 from 0.99999.
        return f"{value:.7f}" if 0.999 < value < 1 else f"{value:.4f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
