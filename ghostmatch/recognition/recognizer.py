"""Recognizer: labels on indexed photos and "what is this?" by a vote of the nearest
labelled photos, answering ``unknown`` below the calibrated threshold."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.scan import content_hash
from ghostmatch.model.binding import ImageLike
from ghostmatch.pathtext import path_text
from ghostmatch.recognition.calibration import (
    CALIBRATION_SAMPLE,
    CALIBRATION_SEED,
    DEFAULT_PRECISION,
    Calibration,
    check_precision,
    choose_threshold,
)
from ghostmatch.recognition.labels import (
    UNKNOWN,
    LabelMap,
    LabelReport,
    NoLabelsError,
    labels_from_folders,
    labels_of,
)
from ghostmatch.recognition.vote import label_scores
from ghostmatch.search import Searcher, check_k
from ghostmatch.store.catalog import Catalog
from ghostmatch.store.vectors import GENERATION_META

if TYPE_CHECKING:
    from ghostmatch.indexes.vector_index import VectorIndex

# Where the calibration lives in the catalog, and a counter every label change bumps, so
# that a long-lived process notices another one's labels.
CALIBRATION_META = "recognition_calibration"
LABELS_REVISION_META = "labels_revision"
DEFAULT_K = 20
# Query-by-labelled scores computed at once while calibrating (~64 MB of float32).
_SCORE_BLOCK = 16_000_000
# Runner-up labels reported beside the answer.
ALTERNATIVES = 5


@dataclass(frozen=True)
class Neighbour:
    """A labelled photo that voted: its cosine ``score`` to the query and its labels."""

    id: int
    path: Path
    score: float
    labels: tuple[str, ...]

    def to_dict(self, answer: str | None = None) -> dict[str, Any]:
        # One label per neighbour, the answer's when it carries it; all of them beside it.
        label = answer if answer in self.labels else self.labels[0]
        return {
            "path": os.fsdecode(self.path),
            "label": label,
            "labels": list(self.labels),
            "score": round(self.score, 6),
        }


@dataclass(frozen=True)
class Recognition:
    """The answer for one query: ``label`` (``unknown`` when ``confidence`` is below the
    ``threshold``), ``best`` (the vote's winner either way), the runner-ups with their
    scores and the ``neighbours`` that voted, nearest first."""

    label: str
    best: str | None
    confidence: float
    threshold: float
    alternatives: list[tuple[str, float]]
    neighbours: list[Neighbour]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "best": self.best,
            "threshold": round(self.threshold, 6),
            "alternatives": [
                {"label": label, "score": round(score, 6)} for label, score in self.alternatives
            ],
            "neighbours": [n.to_dict(self.best) for n in self.neighbours],
        }


class LabelledSet:
    """The indexed photos that carry labels, in memory: ids, content hashes, label indices
    and vectors, searched exactly (FAISS flat inner product)."""

    def __init__(
        self,
        rows: Sequence[tuple[int, str, str]],
        ids: np.ndarray,
        vectors: np.ndarray,
        model: str,
    ) -> None:
        per_image: dict[int, tuple[str, list[str]]] = {}
        for image_id, digest, label in rows:
            per_image.setdefault(image_id, (digest, []))[1].append(label)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.names: list[str] = sorted({label for _, _, label in rows})
        number = {name: i for i, name in enumerate(self.names)}
        self.hashes: list[str] = [per_image[int(i)][0] for i in self.ids]
        self.labels: list[tuple[int, ...]] = [
            tuple(number[name] for name in per_image[int(i)][1]) for i in self.ids
        ]
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows_of_hash: dict[str, list[int]] = {}
        for row, digest in enumerate(self.hashes):
            self.rows_of_hash.setdefault(digest, []).append(row)
        text = "\n".join(f"{d}\t{label}" for _, d, label in sorted(rows, key=lambda r: r[1:]))
        self.fingerprint = hashlib.sha256(f"{model}\n{text}".encode()).hexdigest()[:16]
        self._index: VectorIndex | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            from ghostmatch.indexes.vector_index import VectorIndex

            index = VectorIndex(self.vectors.shape[1], "Flat", device="cpu")
            index.add(np.arange(len(self.ids), dtype=np.int64), self.vectors)
            self._index = index
        return self._index

    def nearest(
        self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each query's ``k`` nearest rows (and cosines), best first, leaving out the rows
        in its ``exclude``."""
        excluded = [set(rows) for rows in exclude]
        extra = max((len(rows) for rows in excluded), default=0)
        want = min(len(self.ids), k + extra)
        scores, rows = self.index.search(np.ascontiguousarray(queries, np.float32), want)
        out_rows: list[np.ndarray] = []
        out_scores: list[np.ndarray] = []
        for found, sims, skip in zip(rows, scores, excluded, strict=True):
            keep = [j for j, row in enumerate(found) if row >= 0 and int(row) not in skip][:k]
            out_rows.append(found[keep])
            out_scores.append(sims[keep])
        return out_rows, out_scores

    def answer_without_labels(self, rows: np.ndarray, k: int) -> np.ndarray:
        """The confidence of each of these rows' answer when no photo sharing a label with
        it votes, by exact numpy search a block of queries at a time (a label may hold
        most of the photos, which a top-k search would have to wade through)."""
        by_label = np.zeros((len(self.names), len(self.ids)), dtype=bool)
        for row, labels in enumerate(self.labels):
            by_label[list(labels), row] = True
        confidence = np.zeros(len(rows))
        block = max(1, _SCORE_BLOCK // max(len(self.ids), 1))
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            sims = self.vectors[chunk] @ self.vectors.T
            for i, row in enumerate(chunk.tolist()):
                allowed = ~by_label[list(self.labels[row])].any(axis=0)
                candidates = np.flatnonzero(allowed)
                if candidates.size == 0:
                    continue
                scores = sims[i, candidates]
                top = min(k, candidates.size)
                best = np.argpartition(-scores, top - 1)[:top]
                ranked = self.vote(candidates[best], scores[best], k)
                confidence[start + i] = ranked[0][1] if ranked else 0.0
        return confidence

    def vote(self, rows: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(label index, score) of the labels of these rows, best first (``label_scores``)."""
        return label_scores([self.labels[int(r)] for r in rows], scores, k)

    def answer(
        self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, winning label index or -1) of each query by the vote of its ``k``
        nearest rows outside its ``exclude``."""
        found, scores = self.nearest(queries, k, exclude)
        confidence = np.zeros(len(found))
        winners = np.full(len(found), -1, dtype=np.int64)
        for i, (rows, sims) in enumerate(zip(found, scores, strict=True)):
            ranked = self.vote(rows, sims, k)
            if ranked:
                winners[i], confidence[i] = ranked[0]
        return confidence, winners


def calibrate_set(labelled: LabelledSet, precision: float, k: int) -> Calibration:
    """The rejection threshold for ``precision``, leave-one-out on ``labelled``.

    Each photo of a seeded sample (at most ``CALIBRATION_SAMPLE``) is recognised twice: as
    a known photo, with itself and its byte-identical copies left out, and as a photo of an
    unknown class, with every photo sharing a label with it left out, where any answer is
    wrong. The threshold is the lowest confidence whose answers over both are right at
    least ``precision`` of the time: a stream of queries half of which show something no
    photo is labelled with.
    """
    precision = check_precision(precision)
    k = check_k(k)
    n = len(labelled)
    rows = np.arange(n)
    if n > CALIBRATION_SAMPLE:
        rng = np.random.default_rng(CALIBRATION_SEED)
        rows = np.sort(rng.permutation(n)[:CALIBRATION_SAMPLE])
    exclude = [labelled.rows_of_hash[labelled.hashes[int(r)]] for r in rows]
    confidence, winners = labelled.answer(labelled.vectors[rows], k, exclude)
    correct = np.array(
        [w >= 0 and w in labelled.labels[int(r)] for w, r in zip(winners, rows, strict=True)],
        dtype=bool,
    )
    unknown = labelled.answer_without_labels(rows, k)
    threshold, reached, _, met = choose_threshold(
        np.concatenate([confidence, unknown]),
        np.concatenate([correct, np.zeros(len(unknown), dtype=bool)]),
        precision,
    )
    return Calibration(
        threshold=threshold,
        target_precision=precision,
        precision=reached,
        coverage=float((confidence >= threshold).mean()) if len(rows) else 0.0,
        unknown_accepted=float((unknown >= threshold).mean()) if len(rows) else 0.0,
        top1=float(correct.mean()) if len(rows) else float("nan"),
        n_queries=len(rows),
        n_labelled=n,
        k=k,
        met=met,
        fingerprint=labelled.fingerprint,
    )


class Recognizer:
    """Labels of one index's photos (by content hash, in its catalog) and recognition of a
    query image from them."""

    def __init__(self, catalog: Catalog, searcher: Searcher) -> None:
        self.catalog = catalog
        self.searcher = searcher
        self._set: LabelledSet | None = None
        self._set_key: tuple[Any, Any] | None = None
        self._calibration: Calibration | None = None

    # ------------------------------------------------------------------------ labels

    def set_labels(self, labels: LabelMap, *, replace: bool = False) -> LabelReport:
        """Give indexed photos labels (path -> a label or several). Paths not in the index
        are reported in the result and the rest are labelled. With ``replace`` each named
        photo loses the labels it had first. Recalibrates when anything changed."""
        wanted = {Path(os.path.abspath(p)): labels_of(v) for p, v in labels.items()}
        records = self.catalog.records_by_path(wanted)
        missing = [p for p in wanted if p not in records]
        pairs = [
            (records[p].content_hash, label) for p in wanted if p in records for label in wanted[p]
        ]
        removed = 0
        with self.catalog.transaction() as tx:
            if replace:
                removed = tx.remove_labels({h for h, _ in pairs})
            added = tx.add_labels(pairs)
            if added or removed:
                self._bump(tx)
        report = LabelReport(len(wanted) - len(missing), added, removed, missing)
        if added or removed:
            self._recalibrate_if_labelled()
        return report

    def remove_labels(
        self, paths: Iterable[str | os.PathLike[str]] | None = None, label: str | None = None
    ) -> int:
        """Drop the labels of these indexed photos (every photo's when None), or only
        ``label``; returns how many were dropped. Recalibrates when anything changed."""
        hashes: list[str] | None = None
        if paths is not None:
            absolute = [Path(os.path.abspath(p)) for p in paths]
            records = self.catalog.records_by_path(absolute)
            hashes = [r.content_hash for r in records.values()]
            # A folder stands for every indexed photo under it.
            under = [
                i for p in absolute if p not in records for i, _ in self.catalog.paths_under(p)
            ]
            hashes += [r.content_hash for r in self.catalog.get(under)]
        with self.catalog.transaction() as tx:
            dropped = tx.remove_labels(hashes, label)
            if dropped:
                self._bump(tx)
        if dropped:
            self._recalibrate_if_labelled()
        return dropped

    def folder_labels(self, root: str | os.PathLike[str]) -> dict[Path, list[str]]:
        """The class of each indexed photo under ``root``: its first sub-folder there."""
        top = Path(os.path.abspath(root))
        if not top.is_dir():
            raise GhostmatchError(f"{path_text(top)} is not a folder")
        found = labels_from_folders(top, [p for _, p in self.catalog.paths_under(top)])
        if not found:
            raise GhostmatchError(
                f"no indexed photo in a sub-folder of {path_text(top)}; index the folder "
                "first, with one sub-folder per class"
            )
        return found

    def labels(
        self, paths: Iterable[str | os.PathLike[str]] | None = None
    ) -> dict[Path, list[str]]:
        """The labels of these indexed photos (those that carry any), or of every labelled
        indexed photo when ``paths`` is None."""
        if paths is None:
            rows = self.catalog.labelled_images()
            found: dict[int, list[str]] = {}
            for image_id, _, label in rows:
                found.setdefault(image_id, []).append(label)
            return {r.path: found[r.id] for r in self.catalog.get(list(found))}
        records = self.catalog.records_by_path(Path(os.path.abspath(p)) for p in paths)
        by_hash = self.catalog.labels_by_hash(r.content_hash for r in records.values())
        return {p: by_hash[r.content_hash] for p, r in records.items() if r.content_hash in by_hash}

    def label_counts(self) -> dict[str, tuple[int, int]]:
        """label -> (photos labelled, of them indexed now)."""
        return self.catalog.label_counts()

    @staticmethod
    def _bump(tx: Any) -> None:
        tx.set_meta(LABELS_REVISION_META, int(tx.get_meta(LABELS_REVISION_META) or 0) + 1)

    # ------------------------------------------------------------------------ calibration

    def labelled_set(self) -> LabelledSet:
        """The labelled photos as the catalog holds them now (cached until they change)."""
        key = (self.catalog.get_meta(GENERATION_META), self.catalog.get_meta(LABELS_REVISION_META))
        if self._set is None or key != self._set_key:
            rows = self.catalog.labelled_images()
            ids, vectors = self.catalog.labelled_vectors()
            card = self.searcher.model.card
            self._set = LabelledSet(rows, ids, vectors, card.fingerprint if card else "")
            self._set_key = key
        return self._set

    def _require_labels(self) -> LabelledSet:
        labelled = self.labelled_set()
        if len(labelled) == 0:
            raise NoLabelsError()
        return labelled

    def calibration(self, k: int = DEFAULT_K) -> Calibration:
        """The stored calibration if it was made on the labelled photos as they are now
        with ``k`` neighbours, else a new one (stored when the catalog can be written)."""
        return self._calibration_of(self._require_labels(), k)

    def _calibration_of(self, labelled: LabelledSet, k: int) -> Calibration:
        current = self._calibration
        if current is not None and current.fingerprint == labelled.fingerprint and current.k == k:
            return current
        stored = self._stored()
        if stored is not None and stored.fingerprint == labelled.fingerprint and stored.k == k:
            self._calibration = stored
            return stored
        target = stored.target_precision if stored is not None else DEFAULT_PRECISION
        return self.calibrate(target, k, store_if_possible=True)

    def _stored(self) -> Calibration | None:
        data = self.catalog.get_meta(CALIBRATION_META)
        try:
            return Calibration.from_dict(data) if isinstance(data, dict) else None
        except TypeError:  # written by another version: recalibrate
            return None

    def calibrate(
        self,
        precision: float = DEFAULT_PRECISION,
        k: int = DEFAULT_K,
        *,
        store_if_possible: bool = False,
    ) -> Calibration:
        """Choose the rejection threshold leave-one-out on the labelled photos (a seeded
        sample of at most ``CALIBRATION_SAMPLE``) for ``precision`` and store it."""
        calibration = calibrate_set(self._require_labels(), precision, k)
        self._calibration = calibration
        try:
            self.catalog.set_meta(CALIBRATION_META, calibration.to_dict())
        except GhostmatchError:
            if not store_if_possible:
                raise
            # A reader without write access recalibrates in memory, each time it opens.
        return calibration

    def recalibrate(self, precision: float | None = None, k: int | None = None) -> Calibration:
        """Calibrate again now, keeping the stored target precision and k unless given."""
        stored = self._stored()
        if precision is None:
            precision = stored.target_precision if stored is not None else DEFAULT_PRECISION
        if k is None:
            k = stored.k if stored is not None else DEFAULT_K
        return self.calibrate(precision, k)

    def _recalibrate_if_labelled(self) -> None:
        if len(self.labelled_set()) > 0:
            self.recalibrate()

    # ------------------------------------------------------------------------ recognition

    def recognize(self, x: ImageLike, k: int = DEFAULT_K) -> Recognition:
        """The label of ``x`` (a path, PIL image or array) by a similarity-weighted vote of
        its ``k`` nearest labelled photos, ``unknown`` when the confidence is below the
        calibrated threshold. The query itself (an indexed path, or any indexed file with
        its bytes) never votes."""
        return self.recognize_many([x], k)[0]

    def recognize_many(self, images: Sequence[ImageLike], k: int = DEFAULT_K) -> list[Recognition]:
        """``recognize`` of each image, the new ones embedded in one batch and all of them
        searched at once: per photo, a fraction of the cost of one call each."""
        labelled = self._require_labels()  # before the model loads to embed the queries
        vectors, own = self._queries(images)
        return self._recognize(labelled, vectors, own, k)

    def _queries(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[set[str]]]:
        """Each image's descriptor (stored for an unchanged indexed file, else embedded, all
        those in one batch) and the content hashes that are the image itself."""
        vectors: list[np.ndarray | None] = []
        own: list[set[str]] = []
        fresh: list[int] = []
        for n, x in enumerate(images):
            hashes: set[str] = set()
            vector = None
            if isinstance(x, str | os.PathLike):
                path = Path(os.path.abspath(x))
                if not path.exists():
                    raise GhostmatchError(f"{path_text(path)} does not exist")
                record = self.catalog.records_by_path([path]).get(path)
                if record is not None:
                    hashes.add(record.content_hash)
                    st = path.stat()
                    if (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns):
                        vector = self.catalog.vectors([record.id])[1][0]
                # Read above already; a file gone since cannot be a labelled copy.
                with contextlib.suppress(OSError):
                    hashes.add(content_hash(path))
            if vector is None:
                fresh.append(n)
            vectors.append(vector)
            own.append(hashes)
        if fresh:
            embedded = self.searcher.model.embed([images[n] for n in fresh])
            for n, vector in zip(fresh, embedded, strict=True):
                vectors[n] = vector
        return np.stack([v for v in vectors if v is not None]).astype(np.float32), own

    def recognize_vector(
        self, vector: np.ndarray, exclude_hashes: Iterable[str] = (), k: int = DEFAULT_K
    ) -> Recognition:
        """``recognize`` of a query descriptor; labelled photos with ``exclude_hashes``
        (the query's own content) do not vote."""
        return self.recognize_vectors(np.asarray(vector)[None, :], [set(exclude_hashes)], k)[0]

    def recognize_vectors(
        self, vectors: np.ndarray, exclude_hashes: Sequence[Iterable[str]], k: int = DEFAULT_K
    ) -> list[Recognition]:
        """``recognize_vector`` of each row of ``vectors``, searched in one call, with the
        neighbours' records read at once."""
        return self._recognize(self._require_labels(), vectors, exclude_hashes, k)

    def _recognize(
        self,
        labelled: LabelledSet,
        vectors: np.ndarray,
        exclude_hashes: Sequence[Iterable[str]],
        k: int,
    ) -> list[Recognition]:
        # The labelled set is looked up once per call: each look-up reads the catalog.
        k = check_k(k)
        calibration = self._calibration_of(labelled, k)
        skips = [
            [row for digest in hashes for row in labelled.rows_of_hash.get(digest, [])]
            for hashes in exclude_hashes
        ]
        found, scores = labelled.nearest(np.asarray(vectors, np.float32), k, skips)
        wanted = sorted({int(labelled.ids[r]) for rows in found for r in rows.tolist()})
        records = {r.id: r for r in self.catalog.get(wanted)}
        return [
            self._answer(labelled, rows, sims, k, calibration.threshold, records)
            for rows, sims in zip(found, scores, strict=True)
        ]

    @staticmethod
    def _answer(
        labelled: LabelledSet,
        rows: np.ndarray,
        sims: np.ndarray,
        k: int,
        threshold: float,
        records: dict[int, Any],
    ) -> Recognition:
        """The vote of one query's nearest labelled ``rows`` (cosines ``sims``)."""
        ranked = labelled.vote(rows, sims, k)
        best, confidence = (labelled.names[ranked[0][0]], ranked[0][1]) if ranked else (None, 0.0)
        accepted = best is not None and confidence >= threshold
        neighbours = [
            Neighbour(
                int(labelled.ids[r]),
                records[int(labelled.ids[r])].path,
                float(s),
                tuple(labelled.names[i] for i in labelled.labels[int(r)]),
            )
            for r, s in zip(rows.tolist(), sims.tolist(), strict=True)
            if int(labelled.ids[r]) in records
        ]
        return Recognition(
            label=best if accepted and best is not None else UNKNOWN,
            best=best,
            confidence=float(confidence),
            threshold=threshold,
            alternatives=[(labelled.names[i], float(s)) for i, s in ranked[1 : 1 + ALTERNATIVES]],
            neighbours=neighbours,
        )
