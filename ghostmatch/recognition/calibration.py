"""The open-set threshold: below it ``recognize`` answers ``unknown``.

Chosen leave-one-out on the labelled photos themselves: each (of a seeded sample) is
recognised from the others, with every byte-identical copy of it left out too, and once more
with every photo of its labels left out, as a photo of an unknown class would be; the
threshold is the lowest confidence at which the answers given over both are right at least
the target precision of the time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ghostmatch.errors import GhostmatchError

# The precision a new calibration aims at unless told otherwise.
DEFAULT_PRECISION = 0.95
# Labelled photos queried leave-one-out: enough for a threshold good to about a percent,
# few enough that a recalibration at 100k labelled photos takes about a second.
CALIBRATION_SAMPLE = 2000
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Calibration:
    """A rejection threshold and what it did leave-one-out on the labelled photos.

    ``precision`` is measured at ``threshold`` over ``n_queries`` photos recognised as
    known and as unknown; ``coverage`` is the share of them answered as known,
    ``unknown_accepted`` the share answered (wrongly) as unknown, and ``top1`` their
    accuracy as known without rejection.
    ``met`` is False when no threshold reached ``target_precision``: the threshold is then
    the one with the best precision. ``fingerprint`` names the labelled set and model it was
    computed on, ``k`` the neighbours that voted.
    """

    threshold: float
    target_precision: float
    precision: float
    coverage: float
    unknown_accepted: float
    top1: float
    n_queries: int
    n_labelled: int
    k: int
    met: bool
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)


def check_precision(precision: float) -> float:
    """A target precision in (0, 1]."""
    if not 0.0 < precision <= 1.0:
        raise GhostmatchError(f"the target precision must be in (0, 1], not {precision}")
    return float(precision)


def choose_threshold(
    confidence: np.ndarray, correct: np.ndarray, precision: float
) -> tuple[float, float, float, bool]:
    """(threshold, precision, coverage, met): the lowest confidence cut whose accepted
    answers (confidence >= cut) are right at least ``precision`` of the time; else the cut
    with the best precision (the lowest of equals)."""
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        return 0.0, float("nan"), 0.0, False
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    # Only the last of equal confidences is a cut: a threshold accepts all of them or none.
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    accepted = ends + 1
    hits = np.cumsum(right)[ends]
    precisions = hits / accepted
    meeting = np.flatnonzero(precisions >= precision - 1e-12)
    met = meeting.size > 0
    at = int(meeting[-1]) if met else int(np.flatnonzero(precisions == precisions.max())[-1])
    return (
        float(conf[ends[at]]),
        float(precisions[at]),
        float(accepted[at] / conf.size),
        met,
    )
