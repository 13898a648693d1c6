"""Index folders sharing one catalog database (as on several machines), on SQLite and on
PostgreSQL: each folder keeps its FAISS files, built or extended from the catalog's vectors;
indexers writing at once never double or lose a row; a folder remembers its catalog."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_support import CLI, cli_env, small_jpegs
from sqlalchemy import URL

import ghostmatch
import ghostmatch.indexes.vector_index as vector_index_module
import ghostmatch.ingest.indexer as indexer_module
from benchmarks.postgres import TemporaryServer
from ghostmatch.errors import GhostmatchError, NoIndexError
from ghostmatch.library import CATALOG_URL_FILE, INDEX_FILE, Library
from ghostmatch.store.catalog import CATALOG_FILE

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]


def text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def assert_in_step(lib: Library, files: set[Path]) -> None:
    """Each file cataloged once, and the folder's FAISS index holds the catalog's vectors."""
    paths = list(lib.catalog.all_stat())
    assert len(paths) == len(set(paths)) and set(paths) == files
    ids, vectors = lib.catalog.vectors()
    index = lib.vector_index
    assert index is not None
    np.testing.assert_array_equal(np.sort(index.ids()), ids)
    np.testing.assert_allclose(index.reconstruct(ids), vectors, atol=1e-6)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the FAISS indexes built from the catalog (the real builder, counted)."""
    sizes: list[int] = []
    build = vector_index_module.build_index

    def counted(ids: np.ndarray, *args: object, **kwargs: object) -> object:
        sizes.append(len(ids))
        return build(ids, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vector_index_module, "build_index", counted)
    yield sizes


def test_a_folder_of_its_own_answers_from_the_shared_catalog(
    catalog_url: URL, tmp_path: Path
) -> None:
    """Machine B's folder was never indexed: its FAISS index comes from the catalog's
    vectors, and what B adds, A sees."""
    photos = small_jpegs(tmp_path / "photos", 8, seed=0)
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    given = catalog_url
    if catalog_url.get_backend_name() == "postgresql":  # the test server takes any password
        given = catalog_url.set(password="hunter2")
    with ghostmatch.open(machine_a, catalog=text(given), weights="random") as lib:
        assert lib.index([tmp_path / "photos"], batch_size=4).added == 8
        asked = sorted(photos)[3]
        expected = [(m.path, m.score) for m in lib.query(asked, k=4)]
    assert (machine_a / INDEX_FILE).is_file() and not (machine_a / CATALOG_FILE).exists()
    remembered = (machine_a / CATALOG_URL_FILE).read_text()
    assert "hunter2" not in remembered and catalog_url.database in remembered

    with ghostmatch.open(machine_b, catalog=text(catalog_url), create=False) as lib:
        found = [(m.path, m.score) for m in lib.query(asked, k=4)]
        assert [p for p, _ in found] == [p for p, _ in expected]
        np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)
        more = small_jpegs(tmp_path / "more", 3, seed=1)
        report = lib.index([tmp_path / "photos", tmp_path / "more"], batch_size=4)
        assert (report.unchanged, report.added) == (8, 3)
        assert_in_step(lib, photos | more)

    with ghostmatch.open(machine_a) as lib:  # the folder remembers its catalog
        assert lib.catalog.on_server == (catalog_url.get_backend_name() == "postgresql")
        assert lib.info()["images"] == 11
        assert_in_step(lib, photos | more)


def test_indexers_writing_one_catalog_at_once_neither_double_nor_lose_rows(
    catalog_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[int]
) -> None:
    """Machine A indexes a folder in checkpoints of 4; before its first commit machine B
    indexes the very same folder, and between A's later commits it indexes two others.
    A's commits replace B's rows of the same paths (same ids), and A's FAISS file is
    built once, at the end of its run, not again before each commit."""
    common = small_jpegs(tmp_path / "common", 12, seed=0)
    b_only = [small_jpegs(tmp_path / f"b{n}", 2, seed=10 + n) for n in range(2)]
    everything = common | b_only[0] | b_only[1]
    monkeypatch.setattr(indexer_module, "CHECKPOINT_IMAGES", 4)
    url = text(catalog_url)
    with ghostmatch.open(tmp_path / "a", catalog=url, weights="random") as first:
        first.embed([sorted(common)[0]])  # a new catalog: A records the model first
    other = ghostmatch.open(tmp_path / "b", catalog=url)
    b_runs = {1: [tmp_path / "common"], 5: [tmp_path / "b0"], 9: [tmp_path / "b1"]}
    b_builds: list[int] = []

    def meanwhile_on_b(stage: str, done: int, total: int | None) -> None:
        if stage == "indexed" and done in b_runs:
            before = len(builds)
            other.index(b_runs[done], batch_size=4, prune=False)
            b_builds.extend(builds[before:])
            del builds[before:]

    try:
        with ghostmatch.open(tmp_path / "a", catalog=url) as lib:
            report = lib.index([tmp_path / "common"], batch_size=4, progress=meanwhile_on_b)
            assert report.added + report.updated == 12 and not report.failed
            assert builds == [len(everything)]  # once, at the end, from the whole catalog
            assert_in_step(lib, everything)
            saved = vector_index_module.VectorIndex.load(tmp_path / "a" / INDEX_FILE)
            np.testing.assert_array_equal(np.sort(saved.ids()), lib.catalog.ids())
        assert_in_step(other, everything)
    finally:
        other.close()


def test_indexer_processes_at_once_on_one_catalog(
    postgres_server: TemporaryServer, tmp_path: Path, model_cache: Path
) -> None:
    """Two `ghostmatch index` processes (one given --catalog, one $GHOSTMATCH_CATALOG),
    each with its own index folder, the same photos and some of their own, run at once,
    as on two machines. (Processes on one folder's SQLite catalog: test_concurrency.py;
    the same interleaving step by step on both back ends: above.)"""
    catalog_url = postgres_server.new_database()
    common = small_jpegs(tmp_path / "common", 12, seed=0)
    own = [small_jpegs(tmp_path / f"own{n}", 2, seed=10 + n) for n in range(2)]
    url = text(catalog_url)
    procs = []
    for n in range(2):
        args = ["index", tmp_path / "common", tmp_path / f"own{n}", "--index", tmp_path / str(n)]
        args += ["--weights", "random", "--batch-size", "4", "--json"]
        extra = {"GHOSTMATCH_CHECKPOINT_IMAGES": "4", "GHOSTMATCH_CHECKPOINT_SECONDS": "100000"}
        if n == 0:
            args += ["--catalog", url]
        else:
            extra["GHOSTMATCH_CATALOG"] = url
        procs.append(
            subprocess.Popen(
                [*CLI, *map(os.fspath, args)],
                env=cli_env(model_cache, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert json.loads(out)["failed"] == {}
    for n in range(2):
        with ghostmatch.open(tmp_path / str(n)) as lib:
            assert_in_step(lib, common | own[0] | own[1])


def test_serve_answers_from_a_shared_catalog(catalog_url: URL, tmp_path: Path) -> None:
    """A server on a folder of its own: what another machine indexes into the catalog is
    searched at the next request, without a restart."""
    from serve_support import serving

    photos = sorted(small_jpegs(tmp_path / "photos", 6, seed=0))
    url = text(catalog_url)
    with ghostmatch.open(tmp_path / "indexer", catalog=url, weights="random") as indexer:
        indexer.index([tmp_path / "photos"], batch_size=4)
        with serving(tmp_path / "server", catalog=url) as server, server.client() as client:
            assert client.get("/api/v1/health").json()["images"] == 6
            more = sorted(small_jpegs(tmp_path / "more", 2, seed=1))
            indexer.index([tmp_path / "more"], batch_size=4)
            assert client.get("/api/v1/health").json()["images"] == 8
            found = client.post("/api/v1/query?k=3", json={"path": str(more[0])}).json()
    assert found["query"] == str(more[0]) and len(found["matches"]) == 3
    assert str(more[0]) not in {match["path"] for match in found["matches"]}
    assert {match["path"] for match in found["matches"]} <= {str(p) for p in photos + more}


def test_a_folder_stays_with_its_catalog(catalog_url: URL, tmp_path: Path) -> None:
    url = text(catalog_url)
    with pytest.raises(NoIndexError) as missing:
        ghostmatch.open(tmp_path / "new", catalog=url, create=False)
    assert missing.value.catalog is not None and not (tmp_path / "new").exists()
    ghostmatch.open(tmp_path / "shared", catalog=url).close()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(GhostmatchError, match=r"uses the catalog .*name that one"):
        ghostmatch.open(tmp_path / "shared", catalog=other)
    ghostmatch.open(tmp_path / "own").close()
    with pytest.raises(GhostmatchError, match=r"keeps its catalog in .*catalog\.db"):
        ghostmatch.open(tmp_path / "own", catalog=url)
    own_file = f"sqlite:///{tmp_path / 'own' / CATALOG_FILE}"
    ghostmatch.open(tmp_path / "own", catalog=own_file).close()  # the same catalog


def test_an_unreachable_catalog_server_is_one_line_and_exit_2(
    tmp_path: Path, model_cache: Path
) -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://ghost:secret@127.0.0.1:{port}/photos"
    for args, extra in (
        (["info", "--index", tmp_path / "a", "--catalog", url], {}),
        (["query", tmp_path / "x.jpg", "--index", tmp_path / "b"], {"GHOSTMATCH_CATALOG": url}),
        (["serve", "--index", tmp_path / "c", "--port", "0"], {"GHOSTMATCH_CATALOG": url}),
    ):
        done = subprocess.run(
            [*CLI, *map(os.fspath, args)],
            env=cli_env(model_cache, **extra),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("error: cannot connect to the catalog database postgresql")
        assert "secret" not in line and "check that the server is running" in line
