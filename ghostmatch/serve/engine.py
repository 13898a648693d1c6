"""The query engine behind ``ghostmatch serve``: one loaded model and index answering many
requests, picking up a changed index, and running index jobs, actions and undo.

Everything a request names is checked here: files only by catalog id or exact catalog
path, journals only by the names this engine gave them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import ghostmatch
from ghostmatch.dupes.actions import apply_actions, plan_actions
from ghostmatch.dupes.actions import undo as undo_journal
from ghostmatch.dupes.groups import DuplicateGroup, DuplicateMember
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, load_image, sniff_image
from ghostmatch.library import GENERATION_META, Library, Match
from ghostmatch.model.embedder import prepare
from ghostmatch.retrieval.pipeline import looks_again, query_image, refined
from ghostmatch.retrieval.refine import QUICK, Refinements
from ghostmatch.serve.batching import MicroBatcher
from ghostmatch.store.catalog import ImageRecord

JOURNAL_FOLDER = "serve-journals"
_JOURNAL_NAME = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{12}\.jsonl$")
_MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
THUMBNAIL_SIZES = (64, 128, 256, 512)
_THUMBNAILS_KEPT = 512


class RequestRefused(GhostmatchError):
    """A request the server will not carry out; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class ServeSettings:
    """How ``ghostmatch serve`` runs; the CLI's options."""

    index: Path
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_upload_bytes: int = 50_000_000
    max_megapixels: float = 100.0
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    # Requests being answered at once (uploads decoding or waiting for the model); one more
    # gets 503 with Retry-After instead of a queue that grows without bound.
    queue: int = 64
    move_to: Path | None = None
    runtime: str = "auto"
    device: str = "auto"
    catalog: str | None = None  # a catalog database's URL (see ``ghostmatch.open``)


@dataclass
class Job:
    """An index run in the background; ``state`` is running, done, failed or interrupted."""

    id: str
    state: str = "running"
    done: int = 0
    total: int | None = None
    found: int | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "found": self.found,
            "report": self.report,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
        }


@dataclass(frozen=True)
class _Upload:
    """One upload for the batcher: its prepared pixels and how many neighbours to find in
    the FAISS index (0: none, the caller searches a folder itself)."""

    pixels: np.ndarray
    k: int


@dataclass(frozen=True)
class _Found:
    """An upload's descriptor and its neighbours (id, cosine), best first, in ``lib``."""

    vector: np.ndarray
    lib: Library
    pairs: list[tuple[int, float]]
    records: dict[int, ImageRecord]


@dataclass(frozen=True)
class _Listing:
    """Duplicate groups found once for one catalog generation and settings."""

    threshold: float
    groups: list[DuplicateGroup]
    ids: dict[Path, int]


class QueryEngine:
    """The open index, its model and the micro-batcher; safe to call from many threads."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        lib = ghostmatch.open(
            settings.index,
            create=False,
            runtime=settings.runtime,
            device=settings.device,
            catalog=settings.catalog,
        )
        try:
            if lib.card is None:
                raise GhostmatchError(
                    f"index {lib.path} has no images yet; run: ghostmatch index DIR "
                    f"--index {lib.path}"
                )
            self.embedder = lib.embedder  # the model, loaded once for the server's life
            _ = lib.vector_index
        except BaseException:
            lib.close()
            raise
        self.path = lib.path
        self.card = self.embedder.card
        self._lib = lib
        self._generation = lib.catalog.get_meta(GENERATION_META)
        self._reload_lock = threading.Lock()
        # Called on the batcher's thread before each model call with the batch size: a
        # deterministic hook for tests (hold the model to fill the queue).
        self.before_embed: Callable[[int], None] | None = None
        self.batcher: MicroBatcher[_Upload, _Found] = MicroBatcher(
            self._run_batch, settings.max_batch, settings.batch_wait_ms / 1000.0
        )
        self._slots = threading.BoundedSemaphore(settings.queue)
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._uploads = Path(tempfile.mkdtemp(prefix="ghostmatch-serve-"))
        self._listings: dict[tuple[Any, float | None, bool, bool], _Listing] = {}
        self._listing_lock = threading.Lock()
        self._action_lock = threading.Lock()
        self._thumbnails: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        self._thumbnail_lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._job_lock = threading.Lock()
        self._job_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Called on the job's thread after each indexed file (tests hold a job here).
        self.job_progress: Callable[[Job], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop a running index job (its finished work is committed), the batcher, the
        catalog; remove the uploads folder."""
        self._stopping.set()
        thread = self._job_thread
        if thread is not None:
            thread.join()
        self.batcher.close()
        self._lib.close()
        shutil.rmtree(self._uploads, ignore_errors=True)

    def library(self) -> Library:
        """The open index, reopened when another process (or a job) changed it: every
        catalog commit bumps its generation, so a changed value means a new index."""
        current = self._lib
        generation = current.catalog.get_meta(GENERATION_META)
        if generation == self._generation:
            return current
        with self._reload_lock:
            if self._lib is current:
                fresh = ghostmatch.open(
                    self.path,
                    create=False,
                    runtime=self.settings.runtime,
                    device=self.settings.device,
                    catalog=self.settings.catalog,
                )
                _ = fresh.vector_index  # loaded here, once, not by racing requests
                self._lib, self._generation = fresh, fresh.catalog.get_meta(GENERATION_META)
                # Requests still using the old one keep working: closing only drops its
                # idle connections.
                current.close()
            return self._lib

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """A slot for one heavy request, or 503 when ``settings.queue`` are in progress."""
        if not self._slots.acquire(blocking=False):
            raise RequestRefused(
                503,
                f"busy: {self.settings.queue} requests in progress; retry shortly",
                {"Retry-After": "1"},
            )
        with self._busy_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1
            self._slots.release()

    @property
    def in_progress(self) -> int:
        """Heavy requests being answered now."""
        return self._busy

    def _run_batch(self, items: Sequence[_Upload]) -> list[_Found]:
        """Descriptors of a batch of uploads in one model call, and their neighbours in one
        FAISS search (which reads the stored vectors once for the whole batch)."""
        hook = self.before_embed
        if hook is not None:
            hook(len(items))
        vectors = self.embedder.embed_arrays([item.pixels for item in items])
        lib = self.library()
        index = lib.vector_index
        want = max(item.k for item in items)
        if index is None or want == 0:
            return [_Found(v, lib, [], {}) for v in vectors]
        # FAISS sets aside room for k results per query: no more than it holds.
        top, ids = index.search(vectors, min(want, index.ntotal))
        hits = [
            [(int(i), float(t)) for i, t in zip(ids[n], top[n], strict=True) if i >= 0][: item.k]
            for n, item in enumerate(items)
        ]
        # The records of the whole batch in one catalog read.
        records = {r.id: r for r in lib.catalog.get(sorted({i for h in hits for i, _ in h}))}
        return [
            _Found(vector, lib, pairs, {i: records[i] for i, _ in pairs if i in records})
            for vector, pairs in zip(vectors, hits, strict=True)
        ]

    # ------------------------------------------------------------------ summary

    def health(self) -> dict[str, Any]:
        lib = self.library()
        return {
            "status": "ok",
            "index": os.fsdecode(lib.path),
            "images": lib.catalog.count(),
            "generation": self._generation,
        }

    def info(self) -> dict[str, Any]:
        return self.library().info()

    # ------------------------------------------------------------------ queries

    def query_upload(
        self,
        data: bytes,
        name: str,
        k: int,
        min_score: float | None,
        under: str | None,
        refine: Refinements = QUICK,
    ) -> dict[str, Any]:
        """``query --json`` for one uploaded image: decoded as ``index`` decodes a file,
        its descriptor computed in a shared batch, refined as ``query`` refines."""
        lib = self.library()
        folder = self._under(lib, under)
        image = None
        with self.batcher.expecting():
            with self._upload_file(data) as file:
                pixels = prepare(self._decode(file, self.card.input_size).image, self.card)
                if looks_again(refine):  # decoded again as ``query`` decodes it for these
                    image = query_image(file, lib.searcher)
            # A query limited to a folder scans that folder's vectors itself; a refined
            # one ranks a shortlist of the plain search anew.
            want = k if refine.plain else max(k, refine.shortlist)
            future = self.batcher.submit(_Upload(pixels, 0 if folder else want))
        found = future.result()
        matches = self._matches(found, k, min_score, folder, refine, image)
        return {"query": name, "matches": [_match(m) for m in matches]}

    def query_path(
        self,
        path: str,
        k: int,
        min_score: float | None,
        under: str | None,
        refine: Refinements = QUICK,
    ) -> dict[str, Any]:
        """``query --json`` for an indexed file, named by its exact catalog path."""
        lib = self.library()
        folder = self._under(lib, under)
        record = self._catalog_path(lib, path)
        matches = lib.query(record.path, k, min_score=min_score, under=folder, refine=refine)
        return {"query": os.fsdecode(record.path), "matches": [_match(m) for m in matches]}

    def duplicates_of_upload(self, data: bytes, name: str) -> dict[str, Any]:
        """``dupes --of --json`` for one uploaded image."""
        lib = self.library()
        with self._upload_file(data) as file:
            self._decode(file, self.card.input_size)  # the size and pixel limits first
            found = lib.duplicates_of(file)
        ids = self._ids_of(lib, [m.path for m in found])
        return {
            "query": name,
            "duplicates": [{**m.to_dict(), "id": ids.get(m.path)} for m in found],
        }

    def _matches(
        self,
        found: _Found,
        k: int,
        min_score: float | None,
        under: Path | None,
        refine: Refinements,
        image: Image.Image | None,
    ) -> list[Match]:
        """``Library.query``'s answer for an upload's descriptor (an upload is never an
        indexed file, so nothing is left out), ``image`` its pixels where ``refine`` looks
        at them again."""
        lib, vector, pairs, records = found.lib, found.vector, found.pairs, found.records
        want = k if refine.plain else max(k, refine.shortlist)
        if under is not None:
            ids, vectors = lib.catalog.vectors([i for i, _ in lib.catalog.paths_under(under)])
            scores = vectors @ vector if len(ids) else np.zeros(0, np.float32)
            order = np.argsort(-scores, kind="stable")[:want]
            pairs = [(int(ids[i]), float(scores[i])) for i in order]
        inliers: dict[int, int] = {}
        if not refine.plain and pairs:
            # The pixels are read only where ``refine`` looks at them again.
            pixels = image if image is not None else vector
            pairs, inliers = refined(lib.searcher, pixels, vector, pairs, refine)
        pairs = pairs[:k]
        if min_score is not None:
            pairs = [(i, s) for i, s in pairs if s >= min_score]
        if any(i not in records for i, _ in pairs):
            records = {r.id: r for r in lib.catalog.get([i for i, _ in pairs])}
        kept = [(i, s) for i, s in pairs if i in records]
        return [
            Match(rank, r.path, s, r.width, r.height, r.size, i, inliers=inliers.get(i))
            for rank, (i, s) in enumerate(kept, start=1)
            for r in (records[i],)
        ]

    @contextmanager
    def _upload_file(self, data: bytes) -> Iterator[Path]:
        """The upload as a file of our own naming (the client's file name is only text)."""
        file = self._uploads / uuid.uuid4().hex
        file.write_bytes(data)
        try:
            yield file
        finally:
            file.unlink(missing_ok=True)

    def _decode(self, file: Path, min_side: int) -> Any:
        if file.stat().st_size == 0:
            raise RequestRefused(422, "the upload is empty: send the image in the field 'image'")
        try:
            return load_image(file, min_side, self.settings.max_megapixels)
        except ImageRejected as error:
            status = 413 if error.reason in ("too-large", "decompression-bomb") else 422
            raise RequestRefused(status, f"the upload is not a usable image: {error}") from error

    # ------------------------------------------------------------------ path checks

    def _catalog_path(self, lib: Library, text: object) -> ImageRecord:
        """The record of an indexed file named by its exact catalog path; anything else
        (relative, ``..``, not indexed, a symlink, gone) is refused."""
        if not isinstance(text, str) or not text:
            raise RequestRefused(422, 'send {"path": "/the/indexed/file.jpg"} as JSON')
        path = _clean_absolute(text, "path")
        record = lib.catalog.records_by_path([path]).get(path)
        if record is None:
            raise RequestRefused(404, f"{text!r} is not an indexed file")
        self._servable(lib, record)
        return record

    def _under(self, lib: Library, under: str | None) -> Path | None:
        """A folder filter: a clean absolute path inside one of the indexed folders."""
        if under is None or under == "":
            return None
        folder = _clean_absolute(under, "under")
        if not any(folder == root or root in folder.parents for root in lib.catalog.roots()):
            raise RequestRefused(400, f"under={under!r} is not inside an indexed folder")
        return folder

    def _servable(self, lib: Library, record: ImageRecord) -> Path:
        """The record's file, if it is a regular file (not a symlink) that really lies in
        an indexed folder; 404 otherwise."""
        path = record.path
        try:
            st = os.lstat(path)
        except OSError:
            raise RequestRefused(404, f"image {record.id} is no longer on disk") from None
        if stat.S_ISLNK(st.st_mode):
            raise RequestRefused(403, f"image {record.id} is a symlink; symlinks are not served")
        if not stat.S_ISREG(st.st_mode):
            raise RequestRefused(404, f"image {record.id} is not a regular file")
        real = Path(os.path.realpath(path))
        roots = [Path(os.path.realpath(root)) for root in lib.catalog.roots()]
        if not any(real == root or root in real.parents for root in roots):
            raise RequestRefused(403, f"image {record.id} lies outside the indexed folders")
        return path

    def _record(self, lib: Library, image_id: int) -> ImageRecord:
        found = lib.catalog.get([image_id])
        if not found:
            raise RequestRefused(404, f"no image {image_id} in the index")
        return found[0]

    # ------------------------------------------------------------------ images

    def thumbnail(self, image_id: int, size: int) -> bytes:
        """A JPEG at most ``size`` pixels on its longer side."""
        if size not in THUMBNAIL_SIZES:
            raise RequestRefused(422, f"size must be one of {THUMBNAIL_SIZES}")
        lib = self.library()
        record = self._record(lib, image_id)
        path = self._servable(lib, record)
        key = (image_id, size, record.size, record.mtime_ns)
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        try:
            image = load_image(path, size, self.settings.max_megapixels).image
        except ImageRejected as error:
            raise RequestRefused(404, f"image {image_id} cannot be read now: {error}") from error
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=82)
        data = buffer.getvalue()
        with self._thumbnail_lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > _THUMBNAILS_KEPT:
                self._thumbnails.popitem(last=False)
        return data

    def open_file(self, image_id: int) -> tuple[int, str, str]:
        """(open descriptor, media type, file name) of an indexed file, opened without
        following a symlink put in its place after the check."""
        lib = self.library()
        record = self._record(lib, image_id)
        path = self._servable(lib, record)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise RequestRefused(404, f"image {image_id} cannot be opened") from None
        head = os.pread(fd, 32, 0)
        media = _MIME.get(sniff_image(head) or "", "application/octet-stream")
        return fd, media, os.fsdecode(path.name)

    # ------------------------------------------------------------------ duplicates

    def duplicates(
        self, offset: int, limit: int, threshold: float | None, verify: bool, similar: bool = False
    ) -> dict[str, Any]:
        """One page of duplicate groups, found once per index generation and settings; with
        ``similar``, each group also lists the other captures of its kept file, apart."""
        lib = self.library()
        listing = self._listing(lib, threshold, verify, similar)
        page = listing.groups[offset : offset + limit]
        return {
            "threshold": listing.threshold,
            "total": len(listing.groups),
            "offset": offset,
            "limit": limit,
            "groups": [
                {
                    "keep": _member(group.keep, listing.ids),
                    "members": [_member(m, listing.ids) for m in group.members],
                    **(
                        {"similar": [_member(m, listing.ids) for m in group.similar]}
                        if similar
                        else {}
                    ),
                }
                for group in page
            ],
        }

    def _listing(
        self, lib: Library, threshold: float | None, verify: bool, similar: bool = False
    ) -> _Listing:
        key = (self._generation, threshold, verify, similar)
        with self._listing_lock:
            listing = self._listings.get(key)
            if listing is None:
                used = lib.duplicate_threshold() if threshold is None else threshold
                groups = lib.find_duplicates(threshold, verify=verify, similar=similar)
                paths = [m.path for g in groups for m in [g.keep, *g.members, *g.similar]]
                listing = _Listing(used, groups, self._ids_of(lib, paths))
                self._listings = {k: v for k, v in self._listings.items() if k[0] == key[0]}
                self._listings[key] = listing
            return listing

    def _ids_of(self, lib: Library, paths: list[Path]) -> dict[Path, int]:
        return {p: r.id for p, r in lib.catalog.records_by_path(paths).items()}

    def _group_of(self, keep: int, copies: list[int]) -> DuplicateGroup:
        """The group a client chose (any member as the kept file): the ids must all be
        in one group listed for the current index."""
        wanted = {keep, *copies}
        if keep in copies or len(set(copies)) != len(copies):
            raise RequestRefused(422, "the kept file and the copies must be different files")
        with self._listing_lock:
            listings = [v for k, v in self._listings.items() if k[0] == self._generation]
        for listing in listings:
            for group in listing.groups:
                members = {listing.ids.get(m.path): m for m in [group.keep, *group.members]}
                if wanted <= members.keys():
                    chosen = members[keep]
                    return DuplicateGroup(
                        keep=chosen, members=[members[i] for i in copies if i in members]
                    )
        raise RequestRefused(
            409, "those files are not one duplicate group of the index as listed; list again"
        )

    def not_duplicate(self, a: int, b: int) -> dict[str, Any]:
        """Record that two indexed files are not duplicates (as ``dupes --not-dup``)."""
        lib = self.library()
        if a == b:
            raise RequestRefused(422, "not-a-duplicate needs two different images")
        first, second = self._record(lib, a), self._record(lib, b)
        lib.mark_not_duplicate(first.path, second.path)
        with self._listing_lock:
            self._listings.clear()  # the groups change; the catalog generation does not
        return {"a": os.fsdecode(first.path), "b": os.fsdecode(second.path)}

    # ------------------------------------------------------------------ actions

    def act(self, op: str, choices: list[tuple[int, list[int]]], dry_run: bool) -> dict[str, Any]:
        """Move or trash the copies of the chosen groups, journaled like ``dupes --apply``."""
        move_to = None
        if op == "move":
            if self.settings.move_to is None:
                raise RequestRefused(
                    400, "moving copies needs a folder: start ghostmatch serve with --move-to DIR"
                )
            move_to = self.settings.move_to
        self.library()  # the listing is checked against the index as it is now
        groups = [self._group_of(keep, copies) for keep, copies in choices]
        with self._action_lock:
            actions, skipped = plan_actions(groups, op, move_to=move_to)
            journal = self._journals() / (
                f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
            )
            report = apply_actions(actions, journal, dry_run=dry_run)
        data = report.to_dict()
        data["journal"] = None if dry_run else journal.name
        data["skipped"] = [{"path": os.fsdecode(p), "reason": r} for p, r in skipped]
        return data

    def undo(self, name: str) -> dict[str, Any]:
        """Put back what one journal of this server moved or trashed (as ``ghostmatch undo``)."""
        if not isinstance(name, str) or not _JOURNAL_NAME.match(name):
            raise RequestRefused(422, "journal must be a name this server returned")
        journal = self._journals() / name
        if not journal.is_file() or journal.is_symlink():
            raise RequestRefused(404, f"no journal {name}")
        lib = self.library()
        with self._action_lock:
            report = undo_journal(journal, lib.catalog.roots())
        return {**report.to_dict(), "journal": name}

    def _journals(self) -> Path:
        folder = self.path / JOURNAL_FOLDER
        folder.mkdir(exist_ok=True)
        return folder

    # ------------------------------------------------------------------ index jobs

    def start_index(self) -> Job:
        """An incremental index run of the index's folders on a thread; one at a time."""
        with self._job_lock:
            running = [j for j in self._jobs.values() if j.state == "running"]
            if running:
                raise RequestRefused(409, f"index job {running[0].id} is still running")
            roots = self.library().catalog.roots()
            if not roots:
                raise RequestRefused(400, "the index has no folders to index")
            job = Job(uuid.uuid4().hex[:12])
            self._jobs[job.id] = job
            while len(self._jobs) > 20:
                self._jobs.popitem(last=False)
            thread = threading.Thread(
                target=self._run_job, args=(job, roots), name="ghostmatch-index", daemon=True
            )
            self._job_thread = thread
            thread.start()
        return job

    def job(self, job_id: str) -> Job:
        with self._job_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise RequestRefused(404, f"no job {job_id!r}")
        return job

    def _run_job(self, job: Job, roots: list[Path]) -> None:
        def progress(stage: str, done: int, total: int | None) -> None:
            if stage == "scanned":
                job.found = done
                return
            job.done, job.total = done, total
            hook = self.job_progress
            if hook is not None:
                hook(job)
            if self._stopping.is_set():
                # The library commits the finished work on an interrupt, as on Ctrl-C.
                raise KeyboardInterrupt

        try:
            # A Library of its own: the server's keeps answering from the index as it was
            # until the job commits, then reopens it (see ``library``).
            with ghostmatch.open(
                self.path,
                create=False,
                runtime=self.settings.runtime,
                device=self.settings.device,
                catalog=self.settings.catalog,
            ) as lib:
                report = lib.index(
                    roots, max_megapixels=self.settings.max_megapixels, progress=progress
                )
            job.report = report.to_dict()
            job.state = "interrupted" if report.interrupted else "done"
        except Exception as error:
            job.error = str(error)
            job.state = "failed"
        finally:
            job.finished = time.time()


def _clean_absolute(text: str, what: str) -> Path:
    """``text`` as a path only if it is absolute and already normal: no ``..``, ``.``,
    doubled or trailing separators, NUL or backslash tricks."""
    if "\x00" in text or not os.path.isabs(text) or os.path.normpath(text) != text:
        raise RequestRefused(400, f"{what} must be a clean absolute path as listed by the index")
    if any(part in ("..", ".") for part in text.split(os.sep)):
        raise RequestRefused(400, f"{what} must not contain '..'")
    return Path(text)


def _match(m: Match) -> dict[str, Any]:
    """The CLI's match object, plus the catalog id that thumbnails and files are asked by."""
    return {**m.to_dict(), "id": m.id}


def _member(m: DuplicateMember, ids: dict[Path, int]) -> dict[str, Any]:
    data = m.to_dict()
    data["id"] = ids.get(m.path)
    data["exists"] = os.path.lexists(m.path)
    return data
