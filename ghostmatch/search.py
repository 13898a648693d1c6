"""Similarity search over an index: the nearest indexed images to a query image."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.binding import ImageLike, ModelBinding
from ghostmatch.pathtext import path_text
from ghostmatch.retrieval.refine import PLAIN, Refinements
from ghostmatch.store.catalog import Catalog
from ghostmatch.store.vectors import VectorStore


@dataclass(frozen=True)
class Match:
    """One search result; ``score`` is cosine similarity, higher = more alike (of the
    refined descriptors, blended with the local matches' agreement when re-ranked), and
    ``inliers`` the local matches that fit one geometry when it was re-ranked."""

    rank: int
    path: Path
    score: float
    width: int
    height: int
    bytes: int
    id: int
    # With a search of every quarter-turn of the query: the clockwise turn (0, 90, 180,
    # 270) that lines this match up with the query; None when only the query was searched.
    turn: int | None = None
    # With re-ranking: how many local features the match shares with the query.
    inliers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "rank": self.rank,
            "path": str(self.path),
            "score": round(self.score, 6),
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
        }
        if self.turn is not None:
            data["turn"] = self.turn
        if self.inliers is not None:
            data["inliers"] = self.inliers
        return data


class Searcher:
    """Queries of one index: its catalog (paths, stored vectors), its FAISS index and the
    model that embeds a new query image the way the index's images were."""

    def __init__(self, catalog: Catalog, vectors: VectorStore, model: ModelBinding) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.model = model
        # What refined queries keep from one query to the next (``ghostmatch.retrieval``).
        self.cache: dict[str, Any] = {}

    def query_vector(self, x: ImageLike) -> tuple[np.ndarray, int | None]:
        """The descriptor of ``x`` and, for an indexed path, the id of its entry.

        An unchanged indexed file (same size and mtime) uses its stored vector; a changed
        one is embedded afresh, and its entry, which describes the file as it was, is
        still returned so that searches leave it out: the file must not match itself.
        """
        if isinstance(x, str | os.PathLike):
            path = Path(os.path.abspath(x))
            if not path.exists():
                raise GhostmatchError(f"{path_text(path)} does not exist")
            record = self.catalog.records_by_path([path]).get(path)
            if record is not None:
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns):
                    _, vectors = self.catalog.vectors([record.id])
                    return vectors[0], record.id
                return self.model.embed([x])[0], record.id
        return self.model.embed([x])[0], None

    def query(
        self,
        x: ImageLike,
        k: int = 10,
        *,
        min_score: float | None = None,
        under: str | os.PathLike[str] | None = None,
        rotations: bool = False,
        refine: Refinements | None = None,
    ) -> list[Match]:
        """The ``k`` most similar indexed images to ``x`` (a path, PIL image or array).

        An indexed file does not match itself. ``under`` keeps only results below a
        folder (searched exactly over that folder's vectors). ``rotations`` searches
        every quarter-turn of ``x`` too (three more embeddings; :meth:`_every_turn`); such a
        search is not refined, as the re-ranking's local features are not turned.
        ``refine`` says how the plain cosine search is refined (``ghostmatch.retrieval``):
        None, a plain cosine search; ``ghostmatch.retrieval.refine.DEFAULT``, what
        ``ghostmatch query`` does; ``QUICK``, what the library and ``serve`` do.
        """
        k = check_k(k)
        refine = PLAIN if refine is None else refine
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise GhostmatchError(f"min_score is a cosine score in [-1, 1], not {min_score}")
        if self.model.card is None:
            return []
        # More results than the index holds cannot come back, and FAISS allocates room for
        # all k per query up front (a k of 10**9 would take tens of GB).
        k = min(k, self.catalog.count())
        vector, own_id = self.query_vector(x)
        turn_of: dict[int, int] = {}
        # A refined query ranks a shortlist of the plain search anew, so it asks for more.
        want = k if refine.plain or rotations else max(k, refine.shortlist)
        if rotations:
            pairs, turn_of = self._every_turn(x, vector, own_id, k, under)
        elif under is not None:
            folder = Path(os.path.abspath(under))
            ids = [i for i, _ in self.catalog.paths_under(folder) if i != own_id]
            found, vectors = self.catalog.vectors(ids)
            scores_all = vectors @ vector if len(found) else np.zeros(0, np.float32)
            order = np.argsort(-scores_all, kind="stable")[:want]
            pairs = [(int(found[i]), float(scores_all[i])) for i in order]
        else:
            index = self.vectors.index
            if index is None:
                return []
            scores, ids_ = index.search(vector[None, :], min(want, index.ntotal) + 1)
            pairs = [
                (int(i), float(s))
                for i, s in zip(ids_[0], scores[0], strict=True)
                if i >= 0 and i != own_id
            ][:want]
        inliers: dict[int, int] = {}
        if not refine.plain and pairs and not rotations:
            from ghostmatch.retrieval.pipeline import refined

            pairs, inliers = refined(self, x, vector, pairs, refine, own_id)
        pairs = pairs[:k]
        if min_score is not None:
            pairs = [(i, s) for i, s in pairs if s >= min_score]
        records = {r.id: r for r in self.catalog.get([i for i, _ in pairs])}
        return [
            Match(
                rank,
                records[i].path,
                s,
                records[i].width,
                records[i].height,
                records[i].size,
                i,
                turn_of.get(i) if rotations else None,
                inliers.get(i),
            )
            for rank, (i, s) in enumerate(((i, s) for i, s in pairs if i in records), start=1)
        ]

    def _every_turn(
        self,
        x: ImageLike,
        vector: np.ndarray,
        own_id: int | None,
        k: int,
        under: str | os.PathLike[str] | None,
    ) -> tuple[list[tuple[int, float]], dict[int, int]]:
        """The ``k`` best (id, score) of ``x`` searched as it is (``vector``) and turned by
        each quarter-turn, each image scored by its best turn, and that turn as the one
        lining the image up with ``x``."""
        from ghostmatch.dupes.turns import QUARTER_TURNS, inverse_turn, quarter_turns_of

        turned = quarter_turns_of(x, self.model.embedder.card.input_size)
        queries = np.vstack([vector[None, :], self.model.embed(turned)])
        # A match like x turned by t lines up with x when turned back.
        turns = [0] + [inverse_turn(t, False) for t in QUARTER_TURNS]
        best: dict[int, tuple[float, int]] = {}
        if under is not None:
            folder = Path(os.path.abspath(under))
            ids = [i for i, _ in self.catalog.paths_under(folder) if i != own_id]
            found, vectors = self.catalog.vectors(ids)
            scores = vectors @ queries.T if len(found) else np.zeros((0, len(queries)))
            for row, i in enumerate(found.tolist()):
                view = int(scores[row].argmax())
                best[int(i)] = (float(scores[row, view]), turns[view])
        else:
            index = self.vectors.index
            if index is None:
                return [], {}
            scores, found = index.search(queries, k + 1)
            for view, turn in enumerate(turns):
                for i, s in zip(found[view].tolist(), scores[view].tolist(), strict=True):
                    if i >= 0 and i != own_id and s > best.get(i, (-np.inf, 0))[0]:
                        best[i] = (s, turn)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
        return [(i, s) for i, (s, _) in ranked], {i: turn for i, (_, turn) in ranked}


def check_k(k: int) -> int:
    """A number of results: a whole number of at least 1 (any size: callers cap it)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise GhostmatchError(f"the number of matches must be a whole number, not {k!r}")
    if k < 1:
        raise GhostmatchError(f"the number of matches must be at least 1, not {k}")
    return int(k)
