"""The indexing pipeline: scan folders, decode and embed new or changed images on worker
threads, and commit the catalog in checkpoints, so a crash or Ctrl-C keeps finished work."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Container, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, load_image
from ghostmatch.ingest.scan import FileEntry, content_hash, is_under, scan
from ghostmatch.model.binding import ModelBinding
from ghostmatch.model.card import ModelCard
from ghostmatch.store.catalog import (
    Catalog,
    FailureRecord,
    ImageRecord,
    NewFailure,
    NewImage,
    TurnScreen,
)
from ghostmatch.store.vectors import VectorStore

if TYPE_CHECKING:
    from ghostmatch.model.embedder import Embedder

Progress = Callable[[str, int, int | None], None]


def _env_number(name: str, default: float, floor: float) -> float:
    """The number in environment variable ``name`` (at least ``floor``), else ``default``."""
    try:
        return max(floor, float(os.environ.get(name, default)))
    except ValueError:
        return default


# Images per commit while indexing: a crash loses at most this much work. The variable lets
# a crash test land after a commit.
CHECKPOINT_IMAGES = int(_env_number("GHOSTMATCH_CHECKPOINT_IMAGES", 1000, 1))
# Seconds of work between commits, so that ``kill -9`` loses about this much however slow
# each image is.
CHECKPOINT_SECONDS = _env_number("GHOSTMATCH_CHECKPOINT_SECONDS", 10.0, 0.0)


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
    vector: np.ndarray | None = None  # embedded elsewhere (a RemoteEmbedding): no pixels
    regions: np.ndarray | None = None  # the regional descriptors made there with ``vector``
    screen: TurnScreen | None = None  # what the turned-copy screen needs, from the same decode


@dataclass(frozen=True)
class _Failed:
    entry: FileEntry
    reason: str
    detail: str
    max_megapixels: float | None = None  # the pixel limit of a rejected image


class RemoteEmbedding(Protocol):
    """Decoding and embedding somewhere else than this process's threads (Ray actors:
    ``ghostmatch.ingest.ray_embed``); the indexer still scans, checkpoints and commits."""

    def results(
        self,
        todo: Sequence[FileEntry],
        embedder: Embedder,
        *,
        batch_size: int,
        max_megapixels: float,
        movable: Collection[str],
        changed: Collection[Path],
    ) -> Generator[_Embedded | _Failed, None, None]:
        """One :func:`read_entry` result per file of ``todo``, in order, each image with
        its ``vector`` and ``regions`` (``Embedder.embed_with_regions``) from ``embedder``'s
        model, runtime and device. ``movable``: content hashes of vanished images (a file
        with one is a move, unless it is in ``changed``)."""
        ...


class Indexer:
    """Brings the catalog (and through :class:`VectorStore` the FAISS index) up to date
    with the images under some folders. The caller holds the writer lock."""

    def __init__(self, catalog: Catalog, vectors: VectorStore, model: ModelBinding) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.model = model
        self._run_started = time.monotonic()

    def run(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int = 32,
        workers: int | None = None,
        max_megapixels: float = 100.0,
        prune: bool = True,
        progress: Progress | None = None,
        remote: RemoteEmbedding | None = None,
    ) -> IndexReport:
        """Index the images under ``roots``; see ``Library.index``. ``remote``: decode and
        embed there instead of on this process's threads."""
        folders = [Path(os.path.abspath(os.path.expanduser(r))) for r in roots]
        for folder in folders:
            if not folder.exists():
                raise GhostmatchError(f"{os.fsdecode(folder)} does not exist")
        report = IndexReport()
        start = self._run_started = time.monotonic()
        start_generation = self.vectors.generation()
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
        # Images indexed before regional descriptors existed get them now, read again like
        # changed files (locally or on Ray workers: both make them).
        lacking = set(self.catalog.ids_without_regions().tolist())
        # Those indexed before the turned-copy screen's data existed only need a decode.
        unscreened = set(self.catalog.ids_without_turn_screens().tolist()) - lacking
        for entry in entries:
            stat = known.get(entry.path)
            if stat is not None and stat[1:] == (entry.size, entry.mtime_ns):
                if stat[0] not in lacking:
                    report.unchanged += 1
                    continue
                changed_ids[entry.path] = stat[0]
                todo.append(entry)
            elif stat is None and _fails_again(bad.get(entry.path), entry, max_megapixels):
                report.known_bad += 1
            else:
                if stat is not None:
                    changed_ids[entry.path] = stat[0]
                todo.append(entry)
        gone = [
            p
            for p in known
            if p not in seen and any(is_under(p, f) for f in folders) and not p.exists()
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
                remote,
            )
            self._add_turn_screens(
                unscreened - set(changed_ids.values()), workers, max_megapixels, progress
            )
        except KeyboardInterrupt:
            report.interrupted = True
        if prune and not report.interrupted:
            doomed = [r for p, r in gone_records.items() if p not in moved_from]
            if doomed:
                self.vectors.delete([r.id for r in doomed])
                report.removed = len(doomed)
        if self.vectors.generation() != start_generation:
            self.vectors.apply()  # the FAISS file catches up once, after all of the run's commits
        report.seconds = time.monotonic() - start
        return report

    def _add_turn_screens(
        self,
        ids: Collection[int],
        workers: int | None,
        max_megapixels: float,
        progress: Progress | None,
    ) -> None:
        """Give images indexed before the turned-copy screen's data existed theirs, from one
        decode each (no model pass), so that finding turned copies need not decode them.
        A file that cannot be read any more is left as it is."""
        if not ids:
            return
        from ghostmatch.dupes.turns import SCREEN_SIDE, turn_screen

        card = self.model.card
        side = card.input_size if card is not None else SCREEN_SIDE
        records = self.catalog.get(sorted(ids))

        def work(record: ImageRecord) -> tuple[int, TurnScreen] | None:
            try:
                decoded = load_image(record.path, side, max_megapixels)
            except ImageRejected:
                return None
            return record.id, turn_screen(decoded.image)

        threads = workers or min(8, max(2, os.cpu_count() or 2))
        done = 0
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(records), CHECKPOINT_IMAGES):
                chunk = records[start : start + CHECKPOINT_IMAGES]
                found = [r for r in pool.map(work, chunk) if r is not None]
                with self.catalog.transaction() as tx:
                    tx.set_turn_screens(found)
                done += len(chunk)
                if progress:
                    progress("screened", done, len(records))

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
        remote: RemoteEmbedding | None = None,
    ) -> None:
        if not todo:
            return
        embedder = self.model.embedder
        card = embedder.card
        claimed: Counter[str] = Counter()  # vanished images taken over, per content hash

        def work(entry: FileEntry) -> _Embedded | _Failed:
            return read_entry(
                entry, card, max_megapixels, () if entry.path in changed_ids else movable
            )

        def produce(stack: ExitStack) -> Iterator[_Embedded | _Failed]:
            if remote is not None:
                results = remote.results(
                    todo,
                    embedder,
                    batch_size=batch_size,
                    max_megapixels=max_megapixels,
                    movable=movable.keys(),
                    changed=changed_ids.keys(),
                )
                # Closed on Ctrl-C or an error too, which stops the remote workers.
                return stack.enter_context(closing(results))
            pool = stack.enter_context(ThreadPoolExecutor(threads))
            return _ordered(pool, work, todo, prefetch=max(64, 4 * batch_size))

        pause_after, pause_marker = _pause_hook()
        threads = workers or min(8, max(2, os.cpu_count() or 2))
        pending: list[_Embedded | _Failed] = []
        waiting: list[_Embedded] = []  # decoded, not yet through the model
        vectors: dict[int, np.ndarray] = {}
        regions: dict[int, np.ndarray] = {}  # regional descriptors, made in the same pass
        maps: dict[int, np.ndarray] = {}  # local maps, made in the same pass where they are
        made_by = embedder.maps_made_by

        def run_model() -> None:
            out, parts, local = embedder.embed_for_index(
                [r.pixels for r in waiting if r.pixels is not None]
            )
            vectors.update((id(r), v) for r, v in zip(waiting, out, strict=True))
            regions.update((id(r), v) for r, v in zip(waiting, parts, strict=True))
            if local is not None:
                maps.update((id(r), m) for r, m in zip(waiting, local, strict=True))
            report.embedded += len(waiting)
            waiting.clear()

        done = 0
        # Counted from the run's start: the scan and the model's loading are work too.
        last_commit = self._run_started
        try:
            with ExitStack() as stack:
                for item in produce(stack):
                    result = item
                    if isinstance(result, _Embedded) and result.vector is not None:
                        vectors[id(result)] = result.vector
                        if result.regions is not None:
                            regions[id(result)] = result.regions
                        report.embedded += 1
                    elif isinstance(result, _Embedded) and result.pixels is None:
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
                        batch, batch_vectors, batch_regions = pending, vectors, regions
                        batch_maps = maps
                        pending, vectors, regions, maps = [], {}, {}, {}
                        self._commit(
                            batch,
                            batch_vectors,
                            changed_ids,
                            moved_from,
                            report,
                            batch_regions,
                            (made_by, batch_maps),
                        )
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
            self._commit(
                finished, vectors, changed_ids, moved_from, report, regions, (made_by, maps)
            )
            raise
        self._commit(pending, vectors, changed_ids, moved_from, report, regions, (made_by, maps))

    def _commit(
        self,
        results: Sequence[_Embedded | _Failed],
        vectors: dict[int, np.ndarray],
        changed_ids: dict[Path, int],
        moved_from: set[Path],
        report: IndexReport,
        regions: dict[int, np.ndarray] | None = None,
        maps: tuple[str | None, dict[int, np.ndarray]] = (None, {}),
    ) -> None:
        """Write one catalog transaction for ``results`` (with their regional descriptors
        where ``regions`` has them, and their local maps where ``maps``, (what made them,
        the maps), has them); the FAISS index catches up later (:meth:`VectorStore.apply`),
        from the changes noted here."""
        regions = regions or {}
        made_by, local = maps
        if not results:
            return
        new_rows: list[NewImage] = []
        new_regions: list[np.ndarray | None] = []
        updated_regions: list[tuple[int, np.ndarray]] = []
        new_maps: list[np.ndarray | None] = []
        updated_maps: list[tuple[int, np.ndarray]] = []
        new_screens: list[TurnScreen | None] = []
        updated_screens: list[tuple[int, TurnScreen]] = []
        failures: list[NewFailure] = []
        ok_paths: list[Path] = []
        with self.vectors.change() as change:
            tx = change.tx
            for r in results:
                if isinstance(r, _Failed):
                    failures.append(_new_failure(r))
                    report.failed[r.reason] += 1
                    report.failures.append((r.entry.path, r.reason, r.detail))
                    if r.entry.path in changed_ids:  # it was an image; now it is broken
                        change.removed.append(changed_ids[r.entry.path])
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
                    if id(r) in regions:
                        updated_regions.append((image_id, regions[id(r)]))
                    if id(r) in local:
                        updated_maps.append((image_id, local[id(r)]))
                    if r.screen is not None:
                        updated_screens.append((image_id, r.screen))
                    change.removed.append(image_id)
                    change.added.append(image_id)
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
                    new_regions.append(regions.get(id(r)))
                    new_maps.append(local.get(id(r)))
                    new_screens.append(r.screen)
            added = tx.insert_images(new_rows)
            change.added.extend(added)
            tx.set_regions(
                [
                    *updated_regions,
                    *((i, p) for i, p in zip(added, new_regions, strict=True) if p is not None),
                ]
            )
            if made_by is not None:
                tx.set_local_maps(
                    (i, made_by, m)
                    for i, m in [
                        *updated_maps,
                        *((i, m) for i, m in zip(added, new_maps, strict=True) if m is not None),
                    ]
                )
            tx.set_turn_screens(
                [
                    *updated_screens,
                    *((i, t) for i, t in zip(added, new_screens, strict=True) if t is not None),
                ]
            )
            report.added += len(new_rows)
            tx.record_failures(failures)
            tx.clear_failures(ok_paths)


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


def read_entry(
    entry: FileEntry, card: ModelCard, max_megapixels: float, movable: Container[str]
) -> _Embedded | _Failed:
    """Hash and decode one file for the model with ``card``, as a worker does: a failure, a
    move (its content hash is in ``movable``: no pixels, the catalog has its vector and
    dimensions) or an image's pixels to embed, with what the turned-copy screen needs of
    it (``ghostmatch.dupes.turns.turn_screen``), made here where it is decoded anyway."""
    from ghostmatch.dupes.turns import turn_screen
    from ghostmatch.model.embedder import prepare

    try:
        digest = content_hash(entry.path)
    except OSError as err:
        return _Failed(entry, "unreadable", str(err))
    if digest in movable:
        return _Embedded(entry, digest, 0, 0, "", None)
    try:
        decoded = load_image(entry.path, card.input_size, max_megapixels)
    except ImageRejected as err:
        return _Failed(entry, err.reason, err.detail, max_megapixels)
    pixels = prepare(decoded.image, card)
    return _Embedded(
        entry,
        digest,
        decoded.width,
        decoded.height,
        decoded.format,
        pixels,
        screen=turn_screen(decoded.image),
    )


def _decode_copy(result: _Embedded, card: ModelCard, max_megapixels: float) -> _Embedded | _Failed:
    """Decode a file whose content matched a moved image that another file already took."""
    from ghostmatch.dupes.turns import turn_screen
    from ghostmatch.model.embedder import prepare

    try:
        decoded = load_image(result.entry.path, card.input_size, max_megapixels)
    except ImageRejected as err:
        return _Failed(result.entry, err.reason, err.detail, max_megapixels)
    pixels = prepare(decoded.image, card)
    return _Embedded(
        result.entry,
        result.digest,
        decoded.width,
        decoded.height,
        decoded.format,
        pixels,
        screen=turn_screen(decoded.image),
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
