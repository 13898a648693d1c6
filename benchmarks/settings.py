"""What a benchmark run was asked for: quick or full sizes, which weights, where results go."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

from ghostmatch.model.weights import BUNDLED_PATH

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """``quick`` picks the small sizes (the whole suite in about three minutes);
    ``weights`` is a ``--weights`` spec for the benchmarks whose figures depend on it;
    ``budget_s`` bounds the estimated time of one size of a scaling benchmark (ann)."""

    quick: bool = False
    weights: str = "random"
    out: Path = RESULTS
    # Longest a benchmark may plan one size for (seconds); larger sizes are skipped.
    budget_s: float = 600.0


def default_weights() -> str:
    """The bundled model when this build has one, else random weights (with a warning):
    quality figures then mean nothing, speed figures are unaffected."""
    if BUNDLED_PATH.exists():
        return "bundled"
    warnings.warn(
        f"no bundled model at {BUNDLED_PATH}; benchmarking RANDOM weights (quality figures "
        "are a floor, not the model's); pass --weights FILE for a trained one",
        stacklevel=2,
    )
    return "random"


def benchmark_options(
    name: str, description: str | None, *, quick: str | None = None, weights: bool = False
) -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.NAME`` with the options benchmarks share:
    ``--out`` (where its JSON goes); ``--quick`` when ``quick`` says what it shrinks to;
    ``--weights`` (default: the bundled model) when ``weights``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    if weights:
        parser.add_argument("--weights", default=None, help="default: bundled")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser
