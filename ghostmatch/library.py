"""An index directory as one object: incremental indexing, queries, duplicates, removal.

The directory holds ``catalog.db`` (the truth: paths, stats, hashes and vectors) and
``vectors.faiss`` (a derived FAISS index, rebuilt from the catalog whenever they disagree).
With a catalog on a database server, the directory keeps the FAISS files and the
catalog's URL (``catalog.url``) instead of ``catalog.db``.
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
from ghostmatch.retrieval.refine import QUICK, Refinements
from ghostmatch.search import Match, Searcher
from ghostmatch.store.catalog import (
    CATALOG_FILE,
    Catalog,
    EmptyCatalogError,
    ImageRecord,
    catalog_url,
    same_database,
    without_password,
)
from ghostmatch.store.vectors import GENERATION_META, INDEX_FILE, VectorStore

if TYPE_CHECKING:
    from sqlalchemy import URL

    from ghostmatch.dupes.finder import DuplicateFinder
    from ghostmatch.dupes.verify import Verification
    from ghostmatch.indexes.vector_index import VectorIndex
    from ghostmatch.model.embedder import Embedder
    from ghostmatch.recognition.calibration import Calibration
    from ghostmatch.recognition.classify import ClassScore
    from ghostmatch.recognition.labels import LabelMap, LabelReport
    from ghostmatch.recognition.recognizer import Recognition, Recognizer

# In an index folder whose catalog is a server's database: that database's URL, without
# its password, so that the folder opens without naming the catalog again.
CATALOG_URL_FILE = "catalog.url"

__all__ = [
    "CARD_META",
    "CATALOG_URL_FILE",
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

    ``catalog`` is the URL of a catalog database (``postgresql://USER@HOST/DB``) that
    several index folders, on several machines, may share; the folder then keeps only the
    FAISS files, rebuilt or extended from the catalog's vectors, and remembers the URL
    (without a password) for later opens. None: the folder's own catalog.
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
        catalog: str | URL | None = None,
    ) -> None:
        self.path = Path(
            os.path.abspath(os.path.expanduser(path if path is not None else default_index_path()))
        )
        if self.path.exists() and not self.path.is_dir():
            raise GhostmatchError(f"the index {self.path} is a file, not a folder")
        url = self._catalog_url(catalog)
        # A folder without a catalog is not an index: opening one without ``create`` must
        # not leave a catalog.db behind in, say, a photo folder named by mistake.
        new = url is None and not (self.path / CATALOG_FILE).is_file()
        if not create and new:
            raise NoIndexError(self.path)
        spec = str(weights) if weights is not None else None
        # Named weights for a new index are loaded before anything is created, so that a
        # wrong name or file leaves no empty index behind.
        preloaded = None
        if new and spec:
            from ghostmatch.model.weights import load_descriptor

            preloaded = load_descriptor(spec)
        if url is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.catalog = Catalog.for_directory(self.path)
        else:
            self.catalog = self._open_server_catalog(url, create)
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
        self._recognizer: Recognizer | None = None
        try:
            self.model.check_request()
        except BaseException:
            self.catalog.close()
            raise

    def _catalog_url(self, catalog: str | URL | None) -> URL | None:
        """The catalog database's URL: ``catalog``, else the one the folder remembers;
        None for the folder's own catalog.db. A folder is never switched to another
        catalog, as its FAISS files hold the ids of its own."""
        recorded_file = self.path / CATALOG_URL_FILE
        recorded = None
        if recorded_file.is_file():
            recorded = catalog_url(recorded_file.read_text(encoding="utf-8").strip())
        if catalog is None:
            return recorded
        url = catalog_url(catalog)
        shown = url.render_as_string(hide_password=True)
        own = self.path / CATALOG_FILE
        sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
        if sqlite_file and Path(os.path.abspath(sqlite_file)) == own:
            return None
        if own.is_file():
            raise GhostmatchError(
                f"the index {self.path} keeps its catalog in {own}, not in {shown}; open it "
                "without a catalog URL, or use another index folder for that catalog"
            )
        if recorded is not None and not same_database(recorded, url):
            raise GhostmatchError(
                f"the index {self.path} uses the catalog {recorded.render_as_string()}, not "
                f"{shown}; name that one, or use another index folder for this catalog"
            )
        return url

    def _open_server_catalog(self, url: URL, create: bool) -> Catalog:
        """Open the catalog database at ``url`` and have the folder remember it."""
        try:
            opened = Catalog(url, create=create)
        except EmptyCatalogError:
            raise NoIndexError(self.path, url.render_as_string(hide_password=True)) from None
        recorded_file = self.path / CATALOG_URL_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not recorded_file.is_file():
                # Without the password: that comes from the URL given, $PGPASSWORD or
                # ~/.pgpass, never from a file beside the index.
                remembered = without_password(url).render_as_string(hide_password=False)
                recorded_file.write_text(remembered + "\n", encoding="utf-8")
        except OSError:
            pass  # a reader without write access: its FAISS index lives in memory
        return opened

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
        ray: str | None = None,
    ) -> IndexReport:
        """Bring the index up to date with the images under ``roots``.

        Unchanged files (same path, size and mtime) are not read; moved files keep their
        vector (found by content hash); files gone from these roots leave the index unless
        ``prune`` is False. Work is committed every ~1,000 images or ~10 s and on Ctrl-C.
        One process writes an index at a time: another one's run is waited for (or, opened
        with ``wait=False``, refused).

        ``ray``: decode and embed on Ray actors (``workers`` of them, default one per CPU of
        the cluster) instead of this process's threads: ``"local"`` starts a cluster on
        this machine, ``"auto"`` joins the running one, else a cluster's address. This
        process still scans, checkpoints and commits; the workers must see the same paths.
        """
        remote = None
        if ray is not None:
            from ghostmatch.ingest.ray_embed import RayEmbedding

            remote = RayEmbedding(ray, actors=workers)
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
                remote=remote,
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
        rotations: bool = False,
        refine: Refinements | None = QUICK,
    ) -> list[Match]:
        """The ``k`` most similar indexed images to ``x`` (a path, PIL image or array).

        An indexed file does not match itself. ``under`` keeps only results below a
        folder (searched exactly over that folder's vectors). ``rotations`` searches every
        quarter-turn of ``x`` too, each match scored by its best turn (``Match.turn``).
        ``refine``: how the plain cosine search is refined; by default as ``serve`` does,
        DBA and alpha-QE without re-ranking (``ghostmatch.retrieval.refine.QUICK``, tens of
        milliseconds); ``DEFAULT``: as ``ghostmatch query`` does, the best 20 also re-ranked
        by local features (the best ranking measured, hundreds of milliseconds for a new
        photo); ``PLAIN`` or None: not at all. A search of every quarter-turn is not
        refined.
        """
        return self.searcher.query(
            x, k, min_score=min_score, under=under, rotations=rotations, refine=refine
        )

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
        similar: bool = False,
        progress: Progress | None = None,
        turned: bool = True,
        workers: int | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, each with one kept file and its copies, and with
        ``similar`` the other captures of it; ``turned`` (the default) finds quarter-turned
        and tilted copies too; ``workers`` processes decide pairs, by default the usable
        cores (see ``DuplicateFinder.find_duplicates``)."""
        return self.finder.find_duplicates(
            threshold,
            keep=keep,
            verify=verify,
            min_inliers=min_inliers,
            similar=similar,
            progress=progress,
            turned=turned,
            workers=workers,
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
        self,
        x: ImageLike,
        threshold: float | None = None,
        k: int = 100,
        *,
        similar: bool = False,
        turned: bool = True,
    ) -> list[DuplicateMember]:
        """Indexed files that duplicate ``x`` (a new image or an indexed path), best first;
        with ``similar``, then the other captures of it (tier ``similar``); ``turned`` (the
        default) counts files that are ``x`` quarter-turned or tilted too."""
        return self.finder.duplicates_of(x, threshold, k, similar=similar, turned=turned)

    def mark_not_duplicate(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        """Record that two files are not duplicates; later searches ignore the pair."""
        self.finder.mark_not_duplicate(a, b)

    # ------------------------------------------------------------------------ recognition

    @property
    def recognizer(self) -> Recognizer:
        """Labels and recognition (see ``ghostmatch.recognition.recognizer``)."""
        if self._recognizer is None:
            from ghostmatch.recognition.recognizer import Recognizer

            self._recognizer = Recognizer(self.catalog, self.searcher)
        return self._recognizer

    def set_labels(
        self, labels: LabelMap | str | os.PathLike[str], *, replace: bool = False
    ) -> LabelReport:
        """Label indexed photos: a mapping path -> label (or several), or a folder whose
        sub-folders name the class of each indexed photo in them. Labels belong to a
        photo's content, so they survive re-indexing and moves. Paths not indexed are
        reported, the rest labelled; ``replace`` drops a named photo's earlier labels."""
        if isinstance(labels, str | os.PathLike):
            labels = self.recognizer.folder_labels(labels)
        return self.recognizer.set_labels(labels, replace=replace)

    def remove_labels(
        self, paths: Iterable[str | os.PathLike[str]] | None = None, label: str | None = None
    ) -> int:
        """Drop the labels of these photos or folders (all photos' when None), or only
        ``label``; returns how many were dropped."""
        return self.recognizer.remove_labels(paths, label)

    def labels(
        self, paths: Iterable[str | os.PathLike[str]] | None = None
    ) -> dict[Path, list[str]]:
        """The labels of these indexed photos, or of every labelled one."""
        return self.recognizer.labels(paths)

    def recognize(self, x: ImageLike, k: int = 20) -> Recognition:
        """What ``x`` shows, by a similarity-weighted vote of its ``k`` nearest labelled
        photos; ``unknown`` below the calibrated threshold (see ``Recognizer.recognize``)."""
        return self.recognizer.recognize(x, k)

    def recognize_many(self, images: Sequence[ImageLike], k: int = 20) -> list[Recognition]:
        """``recognize`` of each image, the new ones embedded in one batch: faster per photo
        than one call each."""
        return self.recognizer.recognize_many(images, k)

    def calibrate_recognition(self, precision: float | None = None, k: int = 20) -> Calibration:
        """Choose and store the rejection threshold for ``precision`` (default: the stored
        target, else 0.95), leave-one-out on the labelled photos."""
        return self.recognizer.recalibrate(precision, k)

    def classify(
        self,
        images: Sequence[ImageLike],
        top: int = 5,
        *,
        weights: str | os.PathLike[str] | None = None,
    ) -> list[list[ClassScore]]:
        """Each image's ``top`` ImageNet-1k classes by the network's own classifier:
        ``weights`` (default: the index's own, which must have one, e.g. imagenet)."""
        from ghostmatch.recognition.classify import Classifier

        return Classifier(weights or self.classifier_weights()).classify(images, top)

    def classifier_weights(self) -> str:
        """The weights whose classifier ``classify`` runs by default: the index's own
        (imagenet for an index not given a model yet)."""
        spec = self.catalog.get_meta(WEIGHTS_META) or (self.card and self.card.weights)
        return spec or "imagenet"

    # ------------------------------------------------------------------------ summary

    def info(self) -> dict[str, Any]:
        """Counts, folders, model card, index type and sizes on disk."""
        card = self.card
        # The stamp names the type of an index file that is current, so that info needs no
        # FAISS; a missing or stale file is loaded (and repaired) to tell.
        factory = self.vectors.saved_factory()
        if factory is None and self.catalog.count():
            index = self.vector_index
            factory = index.factory if index is not None else None
        file = self.vectors.file
        return {
            "index": str(self.path),
            "images": self.catalog.count(),
            "folders": [os.fsdecode(p) for p in self.catalog.roots()],
            "model": card.to_dict() if card else None,
            "model_summary": card.describe() if card else None,
            "index_type": factory,
            "catalog": (
                self.catalog.url.render_as_string(hide_password=True)
                if self.catalog.on_server
                else str(self.path / CATALOG_FILE)
            ),
            "catalog_bytes": self.catalog.disk_size(),
            "index_bytes": file.stat().st_size if file.exists() else 0,
            "failures": self.catalog.failure_counts(),
            "labels": {
                name: {"photos": photos, "indexed": indexed}
                for name, (photos, indexed) in self.catalog.label_counts().items()
            },
        }


def open(path: str | os.PathLike[str] | None = None, **options: Any) -> Library:
    """Open (or create) the index at ``path``; see :class:`Library` for the options."""
    return Library(path, **options)
