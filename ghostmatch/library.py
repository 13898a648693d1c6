"""An index directory as one object: incremental indexing, queries, duplicates, removal.

The directory holds ``catalog.db`` (the truth: paths, stats, hashes and vectors) and
``vectors.faiss`` (a derived FAISS index, rebuilt from the catalog whenever they disagree).
``Library`` wires the parts that do the work and holds no logic of its own beyond that:
``ModelBinding`` (which model), ``VectorStore`` (the FAISS file), ``Indexer``, ``Searcher``
and ``DuplicateFinder``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from platformdirs import user_data_dir

from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember, check_threshold
from ghostmatch.errors import GhostmatchError, NoIndexError
from ghostmatch.ingest.indexer import Indexer, IndexReport, Progress
from ghostmatch.model.binding import CARD_META, WEIGHTS_META, ImageLike, ModelBinding
from ghostmatch.model.card import ModelCard
from ghostmatch.retrieval.refine import Refinements
from ghostmatch.search import Match, Searcher
from ghostmatch.store.catalog import CATALOG_FILE, Catalog, ImageRecord
from ghostmatch.store.vectors import GENERATION_META, INDEX_FILE, VectorStore

if TYPE_CHECKING:
    from ghostmatch.dupes.finder import DuplicateFinder
    from ghostmatch.dupes.verify import Verification
    from ghostmatch.indexes.vector_index import VectorIndex
    from ghostmatch.model.embedder import Embedder

__all__ = [
    "CARD_META",
    "GENERATION_META",
    "INDEX_FILE",
    "WEIGHTS_META",
    "ImageLike",
    "IndexReport",
    "Library",
    "Match",
    "Progress",
    "check_threshold",
    "default_index_path",
    "open",
]


def default_index_path() -> Path:
    """``GHOSTMATCH_INDEX``, else the per-user data folder ``ghostmatch/default``."""
    configured = os.environ.get("GHOSTMATCH_INDEX")
    return Path(configured) if configured else Path(user_data_dir("ghostmatch")) / "default"


class Library:
    """An open index: ``with ghostmatch.open(path) as lib: lib.index([folder])``.

    ``weights`` names the model for a new index; an existing index always uses the model
    recorded in it, and naming a different one is refused rather than mixing vectors.
    A change (``index``, ``remove``, ``rebuild``) waits while another process writes the
    index, telling ``on_wait`` so; with ``wait=False`` it raises an IndexBusyError instead.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        runtime: str = "auto",
        device: str = "auto",
        index_type: str | None = None,
        create: bool = True,
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(
            os.path.abspath(os.path.expanduser(path if path is not None else default_index_path()))
        )
        # A folder without a catalog is not an index: opening one without ``create`` must
        # not leave a catalog.db behind in, say, a photo folder named by mistake.
        new = not (self.path / CATALOG_FILE).is_file()
        if not create and new:
            raise NoIndexError(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise GhostmatchError(f"the index {self.path} is a file, not a folder")
        spec = str(weights) if weights is not None else None
        # Named weights for a new index are loaded before anything is created, so that a
        # wrong name or file leaves no empty index behind.
        preloaded = None
        if new and spec:
            from ghostmatch.model.weights import load_descriptor

            preloaded = load_descriptor(spec)
        self.path.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.for_directory(self.path)
        self.model = ModelBinding(
            self.path, self.catalog, spec, runtime=runtime, device=device, preloaded=preloaded
        )
        self.vectors = VectorStore(
            self.path,
            self.catalog,
            device=device,
            index_type=index_type,
            wait=wait,
            on_wait=on_wait,
        )
        self.indexer = Indexer(self.catalog, self.vectors, self.model)
        self.searcher = Searcher(self.catalog, self.vectors, self.model)
        self._finder: DuplicateFinder | None = None
        try:
            self.model.check_request()
        except BaseException:
            self.catalog.close()
            raise

    @property
    def finder(self) -> DuplicateFinder:
        """The duplicate search, imported on first use: it needs torch and faiss, which
        ``info``, ``remove`` and an unchanged re-run of ``index`` do not."""
        if self._finder is None:
            from ghostmatch.dupes.finder import DuplicateFinder

            self._finder = DuplicateFinder(self.catalog, self.vectors, self.model, self.searcher)
        return self._finder

    # ------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.vectors.close()
        self.catalog.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ model

    @property
    def card(self) -> ModelCard | None:
        """The model card of the vectors in this index (None before the first image)."""
        return self.model.card

    @property
    def embedder(self) -> Embedder:
        """The model, loaded on first use with the index's own weights and preprocessing."""
        return self.model.embedder

    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Unit descriptors (n, dim) float32 for paths, PIL images or arrays."""
        return self.model.embed(images)

    # ------------------------------------------------------------------------ FAISS index

    @property
    def vector_index(self) -> VectorIndex | None:
        """The FAISS index, loaded and checked against the catalog (repaired if needed)."""
        return self.vectors.index

    def rebuild(self, index_type: str | None = None) -> str:
        """Rebuild the FAISS index from the stored vectors, optionally as another type."""
        return self.vectors.rebuild(index_type)

    # ------------------------------------------------------------------------ indexing

    def index(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int = 32,
        workers: int | None = None,
        max_megapixels: float = 100.0,
        prune: bool = True,
        progress: Progress | None = None,
    ) -> IndexReport:
        """Bring the index up to date with the images under ``roots``.

        Unchanged files (same path, size and mtime) are not read; moved files keep their
        vector (found by content hash); files gone from these roots leave the index unless
        ``prune`` is False. Work is committed every ~1,000 images or ~10 s and on Ctrl-C.
        One process writes an index at a time: another one's run is waited for (or, opened
        with ``wait=False``, refused).
        """
        with self.vectors.writing():
            # Another writer may have given a new index its model while this one waited.
            self.model.check_request()
            report = self.indexer.run(
                roots,
                batch_size=batch_size,
                workers=workers,
                max_megapixels=max_megapixels,
                prune=prune,
                progress=progress,
            )
            if not report.interrupted:
                self.vectors.keep_asked_type()
            return report

    def add(self, paths: Sequence[str | os.PathLike[str]], **options: Any) -> IndexReport:
        """Index individual files (or folders) without pruning anything."""
        options["prune"] = False
        return self.index(paths, **options)

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Forget these files (or every file under these folders); the files stay on disk."""
        ids: list[int] = []
        absolute = [Path(os.path.abspath(raw)) for raw in paths]
        for path in absolute:
            record = self.catalog.records_by_path([path]).get(path)
            if record is not None:
                ids.append(record.id)
            ids.extend(i for i, _ in self.catalog.paths_under(path))
        if ids:
            with self.vectors.writing():
                self.vectors.delete(sorted(set(ids)))
                self.vectors.apply()
        # A forgotten file that had failed is no longer skipped as known bad either.
        self.catalog.forget_failures(absolute)
        return len(set(ids))

    # ------------------------------------------------------------------------ queries

    def query_vector(self, x: ImageLike) -> tuple[np.ndarray, int | None]:
        """The descriptor of ``x`` and, for an indexed path, the id of its entry
        (see ``Searcher.query_vector``)."""
        return self.searcher.query_vector(x)

    def query(
        self,
        x: ImageLike,
        k: int = 10,
        *,
        min_score: float | None = None,
        under: str | os.PathLike[str] | None = None,
        refine: Refinements | None = None,
    ) -> list[Match]:
        """The ``k`` most similar indexed images to ``x`` (a path, PIL image or array).

        An indexed file does not match itself. ``under`` keeps only results below a
        folder (searched exactly over that folder's vectors). ``refine``: how the plain
        cosine search is refined (None: not at all; ``ghostmatch.retrieval.refine.DEFAULT``:
        the measured defaults of ``ghostmatch query``).
        """
        return self.searcher.query(x, k, min_score=min_score, under=under, refine=refine)

    # ------------------------------------------------------------------------ duplicates

    def duplicate_threshold(self) -> float:
        """The calibrated threshold of this index, else the model's measured one, else the
        default (0.9 for plain cosines)."""
        return self.finder.duplicate_threshold()

    @property
    def normalised_scores(self) -> bool:
        """Whether duplicate scores are background-normalised rather than plain cosines."""
        return self.finder.normalised_scores

    def score_offsets(self, vectors: np.ndarray) -> np.ndarray | None:
        """Each vector's background offset for duplicate scores, or None for plain cosines."""
        return self.finder.score_offsets(vectors)

    def find_duplicates(
        self,
        threshold: float | None = None,
        *,
        keep: str = "pixels",
        verify: bool = True,
        min_inliers: int | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, each with one kept file and its copies
        (see ``DuplicateFinder.find_duplicates``)."""
        return self.finder.find_duplicates(
            threshold, keep=keep, verify=verify, min_inliers=min_inliers
        )

    def verify_pairs(
        self,
        pairs: Sequence[tuple[int, int]],
        records: dict[int, ImageRecord],
        enough: int | None = None,
    ) -> dict[tuple[int, int], Verification]:
        """Local-feature verification of each pair (see ``DuplicateFinder.verify_pairs``)."""
        return self.finder.verify_pairs(pairs, records, enough)

    def duplicates_of(
        self, x: ImageLike, threshold: float | None = None, k: int = 100
    ) -> list[DuplicateMember]:
        """Indexed files that duplicate ``x`` (a new image or an indexed path), best first."""
        return self.finder.duplicates_of(x, threshold, k)

    def mark_not_duplicate(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        """Record that two files are not duplicates; later searches ignore the pair."""
        self.finder.mark_not_duplicate(a, b)

    # ------------------------------------------------------------------------ summary

    def info(self) -> dict[str, Any]:
        """Counts, folders, model card, index type and sizes on disk."""
        card = self.card
        index = self.vector_index
        file = self.vectors.file
        return {
            "index": str(self.path),
            "images": self.catalog.count(),
            "folders": [os.fsdecode(p) for p in self.catalog.roots()],
            "model": card.to_dict() if card else None,
            "model_summary": card.describe() if card else None,
            "index_type": index.factory if index is not None else None,
            "catalog_bytes": self.catalog.disk_size(),
            "index_bytes": file.stat().st_size if file.exists() else 0,
            "failures": self.catalog.failure_counts(),
        }


def open(path: str | os.PathLike[str] | None = None, **options: Any) -> Library:
    """Open (or create) the index at ``path``; see :class:`Library` for the options."""
    return Library(path, **options)
