"""The catalog of an index: one database row per image, whose id is its FAISS id.

It keeps every image's vector, so any FAISS index can be rebuilt from it alone. It is an
SQLite file in the index folder, or a PostgreSQL database that several index folders (on
several machines) share; the schema and its migrations are the same on both.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import (
    URL,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    case,
    create_engine,
    delete,
    event,
    exc,
    func,
    insert,
    inspect,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.types import TypeDecorator

from ghostmatch.errors import GhostmatchError

__all__ = [
    "MIGRATIONS",
    "Catalog",
    "CatalogTransaction",
    "EmptyCatalogError",
    "FailureRecord",
    "ImageRecord",
    "NewFailure",
    "NewImage",
    "TurnScreen",
    "catalog_url",
    "same_database",
    "user_error",
    "without_password",
]

CATALOG_FILE = "catalog.db"

# How long a connection waits for another process's write lock before giving up.
_BUSY_TIMEOUT_MS = 30_000
# Ids or paths per IN (...) query; stays under SQLite's oldest limit of 999 parameters.
_CHUNK = 900
# Vectors are stored little-endian whatever the machine, so a catalog can be copied anywhere.
_VECTOR_DTYPE = np.dtype("<f4")
# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITER = "ghostmatch_writer"
# The PostgreSQL advisory lock that write transactions hold, so that they run one at a time
# as SQLite's do (BEGIN IMMEDIATE): the read-then-write steps in them (the generation
# counter, meta values, roots) then cannot interleave between machines. Advisory locks are
# per database, and a catalog is a database, so one constant key serves.
_PG_WRITE_LOCK = 0x67686F73_74636174  # "ghostcat"
# Seconds to wait for a PostgreSQL server that does not answer, before saying so.
_PG_CONNECT_TIMEOUT_S = 10


# ---------------------------------------------------------------------------- column types

# SQLite makes only a column declared exactly INTEGER PRIMARY KEY the rowid, and only that
# may be AUTOINCREMENT; other databases need BIGINT for 64-bit FAISS ids.
_Id = BigInteger().with_variant(Integer(), "sqlite")

# Paths must sort by code point everywhere so that a range query is an exact prefix match;
# PostgreSQL would otherwise compare them by locale.
_PathText = Text().with_variant(Text(collation="C"), "postgresql")


class _UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime, stored naive in UTC because SQLite keeps no offset."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------------- current schema


_METADATA = MetaData()

_IMAGES = Table(
    "images",
    _METADATA,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("path", _PathText, unique=True, index=True, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("content_hash", String, index=True, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("format", String, nullable=False),
    Column("indexed_at", _UTCDateTime, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    # Covers all_stat(): a scan of it never touches the pages that hold the vectors.
    Index("ix_images_stat", "path", "size", "mtime_ns"),
    # AUTOINCREMENT: a deleted image's id is never handed out again, as it may still be
    # in a FAISS index file.
    sqlite_autoincrement=True,
)

_FAILURES = Table(
    "failures",
    _METADATA,
    Column("path", _PathText, primary_key=True),
    Column("size", BigInteger),
    Column("mtime_ns", BigInteger),
    Column("reason", String, nullable=False),
    Column("detail", Text, nullable=False),
    Column("seen_at", _UTCDateTime, nullable=False),
    Column("ctime_ns", BigInteger),
    Column("max_megapixels", Float),
)

_ROOTS = Table(
    "roots",
    _METADATA,
    Column("path", _PathText, primary_key=True),
    Column("added_at", _UTCDateTime, nullable=False),
)

_META = Table(
    "meta",
    _METADATA,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)

_NOT_DUPLICATES = Table(
    "not_duplicates",
    _METADATA,
    Column("path_a", _PathText, primary_key=True),
    Column("path_b", _PathText, primary_key=True),
)

# One row per applied migration; the highest version is the schema's.
_SCHEMA_VERSION = Table(
    "schema_version",
    _METADATA,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("reason", Text, nullable=False),
    Column("applied_at", _UTCDateTime, nullable=False),
)

# A label of a photo, keyed by its content hash so that it survives re-indexing, moves and
# renames, and covers every byte-identical copy.
_LABELS = Table(
    "labels",
    _METADATA,
    Column("content_hash", String, primary_key=True),
    Column("label", Text, primary_key=True),
    Index("ix_labels_label", "label"),
)


def _per_image_table(name: str, metadata: MetaData, *columns: Column[Any]) -> Table:
    """A table of data kept beside an image's row, one row an image at most, keyed by the
    image's id and gone with it (and, written by this module, with its vector)."""
    image_id = Column(
        "image_id",
        _Id,
        ForeignKey("images.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    )
    return Table(name, metadata, image_id, *columns)


# The regional descriptors of an image (``ghostmatch.model.regions``), float16, one after
# the other; an image indexed before they existed has no row. They go with the image row.
_REGIONS = _per_image_table("regions", _METADATA, Column("vectors", LargeBinary, nullable=False))
# Half the bytes of float32, and the search over regions only needs to rank candidates.
_REGION_DTYPE = np.dtype("<f2")

# What the turned-copy screen (``ghostmatch.dupes.turns``) needs of an image, made where
# the indexer has it decoded: its grey thumbnail, and when its picture is tilted onto
# filled corners, the tilt, the corners' colour (0xRRGGBB) and the straightened picture's
# thumbnail. An image indexed before these existed has no row. They go with the image row.
_TURN_SCREENS = _per_image_table(
    "turn_screens",
    _METADATA,
    Column("thumbnail", LargeBinary, nullable=False),
    Column("tilt", Float),
    Column("fill", Integer),
    Column("straightened", LargeBinary),
)
# An image's local feature maps (``ghostmatch.model.localmaps``), made in the pass that
# made its vector: float16, height x width x channels, with what made them
# (``ghostmatch.model.exports.local_maps_tag``). A duplicate search reads them instead of
# making them again. An image indexed before they existed, or on a runtime that does not
# make them, has no row. They go with the image row.
_LOCAL_MAPS = _per_image_table(
    "local_maps",
    _METADATA,
    Column("made_by", String, nullable=False),
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("maps", LargeBinary, nullable=False),
)
_MAP_DTYPE = np.dtype("<f2")
# The tables of per-image data, whose rows an image's new vector or removal drops.
_PER_IMAGE = (_REGIONS, _TURN_SCREENS, _LOCAL_MAPS)

# ---------------------------------------------------------------------------- migrations


def _create_tables_v1(conn: Connection) -> None:
    """Create the version 1 tables from a frozen copy: later changes are new migrations."""
    metadata = MetaData()
    Table(
        "images",
        metadata,
        Column("id", _Id, primary_key=True, autoincrement=True),
        Column("path", _PathText, nullable=False, unique=True, index=True),
        Column("size", BigInteger, nullable=False),
        Column("mtime_ns", BigInteger, nullable=False),
        Column("content_hash", String, nullable=False, index=True),
        Column("width", Integer, nullable=False),
        Column("height", Integer, nullable=False),
        Column("format", String, nullable=False),
        Column("indexed_at", _UTCDateTime, nullable=False),
        Column("vector", LargeBinary, nullable=False),
        Index("ix_images_stat", "path", "size", "mtime_ns"),
        sqlite_autoincrement=True,
    )
    Table(
        "failures",
        metadata,
        Column("path", _PathText, primary_key=True),
        Column("size", BigInteger, nullable=True),
        Column("mtime_ns", BigInteger, nullable=True),
        Column("reason", String, nullable=False),
        Column("detail", Text, nullable=False),
        Column("seen_at", _UTCDateTime, nullable=False),
    )
    Table(
        "roots",
        metadata,
        Column("path", _PathText, primary_key=True),
        Column("added_at", _UTCDateTime, nullable=False),
    )
    Table(
        "meta",
        metadata,
        Column("key", String, primary_key=True),
        Column("value", Text, nullable=False),
    )
    Table(
        "not_duplicates",
        metadata,
        Column("path_a", _PathText, primary_key=True),
        Column("path_b", _PathText, primary_key=True),
    )
    metadata.create_all(conn)


def _add_failure_retry_columns_v2(conn: Connection) -> None:
    for column, kind in (("ctime_ns", BigInteger()), ("max_megapixels", Float())):
        conn.execute(
            text(f"ALTER TABLE failures ADD COLUMN {column} {kind.compile(dialect=conn.dialect)}")
        )


def _create_labels_v3(conn: Connection) -> None:
    """Create the version 3 labels table from a frozen copy."""
    metadata = MetaData()
    Table(
        "labels",
        metadata,
        Column("content_hash", String, primary_key=True),
        Column("label", Text, primary_key=True),
        Index("ix_labels_label", "label"),
    )
    metadata.create_all(conn)


def _create_per_image(conn: Connection, name: str, *columns: Column[Any]) -> None:
    """Create a table of per-image data from a frozen copy of its own columns (the image
    id column has not changed since the first such table)."""
    metadata = MetaData()
    Table("images", metadata, Column("id", _Id, primary_key=True))
    _per_image_table(name, metadata, *columns).create(conn, checkfirst=True)


def _create_regions_v4(conn: Connection) -> None:
    """Create the version 4 regions table from a frozen copy."""
    _create_per_image(conn, "regions", Column("vectors", LargeBinary, nullable=False))


def _create_turn_screens_v5(conn: Connection) -> None:
    """Create the version 5 turn_screens table from a frozen copy."""
    _create_per_image(
        conn,
        "turn_screens",
        Column("thumbnail", LargeBinary, nullable=False),
        Column("tilt", Float),
        Column("fill", Integer),
        Column("straightened", LargeBinary),
    )


def _create_local_maps_v6(conn: Connection) -> None:
    """Create the version 6 local_maps table from a frozen copy."""
    _create_per_image(
        conn,
        "local_maps",
        Column("made_by", String, nullable=False),
        Column("height", Integer, nullable=False),
        Column("width", Integer, nullable=False),
        Column("maps", LargeBinary, nullable=False),
    )


# (version, why, apply) in order; opening a catalog applies those above its version.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "images, failures, roots, meta and not_duplicates tables", _create_tables_v1),
    (
        2,
        "failures keep the file's ctime and the pixel limit, so that a chmod or a higher "
        "max_megapixels retries the file",
        _add_failure_retry_columns_v2,
    ),
    (
        3,
        "labels of photos by content hash, for recognition by the nearest labelled photos",
        _create_labels_v3,
    ),
    (
        4,
        "regional descriptors of each image, so that heavily cropped copies are found",
        _create_regions_v4,
    ),
    (
        5,
        "each image's thumbnail and tilt, made while indexing, so that finding turned "
        "copies need not decode every image again",
        _create_turn_screens_v5,
    ),
    (
        6,
        "each image's local feature maps, made in the pass that made its vector, so that "
        "a duplicate search need not make them again",
        _create_local_maps_v6,
    ),
]
# The first version whose failures table has the columns of version 2.
_FAILURE_RETRY_VERSION = 2
# The first version with the labels table.
_LABELS_VERSION = 3
# The first version with the regions table.
_REGIONS_VERSION = 4
# The first version with the turn_screens table.
_TURN_SCREENS_VERSION = 5
# The first version with the local_maps table.
_LOCAL_MAPS_VERSION = 6


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class NewImage:
    """An image to add: its file stat, content hash, pixel size, format and (d,) vector."""

    path: Path
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str
    vector: NDArray[np.float32]


@dataclass(frozen=True)
class ImageRecord:
    """A cataloged image; ``id`` is its id in every FAISS index of the catalog."""

    id: int
    path: Path
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str
    indexed_at: datetime


@dataclass(frozen=True)
class TurnScreen:
    """What the turned-copy screen (``ghostmatch.dupes.turns``) keeps of an image: its
    grey thumbnail (uint8 pixels, row by row) and, when its picture is tilted onto corners
    filled with one colour, the tilt (degrees), that colour and the straightened
    picture's grey thumbnail."""

    thumbnail: bytes
    tilt: float | None = None
    fill: tuple[int, int, int] | None = None
    straightened: bytes | None = None


@dataclass(frozen=True)
class NewFailure:
    """A file that could not be indexed; size and mtime are None where stat failed too.

    ``ctime_ns`` (which a chmod changes) and the ``max_megapixels`` limit in force let a
    later run tell whether trying the file again could succeed.
    """

    path: Path
    size: int | None
    mtime_ns: int | None
    reason: str
    detail: str
    ctime_ns: int | None = None
    max_megapixels: float | None = None


@dataclass(frozen=True)
class FailureRecord:
    """A recorded failure; ``reason`` is a short category, ``detail`` the message."""

    path: Path
    size: int | None
    mtime_ns: int | None
    reason: str
    detail: str
    seen_at: datetime
    ctime_ns: int | None = None
    max_megapixels: float | None = None


# ---------------------------------------------------------------------------- path text

# A file name that is not UTF-8 comes back from os.fsdecode with lone surrogates, which no
# driver stores as text. Each is written as U+FFFD and its four hex digits, and a real U+FFFD
# as two: a code per character, so a folder's text stays a prefix of its files' text.
_ESCAPE = "\ufffd"
_NEEDS_ESCAPE = re.compile("[\ud800-\udfff\ufffd]")
_ESCAPED = re.compile("\ufffd(\ufffd|d[89a-f][0-9a-f]{2})")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPE * 2 if char == _ESCAPE else f"{_ESCAPE}{ord(char):04x}"


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    return _ESCAPE if code == _ESCAPE else chr(int(code, 16))


def _path_text(path: Path | str) -> str:
    text = os.fspath(Path(path))
    return _NEEDS_ESCAPE.sub(_escape, text) if _NEEDS_ESCAPE.search(text) else text


def _text_path(text: str) -> Path:
    return Path(_ESCAPED.sub(_unescape, text) if _ESCAPE in text else text)


# ---------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _vector_bytes(vector: NDArray[np.float32]) -> bytes:
    array = np.asarray(vector, dtype=_VECTOR_DTYPE)
    if array.ndim != 1:
        raise ValueError(f"a vector must be one-dimensional, got shape {array.shape}")
    return array.tobytes()


def _region_bytes(regions: NDArray[np.float32]) -> bytes:
    array = np.asarray(regions, dtype=_REGION_DTYPE)
    if array.ndim != 2:
        raise ValueError(f"regions must be (regions, d), got shape {array.shape}")
    return array.tobytes()


def _packed_colour(colour: tuple[int, int, int]) -> int:
    red, green, blue = (min(255, max(0, int(c))) for c in colour)
    return red << 16 | green << 8 | blue


def _stack_regions(blobs: Sequence[bytes], dim: int) -> NDArray[np.float32]:
    """(n, regions, dim) float32 from n stored rows of regional descriptors."""
    if not blobs or dim == 0:
        return np.empty((0, 0, 0), dtype=np.float32)
    lengths = {len(blob) for blob in blobs}
    if len(lengths) > 1 or next(iter(lengths)) % (dim * _REGION_DTYPE.itemsize):
        raise GhostmatchError("the catalog mixes regional descriptor sizes; rebuild the index")
    flat = np.frombuffer(bytearray().join(blobs), dtype=_REGION_DTYPE)
    return flat.reshape(len(blobs), -1, dim).astype(np.float32)


def _stack(blobs: Sequence[bytes]) -> NDArray[np.float32]:
    """(n, d) float32 from n stored vectors, in one copy."""
    if not blobs:
        return np.empty((0, 0), dtype=np.float32)
    lengths = {len(blob) for blob in blobs}
    if len(lengths) > 1:
        dims = sorted(length // _VECTOR_DTYPE.itemsize for length in lengths)
        raise GhostmatchError(f"the catalog mixes vector sizes {dims}; rebuild the index")
    flat = np.frombuffer(bytearray().join(blobs), dtype=_VECTOR_DTYPE)
    return flat.reshape(len(blobs), -1).astype(np.float32, copy=False)


# In ImageRecord's field order.
_RECORD_COLUMNS = (
    _IMAGES.c.id,
    _IMAGES.c.path,
    _IMAGES.c.size,
    _IMAGES.c.mtime_ns,
    _IMAGES.c.content_hash,
    _IMAGES.c.width,
    _IMAGES.c.height,
    _IMAGES.c.format,
    _IMAGES.c.indexed_at,
)


def _image_record(row: Sequence[Any]) -> ImageRecord:
    """The record of a row of ``_RECORD_COLUMNS``."""
    image_id, path, *rest = row
    return ImageRecord(image_id, _text_path(path), *rest)


def _configure_sqlite(engine: Engine, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop sqlite3 from issuing BEGIN itself: it skips it before SELECT and DDL, which
        # would leave reads and migrations outside any transaction. "begin" below does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if not read_only:  # setting the journal mode may write the file's header
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        # A writer takes the write lock at once: a transaction that read first and then
        # writes after another process did fails at once with "database is locked", as
        # busy_timeout does not cover that case.
        writer = conn.get_execution_options().get(_WRITER, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def _sqlite_file(url: URL) -> Path | None:
    """The database file of an SQLite URL; None for another database or one in memory."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.database.startswith("file:"):  # already a URI: leave it as it is
        return None
    return Path(url.database)


def _read_only_connector(file: Path) -> Callable[[], sqlite3.Connection]:
    """Connections that can only read ``file``, so a reading command never needs write access.

    Where its folder is not writable SQLite cannot create the WAL index (``-shm``) a reader
    needs, so the file is opened as immutable instead: without locks, so a writer elsewhere
    at that very moment could show it a torn state, a risk taken only where there is no
    other way to read. A WAL file with commits still in it rules that out (an immutable
    reader would not see them), and then a plain read-only connection is all there is.
    """

    def connect() -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(os.fsencode(file.absolute())) + "?mode=ro"
        wal = file.with_name(file.name + "-wal")
        pending = wal.exists() and wal.stat().st_size > 0
        if not pending and not os.access(file.parent, os.W_OK):
            uri += "&immutable=1"
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return connect


# The SQLite result codes of damage or of a machine that cannot do what is asked; the
# others (a duplicate path, a bad statement) are bugs and keep their own exception type.
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _is_environmental(error: BaseException) -> bool:
    """Whether a database error comes from the disk, the file, the server or other
    processes."""
    if isinstance(error, exc.DBAPIError):
        if type(error.orig).__module__.startswith("psycopg"):
            # Besides the server's answers: its permissions (42501), and connection settings
            # in the URL that libpq does not know (no SQLSTATE).
            sqlstate = getattr(error.orig, "sqlstate", None)
            unusable_url = sqlstate is None and "connection" in str(error.orig)
            return isinstance(error, exc.OperationalError) or sqlstate == "42501" or unusable_url
        return isinstance(error, exc.OperationalError) or type(error) is exc.DatabaseError
    return isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError


def _catalog_error(error: BaseException, where: str) -> GhostmatchError:
    """A database error as one line that says what the user can do about it."""
    orig = error.orig if isinstance(error, exc.DBAPIError) else error
    code = getattr(orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    reason = " ".join(str(orig).split()) or type(orig).__name__
    if type(orig).__module__.startswith("psycopg"):
        return _server_error(getattr(orig, "sqlstate", None), reason, where)
    if primary in _CORRUPT:
        return GhostmatchError(
            f"the catalog {where} is damaged ({reason}); restore it from a backup, or move "
            "the index folder away and run ghostmatch index again"
        )
    if primary == sqlite3.SQLITE_FULL:
        return GhostmatchError(
            f"no space left to write the catalog {where} ({reason}); free some disk space and "
            "run the command again (work committed so far is kept)"
        )
    if primary == sqlite3.SQLITE_IOERR:
        return GhostmatchError(
            f"cannot read or write the catalog {where} ({reason}); check that its disk has "
            "free space (and quota) and works, then run the command again"
        )
    if primary == sqlite3.SQLITE_READONLY:
        return GhostmatchError(
            f"cannot write the catalog {where} ({reason}); this command changes the index, "
            "so run it as a user who may write to that folder (query and info only read)"
        )
    if primary in _BUSY:
        return GhostmatchError(
            f"the catalog {where} is busy ({reason}): another ghostmatch is writing to it; "
            "wait for it to finish and run the command again"
        )
    if primary == sqlite3.SQLITE_CANTOPEN:
        return GhostmatchError(
            f"cannot open the catalog {where} ({reason}); check that the folder exists and "
            "that you may read it"
        )
    return GhostmatchError(f"the catalog {where} cannot be used: {reason}")


def _server_error(sqlstate: str | None, reason: str, where: str) -> GhostmatchError:
    """A PostgreSQL error (by its SQLSTATE; None: no answer from the server) as one line."""
    # A refused connection carries no SQLSTATE, only the server's message.
    missing = 'database "' in reason and "does not exist" in reason
    if sqlstate == "3D000" or (sqlstate is None and missing):
        return GhostmatchError(
            f"the catalog database {where} does not exist ({reason}); create it first "
            "(createdb NAME) or name another one"
        )
    login = ("password authentication failed", "no pg_hba.conf entry", 'role "')
    if (sqlstate or "").startswith("28") or (sqlstate is None and any(s in reason for s in login)):
        return GhostmatchError(
            f"cannot log in to the catalog database {where} ({reason}); check the user and "
            "password (in the URL, $PGPASSWORD or ~/.pgpass)"
        )
    if sqlstate is None or sqlstate.startswith(("08", "57P")):
        return GhostmatchError(
            f"cannot connect to the catalog database {where} ({reason}); check that the "
            "server is running and that the URL (host, port, options) is right"
        )
    if sqlstate in ("55P03", "40P01"):
        return GhostmatchError(
            f"the catalog {where} is busy ({reason}): another ghostmatch is writing to it; "
            "wait for it to finish and run the command again"
        )
    if sqlstate in ("53100", "53200"):
        return GhostmatchError(
            f"the catalog database {where} is out of space ({reason}); free some space on "
            "its server and run the command again (work committed so far is kept)"
        )
    if sqlstate == "42501":
        return GhostmatchError(
            f"no permission in the catalog database {where} ({reason}); this command needs "
            "a user who may create and write tables there"
        )
    return GhostmatchError(f"the catalog {where} cannot be used: {reason}")


class EmptyCatalogError(GhostmatchError):
    """A catalog database opened with ``create=False`` holds no catalog yet."""


# The driver of each back end's plain name: psycopg 3 for PostgreSQL, whose plain name
# SQLAlchemy would otherwise give to psycopg2.
_DRIVERS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}


def catalog_url(value: str | URL) -> URL:
    """The SQLAlchemy URL of a catalog named by the user: ``postgresql://USER@HOST/DB``
    (psycopg 3 is the driver unless one is named) or ``sqlite:///FILE``."""
    try:
        url = make_url(value)
    except exc.ArgumentError:
        url = None
    backend = url.get_backend_name() if url is not None else None
    if url is None or backend not in _DRIVERS:
        shown = value.render_as_string() if isinstance(value, URL) else value
        raise GhostmatchError(
            f"{shown!r} is not a catalog URL; give postgresql://USER@HOST[:PORT]/DATABASE "
            "or sqlite:///FILE"
        )
    if url.drivername in _DRIVERS:
        url = url.set(drivername=_DRIVERS[url.drivername])
    return url


def without_password(url: URL) -> URL:
    """``url`` with no password: what may be written down or shown."""
    # Not url.set(password=None): set() takes None for "leave it as it is".
    return url._replace(password=None)


def same_database(a: URL, b: URL) -> bool:
    """Whether two catalog URLs name one database, whatever password either carries."""
    return without_password(a) == without_password(b)


def _create_engine(url: URL, **options: Any) -> Engine:
    if url.get_backend_name() != "postgresql":
        return create_engine(url, **options)
    args: dict[str, Any] = {"application_name": "ghostmatch"}
    if "connect_timeout" not in url.query:
        args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
    if "options" not in url.query:
        # A writer waits for another's transaction as long as SQLite's busy timeout, then
        # says the catalog is busy instead of hanging.
        args["options"] = f"-c lock_timeout={_BUSY_TIMEOUT_MS}"
    try:
        # pre_ping: a long-lived server process survives a restart of the database.
        return create_engine(url, connect_args=args, pool_pre_ping=True, **options)
    except ModuleNotFoundError as error:
        raise GhostmatchError(
            f"a PostgreSQL catalog needs the {error.name} driver; install it with: "
            "pip install 'ghostmatch[postgresql]'"
        ) from error


def _schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table(_SCHEMA_VERSION.name):
        return 0
    return conn.scalar(select(func.max(_SCHEMA_VERSION.c.version))) or 0


# ---------------------------------------------------------------------------- catalog


class Catalog:
    """An open catalog database; use as a context manager or call ``close()``.

    Reads of an SQLite file go through read-only connections and writes through others, so
    that reading an index needs no write access to it, and no write happens until one is
    asked for. Database failures the user can act on (damage, a full disk, no write access,
    another writer) raise ``GhostmatchError``.
    """

    def __init__(self, url: str | URL, *, create: bool = True) -> None:
        url = catalog_url(url)
        self._file = _sqlite_file(url)
        writer = _create_engine(url)
        if writer.dialect.name == "sqlite":
            _configure_sqlite(writer)
        self._writer = writer.execution_options(**{_WRITER: True})
        self._reader = writer  # one database in memory, or a server's own permissions
        if self._file is not None:
            self._reader = create_engine(url, creator=_read_only_connector(self._file))
            _configure_sqlite(self._reader, read_only=True)
        self._version = 0
        try:
            with self._errors():
                self._migrate(create)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_directory(cls, directory: Path) -> Catalog:
        """Open (creating if needed) the catalog file of an index directory that exists."""
        # A URL object, not a string: a folder name may hold "?" or "#".
        return cls(URL.create("sqlite", database=os.fspath(Path(directory) / CATALOG_FILE)))

    def close(self) -> None:
        self._reader.dispose()
        self._writer.engine.dispose()

    def forget_connections(self) -> None:
        """Leave the open connections to the process that opened them: a forked process
        calls this first, and opens its own should it read (a connection cannot be shared
        across a fork, and closing it here would close the parent's)."""
        self._reader.dispose(close=False)
        self._writer.engine.dispose(close=False)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> URL:
        """The database's URL, password included (render it with ``hide_password``)."""
        return self._writer.engine.url

    @property
    def on_server(self) -> bool:
        """Whether the catalog is a server's database rather than an SQLite file."""
        return self.url.get_backend_name() != "sqlite"

    def _where(self) -> str:
        url = self._reader.url
        if url.get_backend_name() == "sqlite" and url.database:
            return url.database
        return url.render_as_string(hide_password=True)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn the database errors a user can act on into ``GhostmatchError``."""
        try:
            yield
        except (exc.DBAPIError, sqlite3.Error) as error:
            if not _is_environmental(error):
                raise
            raise _catalog_error(error, self._where()) from error

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._errors(), self._reader.connect() as conn:
            yield conn

    def _writable(self) -> bool:
        """Whether this process may write the catalog file (always assumed for a server)."""
        if self._file is None:
            return True
        folder_ok = os.access(self._file.parent, os.W_OK)
        return folder_ok and (not self._file.exists() or os.access(self._file, os.W_OK))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; on PostgreSQL it first waits for the catalog's write lock."""
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_PG_WRITE_LOCK)))
            yield conn

    def _migrate(self, create: bool) -> None:
        latest = MIGRATIONS[-1][0]
        if self._file is not None and not self._file.exists():
            current = 0  # a new catalog: there is nothing to read yet
        else:
            with self._reader.connect() as conn:
                current = _schema_version(conn)
        self._refuse_newer(current, latest)
        self._version = current
        if current == 0 and not create:
            raise EmptyCatalogError(f"{self._where()} holds no ghostmatch catalog yet")
        # An older catalog that cannot be written is read as it is: reading needs no
        # migration, and a command that writes says it cannot.
        if current == latest or (current > 0 and not self._writable()):
            return
        with self._write() as conn:
            _METADATA.tables[_SCHEMA_VERSION.name].create(conn, checkfirst=True)
            # Another process may have migrated between the read above and the lock.
            current = _schema_version(conn)
            self._refuse_newer(current, latest)
            for version, reason, apply in MIGRATIONS:
                if version > current:
                    apply(conn)
                    conn.execute(
                        insert(_SCHEMA_VERSION),
                        {"version": version, "reason": reason, "applied_at": _now()},
                    )
        self._version = latest

    def _refuse_newer(self, current: int, latest: int) -> None:
        if current > latest:
            raise GhostmatchError(
                f"{self._where()} was written by a newer ghostmatch (schema version "
                f"{current}, this one reads up to {latest}); upgrade ghostmatch"
            )

    def schema_version(self) -> int:
        with self._read() as conn:
            return _schema_version(conn)

    # ------------------------------------------------------------------------ writes

    @contextmanager
    def transaction(self) -> Iterator[CatalogTransaction]:
        """Writes that others see together when the block exits, and never if it raises."""
        with self._errors(), self._write() as conn:
            yield CatalogTransaction(conn)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key`` in its own transaction."""
        with self.transaction() as tx:
            tx.set_meta(key, value)

    def add_roots(self, paths: Iterable[Path]) -> None:
        """Remember folders as indexed, in their own transaction."""
        with self.transaction() as tx:
            tx.add_roots(paths)

    def add_not_duplicate(self, a: Path, b: Path) -> None:
        """Record that the user judged two images distinct, in its own transaction."""
        with self.transaction() as tx:
            tx.add_not_duplicate(a, b)

    def forget_failures(self, paths: Iterable[Path]) -> int:
        """Drop the recorded failures of these files and of every file under these folders,
        in one transaction; returns how many were dropped. Writes only if there are any."""
        paths = list(paths)
        with self._read() as conn:
            if not any(conn.scalar(select(func.count()).where(_under(p))) for p in paths):
                return 0
        with self.transaction() as tx:
            return tx.forget_failures(paths)

    # ------------------------------------------------------------------------ reads

    def get_meta(self, key: str) -> Any | None:
        with self._read() as conn:
            value = conn.scalar(select(_META.c.value).where(_META.c.key == key))
        return None if value is None else json.loads(value)

    def roots(self) -> list[Path]:
        with self._read() as conn:
            texts = conn.scalars(select(_ROOTS.c.path).order_by(_ROOTS.c.path)).all()
        return [_text_path(text) for text in texts]

    def count(self) -> int:
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(_IMAGES)) or 0

    def ids(self) -> NDArray[np.int64]:
        """All image ids, ascending."""
        # Sorted here: ORDER BY id would walk the table, vectors and all, not a small index.
        with self._read() as conn:
            ids = conn.scalars(select(_IMAGES.c.id)).all()
        return np.sort(np.array(ids, dtype=np.int64))

    def get(self, ids: Sequence[int]) -> list[ImageRecord]:
        """Records of ``ids`` in that order; ids not in the catalog are skipped."""
        found: dict[int, ImageRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                query = select(*_RECORD_COLUMNS).where(_IMAGES.c.id.in_(chunk))
                found.update((r.id, r) for r in map(_image_record, conn.execute(query)))
        return [found[image_id] for image_id in ids if image_id in found]

    def records_by_path(self, paths: Iterable[Path]) -> dict[Path, ImageRecord]:
        """Records of those ``paths`` that are cataloged."""
        texts = list(dict.fromkeys(_path_text(path) for path in paths))
        records: dict[Path, ImageRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(texts):
                query = select(*_RECORD_COLUMNS).where(_IMAGES.c.path.in_(chunk))
                records.update((r.path, r) for r in map(_image_record, conn.execute(query)))
        return records

    def all_stat(self) -> dict[Path, tuple[int, int, int]]:
        """path -> (id, size, mtime_ns) of every image: what an incremental scan compares."""
        query = select(_IMAGES.c.path, _IMAGES.c.id, _IMAGES.c.size, _IMAGES.c.mtime_ns)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return {_text_path(path): (image_id, size, mtime) for path, image_id, size, mtime in rows}

    def find_by_hash(self, hashes: Iterable[str]) -> dict[str, list[ImageRecord]]:
        """Records per content hash, by id, for those ``hashes`` that are cataloged."""
        found: dict[str, list[ImageRecord]] = {}
        with self._read() as conn:
            for chunk in _chunks(list(dict.fromkeys(hashes))):
                query = (
                    select(*_RECORD_COLUMNS)
                    .where(_IMAGES.c.content_hash.in_(chunk))
                    .order_by(_IMAGES.c.id)
                )
                for record in map(_image_record, conn.execute(query)):
                    found.setdefault(record.content_hash, []).append(record)
        return found

    def shared_hashes(self) -> list[list[int]]:
        """Ids of byte-identical images: one list (ascending) per content hash that more
        than one image has."""
        shared = (
            select(_IMAGES.c.content_hash).group_by(_IMAGES.c.content_hash).having(func.count() > 1)
        )
        query = (
            select(_IMAGES.c.content_hash, _IMAGES.c.id)
            .where(_IMAGES.c.content_hash.in_(shared))
            .order_by(_IMAGES.c.content_hash, _IMAGES.c.id)
        )
        groups: dict[str, list[int]] = {}
        with self._read() as conn:
            for digest, image_id in conn.execute(query):
                groups.setdefault(digest, []).append(image_id)
        return list(groups.values())

    def paths_under(self, folder: Path) -> list[tuple[int, Path]]:
        """(id, path) of the images inside ``folder`` at any depth, by path."""
        prefix = _path_text(folder)
        if not prefix.endswith(os.sep):
            prefix += os.sep
        # Every text that starts with the prefix lies in [prefix, prefix with its last
        # character bumped), and nothing else does; the path index serves this range.
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        query = (
            select(_IMAGES.c.id, _IMAGES.c.path)
            .where(_IMAGES.c.path >= prefix, _IMAGES.c.path < end)
            .order_by(_IMAGES.c.path)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [(image_id, _text_path(text)) for image_id, text in rows]

    def vectors(
        self, ids: Sequence[int] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """(ids, (n, d) float32 vectors): all by id, or those of ``ids`` that exist, in order.

        An empty result has shape (0, 0): the catalog does not know the dimension.
        """
        order, blobs = self._blobs(_IMAGES.c.id, _IMAGES.c.vector, ids)
        return order, _stack(blobs)

    def _blobs(
        self, key: Any, column: Any, ids: Sequence[int] | None
    ) -> tuple[NDArray[np.int64], list[bytes]]:
        """(ids, blobs) of ``column`` keyed by image id ``key``: every row by id, or the
        rows of those of ``ids`` that exist, in the order of ``ids``."""
        query = select(key, column)
        found: dict[int, bytes] = {}
        with self._read() as conn:
            if ids is None:
                found.update(conn.execute(query.order_by(key)).all())
                order = list(found)
            else:
                for chunk in _chunks(list(dict.fromkeys(ids))):
                    found.update(conn.execute(query.where(key.in_(chunk))).all())
                order = [image_id for image_id in ids if image_id in found]
        return np.array(order, dtype=np.int64), [found[image_id] for image_id in order]

    def regions(
        self, ids: Sequence[int] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """(ids, (n, regions, d) float32): the regional descriptors of every image that has
        them, by id, or of those of ``ids`` that have them, in order. An image indexed
        before they were made has none; an empty result has shape (0, 0, 0)."""
        if self._version < _REGIONS_VERSION:  # an older catalog read as it is has none
            return np.empty(0, dtype=np.int64), np.empty((0, 0, 0), dtype=np.float32)
        order, blobs = self._blobs(_REGIONS.c.image_id, _REGIONS.c.vectors, ids)
        return order, _stack_regions(blobs, self._dim_of_vectors())

    def ids_without_regions(self) -> NDArray[np.int64]:
        """Ids of the images that have no regional descriptors, ascending (none for an
        older catalog read as it is, which cannot take them)."""
        return self._ids_without(_REGIONS, _REGIONS_VERSION)

    def _ids_without(self, table: Table, since: int) -> NDArray[np.int64]:
        """Ids of the images without a row in the per-image ``table``, ascending (none for
        a catalog older than version ``since`` read as it is)."""
        if self._version < since:
            return np.empty(0, dtype=np.int64)
        have = select(table.c.image_id).where(table.c.image_id == _IMAGES.c.id).exists()
        with self._read() as conn:
            ids = conn.scalars(select(_IMAGES.c.id).where(~have)).all()
        return np.sort(np.array(ids, dtype=np.int64))

    def turn_screens(self, ids: Sequence[int] | None = None) -> dict[int, TurnScreen]:
        """The turned-copy screen's data of every image that has it, by id, or of those of
        ``ids`` that have it. An image indexed before it was made has none."""
        if self._version < _TURN_SCREENS_VERSION:  # an older catalog read as it is has none
            return {}
        t = _TURN_SCREENS.c
        query = select(t.image_id, t.thumbnail, t.tilt, t.fill, t.straightened)
        found: dict[int, TurnScreen] = {}
        with self._read() as conn:
            chunks = [None] if ids is None else _chunks(list(dict.fromkeys(ids)))
            for chunk in chunks:
                rows = conn.execute(query if chunk is None else query.where(t.image_id.in_(chunk)))
                for image_id, thumbnail, tilt, fill, straightened in rows:
                    colour = (
                        None if fill is None else (fill >> 16 & 255, fill >> 8 & 255, fill & 255)
                    )
                    found[int(image_id)] = TurnScreen(bytes(thumbnail), tilt, colour, straightened)
        return found

    def ids_without_turn_screens(self) -> NDArray[np.int64]:
        """Ids of the images that have no turned-copy screen data, ascending (none for an
        older catalog read as it is, which cannot take it)."""
        return self._ids_without(_TURN_SCREENS, _TURN_SCREENS_VERSION)

    def local_maps(self, ids: Sequence[int], made_by: str) -> dict[int, NDArray[np.float16]]:
        """The (height, width, channels) float16 local maps of those of ``ids`` that have
        maps made by ``made_by`` (``ghostmatch.model.exports.local_maps_tag``), by id."""
        if self._version < _LOCAL_MAPS_VERSION or not ids:
            return {}
        t = _LOCAL_MAPS.c
        query = select(t.image_id, t.height, t.width, t.maps).where(t.made_by == made_by)
        found: dict[int, NDArray[np.float16]] = {}
        with self._read() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                for image_id, height, width, blob in conn.execute(
                    query.where(t.image_id.in_(chunk))
                ):
                    flat = np.frombuffer(blob, dtype=_MAP_DTYPE)
                    found[int(image_id)] = flat.reshape(height, width, -1).astype(np.float16)
        return found

    def _dim_of_vectors(self) -> int:
        """The dimension of the stored vectors (0 when there are none)."""
        with self._read() as conn:
            blob = conn.scalar(select(_IMAGES.c.vector).limit(1))
        return 0 if blob is None else len(blob) // _VECTOR_DTYPE.itemsize

    def failures(self) -> list[FailureRecord]:
        """Every recorded failure, by path."""
        columns: list[Any] = [
            _FAILURES.c.path,
            _FAILURES.c.size,
            _FAILURES.c.mtime_ns,
            _FAILURES.c.reason,
            _FAILURES.c.detail,
            _FAILURES.c.seen_at,
        ]
        if self._version >= _FAILURE_RETRY_VERSION:  # an older one read as it is lacks them
            columns += [_FAILURES.c.ctime_ns, _FAILURES.c.max_megapixels]
        with self._read() as conn:
            rows = conn.execute(select(*columns).order_by(_FAILURES.c.path)).all()
        return [FailureRecord(_text_path(row[0]), *row[1:]) for row in rows]

    def failure_counts(self) -> dict[str, int]:
        """Number of failures per reason."""
        query = select(_FAILURES.c.reason, func.count()).group_by(_FAILURES.c.reason)
        with self._read() as conn:
            return dict(conn.execute(query).all())

    def not_duplicates(self) -> set[tuple[Path, Path]]:
        """Pairs the user judged distinct, each in the order it is stored (sorted)."""
        with self._read() as conn:
            rows = conn.execute(select(_NOT_DUPLICATES.c.path_a, _NOT_DUPLICATES.c.path_b))
            return {(_text_path(a), _text_path(b)) for a, b in rows}

    def disk_size(self) -> int | None:
        """Bytes the catalog takes on disk (its tables and indexes on a server), or None
        for one in memory."""
        url = self._reader.url
        if self.on_server:
            tables = [table.name for table in _METADATA.sorted_tables]
            with self._read() as conn:
                size = text("SELECT pg_total_relation_size(CAST(:name AS regclass))")
                return sum(
                    conn.scalar(size, {"name": name}) or 0
                    for name in tables
                    if inspect(conn).has_table(name)
                )
        if not url.database or url.database == ":memory:":
            return None
        database = Path(url.database)
        files = [database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))]
        return sum(file.stat().st_size for file in files if file.exists())

    def set_labels(self, labels: Iterable[tuple[str, str]], replace: bool = False) -> int:
        """Give photos (by content hash) labels, in one transaction; see
        ``CatalogTransaction.add_labels``."""
        with self.transaction() as tx:
            return tx.add_labels(labels, replace=replace)

    def labelled_images(self) -> list[tuple[int, str, str]]:
        """(image id, content hash, label) of every indexed image whose content carries a
        label, by id then label."""
        if self._version < _LABELS_VERSION:  # an older catalog read as it is has none
            return []
        query = (
            select(_IMAGES.c.id, _IMAGES.c.content_hash, _LABELS.c.label)
            .join(_LABELS, _LABELS.c.content_hash == _IMAGES.c.content_hash)
            .order_by(_IMAGES.c.id, _LABELS.c.label)
        )
        with self._read() as conn:
            return [(int(i), str(h), str(label)) for i, h, label in conn.execute(query)]

    def labelled_vectors(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """(ids, (n, d) vectors) of the indexed images whose content carries a label, by
        id, in one query: what recognition searches."""
        if self._version < _LABELS_VERSION:
            return np.empty(0, dtype=np.int64), _stack([])
        labelled = select(_LABELS.c.content_hash).distinct()
        query = (
            select(_IMAGES.c.id, _IMAGES.c.vector)
            .where(_IMAGES.c.content_hash.in_(labelled))
            .order_by(_IMAGES.c.id)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return np.array([r[0] for r in rows], dtype=np.int64), _stack([r[1] for r in rows])

    def labels_by_hash(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        """The labels of those content ``hashes`` that carry any, each list sorted."""
        if self._version < _LABELS_VERSION:
            return {}
        found: dict[str, list[str]] = {}
        with self._read() as conn:
            for chunk in _chunks(list(dict.fromkeys(hashes))):
                query = (
                    select(_LABELS.c.content_hash, _LABELS.c.label)
                    .where(_LABELS.c.content_hash.in_(chunk))
                    .order_by(_LABELS.c.content_hash, _LABELS.c.label)
                )
                for digest, label in conn.execute(query):
                    found.setdefault(digest, []).append(label)
        return found

    def label_counts(self) -> dict[str, tuple[int, int]]:
        """label -> (photos labelled, by content; of them, indexed now), by label."""
        if self._version < _LABELS_VERSION:
            return {}
        indexed = (
            select(_IMAGES.c.content_hash)
            .where(_IMAGES.c.content_hash == _LABELS.c.content_hash)
            .exists()
        )
        query = (
            select(
                _LABELS.c.label,
                func.count(),
                func.sum(case((indexed, 1), else_=0)),
            )
            .group_by(_LABELS.c.label)
            .order_by(_LABELS.c.label)
        )
        with self._read() as conn:
            return {str(label): (int(n), int(k or 0)) for label, n, k in conn.execute(query)}


def _dialect_insert(dialect: Dialect) -> Callable[[Any], Any]:
    """The INSERT of ``dialect`` that can say ON CONFLICT (both back ends speak it)."""
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def _under(path: Path) -> Any:
    """A condition on failures: the file ``path``, or any file inside it as a folder."""
    exact = _path_text(path)
    prefix = exact if exact.endswith(os.sep) else exact + os.sep
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # as in Catalog.paths_under
    return (_FAILURES.c.path == exact) | ((_FAILURES.c.path >= prefix) & (_FAILURES.c.path < end))


def user_error(error: BaseException) -> GhostmatchError | None:
    """The ``GhostmatchError`` for a database error from the disk, the file or another
    process that reached the caller without going through a ``Catalog``; else None."""
    if isinstance(error, exc.DBAPIError | sqlite3.Error) and _is_environmental(error):
        return _catalog_error(error, "of the index")
    return None


class CatalogTransaction:
    """The writes of one ``Catalog.transaction()`` block, committed together at its end."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # Per-image tables by name: whether the catalog has them (one older than their
        # version, opened by a process that could not migrate it, has not).
        self._tables: dict[str, bool] = {}

    def insert_images(self, rows: Sequence[NewImage]) -> list[int]:
        """Add images and return their ids in order. A path already cataloged (another
        writer of a shared catalog may have added it since this one looked) keeps its row
        and id, and takes the new values: a path is never cataloged twice."""
        if not rows:
            return []
        now = _now()
        params = [
            {
                "path": _path_text(row.path),
                "size": row.size,
                "mtime_ns": row.mtime_ns,
                "content_hash": row.content_hash,
                "width": row.width,
                "height": row.height,
                "format": row.format,
                "indexed_at": now,
                "vector": _vector_bytes(row.vector),
            }
            for row in rows
        ]
        upsert = _dialect_insert(self._conn.dialect)(_IMAGES)
        replaced = {name: upsert.excluded[name] for name in params[0] if name != "path"}
        query = upsert.on_conflict_do_update(index_elements=["path"], set_=replaced).returning(
            _IMAGES.c.path, _IMAGES.c.id
        )
        # Matched up by path: SQLAlchemy's sort by parameter order assumes ids that grow
        # with it, which a replaced row's older id breaks.
        ids = {path: image_id for path, image_id in self._conn.execute(query, params)}
        return [ids[param["path"]] for param in params]

    def update_image(
        self,
        image_id: int,
        *,
        path: Path | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        content_hash: str | None = None,
        width: int | None = None,
        height: int | None = None,
        format: str | None = None,
        vector: NDArray[np.float32] | None = None,
    ) -> None:
        """Change the given fields of one image (None leaves a field as it is).

        A new vector also sets ``indexed_at`` to now and drops the image's regional
        descriptors, turned-copy screen data and local maps (``set_regions``,
        ``set_turn_screens`` and ``set_local_maps`` store new ones). Raises KeyError for an
        unknown id.
        """
        values: dict[str, Any] = {
            "size": size,
            "mtime_ns": mtime_ns,
            "content_hash": content_hash,
            "width": width,
            "height": height,
            "format": format,
        }
        values = {name: value for name, value in values.items() if value is not None}
        if path is not None:
            values["path"] = _path_text(path)
        if vector is not None:
            values["vector"] = _vector_bytes(vector)
            values["indexed_at"] = _now()
        if not values:
            return
        result = self._conn.execute(update(_IMAGES).where(_IMAGES.c.id == image_id).values(values))
        if result.rowcount == 0:
            raise KeyError(image_id)
        if vector is not None:
            # The old per-image data describes the old pixels; new data comes with
            # set_regions and set_turn_screens.
            self._drop_per_image([image_id])

    def delete_images(self, ids: Iterable[int]) -> None:
        for chunk in _chunks(list(ids)):
            # Explicitly too: a PostgreSQL catalog cascades, but nothing says an SQLite
            # connection made elsewhere turned its foreign keys on.
            self._drop_per_image(chunk)
            self._conn.execute(delete(_IMAGES).where(_IMAGES.c.id.in_(chunk)))

    def set_regions(self, rows: Iterable[tuple[int, NDArray[np.float32]]]) -> None:
        """Store the (regions, d) regional descriptors of images, replacing ones they had."""
        self._replace_per_image(
            _REGIONS, [{"image_id": int(i), "vectors": _region_bytes(r)} for i, r in rows]
        )

    def set_local_maps(self, rows: Iterable[tuple[int, str, NDArray[np.float16]]]) -> None:
        """Store the (height, width, channels) local maps of images with what made them,
        replacing ones they had."""
        params = []
        for image_id, made_by, maps in rows:
            array = np.ascontiguousarray(maps, dtype=_MAP_DTYPE)
            if array.ndim != 3:
                raise ValueError(f"local maps must be (height, width, channels), not {array.shape}")
            height, width, _ = array.shape
            params.append(
                {
                    "image_id": int(image_id),
                    "made_by": made_by,
                    "height": height,
                    "width": width,
                    "maps": array.tobytes(),
                }
            )
        self._replace_per_image(_LOCAL_MAPS, params)

    def set_turn_screens(self, rows: Iterable[tuple[int, TurnScreen]]) -> None:
        """Store the turned-copy screen data of images, replacing what they had."""
        params = [
            {
                "image_id": int(i),
                "thumbnail": screen.thumbnail,
                "tilt": screen.tilt,
                "fill": None if screen.fill is None else _packed_colour(screen.fill),
                "straightened": screen.straightened,
            }
            for i, screen in rows
        ]
        self._replace_per_image(_TURN_SCREENS, params)

    def _replace_per_image(self, table: Table, params: list[dict[str, Any]]) -> None:
        """Write ``params`` (rows with their ``image_id``) to the per-image ``table``,
        replacing the rows those images had; nothing where the catalog lacks the table."""
        if not params or not self._has(table):
            return
        for chunk in _chunks(params):
            ids = [p["image_id"] for p in chunk]
            self._conn.execute(delete(table).where(table.c.image_id.in_(ids)))
            self._conn.execute(insert(table), list(chunk))

    def _drop_per_image(self, ids: Sequence[int]) -> None:
        """Delete the rows of images ``ids`` from every per-image table the catalog has."""
        for table in _PER_IMAGE:
            if self._has(table):
                self._conn.execute(delete(table).where(table.c.image_id.in_(ids)))

    def _has(self, table: Table) -> bool:
        if table.name not in self._tables:
            self._tables[table.name] = inspect(self._conn).has_table(table.name)
        return self._tables[table.name]

    def record_failures(self, rows: Sequence[NewFailure]) -> None:
        """Record files that could not be indexed, replacing earlier failures of the paths."""
        self.clear_failures(row.path for row in rows)
        if not rows:
            return
        now = _now()
        params = [
            {
                "path": _path_text(row.path),
                "size": row.size,
                "mtime_ns": row.mtime_ns,
                "reason": row.reason,
                "detail": row.detail,
                "seen_at": now,
                "ctime_ns": row.ctime_ns,
                "max_megapixels": row.max_megapixels,
            }
            for row in rows
        ]
        self._conn.execute(insert(_FAILURES), params)

    def clear_failures(self, paths: Iterable[Path]) -> None:
        for chunk in _chunks([_path_text(path) for path in paths]):
            self._conn.execute(delete(_FAILURES).where(_FAILURES.c.path.in_(chunk)))

    def forget_failures(self, paths: Iterable[Path]) -> int:
        """Drop the failures of these paths and of everything under them, as folders."""
        return sum(self._conn.execute(delete(_FAILURES).where(_under(p))).rowcount for p in paths)

    def get_meta(self, key: str) -> Any | None:
        """The value under ``key`` as this transaction sees it (its own writes included)."""
        value = self._conn.scalar(select(_META.c.value).where(_META.c.key == key))
        return None if value is None else json.loads(value)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``, replacing any earlier one."""
        text = json.dumps(value)
        result = self._conn.execute(update(_META).where(_META.c.key == key).values(value=text))
        if result.rowcount == 0:
            self._conn.execute(insert(_META), {"key": key, "value": text})

    def add_roots(self, paths: Iterable[Path]) -> None:
        """Remember folders as indexed; ones already known are left as they are."""
        texts = list(dict.fromkeys(_path_text(path) for path in paths))
        known: set[str] = set()
        for chunk in _chunks(texts):
            known.update(self._conn.scalars(select(_ROOTS.c.path).where(_ROOTS.c.path.in_(chunk))))
        now = _now()
        new = [{"path": text, "added_at": now} for text in texts if text not in known]
        if new:
            self._conn.execute(insert(_ROOTS), new)

    def add_not_duplicate(self, a: Path, b: Path) -> None:
        """Record that two images are distinct; the pair is stored sorted, once."""
        path_a, path_b = sorted((_path_text(a), _path_text(b)))
        exists = self._conn.scalar(
            select(func.count())
            .select_from(_NOT_DUPLICATES)
            .where(_NOT_DUPLICATES.c.path_a == path_a, _NOT_DUPLICATES.c.path_b == path_b)
        )
        if not exists:
            self._conn.execute(insert(_NOT_DUPLICATES), {"path_a": path_a, "path_b": path_b})

    def add_labels(self, labels: Iterable[tuple[str, str]], replace: bool = False) -> int:
        """Give photos (content hash, label) labels; ones they already carry are left as they
        are. With ``replace`` each named photo first loses the labels it had. Returns how
        many labels were new."""
        pairs = list(dict.fromkeys((str(h), str(label)) for h, label in labels))
        hashes = list(dict.fromkeys(h for h, _ in pairs))
        if replace:
            self.remove_labels(hashes)
        known: set[tuple[str, str]] = set()
        for chunk in _chunks(hashes):
            query = select(_LABELS.c.content_hash, _LABELS.c.label).where(
                _LABELS.c.content_hash.in_(chunk)
            )
            known.update((h, label) for h, label in self._conn.execute(query))
        new = [{"content_hash": h, "label": label} for h, label in pairs if (h, label) not in known]
        if new:
            self._conn.execute(insert(_LABELS), new)
        return len(new)

    def remove_labels(self, hashes: Iterable[str] | None = None, label: str | None = None) -> int:
        """Drop labels: those of these content ``hashes`` (all photos when None), only
        ``label`` when given. Returns how many were dropped."""
        condition = [] if label is None else [_LABELS.c.label == label]
        if hashes is None:
            return int(self._conn.execute(delete(_LABELS).where(*condition)).rowcount)
        dropped = 0
        for chunk in _chunks(list(dict.fromkeys(hashes))):
            query = delete(_LABELS).where(_LABELS.c.content_hash.in_(chunk), *condition)
            dropped += int(self._conn.execute(query).rowcount)
        return dropped
