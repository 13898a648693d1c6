"""The stored vectors of every image of an index, for its all-pairs search: in memory, or,
when its FAISS index is on disk (too many vectors to hold), read from the catalog a chunk
at a time and searched chunk by chunk against that index."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.allpairs import similar_pairs, similar_pairs_streamed
from ghostmatch.indexes.ondisk import is_ondisk
from ghostmatch.indexes.vector_index import VectorIndex
from ghostmatch.store.catalog import Catalog

# Vectors read at once: ScoreNorm.offsets' own chunk, so that offsets computed a chunk at a
# time see the same batches (and BLAS rounding) as offsets of all vectors in memory, and
# both paths score every pair to the last bit. 64 MB of 256-d vectors.
CHUNK = 65_536


class StreamedVectors:
    """All the catalog's vectors by ascending id, read from the catalog when needed rather
    than held: row ``r`` is the vector of ``ids[r]``."""

    def __init__(self, catalog: Catalog, ids: np.ndarray, dim: int, chunk: int = CHUNK) -> None:
        self.catalog = catalog
        self.ids = ids
        self.dim = dim
        self.chunk = chunk

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), self.dim

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of ``chunk`` images at a time, in id order."""
        for start in range(0, len(self.ids), self.chunk):
            ids = self.ids[start : start + self.chunk]
            yield ids, self.by_id(ids)

    def by_id(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids``, in that order."""
        found, vectors = self.catalog.vectors(np.asarray(ids, dtype=np.int64).tolist())
        if len(found) != len(ids):
            raise GhostmatchError(
                "images were removed from the index during the duplicate search; run it again"
            )
        return vectors.reshape(len(found), self.dim)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of rows ``rows`` (what :func:`pair_scores` reads)."""
        return self.by_id(self.ids[rows])

    def load(self) -> np.ndarray:
        """Every vector in memory, for the searches that need them all at once."""
        return self.catalog.vectors(self.ids.tolist())[1].reshape(len(self.ids), self.dim)


Stored = np.ndarray | StreamedVectors


def stored_vectors(catalog: Catalog, index: VectorIndex | None) -> tuple[np.ndarray, Stored]:
    """(ids ascending, their vectors): in memory, unless ``index`` (the catalog's FAISS
    index) is on disk, which it is because they are too many to hold."""
    if index is None or not is_ondisk(index):
        return catalog.vectors()
    ids = catalog.ids()
    return ids, StreamedVectors(catalog, ids, index.dim)


def in_memory(vectors: Stored) -> np.ndarray:
    """All ``vectors`` as one array, for the searches that have no chunked path."""
    return vectors.load() if isinstance(vectors, StreamedVectors) else vectors


def stored_offsets(
    vectors: Stored, offsets_of: Callable[[np.ndarray], np.ndarray | None]
) -> np.ndarray | None:
    """``offsets_of`` (per-vector score offsets, or None) of all ``vectors``."""
    if not isinstance(vectors, StreamedVectors):
        return offsets_of(vectors)
    parts = []
    for _, chunk in vectors.chunks():
        part = offsets_of(chunk)
        if part is None:
            return None
        parts.append(part)
    return np.concatenate([np.empty(0, np.float64), *parts])


def stored_pairs(
    ids: np.ndarray,
    vectors: Stored,
    floor: float,
    index: VectorIndex | None,
    offsets: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs scoring at least ``floor`` (:func:`similar_pairs`): exact with a Flat
    index, from ``index``'s nearest neighbours otherwise; for streamed vectors, one chunk
    at a time against the on-disk ``index``, rescored from the catalog's vectors."""
    if isinstance(vectors, StreamedVectors):
        assert index is not None  # streamed only for an on-disk index
        known = offsets
        return similar_pairs_streamed(
            index,
            vectors.chunks(),
            floor,
            lookup=vectors.by_id,
            offsets=None if known is None else lambda wanted: known[np.searchsorted(ids, wanted)],
        )
    approximate = index if index is not None and index.factory != "Flat" else None
    return similar_pairs(vectors, floor, ids=ids, index=approximate, offsets=offsets)
