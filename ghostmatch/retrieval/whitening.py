"""PCA whitening of unit descriptors with eigenvalue shrinkage.

Whitening (Jegou and Chum, ECCV 2012) decorrelates the descriptor's dimensions and evens
out their variances, so that directions every photo shares (a common background, a
lighting cast) stop dominating the cosine. Learnt on few photos, the smallest eigenvalues
are noise, and dividing by them amplifies it; shrinking every eigenvalue towards their
mean (Ledoit-Wolf style) keeps the gain and bounds that noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghostmatch.errors import GhostmatchError

# Fewer vectors than this leave the covariance too poorly estimated to be worth learning.
MIN_VECTORS = 32


@dataclass(frozen=True, eq=False)
class Whitening:
    """``apply(x)`` = unit rows of ``(x - mean) @ projection``; ``learnt_on`` vectors."""

    mean: np.ndarray
    projection: np.ndarray
    learnt_on: int

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whitened unit vectors (n, dim) float32 for (n, dim) or (dim,) inputs."""
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        y = (x - self.mean) @ self.projection
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return np.ascontiguousarray(y / np.maximum(norms, 1e-12), dtype=np.float32)

    def save(self, path: Path, **stamp: float | str) -> None:
        """Write to ``path`` (an ``.npz``) atomically, with ``stamp`` kept beside it."""
        tmp = path.with_name(f".{path.name}.tmp.npz")
        arrays: dict[str, np.ndarray] = {key: np.array(value) for key, value in stamp.items()}
        arrays.update(
            mean=self.mean, projection=self.projection, learnt_on=np.array(self.learnt_on)
        )
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> tuple[Whitening, dict[str, object]]:
        """The whitening in ``path`` and the stamp saved with it."""
        with np.load(path, allow_pickle=False) as data:
            stamp = {k: data[k].item() for k in data.files if k not in _ARRAYS}
            return (
                cls(data["mean"], data["projection"], int(data["learnt_on"])),
                stamp,
            )


_ARRAYS = ("mean", "projection", "learnt_on")


def learn_whitening(vectors: np.ndarray, shrinkage: float) -> Whitening:
    """PCA whitening of ``vectors`` (n, dim), each eigenvalue replaced by
    ``(1 - shrinkage) * eigenvalue + shrinkage * mean eigenvalue`` before it divides.

    ``shrinkage`` 0 is plain PCA whitening; 1 only centres and rotates (cosines change only
    by the centring).
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise GhostmatchError(f"whitening shrinkage must be in [0, 1], not {shrinkage}")
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < MIN_VECTORS:
        raise GhostmatchError(
            f"whitening needs at least {MIN_VECTORS} indexed images to learn from, "
            f"the index has {len(x)}"
        )
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    shrunk = (1.0 - shrinkage) * eigenvalues + shrinkage * eigenvalues.mean()
    projection = eigenvectors / np.sqrt(np.maximum(shrunk, 1e-12))
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), len(x))
