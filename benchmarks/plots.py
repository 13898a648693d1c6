"""Charts for the summary, drawn on a bare matplotlib Figure (Agg, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def bar_chart(values: Mapping[str, float], ylabel: str, title: str, path: Path) -> str:
    """Horizontal bars, one per name, written to ``path``; returns its file name."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 0.5 + 0.45 * len(values)), layout="constrained")
    axes = figure.add_subplot()
    names = list(values)[::-1]
    bars = axes.barh(names, [values[n] for n in names], color="tab:blue")
    axes.bar_label(bars, fmt="%.1f", padding=3)
    axes.set_xlabel(ylabel)
    axes.set_title(title)
    axes.margins(x=0.15)
    figure.savefig(path, dpi=110)
    return path.name


def scatter_chart(
    series: Mapping[str, Sequence[tuple[float, float, str]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
) -> str:
    """One marker per (x, y, label) point, a colour per series, written to ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, points in series.items():
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        axes.scatter(xs, ys, label=name)
        for x, y, label in points:
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())  # labels at 2x, 3x... overlap
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    figure.savefig(path, dpi=110)
    return path.name
