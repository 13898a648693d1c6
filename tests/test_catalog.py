"""Contracts of the catalog, checked on real databases: an SQLite file and a PostgreSQL
server (``catalog_url`` runs each test on both)."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import URL, Connection, Engine, create_engine, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

import ghostmatch.store.catalog as catalog_module
from benchmarks.postgres import TemporaryServer
from ghostmatch.errors import GhostmatchError
from ghostmatch.store.catalog import Catalog, NewFailure, NewImage

DIM = 8


def new_image(path: str | Path, seed: int = 0, content_hash: str | None = None) -> NewImage:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return NewImage(
        path=Path(path),
        size=1000 + seed,
        mtime_ns=1_700_000_000_123_456_789 + seed,
        content_hash=content_hash or f"hash{seed}",
        width=640,
        height=480,
        format="JPEG",
        vector=vector / np.linalg.norm(vector),
    )


@pytest.fixture
def catalog(catalog_url: URL) -> Iterator[Catalog]:
    with Catalog(catalog_url) as opened:
        yield opened


def execute(url: URL, *statements: str, **params: object) -> list[tuple[object, ...]]:
    """Run SQL on the database behind the catalog's back, as another client would; the
    last statement's rows."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                result = conn.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def insert(catalog: Catalog, *images: NewImage) -> list[int]:
    with catalog.transaction() as tx:
        return tx.insert_images(images)


def test_insert_then_read_back_everything(catalog: Catalog) -> None:
    images = [new_image(f"/photos/{i}.jpg", seed=i, content_hash="same") for i in range(3)]
    before = datetime.now(timezone.utc)
    ids = insert(catalog, *images)

    assert ids == [1, 2, 3]
    assert catalog.count() == 3
    assert catalog.ids().tolist() == ids
    records = catalog.get([ids[2], 999, ids[0]])
    assert [record.id for record in records] == [ids[2], ids[0]]
    record = records[1]
    assert record.path == images[0].path
    assert (record.size, record.mtime_ns) == (images[0].size, images[0].mtime_ns)
    assert (record.width, record.height, record.format) == (640, 480, "JPEG")
    assert record.indexed_at.tzinfo == timezone.utc
    assert before <= record.indexed_at <= datetime.now(timezone.utc)

    all_ids, vectors = catalog.vectors()
    assert all_ids.tolist() == ids
    assert vectors.dtype == np.float32 and vectors.shape == (3, DIM)
    assert vectors.tobytes() == np.stack([image.vector for image in images]).tobytes()
    some_ids, some = catalog.vectors([ids[2], 999, ids[1]])
    assert some_ids.tolist() == [ids[2], ids[1]]
    assert some.tobytes() == np.stack([images[2].vector, images[1].vector]).tobytes()
    assert catalog.all_stat() == {
        image.path: (image_id, image.size, image.mtime_ns)
        for image_id, image in zip(ids, images, strict=True)
    }
    by_path = catalog.records_by_path([images[1].path, Path("/photos/missing.jpg")])
    assert list(by_path) == [images[1].path] and by_path[images[1].path].id == ids[1]
    by_hash = catalog.find_by_hash(["same", "other"])
    assert [record.id for record in by_hash["same"]] == ids and "other" not in by_hash


def test_empty_catalog_reads(catalog: Catalog) -> None:
    assert catalog.count() == 0
    assert catalog.ids().shape == (0,)
    ids, vectors = catalog.vectors()
    assert ids.shape == (0,) and vectors.shape == (0, 0)
    assert catalog.all_stat() == {} and catalog.get([1]) == []


def test_deleted_ids_are_never_reused(catalog_url: URL) -> None:
    with Catalog(catalog_url) as catalog:
        ids = insert(catalog, *(new_image(f"/p/{i}.jpg", i) for i in range(3)))
        with catalog.transaction() as tx:
            tx.delete_images([ids[2]])
        assert insert(catalog, new_image("/p/new.jpg", 7)) == [4]
        with catalog.transaction() as tx:
            tx.delete_images([4])
    with Catalog(catalog_url) as catalog:
        assert insert(catalog, new_image("/p/newer.jpg", 8)) == [5]
        assert catalog.ids().tolist() == [ids[0], ids[1], 5]


def test_an_exception_rolls_the_whole_transaction_back(catalog: Catalog) -> None:
    insert(catalog, new_image("/p/kept.jpg"))
    with pytest.raises(RuntimeError), catalog.transaction() as tx:
        tx.insert_images([new_image("/p/a.jpg", 1), new_image("/p/b.jpg", 2)])
        tx.update_image(1, size=5)
        tx.record_failures([NewFailure(Path("/p/bad.jpg"), 1, 2, "decode", "truncated")])
        tx.set_meta("model", "x")
        tx.add_roots([Path("/p")])
        raise RuntimeError("interrupted")

    assert catalog.count() == 1 and catalog.get([1])[0].size == new_image("").size
    assert catalog.failures() == [] and catalog.get_meta("model") is None
    assert catalog.roots() == []


def test_other_connections_see_writes_only_after_commit(catalog_url: URL) -> None:
    with Catalog(catalog_url) as writer, Catalog(catalog_url) as reader:
        with writer.transaction() as tx:
            tx.insert_images([new_image("/p/a.jpg")])
            assert reader.count() == 0
            assert writer.count() == 0  # its reads use other connections too
        assert reader.count() == 1


def test_a_path_is_cataloged_once(catalog: Catalog) -> None:
    """Adding a cataloged path again (another writer of a shared catalog got there first)
    replaces its values and keeps its row and id; moving a row onto one is refused."""
    (first,) = insert(catalog, new_image("/p/a.jpg"))
    again = new_image("/p/a.jpg", 2)
    ids = insert(catalog, new_image("/p/b.jpg", 1), again, new_image("/p/c.jpg", 3))
    assert ids[1] == first and len(set(ids)) == 3
    assert catalog.count() == 3 and sorted(catalog.ids().tolist()) == sorted(ids)
    record = catalog.get([first])[0]
    assert (record.path, record.size, record.content_hash) == (again.path, again.size, "hash2")
    assert catalog.vectors([first])[1].tobytes() == again.vector.tobytes()
    with pytest.raises(IntegrityError), catalog.transaction() as tx:
        tx.update_image(first, path=Path("/p/c.jpg"))
    assert [record.path for record in catalog.get(ids)] == [Path(f"/p/{n}.jpg") for n in "bac"]


def test_update_image(catalog: Catalog) -> None:
    (image_id,) = insert(catalog, new_image("/p/a.jpg"))
    first = catalog.get([image_id])[0]
    with catalog.transaction() as tx:
        tx.update_image(image_id, path=Path("/q/a.jpg"))
    moved = catalog.get([image_id])[0]
    assert moved.path == Path("/q/a.jpg") and moved.indexed_at == first.indexed_at
    assert catalog.records_by_path([Path("/p/a.jpg")]) == {}

    vector = new_image("", seed=9).vector
    with catalog.transaction() as tx:
        tx.update_image(image_id, size=1, mtime_ns=2, content_hash="h", vector=vector)
    changed = catalog.get([image_id])[0]
    assert (changed.size, changed.mtime_ns, changed.content_hash) == (1, 2, "h")
    assert changed.indexed_at >= first.indexed_at
    assert catalog.vectors()[1][0].tobytes() == vector.tobytes()

    with pytest.raises(KeyError), catalog.transaction() as tx:
        tx.update_image(999, size=1)


def test_a_non_utf8_file_name_round_trips(
    tmp_path: Path, catalog_url: URL, catalog: Catalog
) -> None:
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    names = [b"na\xefve.jpg", "real \ufffd and \ufffddc80.jpg".encode(), b"\xed\xb2\x80.png"]
    for name in names:
        open(folder + b"/" + name, "wb").close()
    paths = sorted(Path(os.fsdecode(folder)).iterdir())
    assert any("\udce9" in str(path) for path in paths)  # undecodable bytes came back escaped

    ids = insert(catalog, *(new_image(path, i) for i, path in enumerate(paths)))

    records = catalog.get(ids)
    assert [record.path for record in records] == paths
    assert all(record.path.exists() for record in records)
    assert sorted(catalog.all_stat()) == paths
    assert sorted(catalog.records_by_path(paths)) == paths
    assert [path for _, path in catalog.paths_under(Path(os.fsdecode(folder)))] == paths
    assert catalog.paths_under(tmp_path / "caf\ufffd") == []
    # What lands in the database is valid text that a plain client can read.
    stored = [row[0] for row in execute(catalog_url, "SELECT path FROM images")]
    assert len(stored) == 3 and all(str(value).encode("utf-8") for value in stored)


def test_an_index_directory_may_have_any_name(tmp_path: Path) -> None:
    directory = Path(os.fsdecode(os.fsencode(tmp_path) + b"/odd ?#%20 \xff name"))
    directory.mkdir()
    with Catalog.for_directory(directory) as catalog:
        insert(catalog, new_image("/p/a.jpg"))
    assert (directory / "catalog.db").is_file()
    with Catalog.for_directory(directory) as catalog:
        assert catalog.count() == 1


def test_paths_under_is_a_folder_prefix_not_a_string_prefix(catalog: Catalog) -> None:
    names = ["a/b/x.jpg", "a/b/c/y.jpg", "a/bc/z.jpg", "a/b.jpg", "a/b", "A/b/w.jpg", "a/b0.jpg"]
    ids = insert(catalog, *(new_image(f"/r/{name}", i) for i, name in enumerate(names)))

    expected = [(ids[1], Path("/r/a/b/c/y.jpg")), (ids[0], Path("/r/a/b/x.jpg"))]
    assert catalog.paths_under(Path("/r/a/b")) == expected
    assert catalog.paths_under(Path("/r/a/b/")) == expected
    assert len(catalog.paths_under(Path("/"))) == len(names)
    assert catalog.paths_under(Path("/r/a/b/x.jpg")) == []


def test_meta_holds_json(catalog: Catalog) -> None:
    card = {"name": "ghostnet_100", "mean": [0.485, 0.456, 0.406], "size": 224, "gem": None}
    catalog.set_meta("model", card)
    catalog.set_meta("threshold", 0.8125)
    assert catalog.get_meta("model") == card
    assert catalog.get_meta("threshold") == 0.8125
    assert catalog.get_meta("missing") is None
    catalog.set_meta("threshold", 0.5)
    assert catalog.get_meta("threshold") == 0.5


def test_roots_are_kept_once(catalog: Catalog) -> None:
    catalog.add_roots([Path("/b"), Path("/a"), Path("/a")])
    catalog.add_roots([Path("/a/")])
    assert catalog.roots() == [Path("/a"), Path("/b")]


def test_not_duplicates_ignore_order(catalog: Catalog) -> None:
    catalog.add_not_duplicate(Path("/p/b.jpg"), Path("/p/a.jpg"))
    catalog.add_not_duplicate(Path("/p/a.jpg"), Path("/p/b.jpg"))
    catalog.add_not_duplicate(Path("/p/b.jpg"), Path("/p/a.jpg"))
    catalog.add_not_duplicate(Path("/p/c.jpg"), Path("/p/a.jpg"))
    assert catalog.not_duplicates() == {
        (Path("/p/a.jpg"), Path("/p/b.jpg")),
        (Path("/p/a.jpg"), Path("/p/c.jpg")),
    }


def test_failures_are_counted_by_reason_and_replaced(catalog: Catalog) -> None:
    with catalog.transaction() as tx:
        tx.record_failures(
            [
                NewFailure(Path("/p/a.jpg"), 10, 20, "decode", "cannot identify image"),
                NewFailure(Path("/p/b.jpg"), 11, 21, "decode", "truncated"),
                NewFailure(Path("/p/c.jpg"), None, None, "permission", "denied"),
            ]
        )
    assert catalog.failure_counts() == {"decode": 2, "permission": 1}

    with catalog.transaction() as tx:
        tx.record_failures([NewFailure(Path("/p/a.jpg"), 12, 22, "too_large", "1e9 pixels")])
        tx.clear_failures([Path("/p/b.jpg")])
    assert catalog.failure_counts() == {"permission": 1, "too_large": 1}
    failures = catalog.failures()
    assert [(f.path, f.size, f.reason) for f in failures] == [
        (Path("/p/a.jpg"), 12, "too_large"),
        (Path("/p/c.jpg"), None, "permission"),
    ]
    assert failures[0].seen_at.tzinfo == timezone.utc


def test_failures_keep_what_decides_a_retry(catalog: Catalog) -> None:
    with catalog.transaction() as tx:
        tx.record_failures(
            [
                NewFailure(Path("/p/big.jpg"), 10, 20, "too-large", "huge", 30, 0.5),
                NewFailure(Path("/p/gone.jpg"), None, None, "unreadable", "no such file"),
            ]
        )
    big, gone = catalog.failures()
    assert (big.ctime_ns, big.max_megapixels) == (30, 0.5)
    assert (gone.ctime_ns, gone.max_megapixels) == (None, None)


def test_forget_failures_of_files_and_folders(catalog: Catalog) -> None:
    paths = ["/p/a.jpg", "/p/sub/b.jpg", "/p/sub/deeper/c.jpg", "/p/sub-other/d.jpg", "/q/e.jpg"]
    with catalog.transaction() as tx:
        tx.record_failures([NewFailure(Path(p), 1, 2, "corrupt", "bad") for p in paths])
    assert catalog.forget_failures([Path("/p/sub"), Path("/q/e.jpg"), Path("/nowhere")]) == 3
    assert [str(f.path) for f in catalog.failures()] == ["/p/a.jpg", "/p/sub-other/d.jpg"]


def test_failures_recorded_before_version_2_are_kept(catalog_url: URL) -> None:
    with Catalog(catalog_url) as catalog, catalog.transaction() as tx:
        tx.record_failures([NewFailure(Path("/p/a.jpg"), 10, 20, "corrupt", "bad")])
    execute(  # as version 1 left it
        catalog_url,
        "DELETE FROM schema_version WHERE version > 1",
        "ALTER TABLE failures DROP COLUMN ctime_ns",
        "ALTER TABLE failures DROP COLUMN max_megapixels",
    )
    with Catalog(catalog_url) as catalog:
        assert catalog.schema_version() == catalog_module.MIGRATIONS[-1][0]
        [failure] = catalog.failures()
    assert (failure.path, failure.size, failure.mtime_ns) == (Path("/p/a.jpg"), 10, 20)
    assert (failure.ctime_ns, failure.max_megapixels) == (None, None)  # so tried again once


def test_a_damaged_catalog_raises_ghostmatch_errors_only(tmp_path: Path) -> None:
    with Catalog.for_directory(tmp_path) as catalog:
        insert(catalog, *(new_image(f"/p/{i}.jpg", seed=i) for i in range(200)))
    file = tmp_path / "catalog.db"
    size = file.stat().st_size
    with file.open("r+b") as f:  # every page but the first (the schema) and the last
        f.seek(4096)
        f.write(b"\x5a" * (size - 2 * 4096))

    def delete(catalog: Catalog) -> None:
        with catalog.transaction() as tx:
            tx.delete_images([1, 2])

    uses: list[Callable[[Catalog], object]] = [
        Catalog.count,
        Catalog.all_stat,
        Catalog.vectors,
        Catalog.failures,
        delete,
    ]
    for use in uses:
        # Opening reads the schema version, which may already meet the damage.
        with (
            pytest.raises(GhostmatchError, match=r"is damaged .*restore it from a backup"),
            Catalog.for_directory(tmp_path) as catalog,
        ):
            use(catalog)


def test_bulk_insert_reads_back_every_vector(catalog: Catalog) -> None:
    n, dim = 10_000, 960
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    rows = [
        NewImage(Path(f"/bulk/{i % 97}/{i}.jpg"), i, i, f"h{i}", 1, 1, "PNG", vectors[i])
        for i in range(n)
    ]
    with catalog.transaction() as tx:
        ids = tx.insert_images(rows)

    assert len(ids) == n == catalog.count() == len(catalog.all_stat())
    all_ids, stored = catalog.vectors()
    assert all_ids.tolist() == ids
    assert np.array_equal(stored, vectors)
    assert (catalog.disk_size() or 0) > vectors.nbytes


def test_migrations_run_once_in_order(catalog_url: URL, monkeypatch: pytest.MonkeyPatch) -> None:
    latest = catalog_module.MIGRATIONS[-1][0]
    with Catalog(catalog_url) as catalog:
        assert catalog.schema_version() == latest
        insert(catalog, new_image("/p/a.jpg"))
    applied: list[int] = []

    def add_note_column(conn: Connection) -> None:
        applied.append(latest + 1)
        conn.execute(text("ALTER TABLE images ADD COLUMN note TEXT"))

    migrations = [
        *catalog_module.MIGRATIONS,
        (latest + 1, "test: a note per image", add_note_column),
    ]
    monkeypatch.setattr(catalog_module, "MIGRATIONS", migrations)
    for _ in range(2):
        with Catalog(catalog_url) as catalog:
            assert catalog.schema_version() == latest + 1
            assert catalog.count() == 1
    assert applied == [latest + 1]
    history = execute(catalog_url, "SELECT version, reason FROM schema_version ORDER BY 1")
    engine = create_engine(catalog_url)
    columns = [column["name"] for column in inspect(engine).get_columns("images")]
    engine.dispose()
    assert [version for version, _ in history] == list(range(1, latest + 2))
    assert history[-1][1] == "test: a note per image"
    assert "note" in columns


def test_a_failed_migration_changes_nothing(
    catalog_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    Catalog(catalog_url).close()

    def half_done(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE half (x INTEGER)"))
        raise RuntimeError("bug in migration")

    latest = catalog_module.MIGRATIONS[-1][0]
    monkeypatch.setattr(
        catalog_module,
        "MIGRATIONS",
        [*catalog_module.MIGRATIONS, (latest + 1, "test", half_done)],
    )
    with pytest.raises(RuntimeError):
        Catalog(catalog_url)
    monkeypatch.undo()
    with Catalog(catalog_url) as catalog:
        assert catalog.schema_version() == latest
    engine = create_engine(catalog_url)
    assert not inspect(engine).has_table("half")
    engine.dispose()


def test_a_newer_database_is_refused(catalog_url: URL) -> None:
    Catalog(catalog_url).close()
    execute(catalog_url, "INSERT INTO schema_version VALUES (99, 'future', '2099-01-01 00:00:00')")
    with pytest.raises(GhostmatchError, match=r"newer ghostmatch.*upgrade"):
        Catalog(catalog_url)


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "catalog.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(GhostmatchError, match=r"catalog .* is damaged .*not a database"):
        Catalog.for_directory(tmp_path)


def test_migrations_build_exactly_the_declared_schema(
    catalog_url: URL, request: pytest.FixtureRequest
) -> None:
    versions = [version for version, _, _ in catalog_module.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))

    Catalog(catalog_url).close()
    migrated = create_engine(catalog_url)
    if catalog_url.get_backend_name() == "sqlite":
        declared = create_engine("sqlite://")
    else:
        declared = create_engine(request.getfixturevalue("postgres_server").new_database())
    catalog_module._METADATA.create_all(declared)

    def schema(engine: Engine) -> dict[str, object]:
        inspector = inspect(engine)
        return {
            table: (
                [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
                inspector.get_pk_constraint(table)["constrained_columns"],
                sorted(
                    (i["name"], tuple(i["column_names"]), i["unique"])
                    for i in inspector.get_indexes(table)
                ),
                sorted(str(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            )
            for table in sorted(inspector.get_table_names())
        }

    assert schema(migrated) == schema(declared)
    migrated.dispose()
    declared.dispose()


def test_the_schema_compiles_for_postgresql() -> None:
    dialect = postgresql.dialect()
    ddl = {
        table.name: str(CreateTable(table).compile(dialect=dialect))
        for table in catalog_module._METADATA.sorted_tables
    }
    assert "id BIGSERIAL" in ddl["images"]
    assert 'path TEXT COLLATE "C" NOT NULL' in ddl["images"]
    assert "vector BYTEA NOT NULL" in ddl["images"]


def test_user_error_names_what_to_do_for_failures_of_the_machine_only(tmp_path: Path) -> None:
    file = tmp_path / "junk.db"
    file.write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError) as damaged:
        sqlite3.connect(file).execute("SELECT 1 FROM sqlite_master")
    error = catalog_module.user_error(damaged.value)
    assert error is not None and "is damaged (file is not a database)" in str(error)
    with sqlite3.connect(":memory:") as raw, pytest.raises(sqlite3.IntegrityError) as bug:
        raw.execute("CREATE TABLE t (x UNIQUE)")
        raw.execute("INSERT INTO t VALUES (1), (1)")
    assert catalog_module.user_error(bug.value) is None  # a bug keeps its traceback


# ---------------------------------------------------------------------------- shared catalogs


def test_writers_of_one_catalog_take_turns(catalog_url: URL) -> None:
    """A write transaction that reads a value and writes it back changed (the generation
    counter, meta values) is never interleaved with another's: while one is open, a writer
    through another connection waits for it, on a server as in a file."""
    with Catalog(catalog_url) as first, Catalog(catalog_url) as second:
        first.set_meta("counter", 0)

        def bump_from_another_client() -> None:
            with second.transaction() as tx:
                tx.set_meta("counter", tx.get_meta("counter") + 1)

        other = threading.Thread(target=bump_from_another_client)
        with first.transaction() as tx:
            seen = tx.get_meta("counter")
            other.start()
            # Until the other writer waits for this one (or, were nothing to stop it,
            # finishes), checked on the server itself; SQLite's wait cannot be seen.
            deadline = time.monotonic() + 60
            while not (waiting_for_a_lock(catalog_url) or not other.is_alive()):
                assert time.monotonic() < deadline, "the other writer neither waited nor ran"
                if catalog_url.get_backend_name() == "sqlite":
                    break
                time.sleep(0.01)
            tx.set_meta("counter", seen + 1)
        other.join()
        assert first.get_meta("counter") == 2


def waiting_for_a_lock(url: URL) -> bool:
    if url.get_backend_name() == "sqlite":
        return False
    rows = execute(url, "SELECT count(*) FROM pg_locks WHERE NOT granted")
    return bool(rows[0][0])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_is_one_line_that_says_what_to_check() -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql://ghost:secret@127.0.0.1:{closed_port()}/photos"
    with pytest.raises(GhostmatchError) as raised:
        Catalog(url)
    message = str(raised.value)
    assert message.startswith("cannot connect to the catalog database postgresql")
    assert "check that the server is running" in message and "\n" not in message
    assert "secret" not in message and "***" in message


def test_a_missing_database_or_user_says_so(postgres_server: TemporaryServer) -> None:
    url = postgres_server.url("no_such_database")
    with pytest.raises(GhostmatchError, match=r"database .* does not exist .*createdb"):
        Catalog(url)
    with pytest.raises(GhostmatchError, match=r"cannot log in .*check the user and password"):
        Catalog(url.set(username="nobody", database="postgres"))


def test_a_catalog_url_must_name_a_known_database() -> None:
    for bad in ("mysql://u@h/db", "photos", "http://example.com/"):
        with pytest.raises(GhostmatchError, match=r"is not a catalog URL; give postgresql://"):
            Catalog(bad)
    assert catalog_module.catalog_url("postgres://u@h/db").drivername == "postgresql+psycopg"


def test_opening_without_create_leaves_an_empty_database_empty(catalog_url: URL) -> None:
    with pytest.raises(catalog_module.EmptyCatalogError):
        Catalog(catalog_url, create=False)
    engine = create_engine(catalog_url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_regions_round_trip_and_go_with_their_image(catalog: Catalog) -> None:
    a, b, c = insert(
        catalog, new_image("/p/a.jpg", 1), new_image("/p/b.jpg", 2), new_image("/p/c.jpg", 3)
    )
    rng = np.random.default_rng(0)
    parts = {i: rng.standard_normal((5, DIM)).astype(np.float32) for i in (a, b, c)}
    assert catalog.ids_without_regions().tolist() == [a, b, c]
    with catalog.transaction() as tx:
        tx.set_regions(parts.items())
    ids, stored = catalog.regions()
    assert ids.tolist() == [a, b, c] and stored.shape == (3, 5, DIM)
    # Stored as float16: what a ranking of candidates needs, in half the bytes.
    np.testing.assert_allclose(stored[1], parts[b], rtol=1e-3, atol=1e-3)
    assert catalog.regions([c, a])[0].tolist() == [c, a]
    assert catalog.ids_without_regions().size == 0

    # A move keeps the image's row, so its regions; a new vector drops them (new pixels);
    # a deleted image takes its regions along.
    with catalog.transaction() as tx:
        tx.update_image(a, path=Path("/q/a.jpg"))
        tx.update_image(b, vector=new_image("", seed=9).vector)
        tx.delete_images([c])
    assert catalog.regions()[0].tolist() == [a]
    assert catalog.ids_without_regions().tolist() == [b]
    with catalog.transaction() as tx:
        tx.set_regions([(b, parts[a])])
    np.testing.assert_allclose(catalog.regions([b])[1][0], parts[a], atol=1e-3)


def test_local_maps_round_trip_by_what_made_them_and_go_with_their_image(
    catalog: Catalog,
) -> None:
    a, b, c = insert(
        catalog, new_image("/p/a.jpg", 1), new_image("/p/b.jpg", 2), new_image("/p/c.jpg", 3)
    )
    rng = np.random.default_rng(0)
    maps = {i: rng.standard_normal((10, 7, 12)).astype(np.float16) for i in (a, b, c)}
    assert catalog.local_maps([a, b, c], "onnx") == {}
    with catalog.transaction() as tx:
        tx.set_local_maps((i, "onnx", m) for i, m in maps.items())
    found = catalog.local_maps([c, a, 999], "onnx")
    assert sorted(found) == [a, c]
    # Kept to the bit, in their shape: they stand in for maps a search makes.
    np.testing.assert_array_equal(found[c], maps[c])
    assert found[c].dtype == np.float16 and found[c].shape == (10, 7, 12)
    # Maps made otherwise (another runtime, another model) are not these.
    assert catalog.local_maps([a, b, c], "torch") == {}
    with pytest.raises(ValueError, match="height, width, channels"), catalog.transaction() as tx:
        tx.set_local_maps([(a, "onnx", maps[a][0])])

    # A move keeps the image's row, so its maps; a new vector drops them (new pixels); a
    # deleted image takes them along; new ones replace old ones.
    with catalog.transaction() as tx:
        tx.update_image(a, path=Path("/q/a.jpg"))
        tx.update_image(b, vector=new_image("", seed=9).vector)
        tx.delete_images([c])
    assert sorted(catalog.local_maps([a, b, c], "onnx")) == [a]
    with catalog.transaction() as tx:
        tx.set_local_maps([(a, "onnx", maps[b])])
    np.testing.assert_array_equal(catalog.local_maps([a], "onnx")[a], maps[b])
