"""An index directory as one object: incremental indexing, queries, removal, repair.

The directory holds ``catalog.db`` (the truth: paths, stats, hashes and vectors) and
``vectors.faiss`` (a derived FAISS index, rebuilt from the catalog whenever they disagree).
"""

from __future__ import annotations

import numbers
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from platformdirs import user_data_dir
from sqlalchemy.exc import IntegrityError

from ghostmatch.dupes.groups import (
    DEFAULT_MIN_INLIERS,
    THRESHOLD_META,
    DuplicateGroup,
    DuplicateMember,
    default_thresholds,
    group_pairs,
    threshold_of,
    tier_of,
)
from ghostmatch.dupes.verify import ZOOM, ScaledMaps, Verification, local_features, verify_scales
from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.allpairs import pair_scores, similar_pairs
from ghostmatch.indexes.vector_index import VectorIndex, build_index, default_factory
from ghostmatch.ingest.images import ImageRejected, image_from_array, load_image, to_rgb
from ghostmatch.ingest.scan import FileEntry, content_hash, scan
from ghostmatch.model.card import ModelCard
from ghostmatch.model.download import sha256_of
from ghostmatch.model.embedder import Embedder, prepare, to_batch
from ghostmatch.model.weights import load_descriptor
from ghostmatch.pathtext import path_text
from ghostmatch.store.catalog import (
    CATALOG_FILE,
    Catalog,
    CatalogTransaction,
    FailureRecord,
    ImageRecord,
    NewFailure,
    NewImage,
)
from ghostmatch.store.locking import WriterLock

INDEX_FILE = "vectors.faiss"


def _checkpoint_images() -> int:
    """Images per commit while indexing: a crash loses at most this much work.

    ``GHOSTMATCH_CHECKPOINT_IMAGES`` overrides it, so a crash test can land after a commit.
    """
    try:
        return max(1, int(os.environ.get("GHOSTMATCH_CHECKPOINT_IMAGES", "1000")))
    except ValueError:
        return 1000


def _checkpoint_seconds() -> float:
    """Seconds of work between commits while indexing (``GHOSTMATCH_CHECKPOINT_SECONDS``),
    so that ``kill -9`` loses about this much however slow each image is."""
    try:
        return max(0.0, float(os.environ.get("GHOSTMATCH_CHECKPOINT_SECONDS", "10")))
    except ValueError:
        return 10.0


CHECKPOINT_IMAGES = _checkpoint_images()
CHECKPOINT_SECONDS = _checkpoint_seconds()
# Vectors fetched from the catalog at once when the FAISS index catches up with it.
_SYNC_CHUNK = 50_000
CARD_META = "model_card"
WEIGHTS_META = "weights_spec"
INDEX_TYPE_META = "index_type"
GENERATION_META = "generation"
# Weights named rather than given as a file (ghostmatch.model.weights.load_descriptor).
NAMED_WEIGHTS = ("imagenet", "bundled", "random")

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray
Progress = Callable[[str, int, int | None], None]


def default_index_path() -> Path:
    """``GHOSTMATCH_INDEX``, else the per-user data folder ``ghostmatch/default``."""
    configured = os.environ.get("GHOSTMATCH_INDEX")
    return Path(configured) if configured else Path(user_data_dir("ghostmatch")) / "default"


@dataclass(frozen=True)
class Match:
    """One search result; ``score`` is cosine similarity, higher = more alike."""

    rank: int
    path: Path
    score: float
    width: int
    height: int
    bytes: int
    id: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "path": str(self.path),
            "score": round(self.score, 6),
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
        }


@dataclass
class IndexReport:
    """What one indexing run did; ``failed`` counts this run's bad files by reason."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    known_bad: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[Path, str, str]] = field(default_factory=list)
    embedded: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "moved": self.moved,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "skipped_known_bad": self.known_bad,
            "failed": dict(self.failed),
            "failures": [
                {"path": os.fsdecode(p), "reason": r, "detail": d} for p, r, d in self.failures
            ],
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "interrupted": self.interrupted,
        }


@dataclass(frozen=True)
class _Embedded:
    entry: FileEntry
    digest: str
    width: int
    height: int
    format: str
    pixels: np.ndarray | None  # None: a move, the vector comes from the catalog
    source: ImageRecord | None = None  # for a move: the vanished image this file is


@dataclass(frozen=True)
class _Failed:
    entry: FileEntry
    reason: str
    detail: str
    max_megapixels: float | None = None  # the pixel limit of a rejected image


class Library:
    """An open index: ``with ghostmatch.open(path) as lib: lib.index([folder])``.

    ``weights`` names the model for a new index; an existing index always uses the model
    recorded in it, and naming a different one is refused rather than mixing vectors.
    A change (``index``, ``remove``, ``rebuild``) waits while another process writes the
    index, telling ``on_wait`` so; with ``wait=False`` it raises a GhostmatchError instead.
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
            raise GhostmatchError(
                f"no index at {self.path}; create one with: ghostmatch index DIR "
                f"--index {self.path}"
            )
        if self.path.exists() and not self.path.is_dir():
            raise GhostmatchError(f"--index {self.path} is a file, not a folder")
        self._weights = str(weights) if weights is not None else None
        # Named weights for a new index are loaded before anything is created, so that a
        # wrong name or file leaves no empty index behind.
        self._model = load_descriptor(self._weights) if new and self._weights else None
        self.path.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.for_directory(self.path)
        self._runtime, self._device = runtime, device
        self._embedder: Embedder | None = None
        self._index: VectorIndex | None = None
        self._index_type = index_type
        # One writer at a time per index folder (``wait`` False: fail instead of waiting).
        self._lock = WriterLock(self.path)
        self._wait, self._on_wait = wait, on_wait
        # The catalog generation ``_index`` holds, and the changes this object committed
        # since (ids to drop, ids whose catalog vectors to add) up to ``_delta_generation``:
        # the FAISS index catches up once, at the end of a write, not at every checkpoint.
        self._index_generation: int | None = None
        self._delta_generation: int | None = None
        self._delta_removed: set[int] = set()
        self._delta_added: set[int] = set()
        self._run_started = time.monotonic()
        try:
            self._check_card_request()
        except BaseException:
            self.catalog.close()
            raise

    # ------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        while self._lock.held:
            self._lock.release()
        self.catalog.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the index's writer lock (re-entrant) for a change of catalog and FAISS file."""
        self._lock.acquire(self._wait, self._on_wait)
        try:
            yield
        finally:
            self._lock.release()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ model

    @property
    def card(self) -> ModelCard | None:
        """The model card of the vectors in this index (None before the first image)."""
        data = self.catalog.get_meta(CARD_META)
        return ModelCard.from_dict(data) if data else None

    def _check_card_request(self) -> None:
        """Refuse weights other than the index's: a file counts as the same only when it
        is the recorded file or has the recorded sha256, never for its name alone."""
        stored = self.card
        if stored is None or self._weights is None:
            return
        spec = self._weights
        if spec in NAMED_WEIGHTS:
            if spec == stored.weights:
                return
        else:
            file = Path(spec).expanduser()
            recorded = self.catalog.get_meta(WEIGHTS_META)
            if recorded not in (None, *NAMED_WEIGHTS) and os.path.realpath(
                file
            ) == os.path.realpath(recorded):
                return
            try:
                digest = sha256_of(file) if file.is_file() else None
            except OSError as error:
                raise GhostmatchError(
                    f"cannot read weights file {path_text(file)}: {error.strerror}"
                ) from error
            if digest == stored.weights_sha256:
                return
        raise GhostmatchError(
            f"index {self.path} was built with weights {stored.weights!r} (sha256 "
            f"{stored.weights_sha256[:12]}), not {path_text(spec)!r}; "
            "drop --weights, or use another --index for the other model"
        )

    @property
    def embedder(self) -> Embedder:
        """The model, loaded on first use with the index's own weights and preprocessing."""
        if self._embedder is None:
            stored = self.card
            spec = self._weights
            if stored is not None:
                spec = self.catalog.get_meta(WEIGHTS_META) or stored.weights
            preloaded = self._model if stored is None else None
            model = preloaded if preloaded is not None else load_descriptor(spec)
            self._model = None
            if stored is not None and _only_learnt_p_differs(stored, model.card):
                stored = model.card
            if stored is not None and model.card.fingerprint != stored.fingerprint:
                raise GhostmatchError(
                    f"the weights {spec!r} no longer match index {self.path} (its card: "
                    f"{stored.describe()}; found: {model.card.describe()}); rebuild the "
                    "index or restore the original weights file"
                )
            self._embedder = Embedder(model, runtime=self._runtime, device=self._device)
            if stored is None:
                with self.catalog.transaction() as tx:
                    tx.set_meta(CARD_META, model.card.to_dict())
                    tx.set_meta(WEIGHTS_META, _weights_spec(spec, model.card))
        return self._embedder

    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Unit descriptors (n, dim) float32 for paths, PIL images or arrays."""
        embedder = self.embedder
        arrays = [prepare(self._to_image(x), embedder.card) for x in images]
        return embedder.embed_arrays(arrays)

    def _to_image(self, x: ImageLike) -> Image.Image:
        if isinstance(x, Image.Image):
            return to_rgb(x)
        if isinstance(x, np.ndarray):
            return image_from_array(x)
        try:
            return load_image(x, min_side=self.embedder.card.input_size).image
        except ImageRejected as err:
            raise GhostmatchError(f"cannot read {os.fsdecode(x)}: {err}") from err

    # ------------------------------------------------------------------------ FAISS index

    @property
    def vector_index(self) -> VectorIndex | None:
        """The FAISS index, loaded and checked against the catalog (repaired if needed)."""
        # Another process may have changed the index since it was loaded here.
        stale = self._index is not None and self._index_generation != self._generation()
        if stale and not self._lock.held:
            self._forget_index()
        if self._index is None:
            self._index = self._open_index()
        return self._index

    def _open_index(self) -> VectorIndex | None:
        """Load the FAISS file if it holds exactly the catalog's current vectors, else rebuild.

        Every catalog commit bumps a generation number; the index file is saved with the
        generation of what it holds and the sha256 of its bytes, so a crash between the two
        writes, a stale copy put back or a file damaged in place is always noticed, even
        for a changed file whose id (and so the id set) stayed the same. A rebuild is saved
        only when that is possible (writable folder, no other writer); a reader never
        fails for want of write access.
        """
        # Read before the vectors: a concurrent commit can then only make what is built
        # newer than its stamp (a needless rebuild later), never older.
        generation = self._generation()
        file = self.path / INDEX_FILE
        stamp = _read_generation(file)
        if stamp is not None and stamp[0] == generation:
            try:
                index = VectorIndex.load(file, device=self._device)
            except GhostmatchError:
                index = None
            if (
                index is not None
                and index.checksum == stamp[1]
                and np.array_equal(index.ids(), self.catalog.ids())
            ):
                self._loaded(index, generation)
                return index
        all_ids, vectors = self.catalog.vectors()
        if len(all_ids) == 0:
            self._loaded(None, generation)
            if self._lock.try_acquire():
                try:
                    if self._generation() == generation:
                        file.unlink(missing_ok=True)
                except OSError:
                    pass  # a read-only folder: the stale file is never trusted anyway
                finally:
                    self._lock.release()
            return None
        stored_type = self.catalog.get_meta(INDEX_TYPE_META)
        factory = self._index_type or stored_type or default_factory(len(all_ids), vectors.shape[1])
        index = build_index(all_ids, vectors, factory, device=self._device)
        self._loaded(index, generation)
        if self._lock.try_acquire():
            try:
                if self._index_type is not None and stored_type != self._index_type:
                    # The type asked for when the index was made outlives a lost file.
                    self.catalog.set_meta(INDEX_TYPE_META, self._index_type)
                if self._generation() == generation:
                    self._save(index, generation)
            except OSError:
                pass  # read-only or full: the rebuilt index serves from memory this time
            finally:
                self._lock.release()
        return index

    def _load_before_change(self) -> None:
        """Load the index (checked against the catalog) before a commit changes the catalog,
        unless what is held is current: the commits' changes are then applied to it, not
        rebuilt. Another process may have written since this object last looked."""
        if self._delta_generation is None or self._delta_generation != self._generation():
            self._forget_index()
            self._index = self._open_index()

    def _loaded(self, index: VectorIndex | None, generation: int) -> None:
        self._index = index
        self._index_generation = self._delta_generation = generation
        self._delta_removed, self._delta_added = set(), set()

    def _forget_index(self) -> None:
        """Drop the in-memory index; the next use reloads it checked against the catalog."""
        self._index = None
        self._index_generation = self._delta_generation = None
        self._delta_removed, self._delta_added = set(), set()

    def _generation(self) -> int:
        return int(self.catalog.get_meta(GENERATION_META) or 0)

    def _save(self, index: VectorIndex, generation: int) -> None:
        """Save ``index``, stamped with the catalog generation whose vectors it holds."""
        file = self.path / INDEX_FILE
        checksum = index.save(file)
        _write_generation(file, generation, checksum)

    def rebuild(self, index_type: str | None = None) -> str:
        """Rebuild the FAISS index from the stored vectors, optionally as another type."""
        with self._writing():
            generation = self._generation()
            ids, vectors = self.catalog.vectors()
            if len(ids) == 0:
                raise GhostmatchError("the index is empty; nothing to rebuild")
            factory = index_type or default_factory(len(ids), vectors.shape[1])
            index = build_index(ids, vectors, factory, device=self._device)
            self.catalog.set_meta(INDEX_TYPE_META, index_type)
            self._loaded(index, generation)
            self._save(index, generation)
        return factory

    def _track(self, before: int, removed: Iterable[int], added: Iterable[int]) -> None:
        """Note a committed catalog change (generation ``before`` to ``before + 1``) for
        the in-memory index to catch up with in :meth:`_apply`."""
        if self._delta_generation is None:
            return  # not loaded: the next use loads it checked against the catalog
        if self._delta_generation != before:
            # Someone else committed in between: what the changes build on is unknown.
            self._forget_index()
            return
        gone = set(removed)
        self._delta_removed |= gone
        self._delta_added = (self._delta_added - gone) | set(added)
        self._delta_generation = before + 1

    def _apply(self) -> None:
        """Bring the FAISS index up to this object's committed catalog changes, then save
        it once, stamped with the generation it now holds. Call with the writer lock."""
        target = self._delta_generation
        index = self._index
        if target is not None and target == self._index_generation:
            return
        if index is None or target is None or target != self._generation():
            # Empty before, not loaded, or the catalog moved on without us: load it checked
            # (built from the catalog and saved when the file is behind).
            self._forget_index()
            self._index = self._open_index()
            return
        removed, added = sorted(self._delta_removed), sorted(self._delta_added)
        self._index = None  # half-changed if interrupted here: reload it next time
        if removed:
            index.remove(np.asarray(removed, dtype=np.int64))
        for start in range(0, len(added), _SYNC_CHUNK):
            ids, vectors = self.catalog.vectors(added[start : start + _SYNC_CHUNK])
            if len(ids):
                index.add(ids, vectors)
        if index.ntotal == 0:
            (self.path / INDEX_FILE).unlink(missing_ok=True)
            self._loaded(None, target)
            return
        self._save(index, target)
        self._loaded(index, target)

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
        with self._writing():
            # Another writer may have given a new index its model while this one waited.
            self._check_card_request()
            return self._index_run(
                roots,
                batch_size=batch_size,
                workers=workers,
                max_megapixels=max_megapixels,
                prune=prune,
                progress=progress,
            )

    def _index_run(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int,
        workers: int | None,
        max_megapixels: float,
        prune: bool,
        progress: Progress | None,
    ) -> IndexReport:
        folders = [Path(os.path.abspath(os.path.expanduser(r))) for r in roots]
        for folder in folders:
            if not folder.exists():
                raise GhostmatchError(f"{os.fsdecode(folder)} does not exist")
        report = IndexReport()
        start = self._run_started = time.monotonic()
        start_generation = self._generation()
        scan_failures: list[tuple[Path, str, str]] = []
        found = scan(folders, on_error=lambda p, r, d: scan_failures.append((p, r, d)))
        # A file inside a folder that is also named on its own comes twice; index it once.
        entries = list({e.path: e for e in found}.values())
        if progress:
            progress("scanned", len(entries), None)
        with self.catalog.transaction() as tx:
            tx.add_roots(f for f in folders if f.is_dir())
        known = self.catalog.all_stat()
        bad = {f.path: f for f in self.catalog.failures()}
        seen = {e.path for e in entries}
        todo: list[FileEntry] = []
        changed_ids: dict[Path, int] = {}
        for entry in entries:
            stat = known.get(entry.path)
            if stat is not None and stat[1:] == (entry.size, entry.mtime_ns):
                report.unchanged += 1
            elif stat is None and _fails_again(bad.get(entry.path), entry, max_megapixels):
                report.known_bad += 1
            else:
                if stat is not None:
                    changed_ids[entry.path] = stat[0]
                todo.append(entry)
        gone = [
            p
            for p in known
            if p not in seen and any(_is_under(p, f) for f in folders) and not p.exists()
        ]
        gone_records = self.catalog.records_by_path(gone)
        # Several vanished files may share content (copies); each can be one file's origin.
        movable: dict[str, list[ImageRecord]] = {}
        for gone_record in gone_records.values():
            movable.setdefault(gone_record.content_hash, []).append(gone_record)
        moved_from: set[Path] = set()
        report.failures.extend(scan_failures)
        for _, reason, _ in scan_failures:
            report.failed[reason] += 1
        self._record_scan_failures(scan_failures)
        try:
            self._index_entries(
                todo,
                changed_ids,
                movable,
                moved_from,
                report,
                batch_size,
                workers,
                max_megapixels,
                progress,
            )
        except KeyboardInterrupt:
            report.interrupted = True
        if prune and not report.interrupted:
            doomed = [r for p, r in gone_records.items() if p not in moved_from]
            if doomed:
                self._delete([r.id for r in doomed])
                report.removed = len(doomed)
        if self._generation() != start_generation:
            self._apply()  # the FAISS file catches up once, after all of the run's commits
        report.seconds = time.monotonic() - start
        return report

    def add(self, paths: Sequence[str | os.PathLike[str]], **options: Any) -> IndexReport:
        """Index individual files (or folders) without pruning anything."""
        options["prune"] = False
        return self.index(paths, **options)

    def _record_scan_failures(self, failures: Sequence[tuple[Path, str, str]]) -> None:
        if failures:
            with self.catalog.transaction() as tx:
                tx.record_failures([NewFailure(p, None, None, r, d) for p, r, d in failures])

    def _index_entries(
        self,
        todo: Sequence[FileEntry],
        changed_ids: dict[Path, int],
        movable: dict[str, list[ImageRecord]],
        moved_from: set[Path],
        report: IndexReport,
        batch_size: int,
        workers: int | None,
        max_megapixels: float,
        progress: Progress | None,
    ) -> None:
        if not todo:
            return
        embedder = self.embedder
        card = embedder.card
        claimed: Counter[str] = Counter()  # vanished images taken over, per content hash

        def work(entry: FileEntry) -> _Embedded | _Failed:
            try:
                digest = content_hash(entry.path)
            except OSError as err:
                return _Failed(entry, "unreadable", str(err))
            if entry.path not in changed_ids and digest in movable:
                old = movable[digest][0]
                return _Embedded(entry, digest, old.width, old.height, old.format, None)
            try:
                decoded = load_image(entry.path, card.input_size, max_megapixels)
            except ImageRejected as err:
                return _Failed(entry, err.reason, err.detail, max_megapixels)
            pixels = prepare(decoded.image, card)
            return _Embedded(entry, digest, decoded.width, decoded.height, decoded.format, pixels)

        pause_after, pause_marker = _pause_hook()
        threads = workers or min(8, max(2, os.cpu_count() or 2))
        pending: list[_Embedded | _Failed] = []
        waiting: list[_Embedded] = []  # decoded, not yet through the model
        vectors: dict[int, np.ndarray] = {}

        def run_model() -> None:
            out = embedder.embed_arrays([r.pixels for r in waiting if r.pixels is not None])
            vectors.update((id(r), v) for r, v in zip(waiting, out, strict=True))
            report.embedded += len(waiting)
            waiting.clear()

        done = 0
        # Counted from the run's start: the scan and the model's loading are work too.
        last_commit = self._run_started
        try:
            with ThreadPoolExecutor(threads) as pool:
                for item in _ordered(pool, work, todo, prefetch=max(64, 4 * batch_size)):
                    result = item
                    if isinstance(result, _Embedded) and result.pixels is None:
                        origins = movable[result.digest]
                        if claimed[result.digest] < len(origins):
                            result = replace(result, source=origins[claimed[result.digest]])
                            claimed[result.digest] += 1
                        else:  # more copies than vanished originals: a new image
                            result = _decode_copy(result, card, max_megapixels)
                    pending.append(result)
                    if isinstance(result, _Embedded) and result.pixels is not None:
                        waiting.append(result)
                        if len(waiting) >= batch_size:
                            run_model()
                    done += 1
                    if len(pending) >= CHECKPOINT_IMAGES or (
                        pending and time.monotonic() - last_commit >= CHECKPOINT_SECONDS
                    ):
                        run_model()
                        # Handed over before the commit: interrupted, it is never redone.
                        batch, batch_vectors = pending, vectors
                        pending, vectors = [], {}
                        self._commit(batch, batch_vectors, changed_ids, moved_from, report)
                        last_commit = time.monotonic()
                    if progress:
                        progress("indexed", done, len(todo))
                    if done == pause_after:
                        _pause(pause_marker)
            run_model()
        except KeyboardInterrupt:
            # Ctrl-C keeps the finished work: all but the images still waiting for the model.
            finished = [
                r
                for r in pending
                if not (isinstance(r, _Embedded) and r.pixels is not None and id(r) not in vectors)
            ]
            self._commit(finished, vectors, changed_ids, moved_from, report)
            raise
        self._commit(pending, vectors, changed_ids, moved_from, report)

    def _commit(
        self,
        results: Sequence[_Embedded | _Failed],
        vectors: dict[int, np.ndarray],
        changed_ids: dict[Path, int],
        moved_from: set[Path],
        report: IndexReport,
    ) -> None:
        """Write one catalog transaction for ``results``; the FAISS index catches up later
        (:meth:`_apply`), from the changes noted here."""
        if not results:
            return
        self._load_before_change()
        new_rows: list[NewImage] = []
        removed: list[int] = []
        updated_ids: list[int] = []
        failures: list[NewFailure] = []
        ok_paths: list[Path] = []
        with self._catalog_change() as tx:
            before = int(tx.get_meta(GENERATION_META) or 0)
            for r in results:
                if isinstance(r, _Failed):
                    failures.append(_new_failure(r))
                    report.failed[r.reason] += 1
                    report.failures.append((r.entry.path, r.reason, r.detail))
                    if r.entry.path in changed_ids:  # it was an image; now it is broken
                        removed.append(changed_ids[r.entry.path])
                        tx.delete_images([changed_ids[r.entry.path]])
                    continue
                ok_paths.append(r.entry.path)
                old = r.source
                if old is not None:
                    tx.update_image(
                        old.id, path=r.entry.path, size=r.entry.size, mtime_ns=r.entry.mtime_ns
                    )
                    moved_from.add(old.path)
                    report.moved += 1
                    continue
                vector = vectors[id(r)]
                if r.entry.path in changed_ids:
                    image_id = changed_ids[r.entry.path]
                    tx.update_image(
                        image_id,
                        size=r.entry.size,
                        mtime_ns=r.entry.mtime_ns,
                        content_hash=r.digest,
                        width=r.width,
                        height=r.height,
                        format=r.format,
                        vector=vector,
                    )
                    removed.append(image_id)
                    updated_ids.append(image_id)
                    report.updated += 1
                else:
                    new_rows.append(
                        NewImage(
                            r.entry.path,
                            r.entry.size,
                            r.entry.mtime_ns,
                            r.digest,
                            r.width,
                            r.height,
                            r.format,
                            vector,
                        )
                    )
            new_ids = tx.insert_images(new_rows)
            report.added += len(new_rows)
            tx.record_failures(failures)
            tx.clear_failures(ok_paths)
            tx.set_meta(GENERATION_META, before + 1)
        self._track(before, removed, updated_ids + list(new_ids))

    @contextmanager
    def _catalog_change(self) -> Iterator[CatalogTransaction]:
        """A catalog transaction of an index change; a clash with a writer that ignores
        the lock (an older ghostmatch) becomes a GhostmatchError, not a database one."""
        try:
            with self.catalog.transaction() as tx:
                yield tx
        except IntegrityError as error:
            raise GhostmatchError(
                f"another program changed the index {self.path} at the same time "
                f"({error.orig}); run the command again"
            ) from error

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
            with self._writing():
                self._delete(sorted(set(ids)))
                self._apply()
        # A forgotten file that had failed is no longer skipped as known bad either.
        self.catalog.forget_failures(absolute)
        return len(set(ids))

    def _delete(self, ids: Sequence[int]) -> None:
        """Delete catalog rows; the FAISS index catches up in :meth:`_apply`."""
        self._load_before_change()
        with self._catalog_change() as tx:
            before = int(tx.get_meta(GENERATION_META) or 0)
            tx.delete_images(ids)
            tx.set_meta(GENERATION_META, before + 1)
        self._track(before, ids, [])

    # ------------------------------------------------------------------------ queries

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
                return self.embed([x])[0], record.id
        return self.embed([x])[0], None

    def query(
        self,
        x: ImageLike,
        k: int = 10,
        *,
        min_score: float | None = None,
        under: str | os.PathLike[str] | None = None,
    ) -> list[Match]:
        """The ``k`` most similar indexed images to ``x`` (a path, PIL image or array).

        An indexed file does not match itself. ``under`` keeps only results below a
        folder (searched exactly over that folder's vectors).
        """
        k = _check_k(k)
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise GhostmatchError(f"--min-score is a cosine score in [-1, 1], not {min_score}")
        if self.card is None:
            return []
        # More results than the index holds cannot come back, and FAISS allocates room for
        # all k per query up front (a k of 10**9 would take tens of GB).
        k = min(k, self.catalog.count())
        vector, own_id = self.query_vector(x)
        if under is not None:
            folder = Path(os.path.abspath(under))
            ids = [i for i, _ in self.catalog.paths_under(folder) if i != own_id]
            found, vectors = self.catalog.vectors(ids)
            scores_all = vectors @ vector if len(found) else np.zeros(0, np.float32)
            order = np.argsort(-scores_all, kind="stable")[:k]
            pairs = [(int(found[i]), float(scores_all[i])) for i in order]
        else:
            index = self.vector_index
            if index is None:
                return []
            scores, ids_ = index.search(vector[None, :], k + 1)
            pairs = [
                (int(i), float(s))
                for i, s in zip(ids_[0], scores[0], strict=True)
                if i >= 0 and i != own_id
            ][:k]
        if min_score is not None:
            pairs = [(i, s) for i, s in pairs if s >= min_score]
        records = {r.id: r for r in self.catalog.get([i for i, _ in pairs])}
        return [
            Match(rank, records[i].path, s, records[i].width, records[i].height, records[i].size, i)
            for rank, (i, s) in enumerate(((i, s) for i, s in pairs if i in records), start=1)
        ]

    # ------------------------------------------------------------------------ duplicates

    def duplicate_threshold(self) -> float:
        """The calibrated threshold of this index, else the model's measured one, else the
        default (0.9 for plain cosines)."""
        card = self.card
        extra = card.extra if card is not None else None
        return threshold_of(self.catalog.get_meta(THRESHOLD_META), extra, self.normalised_scores)[0]

    @property
    def normalised_scores(self) -> bool:
        """Whether duplicate scores are background-normalised (the model file carries a
        score background, ``ghostmatch.model.scorenorm``) rather than plain cosines."""
        return self.card is not None and self.card.normalised_scores

    def score_offsets(self, vectors: np.ndarray) -> np.ndarray | None:
        """Each vector's background offset for duplicate scores, or None when the model has
        no score background (duplicate scores are then plain cosines)."""
        if not self.normalised_scores:
            return None
        norm = self.embedder.model.score_norm
        if norm is None:
            raise GhostmatchError(
                f"the model card of index {self.path} names a score background that its "
                "weights file lacks; restore the original weights file"
            )
        return norm.offsets(vectors)

    def find_duplicates(
        self,
        threshold: float | None = None,
        *,
        keep: str = "pixels",
        verify: bool = True,
        min_inliers: int | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, each with one kept file and its copies.

        Stage 1: an all-pairs search of the stored vectors (exact for Flat indexes); a pair
        scoring at least ``threshold`` is a duplicate on its descriptors alone. Stage 2
        (``verify``): a pair scoring between the verify threshold and ``threshold`` is a
        duplicate when its local features agree on one geometric transform on at least
        ``min_inliers`` points (see ``ghostmatch.dupes.verify``); the transform also sets the
        tier. Pairs marked ``--not-dup`` are ignored; grouping never chains.
        """
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        verify_default = default_thresholds(normalised)[1]
        low = min(t, self._stage2_setting("verify_threshold", verify_default))
        ids, vectors = self.catalog.vectors()
        if len(ids) < 2:
            return []
        index = self.vector_index
        approximate = index if index is not None and index.factory != "Flat" else None
        floor = low if verify else t
        offsets = self.score_offsets(vectors)
        a, b, scores = similar_pairs(vectors, floor, ids=ids, index=approximate, offsets=offsets)
        found = {
            (min(i, j), max(i, j)): s
            for i, j, s in zip(a.tolist(), b.tolist(), scores.tolist(), strict=True)
        }
        # Byte-identical files are duplicates whatever their score: a photo much like the
        # score background can score an exact copy of itself under the threshold.
        exact = [
            (same[m], same[n])
            for same in self.catalog.shared_hashes()
            for m in range(len(same))
            for n in range(m + 1, len(same))
        ]
        exact = [pair for pair in exact if pair not in found]
        if exact:
            rows = np.searchsorted(ids, np.array(exact, dtype=np.int64))
            exact_scores = pair_scores(vectors, rows[:, 0], rows[:, 1], offsets)
            found.update(zip(exact, exact_scores.tolist(), strict=True))
        involved = sorted({i for pair in found for i in pair})
        records = {r.id: r for r in self.catalog.get(involved)}
        ignored = self.catalog.not_duplicates()
        pairs = []
        for (i, j), score in found.items():
            pa, pb = records[i].path, records[j].path
            if (pa, pb) in ignored or (pb, pa) in ignored:
                continue
            pairs.append((i, j, float(score)))

        def identical(i: int, j: int) -> bool:
            return records[i].content_hash == records[j].content_hash

        checks: dict[tuple[int, int], Verification] = {}
        if verify and pairs:
            needed = min_inliers
            if needed is None:
                needed = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
            to_check = [(i, j) for i, j, _ in pairs if not identical(i, j)]
            checks = self.verify_pairs(to_check, records, needed)
            pairs = [
                (i, j, s)
                for i, j, s in pairs
                if s >= t or identical(i, j) or checks[(i, j)].inliers >= needed
            ]
        members = {i: _member(r, 1.0, "keep") for i, r in records.items()}
        groups = []
        for leader, taken in group_pairs(members, pairs, keep):
            kept = records[leader]
            group = []
            for j, s in taken:
                check = checks.get((leader, j)) or checks.get((j, leader))
                ceiling = 1.0
                if offsets is not None:  # an identical copy scores 1 less both offsets
                    rows = np.searchsorted(ids, [leader, j])
                    ceiling -= float(offsets[rows[0]] + offsets[rows[1]])
                tier = tier_of(kept, records[j], s, t, check, ceiling)
                group.append(_member(records[j], s, tier))
            groups.append(DuplicateGroup(keep=members[leader], members=group))
        groups.sort(key=lambda g: (-len(g.members), -g.members[0].score))
        return groups

    def _stage2_setting(self, key: str, default: float) -> float:
        """A stage-2 setting: calibrated in this index, else measured for the model."""
        stored = self.catalog.get_meta(THRESHOLD_META)
        if isinstance(stored, dict) and key in stored:
            return float(stored[key])
        card = self.card
        if card is not None and key in card.extra:
            return float(card.extra[key])
        return default

    def verify_pairs(
        self,
        pairs: Sequence[tuple[int, int]],
        records: dict[int, ImageRecord],
        enough: int | None = None,
    ) -> dict[tuple[int, int], Verification]:
        """Local-feature verification of each pair (``ghostmatch.dupes.verify.verify_scales``).
        A pair whose equal-scale check already has ``enough`` inliers skips the zoomed checks.

        Memory stays bounded however many pairs there are: at most ``MAP_CACHE_IMAGES``
        images' maps are held (fp16: about 0.2 MB each at 224 px, 0.1 MB at 160 px), least
        recently used dropped first. Pairs
        are taken in breadth-first order of the pair graph (:func:`_locality_order`), so
        the two images of a pair are seldom far apart and most images are decoded once.
        """
        cache = _MapCache(self.embedder, records)
        empty = Verification(0, 0, np.eye(2, 3), False)
        results: dict[tuple[int, int], Verification] = {}
        ordered = _locality_order(pairs)
        block: list[tuple[int, int]] = []
        with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:

            def flush() -> None:
                cache.load({i for pair in block for i in pair}, pool)
                for i, j in block:
                    a, b = cache.get(i), cache.get(j)
                    results[(i, j)] = (
                        empty
                        if a is None or b is None
                        else verify_scales(_as_float(a), _as_float(b), enough)
                    )
                block.clear()

            new: set[int] = set()
            for pair in ordered:
                new.update(i for i in pair if i not in cache)
                block.append(pair)
                # A block needs its images' maps at once: few enough new ones to embed as
                # one batch, and few enough in all to fit the cache.
                if len(new) >= MAP_BATCH or len(block) >= MAP_CACHE_IMAGES // 4:
                    flush()
                    new.clear()
            if block:
                flush()
        return results

    def duplicates_of(
        self, x: ImageLike, threshold: float | None = None, k: int = 100
    ) -> list[DuplicateMember]:
        """Indexed files that duplicate ``x`` (a new image or an indexed path), best first.

        One k-NN search of the index (at most ``k`` candidates), no scan of the collection;
        indexed files with the same bytes as ``x`` always count, as ``exact``. The tiers of
        the others come from the geometric check of ``x`` against each.
        """
        normalised = self.normalised_scores
        t = (
            self.duplicate_threshold()
            if threshold is None
            else check_threshold(threshold, normalised)
        )
        k = _check_k(k)
        if self.card is None:
            return []
        vector, own_id = self.query_vector(x)
        index = self.vector_index
        if index is None:
            return []
        digest = None
        if isinstance(x, str | os.PathLike):
            try:
                digest = content_hash(Path(x))
            except OSError:
                digest = None
        # Byte-identical indexed files are duplicates whatever their score (see
        # find_duplicates), so they are looked up by content hash, not left to the search.
        same = self.catalog.find_by_hash([digest]).get(digest, []) if digest else []
        exact = {r.id for r in same if r.id != own_id}
        _, found = index.search(vector[None, :], min(k, index.ntotal) + 1)
        near = [int(i) for i in found[0] if i >= 0 and i != own_id and i not in exact]
        ids, vectors = self.catalog.vectors(sorted(exact) + near)
        # Rescored from the stored vectors, the way find_duplicates scores a pair.
        rows = np.vstack([vector[None, :], vectors]) if len(ids) else vector[None, :]
        offsets = self.score_offsets(rows)
        scores = pair_scores(
            rows, np.zeros(len(ids), np.int64), np.arange(1, len(ids) + 1), offsets
        )
        hits = sorted(
            (
                (int(i), float(s))
                for i, s in zip(ids, scores, strict=True)
                if s >= t or int(i) in exact
            ),
            key=lambda hit: (-hit[1], hit[0]),
        )
        records = {r.id: r for r in self.catalog.get([i for i, _ in hits])}
        # Tiers from the same geometric check as find_duplicates: a score alone cannot
        # tell a flip or a mild crop from a recoloured copy.
        checks = self._check_against(x, {i: r for i, r in records.items() if i not in exact})
        result = []
        for i, s in hits:
            record = records.get(i)
            if record is None:
                continue
            tier = "exact" if i in exact else tier_of(None, record, s, t, checks.get(i))
            result.append(_member(record, s, tier))
        return result

    def _check_against(
        self, x: ImageLike, records: dict[int, ImageRecord]
    ) -> dict[int, Verification]:
        """The geometric check of ``x`` (the copy) against each indexed image in
        ``records`` (the original), as ``verify_pairs`` checks an indexed pair."""
        if not records:
            return {}
        cache = _MapCache(self.embedder, records)
        if isinstance(x, Image.Image):
            image = to_rgb(x)
        elif isinstance(x, np.ndarray):
            image = image_from_array(x)
        else:
            try:
                image = load_image(x, cache.zoomed_card.input_size).image
            except ImageRejected as err:
                raise GhostmatchError(f"cannot read {path_text(x)}: {err}") from err
        model = self.embedder.local_model
        pixels = [prepare(image, cache.card), prepare(ImageOps.mirror(image), cache.card)]
        base = local_features(model, to_batch(pixels)).astype(np.float16)
        zoomed = local_features(model, to_batch([prepare(image, cache.zoomed_card)]))
        mine = _as_float(ScaledMaps(base[0], base[1], zoomed[0].astype(np.float16)))
        enough = int(self._stage2_setting("min_inliers", DEFAULT_MIN_INLIERS))
        with ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 2))) as pool:
            cache.load(set(records), pool)
        checks = {}
        for i in records:
            maps = cache.get(i)
            if maps is not None:
                checks[i] = verify_scales(_as_float(maps), mine, enough)
        return checks

    def mark_not_duplicate(self, a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        """Record that two files are not duplicates; later searches ignore the pair."""
        pa, pb = Path(os.path.abspath(a)), Path(os.path.abspath(b))
        if pa == pb:
            raise GhostmatchError("--not-dup needs two different files")
        self.catalog.add_not_duplicate(pa, pb)

    # ------------------------------------------------------------------------ summary

    def info(self) -> dict[str, Any]:
        """Counts, folders, model card, index type and sizes on disk."""
        card = self.card
        index = self.vector_index
        file = self.path / INDEX_FILE
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


def _new_failure(failed: _Failed) -> NewFailure:
    entry = failed.entry
    return NewFailure(
        entry.path,
        entry.size,
        entry.mtime_ns,
        failed.reason,
        failed.detail,
        entry.ctime_ns,
        failed.max_megapixels,
    )


def _fails_again(failure: FailureRecord | None, entry: FileEntry, max_megapixels: float) -> bool:
    """Whether a file that failed before would fail the same way now, so is not read again.

    Only if its stat is as it was (a chmod changes ctime, an edit size or mtime) and, for
    one over the pixel limit, the limit is no higher than it was then.
    """
    if failure is None:
        return False
    stat = (entry.size, entry.mtime_ns, entry.ctime_ns)
    if (failure.size, failure.mtime_ns, failure.ctime_ns) != stat:
        return False
    if failure.reason == "too-large":
        return failure.max_megapixels is not None and max_megapixels <= failure.max_megapixels
    return True


def _decode_copy(result: _Embedded, card: ModelCard, max_megapixels: float) -> _Embedded | _Failed:
    """Decode a file whose content matched a moved image that another file already took."""
    try:
        decoded = load_image(result.entry.path, card.input_size, max_megapixels)
    except ImageRejected as err:
        return _Failed(result.entry, err.reason, err.detail, max_megapixels)
    pixels = prepare(decoded.image, card)
    return _Embedded(
        result.entry, result.digest, decoded.width, decoded.height, decoded.format, pixels
    )


def _ordered(
    pool: ThreadPoolExecutor,
    fn: Callable[[FileEntry], _Embedded | _Failed],
    items: Sequence[FileEntry],
    prefetch: int,
) -> Iterator[_Embedded | _Failed]:
    """``pool.map`` with at most ``prefetch`` items decoded ahead (bounded memory)."""
    queue: list[Future[_Embedded | _Failed]] = []
    position = 0
    try:
        while position < len(items) or queue:
            while position < len(items) and len(queue) < prefetch:
                queue.append(pool.submit(fn, items[position]))
                position += 1
            yield queue.pop(0).result()
    finally:
        for future in queue:
            future.cancel()


def _member(record: ImageRecord, score: float, tier: str) -> DuplicateMember:
    return DuplicateMember(
        path=record.path,
        score=score,
        tier=tier,
        width=record.width,
        height=record.height,
        bytes=record.size,
        mtime_ns=record.mtime_ns,
        content_hash=record.content_hash,
    )


# Images whose local maps verify_pairs embeds together, and the most it holds at once.
MAP_BATCH = 32
MAP_CACHE_IMAGES = 4096


def _locality_order(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs, each once, in an order that keeps the images they share close together:
    images numbered breadth-first over the pair graph (lowest degree first in each
    component, as in Cuthill-McKee), pairs sorted by the later of their two numbers."""
    neighbours: dict[int, set[int]] = {}
    for i, j in pairs:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    position: dict[int, int] = {}
    for root in sorted(neighbours, key=lambda i: (len(neighbours[i]), i)):
        if root in position:
            continue
        position[root] = len(position)
        queue = [root]
        while queue:
            frontier = []
            for i in queue:
                for j in sorted(
                    neighbours[i] - position.keys(), key=lambda j: (len(neighbours[j]), j)
                ):
                    position[j] = len(position)
                    frontier.append(j)
            queue = frontier
    unique = {(i, j) for i, j in pairs}
    return sorted(
        unique,
        key=lambda p: (max(position[p[0]], position[p[1]]), min(position[p[0]], position[p[1]])),
    )


def _as_float(maps: ScaledMaps) -> ScaledMaps:
    return ScaledMaps(*(m.astype(np.float32) for m in (maps.base, maps.mirrored, maps.zoomed)))


class _MapCache:
    """Local feature maps (fp16 ``ScaledMaps``) of recently used images, LRU-bounded."""

    def __init__(self, embedder: Embedder, records: dict[int, ImageRecord]) -> None:
        self.embedder = embedder
        self.records = records
        card = embedder.card
        self.card = card
        self.zoomed_card = card.with_changes(input_size=round(card.input_size * ZOOM / 16) * 16)
        # None marks an image that could not be decoded, so it is not tried again.
        self.maps: OrderedDict[int, ScaledMaps | None] = OrderedDict()

    def __contains__(self, i: int) -> bool:
        return i in self.maps

    def get(self, i: int) -> ScaledMaps | None:
        self.maps.move_to_end(i)
        return self.maps[i]

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        try:
            image = load_image(self.records[i].path, self.zoomed_card.input_size).image
        except ImageRejected:
            return None
        return (
            prepare(image, self.card),
            prepare(ImageOps.mirror(image), self.card),
            prepare(image, self.zoomed_card),
        )

    def load(self, ids: set[int], pool: ThreadPoolExecutor) -> None:
        """Make sure every image in ``ids`` has its maps (or a failure mark) cached."""
        for i in ids & self.maps.keys():
            self.maps.move_to_end(i)
        missing = sorted(ids - self.maps.keys())
        for start in range(0, len(missing), MAP_BATCH):
            chunk = missing[start : start + MAP_BATCH]
            decoded = list(pool.map(self._decode, chunk))
            ok = [(i, d) for i, d in zip(chunk, decoded, strict=True) if d is not None]
            self.maps.update((i, None) for i, d in zip(chunk, decoded, strict=True) if d is None)
            if ok:
                model, n = self.embedder.local_model, len(ok)
                base = local_features(
                    model, to_batch([d[0] for _, d in ok] + [d[1] for _, d in ok])
                ).astype(np.float16)
                zoomed = local_features(model, to_batch([d[2] for _, d in ok]))
                zoomed = zoomed.astype(np.float16)
                for k, (i, _) in enumerate(ok):
                    self.maps[i] = ScaledMaps(base[k], base[n + k], zoomed[k])
        while len(self.maps) > max(MAP_CACHE_IMAGES, len(ids)):
            self.maps.popitem(last=False)


def _check_k(k: int) -> int:
    """A number of results: a whole number of at least 1 (any size: callers cap it)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise GhostmatchError(f"the number of matches must be a whole number, not {k!r}")
    if k < 1:
        raise GhostmatchError(f"the number of matches must be at least 1, not {k}")
    return int(k)


def check_threshold(threshold: float, normalised: bool = False) -> float:
    """A duplicate threshold: a cosine in [-1, 1], or for background-normalised scores
    (a cosine less two offsets of at most 1 each) a number in [-3, 1]."""
    low, kind = (-3.0, "normalised score") if normalised else (-1.0, "cosine score")
    if not low <= threshold <= 1.0:
        raise GhostmatchError(f"--threshold is a {kind} in [{low:g}, 1], not {threshold}")
    return float(threshold)


def _read_generation(file: Path) -> tuple[int, str] | None:
    """(catalog generation, sha256) of what the index file was saved holding, or None if
    unknown. The checksum names the exact bytes saved, so an older copy put back in its
    place, or a file overwritten in part, is not taken for the one that was saved (while a
    copy of the whole folder stays valid)."""
    try:
        generation, checksum = file.with_name(file.name + ".generation").read_text().split()
        return int(generation), checksum
    except (OSError, ValueError):
        return None


def _write_generation(file: Path, generation: int, checksum: str) -> None:
    """Atomically record the catalog generation and checksum of the just-saved index file."""
    target = file.with_name(file.name + ".generation")
    # Named per process: a temp name shared by two writers was renamed away under one.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(f"{generation} {checksum}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pause_hook() -> tuple[int | None, Path | None]:
    """``GHOSTMATCH_PAUSE_AFTER_IMAGES=N``: after N images of a run the indexer creates
    ``GHOSTMATCH_PAUSE_MARKER`` and waits there for a signal, so a crash test's Ctrl-C or
    ``kill -9`` lands mid-run however fast or loaded the machine is."""
    try:
        after = int(os.environ.get("GHOSTMATCH_PAUSE_AFTER_IMAGES", ""))
    except ValueError:
        return None, None
    marker = os.environ.get("GHOSTMATCH_PAUSE_MARKER")
    return after, Path(marker) if marker else None


def _pause(marker: Path | None) -> None:
    if marker is not None:
        marker.touch()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.1)


def _only_learnt_p_differs(stored: ModelCard, loaded: ModelCard) -> bool:
    """True when ``loaded`` is ``stored``'s very file, whose card now reports GeM's learnt p
    instead of the starting value an older ghostmatch recorded: the vectors are the same,
    since p was always loaded from the file's bytes."""
    return (
        stored.weights_sha256 == loaded.weights_sha256
        and stored.gem_p != loaded.gem_p
        and stored.with_changes(gem_p=loaded.gem_p).fingerprint == loaded.fingerprint
    )


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _weights_spec(spec: str | None, card: ModelCard) -> str:
    """What to load next time: a name, or the absolute path of a weights file."""
    if spec is None or spec in ("imagenet", "bundled", "random"):
        return card.weights
    return os.path.abspath(spec)


def open(path: str | os.PathLike[str] | None = None, **options: Any) -> Library:
    """Open (or create) the index at ``path``; see :class:`Library` for the options."""
    return Library(path, **options)
