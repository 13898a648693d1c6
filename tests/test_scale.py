"""The on-disk sharded index (ghostmatch.indexes.ondisk): built in shards it answers like
a one-piece build and like brute force, reloads from its files, serves all-pairs, and the
catalog's vector store switches to it above its size limit; ``dupes`` and ``query`` on it
(the real command, real photos) answer as in memory, never reading all vectors at once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest
from cli_support import ok, run_cli
from PIL import Image, ImageOps

import ghostmatch
from ghostmatch.dupes.collection import StreamedVectors, stored_pairs, stored_vectors
from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes import ondisk
from ghostmatch.indexes.allpairs import brute_force_pairs, similar_pairs, similar_pairs_streamed
from ghostmatch.indexes.ondisk import build_ondisk, is_ondisk
from ghostmatch.indexes.vector_index import VectorIndex, VectorIndexError
from ghostmatch.store.catalog import Catalog, NewImage
from ghostmatch.store.locking import WriterLock
from ghostmatch.store.vectors import INDEX_FILE, VectorStore, read_stamp

DIM = 32
N = 3000
CHUNK = 400


def clustered(n: int, seed: int = 0, planted: int = 30) -> np.ndarray:
    """Unit vectors around 30 centres; the last ``planted`` rows are near-copies
    (cosine ~0.99) of the first ones, for all-pairs to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 30, n)] + rng.standard_normal((n, DIM)).astype(np.float32)
    x[n - planted :] = x[:planted] + 0.02 * rng.standard_normal((planted, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def chunks(ids: np.ndarray, x: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(x), CHUNK):
        yield ids[start : start + CHUNK], x[start : start + CHUNK]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(N)
    # Catalog-like ids: not positions, not contiguous.
    ids = np.arange(N, dtype=np.int64) * 3 + 7
    return ids, x


def build(
    folder: Path, data: tuple[np.ndarray, np.ndarray], factory: str, shard_size: int
) -> VectorIndex:
    ids, x = data
    folder.mkdir(exist_ok=True)
    return build_ondisk(
        x[:1000], chunks(ids, x), folder / INDEX_FILE, factory, shard_size=shard_size
    )


def test_sharded_build_answers_exactly_like_the_one_piece_build(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    one = build(tmp_path / "one", data, "IVF16,Flat", 10**9)
    sharded = build(tmp_path / "sharded", data, "IVF16,Flat", 700)
    assert is_ondisk(sharded) and is_ondisk(one)
    assert sharded.ntotal == one.ntotal == N
    np.testing.assert_array_equal(sharded.ids(), np.sort(data[0]))
    queries = data[1][::50]
    np.testing.assert_array_equal(sharded.search(queries, 10)[1], one.search(queries, 10)[1])
    np.testing.assert_array_equal(sharded.search(queries, 10)[0], one.search(queries, 10)[0])


def test_probing_every_list_finds_the_brute_force_neighbours(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, x = data
    index = build(tmp_path, data, "IVF16,Flat", 700)
    index.set_search_params(nprobe=16)
    queries = x[::37]
    scores, found = index.search(queries, 10)
    exact_scores, rows = faiss.knn(queries, x, 10, faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(found, ids[rows])
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)


def test_half_precision_codes_keep_scores_within_a_thousandth(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, x = data
    index = build(tmp_path, data, "IVF16_HNSW32,SQfp16", 700)
    index.set_search_params(nprobe=16)
    queries = x[::37]
    scores, found = index.search(queries, 10)
    exact_scores, rows = faiss.knn(queries, x, 10, faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-3)
    recall = (found[:, :, None] == ids[rows][:, None, :]).any(axis=2).mean()
    assert recall >= 0.99


def test_reload_reads_the_lists_from_disk_and_a_rebuild_drops_the_old_ones(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    index = build(tmp_path, data, "IVF16,Flat", 700)
    queries = data[1][:20]
    expected = index.search(queries, 5)
    first_lists = sorted(tmp_path.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}"))
    assert len(first_lists) == 1
    again = VectorIndex.load(tmp_path / INDEX_FILE)
    assert is_ondisk(again) and again.search_params == index.search_params
    np.testing.assert_array_equal(again.search(queries, 5)[1], expected[1])
    np.testing.assert_array_equal(again.reconstruct(data[0][:3]), data[1][:3])
    build(tmp_path, data, "IVF16,Flat", 700)
    lists = sorted(tmp_path.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}"))
    assert len(lists) == 1 and lists != first_lists
    # The index opened before the rebuild still reads its own (now unlinked) lists.
    np.testing.assert_array_equal(again.search(queries, 5)[1], expected[1])
    assert not list(tmp_path.glob(".shards-*"))


def test_all_pairs_on_the_ondisk_index_match_brute_force(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, x = data
    index = build(tmp_path, data, "IVF16,Flat", 700)
    index.set_search_params(nprobe=16)
    truth = brute_force_pairs(x, 0.95, ids=ids)
    assert len(truth[0]) >= 30
    in_memory = similar_pairs(x, 0.95, ids=ids, index=index)
    streamed = similar_pairs_streamed(index, chunks(ids, x), 0.95)
    for found in (in_memory, streamed):
        np.testing.assert_array_equal(found[0], truth[0])
        np.testing.assert_array_equal(found[1], truth[1])
        np.testing.assert_array_equal(found[2], truth[2])


def test_a_factory_that_is_not_ivf_is_refused(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    with pytest.raises(VectorIndexError, match="IVF"):
        build(tmp_path, data, "HNSW32", 700)


def test_an_ondisk_index_is_saved_with_the_measured_search_settings(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    # The settings that reached recall@10 >= 0.95 at 10M vectors, capped at the lists there
    # are; the graph quantizer's beam wider than the lists it returns.
    graph = build(tmp_path / "graph", data, "IVF128_HNSW32,SQfp16", 10**9)
    assert graph.search_params == {"nprobe": 64, "ef_search": 128}
    flat = build(tmp_path / "flat", data, "IVF16,Flat", 10**9)
    assert flat.search_params == {"nprobe": 16}


def test_ondisk_factory_caps_lists_and_uses_half_precision() -> None:
    assert ondisk.ondisk_factory(10_000_000, 256) == "IVF4096_HNSW32,SQfp16"
    assert ondisk.ondisk_factory(3000, 32).endswith(",SQfp16")


def test_vector_store_builds_on_disk_above_the_limit_and_keeps_up_with_changes(
    big_catalog: tuple[Path, Catalog], data: tuple[np.ndarray, np.ndarray]
) -> None:
    (folder, catalog), (_, x) = big_catalog, data
    store = VectorStore(folder, catalog)
    index = store.index
    assert index is not None and is_ondisk(index)
    np.testing.assert_array_equal(index.ids(), catalog.ids())
    assert read_stamp(store.file)[:2] == (store.generation(), index.checksum)
    assert not list(folder.glob(".shards-*"))
    # A second store trusts the stamped files: nothing rebuilt.
    lists = sorted(folder.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}"))
    again = VectorStore(folder, catalog).index
    assert again is not None and again.checksum == index.checksum
    assert sorted(folder.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}")) == lists
    _, found = again.search(x[:1], 1)
    assert found[0, 0] == catalog.ids()[0]
    # A change rebuilds the lists from the catalog rather than editing shared files.
    doomed = [int(i) for i in catalog.ids()[:5]]
    with store.writing():
        store.delete(doomed)
        store.apply()
    changed = store.index
    assert changed is not None and is_ondisk(changed)
    np.testing.assert_array_equal(changed.ids(), catalog.ids())
    assert sorted(folder.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}")) != lists
    assert read_stamp(store.file)[:2] == (store.generation(), changed.checksum)
    store.close()


def test_an_index_in_memory_moves_to_disk_when_it_grows_past_the_limit(
    big_catalog: tuple[Path, Catalog],
    data: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (folder, catalog), (_, x) = big_catalog, data
    monkeypatch.setenv(ondisk.LIMIT_ENV, str(N))
    store = VectorStore(folder, catalog)
    index = store.index
    assert index is not None and not is_ondisk(index)
    with store.writing():
        with store.change() as change:
            change.added.extend(change.tx.insert_images([_row(N + i, x[i]) for i in range(5)]))
        store.apply()
    grown = store.index
    assert grown is not None and is_ondisk(grown)
    np.testing.assert_array_equal(grown.ids(), catalog.ids())
    store.close()


@pytest.fixture
def big_catalog(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Catalog]]:
    """An index folder whose catalog holds the N vectors, above an on-disk limit of 1000:
    the limit is millions of vectors, a small one makes the catalog's store take the same
    path on a small catalog."""
    monkeypatch.setenv(ondisk.LIMIT_ENV, "1000")
    folder = tmp_path / "index"
    folder.mkdir()
    with Catalog.for_directory(folder) as catalog:
        with catalog.transaction() as tx:
            tx.insert_images([_row(i, data[1][i]) for i in range(N)])
        yield folder, catalog


def _row(number: int, vector: np.ndarray) -> NewImage:
    return NewImage(
        Path(f"/photos/{number}.jpg"), 100 + number, number, f"h{number}", 64, 48, "JPEG", vector
    )


def test_every_vector_is_added_to_its_nearest_list(tmp_path: Path) -> None:
    # With the graph's default beam, adding put 19 of these 20,000 vectors (and 13% of
    # 10M clustered ones) in a list other than their nearest, where no query finds them.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(len(x), dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one graph, built the same way every run
    try:
        index = build_ondisk(
            x[:10_240],
            chunks(ids, x),
            tmp_path / INDEX_FILE,
            "IVF256_HNSW32,SQfp16",
            shard_size=7000,
        )
    finally:
        faiss.omp_set_num_threads(threads)
    ivf = index._ivf()
    assert ivf is not None and ivf.invlists is not None
    centroids = faiss.downcast_index(ivf.quantizer).storage.reconstruct_n(0, ivf.nlist)
    _, nearest = faiss.knn(x, centroids, 1, faiss.METRIC_INNER_PRODUCT)
    holder = np.full(len(x), -1, np.int64)
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        if size:
            positions = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)
            holder[positions] = number
    np.testing.assert_array_equal(holder, nearest[:, 0])


def test_a_reader_builds_privately_while_another_process_writes(
    big_catalog: tuple[Path, Catalog], data: tuple[np.ndarray, np.ndarray]
) -> None:
    (folder, catalog), (_, x) = big_catalog, data
    # A lock of its own open file: to flock, another writer.
    other = WriterLock(folder)
    assert other.try_acquire()
    try:
        index = VectorStore(folder, catalog).index
        assert index is not None and is_ondisk(index)
        _, found = index.search(x[:1], 1)
        assert found[0, 0] == catalog.ids()[0]
        assert not list(folder.glob(f"{INDEX_FILE}*"))
    finally:
        other.release()


def test_the_ondisk_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ondisk.LIMIT_ENV, raising=False)
    assert ondisk.ondisk_limit() == ondisk.ONDISK_LIMIT
    monkeypatch.setenv(ondisk.LIMIT_ENV, "1_000")
    assert ondisk.ondisk_limit() == 1000
    for wrong in ("lots", "-1", "2.5"):
        monkeypatch.setenv(ondisk.LIMIT_ENV, wrong)
        with pytest.raises(GhostmatchError, match=f"{ondisk.LIMIT_ENV} must be a whole number"):
            ondisk.ondisk_limit()


def test_all_pairs_of_an_ondisk_catalog_read_it_a_chunk_at_a_time(
    big_catalog: tuple[Path, Catalog],
    data: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pairs of the exact in-memory search, scores to the last bit, offsets and all,
    while no read of the catalog asks for more than one chunk of vectors."""
    (folder, catalog), (_, x) = big_catalog, data
    offsets = np.random.default_rng(1).uniform(-0.05, 0.05, N)
    store = VectorStore(folder, catalog)
    index = store.index
    assert index is not None and is_ondisk(index)
    ids, vectors = stored_vectors(catalog, index)
    assert isinstance(vectors, StreamedVectors)
    vectors.chunk = CHUNK
    reads = count_reads(catalog, monkeypatch)
    for shift in (None, offsets):
        want = similar_pairs(x, 0.9, ids=ids, offsets=shift)
        assert len(want[0]) >= 30
        got = stored_pairs(ids, vectors, 0.9, index, shift)
        for found, expected in zip(got, want, strict=True):
            np.testing.assert_array_equal(found, expected)
    assert reads and None not in reads and max(map(int, reads)) <= CHUNK
    store.close()


def count_reads(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """How many vectors each later ``catalog.vectors`` call asks for (None: all)."""
    reads: list[int | None] = []
    read = catalog.vectors

    def counted(wanted: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        reads.append(None if wanted is None else len(wanted))
        return read(wanted)

    monkeypatch.setattr(catalog, "vectors", counted)
    return reads


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def gallery(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test photos and copies of four of them: byte-identical, smaller, re-encoded
    and mirrored."""
    folder = tmp_path_factory.mktemp("ondisk-gallery")
    for file in sorted(photos.iterdir()):
        shutil.copy2(file, folder / file.name)
    shutil.copy2(photos / "astronaut.jpg", folder / "astronaut-copy.jpg")
    with Image.open(photos / "coffee.jpg") as coffee:
        coffee.resize((300, 200)).save(folder / "coffee-small.jpg", quality=85)
    with Image.open(photos / "chelsea.jpg") as chelsea:
        chelsea.save(folder / "chelsea-q60.jpg", quality=60)
    with Image.open(photos / "rocket.jpg") as rocket:
        ImageOps.mirror(rocket).save(folder / "rocket-mirrored.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def indexes(gallery: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict:
    """The gallery indexed by ``ghostmatch index`` on disk (a limit of 4 vectors), and a
    copy of that index without its FAISS files, which the next command rebuilds from the
    same catalog in memory (the default limit)."""
    root = tmp_path_factory.mktemp("ondisk")
    disk, memory = root / "disk", root / "memory"
    env = {ondisk.LIMIT_ENV: "4"}
    ok(run_cli(["index", gallery, "--index", disk, "--json"], model_cache, **env))
    shutil.copytree(disk, memory, ignore=shutil.ignore_patterns(f"{INDEX_FILE}*"))
    return {"disk": disk, "memory": memory}


def lists_of(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{INDEX_FILE}.*{ondisk.DATA_SUFFIX}"))


@pytest.mark.usefixtures("shared_model_cache")
def test_dupes_and_query_on_an_ondisk_index_answer_as_in_memory(
    indexes: dict[str, Path], gallery: Path, model_cache: Path
) -> None:
    assert lists_of(indexes["disk"])
    commands: list[Sequence[object]] = [
        ["dupes", "--json", "--similar"],
        ["query", gallery / "coffee.jpg", "-k", "5", "--json"],
    ]
    for command in commands:
        answers = [
            json.loads(ok(run_cli([*command, "--index", indexes[name]], model_cache)).stdout)
            for name in ("memory", "disk")
        ]
        assert answers[0] == answers[1], command
        assert not lists_of(indexes["memory"])
        if command[0] == "dupes":
            copies = {Path(m["path"]).name for g in answers[1]["groups"] for m in g["members"]}
            assert {"coffee-small.jpg", "chelsea-q60.jpg", "rocket-mirrored.jpg"} <= copies


@pytest.mark.usefixtures("shared_model_cache")
def test_duplicates_of_an_ondisk_index_never_read_every_vector_at_once(
    indexes: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = {}
    for name in ("memory", "disk"):
        with ghostmatch.open(indexes[name], create=False) as lib:
            reads = count_reads(lib.catalog, monkeypatch)
            found[name] = [g.to_dict() for g in lib.find_duplicates(verify=False)]
            # In memory every vector is read at once; on disk, by chunks of ids.
            assert (None in reads) == (name == "memory")
    assert found["disk"] == found["memory"] and found["disk"]
