"""What the commands print: a console for results (stdout), one for messages (stderr),
and JSON for machines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

IndexOpt = Annotated[
    Path | None,
    typer.Option("--index", help="Index folder (default: $GHOSTMATCH_INDEX or the user data dir)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        envvar="GHOSTMATCH_CATALOG",
        help="Catalog database URL (postgresql://USER@HOST/DB) that index folders share; "
        "default: the folder's own catalog, or the URL it was first opened with.",
    ),
]


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout.

    ensure_ascii keeps non-UTF-8 names (lone surrogates) as ``\\udcNN`` escapes that
    round-trip, where writing them raw fails on a strict UTF-8 stdout.
    """
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True) + "\n")


def progress_columns() -> tuple[ProgressColumn, ...]:
    """The columns of every progress bar: stage, bar, done of total, rate (a task field
    ``rate``), elapsed time and ETA."""
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
