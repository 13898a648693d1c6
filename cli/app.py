"""Typer application: parses options, wires the library, prints results."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print the version."""
    import ghostmatch

    typer.echo(ghostmatch.__version__)


def main() -> None:
    app()
