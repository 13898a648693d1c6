"""Background score normalisation for duplicate scores.

A raw cosine says little on its own: two photos of airliners against blue sky score 0.93
under a copy-detection model, higher than a grey copy of a cluttered photo scores with its
original. SSCD (Pizzi et al., CVPR 2022, section 3.4) fixes this by subtracting, from a
pair's similarity, how similar each image is to a set of unrelated *background* images:
an image in a crowded part of the space (a common subject, a plain picture) must beat a
higher bar. A model file may carry such a background (descriptors of its training photos),
and then a duplicate score is

    score(a, b) = cos(a, b) - offset(a) - offset(b),
    offset(x)   = beta / 2 * (cosine of x to its ``rank``-th nearest background vector)

so 0 means "as alike as each image is to its nearest unrelated photos". Search results
(``query``) stay plain cosines; duplicate scores, thresholds, calibration and evaluation
use this score whenever the model has a background. Written from the paper's description.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import faiss
import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.card import SCORE_NORM_BETA_KEY, SCORE_NORM_RANK_KEY

# Where a model file keeps its background (the card extras that say how to use it are
# ghostmatch.model.card.SCORE_NORM_RANK_KEY and SCORE_NORM_BETA_KEY).
BACKGROUND_KEY = "score_norm.background"
DEFAULT_RANK = 2
DEFAULT_BETA = 0.75
# Enough photos to stand for "unrelated"; 2,000 x 256 fp16 adds 1 MB to a model file.
DEFAULT_BACKGROUND_SIZE = 2000


@dataclass(frozen=True, eq=False)
class ScoreNorm:
    """A background of unit descriptors and how to turn it into per-image offsets."""

    background: np.ndarray
    rank: int = DEFAULT_RANK
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        bg = np.ascontiguousarray(self.background, dtype=np.float32)
        if bg.ndim != 2 or len(bg) < 1:
            raise GhostmatchError(f"a score background must be (n, dim) vectors, got {bg.shape}")
        if not 1 <= self.rank <= len(bg):
            raise GhostmatchError(
                f"score normalisation rank {self.rank} needs at least that many background "
                f"vectors, the model has {len(bg)}"
            )
        if not 0.0 <= self.beta <= 2.0:
            raise GhostmatchError(f"score normalisation beta must be in [0, 2], got {self.beta}")
        object.__setattr__(self, "background", bg)

    @property
    def dim(self) -> int:
        return int(self.background.shape[1])

    def offsets(self, vectors: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """Each vector's offset (float64): beta/2 times its cosine to the ``rank``-th
        nearest background vector. Exact (a flat search of the small background)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GhostmatchError(
                f"vectors of shape {x.shape} do not match the {self.dim}-d score background"
            )
        out = np.empty(len(x), np.float64)
        for start in range(0, len(x), chunk):
            scores, _ = faiss.knn(
                x[start : start + chunk], self.background, self.rank, faiss.METRIC_INNER_PRODUCT
            )
            out[start : start + chunk] = scores[:, self.rank - 1].astype(np.float64)
        return out * (self.beta / 2.0)

    def card_extra(self) -> dict[str, float]:
        """The card entries that go with this background in a model file."""
        return {SCORE_NORM_RANK_KEY: self.rank, SCORE_NORM_BETA_KEY: self.beta}


def pick_background(n_items: int, size: int = DEFAULT_BACKGROUND_SIZE, seed: int = 0) -> list[int]:
    """Which of ``n_items`` training images form the background: ``size`` of them, seeded."""
    if n_items <= size:
        return list(range(n_items))
    return sorted(random.Random(f"background:{seed}").sample(range(n_items), size))


def from_tensors(background: np.ndarray, extra: dict[str, object]) -> ScoreNorm:
    """The ScoreNorm a model file describes (its background tensor and card extras)."""
    rank = extra.get(SCORE_NORM_RANK_KEY, DEFAULT_RANK)
    beta = extra.get(SCORE_NORM_BETA_KEY, DEFAULT_BETA)
    if not isinstance(rank, int | float) or not isinstance(beta, int | float):
        raise GhostmatchError("the model card's score normalisation settings are not numbers")
    return ScoreNorm(background, int(rank), float(beta))
