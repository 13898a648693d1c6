"""The FAISS file of an index folder, kept in step with the catalog.

The catalog is the truth; ``vectors.faiss`` is derived from it and rebuilt whenever the
two disagree. Every catalog change bumps a generation number, and the FAISS file is saved
stamped with the generation it holds, the sha256 of its bytes and the file's identity
(inode, size, mtime, ctime), so that an unchanged file need not be hashed at every open.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from sqlalchemy.exc import IntegrityError

from ghostmatch.errors import GhostmatchError
from ghostmatch.store.catalog import Catalog, CatalogTransaction
from ghostmatch.store.locking import WriterLock

if TYPE_CHECKING:
    from collections.abc import Callable

    from ghostmatch.indexes.vector_index import VectorIndex

INDEX_FILE = "vectors.faiss"
INDEX_TYPE_META = "index_type"
GENERATION_META = "generation"
# Vectors fetched from the catalog at once when the FAISS index catches up with it.
_SYNC_CHUNK = 50_000


@dataclass
class Change:
    """One catalog transaction of an index change and the ids it drops and adds, for the
    FAISS index to catch up with (the ids of updated vectors go in both)."""

    tx: CatalogTransaction
    removed: list[int] = field(default_factory=list)
    added: list[int] = field(default_factory=list)


class VectorStore:
    """The FAISS index of one index folder, checked against (and repaired from) its catalog.

    Changes go through :meth:`change`, under :meth:`writing`; the FAISS file catches up
    once, in :meth:`apply`, rather than at every commit.
    """

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        *,
        device: str = "auto",
        index_type: str | None = None,
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.file = path / INDEX_FILE
        self.catalog = catalog
        # ``device`` names where the model runs. FAISS follows it onto the GPU only when its
        # build can (faiss-cpu, the default install, cannot), so "cuda" asks for "auto" here.
        self._device = "auto" if device == "cuda" else device
        self._index_type = index_type
        # One writer at a time per index folder (``wait`` False: fail instead of waiting).
        self._lock = WriterLock(path)
        self._wait, self._on_wait = wait, on_wait
        self._index: VectorIndex | None = None
        # The catalog generation ``_index`` holds, and the changes committed through this
        # object since (ids to drop, ids whose catalog vectors to add) up to
        # ``_delta_generation``: the FAISS index catches up once, at the end of a write.
        self._index_generation: int | None = None
        self._delta_generation: int | None = None
        self._delta_removed: set[int] = set()
        self._delta_added: set[int] = set()

    # ------------------------------------------------------------------------ locking

    def close(self) -> None:
        while self._lock.held:
            self._lock.release()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's writer lock (re-entrant) for a change of catalog and FAISS file."""
        self._lock.acquire(self._wait, self._on_wait)
        try:
            yield
        finally:
            self._lock.release()

    # ------------------------------------------------------------------------ reading

    def generation(self) -> int:
        return int(self.catalog.get_meta(GENERATION_META) or 0)

    def saved_factory(self) -> str | None:
        """The FAISS factory of the saved index file when it holds the catalog's current
        vectors, read from its stamp without loading FAISS; None when unknown."""
        stamp = read_stamp(self.file)
        if stamp is None or stamp.generation != self.generation() or not self.file.exists():
            return None
        return stamp.factory

    @property
    def index(self) -> VectorIndex | None:
        """The FAISS index, loaded and checked against the catalog (repaired if needed)."""
        # Another process may have changed the index since it was loaded here.
        stale = self._index is not None and self._index_generation != self.generation()
        if stale and not self._lock.held:
            self.forget()
        if self._index is None:
            self._index = self._open()
        return self._index

    def _open(self) -> VectorIndex | None:
        """Load the FAISS file if it holds exactly the catalog's current vectors, else rebuild.

        The stamp catches a crash between the two writes, a stale copy put back or a file
        damaged in place, even for a changed file whose id (and so the id set) stayed the
        same. A rebuild is saved only when that is possible (writable folder, no other
        writer); a reader never fails for want of write access.
        """
        from ghostmatch.indexes.vector_index import VectorIndex

        # Read before the vectors: a concurrent commit can then only make what is built
        # newer than its stamp (a needless rebuild later), never older.
        generation = self.generation()
        stamp = read_stamp(self.file)
        if stamp is not None and stamp.generation == generation:
            known = None if stamp.file is None else (stamp.file, stamp.checksum)
            try:
                index: VectorIndex | None = VectorIndex.load(
                    self.file, device=self._device, known=known
                )
            except GhostmatchError:
                index = None
            if (
                index is not None
                and index.checksum == stamp.checksum
                and np.array_equal(index.ids(), self.catalog.ids())
            ):
                self._loaded(index, generation)
                if stamp.file != index.identity:
                    self._restamp(stamp, index, generation)
                return index
        stored_type = self.catalog.get_meta(INDEX_TYPE_META)
        index = self._build(self._index_type or stored_type)
        if index is None:
            self._loaded(None, generation)
            if self._lock.try_acquire():
                try:
                    if self.generation() == generation:
                        self.file.unlink(missing_ok=True)
                except OSError:
                    pass  # a read-only folder: the stale file is never trusted anyway
                finally:
                    self._lock.release()
            return None
        self._loaded(index, generation)
        if self._lock.try_acquire():
            try:
                if self._index_type is not None and stored_type != self._index_type:
                    # The type asked for when the index was made outlives a lost file.
                    self.catalog.set_meta(INDEX_TYPE_META, self._index_type)
                if self.generation() == generation and not _private_lists(index, self.file):
                    self._save(index, generation)
            except OSError:
                pass  # read-only or full: the rebuilt index serves from memory this time
            finally:
                self._lock.release()
        return index

    def _build(self, factory: str | None) -> VectorIndex | None:
        """Build from the catalog's vectors (None when it has none): as ``factory``, else
        in memory up to ``ondisk_limit()`` vectors and on disk, in shards, above."""
        from ghostmatch.indexes import ondisk
        from ghostmatch.indexes.vector_index import build_index, default_factory

        if factory is None and self.catalog.count() > ondisk.ondisk_limit():
            return self._build_ondisk()
        ids, vectors = self.catalog.vectors()
        if len(ids) == 0:
            return None
        chosen = factory or default_factory(len(ids), vectors.shape[1])
        return build_index(ids, vectors, chosen, device=self._device)

    def _build_ondisk(self) -> VectorIndex:
        """The sharded build, streamed from the catalog: its lists go beside the index
        file under the writer lock, else (another writer, a read-only folder) into a
        private folder deleted once loaded, the open memory map keeping them readable."""
        from ghostmatch.indexes import ondisk

        ids = self.catalog.ids()
        _, first = self.catalog.vectors(ids[:1].tolist())
        dim = first.shape[1]
        factory = ondisk.ondisk_factory(len(ids), dim)
        rng = np.random.default_rng(ondisk.SEED)
        wanted = min(len(ids), ondisk.training_size(factory, dim))
        _, training = self.catalog.vectors(np.sort(rng.choice(ids, wanted, replace=False)).tolist())

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(ids), _SYNC_CHUNK):
                yield self.catalog.vectors(ids[start : start + _SYNC_CHUNK].tolist())

        if self._lock.try_acquire():
            try:
                return ondisk.build_ondisk(training, chunks(), self.file, factory)
            except OSError:
                pass  # a read-only or full folder: build privately below
            finally:
                self._lock.release()
        with tempfile.TemporaryDirectory(prefix="ghostmatch-index-") as private:
            return ondisk.build_ondisk(training, chunks(), Path(private) / INDEX_FILE, factory)

    def _loaded(self, index: VectorIndex | None, generation: int) -> None:
        self._index = index
        self._index_generation = self._delta_generation = generation
        self._delta_removed, self._delta_added = set(), set()

    def forget(self) -> None:
        """Drop the in-memory index; the next use reloads it checked against the catalog."""
        self._index = None
        self._index_generation = self._delta_generation = None
        self._delta_removed, self._delta_added = set(), set()

    def _save(self, index: VectorIndex, generation: int) -> None:
        """Save ``index``, stamped with the catalog generation whose vectors it holds."""
        checksum = index.save(self.file)
        write_stamp(self.file, Stamp(generation, checksum, index.factory, index.identity))

    def _restamp(self, stamp: Stamp, index: VectorIndex, generation: int) -> None:
        """Record the identity of a file just found intact by its hash (a copied folder, a
        stamp written in the same clock tick as its file), so later opens can skip the
        hash; only where this process may write, and while the stamp is still current."""
        if not self._lock.try_acquire():
            return
        try:
            if self.generation() == generation and read_stamp(self.file) == stamp:
                write_stamp(self.file, stamp._replace(file=index.identity))
        except OSError:
            pass  # a read-only folder: every open hashes the file
        finally:
            self._lock.release()

    # ------------------------------------------------------------------------ changing

    def rebuild(self, index_type: str | None = None) -> str:
        """Rebuild the FAISS index from the stored vectors, optionally as another type."""
        with self.writing():
            generation = self.generation()
            index = self._build(index_type)
            if index is None:
                raise GhostmatchError("the index is empty; nothing to rebuild")
            self.catalog.set_meta(INDEX_TYPE_META, index_type)
            self._loaded(index, generation)
            self._save(index, generation)
        return index.factory

    def keep_asked_type(self) -> None:
        """Rebuild the index as the type it was opened with, when it is another type: an
        ``index_type`` asked of an existing index applies to it, once."""
        if self._index_type is None:
            return
        current = self.index
        if current is not None and current.factory != self._index_type:
            self.rebuild(self._index_type)

    @contextmanager
    def change(self) -> Iterator[Change]:
        """A catalog transaction that bumps the generation and notes which ids it drops
        and adds, for :meth:`apply`. A clash with a writer that ignores the lock (an older
        ghostmatch) becomes a GhostmatchError, not a database one."""
        self._load_before_change()
        try:
            with self.catalog.transaction() as tx:
                before = int(tx.get_meta(GENERATION_META) or 0)
                change = Change(tx)
                yield change
                tx.set_meta(GENERATION_META, before + 1)
        except IntegrityError as error:
            raise GhostmatchError(
                f"another program changed the index {self.path} at the same time "
                f"({error.orig}); run the command again"
            ) from error
        self._track(before, change.removed, change.added)

    def delete(self, ids: Sequence[int]) -> None:
        """Delete catalog rows; the FAISS index catches up in :meth:`apply`."""
        with self.change() as change:
            change.tx.delete_images(ids)
            change.removed.extend(ids)

    def _load_before_change(self) -> None:
        """Load the index (checked against the catalog) before a commit changes the catalog,
        unless what is held is current: the commits' changes are then applied to it, not
        rebuilt. Another process may have written since this object last looked.

        A file behind the catalog (another folder's writer of a shared catalog committed
        since it was saved) is not rebuilt here, before every commit of a run whose
        commits alternate with that writer's, but once, in :meth:`apply`."""
        if self._delta_generation is not None and self._delta_generation == self.generation():
            return
        self.forget()
        stamp = read_stamp(self.file)
        if stamp is not None and stamp.generation == self.generation():
            self._index = self._open()

    def _track(self, before: int, removed: Iterable[int], added: Iterable[int]) -> None:
        """Note a committed catalog change (generation ``before`` to ``before + 1``)."""
        if self._delta_generation is None:
            return  # not loaded: the next use loads it checked against the catalog
        if self._delta_generation != before:
            # Someone else committed in between: what the changes build on is unknown.
            self.forget()
            return
        gone = set(removed)
        self._delta_removed |= gone
        self._delta_added = (self._delta_added - gone) | set(added)
        self._delta_generation = before + 1

    def apply(self) -> None:
        """Bring the FAISS index up to the catalog changes committed here, then save it
        once, stamped with the generation it now holds. Call with the writer lock."""
        target = self._delta_generation
        index = self._index
        if target is not None and target == self._index_generation:
            return
        if index is None or target is None or target != self.generation():
            # Empty before, not loaded, or the catalog moved on without us: load it checked
            # (built from the catalog and saved when the file is behind).
            self.forget()
            self._index = self._open()
            return
        if _is_ondisk(index) or self._outgrown():
            # Lists on disk are shared, through memory maps, with every reader of the
            # folder: changing them in place could show a reader half a change. Rebuild;
            # likewise an index in memory that the changes take past the on-disk limit.
            self.forget()
            self._index = self._open()
            return
        # An added id may be there already: inserting a path that another writer of a
        # shared catalog cataloged first keeps that row's id. Absent ids cost nothing.
        removed = sorted(self._delta_removed | self._delta_added)
        added = sorted(self._delta_added)
        self._index = None  # half-changed if interrupted here: reload it next time
        if removed:
            index.remove(np.asarray(removed, dtype=np.int64))
        for start in range(0, len(added), _SYNC_CHUNK):
            ids, vectors = self.catalog.vectors(added[start : start + _SYNC_CHUNK])
            if len(ids):
                index.add(ids, vectors)
        if index.ntotal == 0:
            self.file.unlink(missing_ok=True)
            self._loaded(None, target)
            return
        self._save(index, target)
        self._loaded(index, target)

    def _outgrown(self) -> bool:
        """Whether the catalog has grown past the size at which its index is built on disk
        (unless a type was asked for)."""
        from ghostmatch.indexes.ondisk import ondisk_limit

        asked = self._index_type or self.catalog.get_meta(INDEX_TYPE_META)
        return asked is None and self.catalog.count() > ondisk_limit()


def _is_ondisk(index: VectorIndex) -> bool:
    from ghostmatch.indexes.ondisk import is_ondisk

    return is_ondisk(index)


def _private_lists(index: VectorIndex, file: Path) -> bool:
    """Whether ``index`` maps lists built outside the folder (deleted once loaded), which
    an index file saved there must not name."""
    from ghostmatch.indexes.ondisk import lists_file

    lists = lists_file(index)
    return lists is not None and lists.parent.resolve() != file.parent.resolve()


class Stamp(NamedTuple):
    """What an index file was saved holding: the catalog generation of its vectors, the
    sha256 of its bytes, its FAISS factory (None in stamps written before it was kept) and
    the file's (inode, size, mtime, ctime) when saved, None where that cannot vouch for it."""

    generation: int
    checksum: str
    factory: str | None = None
    file: tuple[int, int, int, int] | None = None


_FILE_FIELD = "file="


def read_stamp(file: Path) -> Stamp | None:
    """The stamp of an index file, or None if unknown. The checksum names the exact bytes
    saved, so an older copy put back in its place, or a file overwritten in part, is not
    taken for the one that was saved (while a copy of the whole folder stays valid).

    A file still in the state the stamp recorded (same inode, size, mtime and ctime) has
    not been written since; but file times are kept to a clock tick of a few milliseconds,
    so a write in the tick of the recorded ctime would leave it as it was. The recorded
    state counts only when the stamp itself was written in a later tick."""
    try:
        with file.with_name(file.name + ".generation").open() as f:
            written = os.fstat(f.fileno()).st_mtime_ns
            fields = f.read().split()
        identity = None
        if fields and fields[-1].startswith(_FILE_FIELD):
            parts = tuple(int(n) for n in fields.pop()[len(_FILE_FIELD) :].split(":"))
            if len(parts) == 4 and parts[3] < written:
                identity = (parts[0], parts[1], parts[2], parts[3])
        if len(fields) not in (2, 3):
            return None
        factory = fields[2] if len(fields) == 3 else None
        return Stamp(int(fields[0]), fields[1], factory, identity)
    except (OSError, ValueError):
        return None


def write_stamp(file: Path, stamp: Stamp) -> None:
    """Atomically record the stamp of the just-saved index file."""
    target = file.with_name(file.name + ".generation")
    # Named per process: a temp name shared by two writers was renamed away under one.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            # Fields split on white space; faiss's factory syntax has none, and a factory
            # that did would be left out (info then loads the index to tell its type).
            factory = stamp.factory if stamp.factory and len(stamp.factory.split()) == 1 else None
            fields = [str(stamp.generation), stamp.checksum, *([factory] if factory else [])]
            if stamp.file is not None:
                fields.append(_FILE_FIELD + ":".join(str(n) for n in stamp.file))
            f.write(" ".join(fields))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
