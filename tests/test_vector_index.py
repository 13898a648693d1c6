"""Contract tests of VectorIndex over every index type, against exact numpy search."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
from pathlib import Path

import faiss
import numpy as np
import pytest

from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.vector_index import (
    FLAT_LIMIT,
    FileIdentity,
    VectorIndex,
    VectorIndexError,
    build_index,
    default_factory,
)

N, DIM, K = 4000, 64, 10
# recall@10 each factory must reach at its default (tuned) search parameters; PQ32x4
# squeezes 64 floats into 16 bytes, so its scores, hence its rankings, are coarse.
MIN_RECALL = {
    "Flat": 1.0,
    "IVF64,Flat": 0.9,
    "HNSW32": 0.9,
    "IVF64,PQ32x4": 0.6,
    "IVF64_HNSW32,Flat": 0.9,
}
FACTORIES = list(MIN_RECALL)
LOSSY = {"IVF64,PQ32x4"}

Data = dict[str, np.ndarray]
Built = dict[str, VectorIndex]


def clustered_unit_vectors(n: int, dim: int, seed: int, clusters: int = 40) -> np.ndarray:
    """Points around `clusters` random centres (same centres for every seed), cosine to
    a cluster mate ~0.5, unit length."""
    centres = np.random.default_rng(12345).standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())


@pytest.fixture(scope="module")
def data() -> Data:
    base = clustered_unit_vectors(N, DIM, seed=0)
    # Catalog-like ids: unique, unordered, not positions.
    ids = np.random.default_rng(1).permutation(10 * N)[:N].astype(np.int64)
    queries = clustered_unit_vectors(200, DIM, seed=2)
    truth_scores, truth_rows = exact_knn(queries, base, K)
    return {
        "base": base,
        "ids": ids,
        "queries": queries,
        "truth_scores": truth_scores,
        "truth_ids": ids[truth_rows],
    }


@pytest.fixture(scope="module")
def built(data: Data) -> Built:
    return {f: build_index(data["ids"], data["base"], f, device="cpu") for f in FACTORIES}


def copy_of(index: VectorIndex, tmp_path: Path) -> VectorIndex:
    index.save(tmp_path / "copy.faiss")
    return VectorIndex.load(tmp_path / "copy.faiss", device="cpu")


@pytest.mark.parametrize("factory", FACTORIES)
def test_search_against_brute_force(factory: str, data: Data, built: Built) -> None:
    scores, ids = built[factory].search(data["queries"], K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(data["queries"]), K)
    if factory == "Flat":
        np.testing.assert_array_equal(ids, data["truth_ids"])
        np.testing.assert_array_almost_equal(scores, data["truth_scores"], decimal=4)
    assert recall_at(ids, data["truth_ids"]) >= MIN_RECALL[factory]
    if factory not in LOSSY:
        # Flat codes: whatever is found carries its exact cosine.
        rows = np.searchsorted(np.sort(data["ids"]), ids)
        by_id = data["base"][np.argsort(data["ids"])]
        exact = np.einsum("qd,qkd->qk", data["queries"], by_id[rows])
        np.testing.assert_array_almost_equal(scores, exact, decimal=4)


@pytest.mark.parametrize("factory", FACTORIES)
def test_results_are_ranked_and_padded(factory: str, data: Data, built: Built) -> None:
    index = built[factory]
    k = N + 5
    scores, ids = index.search(data["queries"][:3], k)
    assert scores.shape == ids.shape == (3, k)
    np.testing.assert_array_equal(ids < 0, np.isneginf(scores))
    assert (ids[:, N:] == -1).all()
    for row_scores, row_ids in zip(scores, ids, strict=True):
        valid = row_ids >= 0
        assert (np.diff(row_scores[valid]) <= 1e-6).all()
        assert np.unique(row_ids[valid]).size == valid.sum()
        assert np.isin(row_ids[valid], data["ids"]).all()


def test_empty_index_searches_to_padding() -> None:
    scores, ids = VectorIndex(DIM, "HNSW32", device="cpu").search(np.ones((2, DIM), np.float32), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("factory", FACTORIES)
def test_ids_and_reconstruct(factory: str, data: Data, built: Built) -> None:
    index = built[factory]
    assert index.ntotal == N and index.is_trained and index.dim == DIM
    np.testing.assert_array_equal(index.ids(), np.sort(data["ids"]))
    rows = np.arange(0, N, 97)
    got = index.reconstruct(data["ids"][rows])
    assert got.shape == (len(rows), DIM) and got.dtype == np.float32
    if factory in LOSSY:
        cosines = np.einsum("nd,nd->n", got, data["base"][rows]) / np.linalg.norm(got, axis=1)
        assert cosines.min() > 0.8
    else:
        np.testing.assert_array_equal(got, data["base"][rows])
    with pytest.raises(ValueError, match="not in the index"):
        index.reconstruct(np.array([-5]))


@pytest.mark.parametrize("factory", FACTORIES)
def test_remove_then_add_back(factory: str, data: Data, built: Built, tmp_path: Path) -> None:
    index = copy_of(built[factory], tmp_path)
    rng = np.random.default_rng(3)
    gone_rows = rng.choice(N, size=500, replace=False)
    gone = data["ids"][gone_rows]
    assert index.remove(np.concatenate([gone, [-1, -2]])) == 500
    assert index.remove(gone) == 0
    assert index.ntotal == N - 500
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(data["ids"], gone))
    _, found = index.search(data["queries"], K)
    assert not np.isin(found, gone).any()
    # Stored vectors must still answer to their own ids (IndexIDMap2.remove_ids over IVF
    # would shift them onto their neighbours' ids).
    kept_rows = np.setdiff1d(np.arange(N), gone_rows)[::20]
    _, top = index.search(data["base"][kept_rows], 1 if factory not in LOSSY else K)
    assert (top == data["ids"][kept_rows][:, None]).any(axis=1).mean() >= 0.95
    if factory not in LOSSY:
        kept = index.reconstruct(data["ids"][kept_rows])
        np.testing.assert_array_equal(kept, data["base"][kept_rows])
    index.add(gone, data["base"][gone_rows])
    assert index.ntotal == N
    np.testing.assert_array_equal(index.ids(), np.sort(data["ids"]))
    assert recall_at(index.search(data["queries"], K)[1], data["truth_ids"]) >= MIN_RECALL[factory]


@pytest.mark.parametrize("factory", [f for f in FACTORIES if f.startswith("IVF")])
def test_ivf_removal_deletes_in_place(factory: str, data: Data) -> None:
    """An IVF index deletes from its lists: the entries that stay are neither re-encoded
    nor re-added (a rebuild would re-add them in id order), so a removal costs no
    re-assignment of the whole collection."""
    order = np.random.default_rng(4).permutation(N)
    index = build_index(data["ids"][order], data["base"][order], factory, device="cpu")
    added_order = faiss.vector_to_array(index._cpu.id_map)
    gone = data["ids"][order[::7]]
    index.remove(gone)
    left = added_order[~np.isin(added_order, gone)]
    np.testing.assert_array_equal(faiss.vector_to_array(index._cpu.id_map), left)
    _, top = index.search(data["base"][order[1::7]], K)
    assert (top == data["ids"][order[1::7]][:, None]).any(axis=1).mean() >= 0.95


def test_duplicate_ids_refused(data: Data) -> None:
    index = VectorIndex(DIM, "Flat", device="cpu")
    index.add(np.array([1, 2, 3]), data["base"][:3])
    with pytest.raises(ValueError, match="already in the index: 3"):
        index.add(np.array([3, 4]), data["base"][3:5])
    with pytest.raises(ValueError, match="repeated"):
        index.add(np.array([5, 5]), data["base"][3:5])
    assert index.ntotal == 3
    np.testing.assert_array_equal(index.ids(), [1, 2, 3])


def test_add_checks_shapes_and_training(data: Data) -> None:
    index = VectorIndex(DIM, "Flat", device="cpu")
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.arange(3), data["base"][:2])
    with pytest.raises(ValueError, match="shape"):
        index.add(np.arange(2), data["base"][:2, :10])
    with pytest.raises(ValueError, match="integer"):
        index.add(np.array([1.0, 2.0]), data["base"][:2])
    with pytest.raises(ValueError, match="trained"):
        VectorIndex(DIM, "IVF8,Flat", device="cpu").add(np.arange(2), data["base"][:2])


@pytest.mark.parametrize("factory", FACTORIES)
def test_save_load_round_trip(factory: str, data: Data, built: Built, tmp_path: Path) -> None:
    index = built[factory]
    path = tmp_path / "index.faiss"
    index.save(path)
    assert os.listdir(tmp_path) == ["index.faiss"]
    loaded = VectorIndex.load(path, device="cpu")
    assert (loaded.ntotal, loaded.dim, loaded.on_gpu) == (N, DIM, False)
    assert loaded.search_params == index.search_params
    assert loaded.factory == factory
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    for got, want in zip(
        loaded.search(data["queries"], K), index.search(data["queries"], K), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
def test_failed_save_keeps_previous_file(data: Data, built: Built, tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    small = VectorIndex(DIM, "Flat", device="cpu")
    small.add(np.arange(3), data["base"][:3])
    small.save(path)
    before = path.read_bytes()
    # A real write failure: the kernel refuses to grow any file past 64 KiB (EFBIG),
    # as on a full disk, while the 1 MB Flat index is being written.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError):
            built["Flat"].save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.listdir(tmp_path) == ["index.faiss"]
    assert path.read_bytes() == before
    np.testing.assert_array_equal(VectorIndex.load(path, device="cpu").ids(), [0, 1, 2])


def test_save_keeps_mode_of_replaced_file(data: Data, tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    index = VectorIndex(DIM, "Flat", device="cpu")
    index.save(path)
    path.chmod(0o640)
    index.add(np.arange(2), data["base"][:2])
    index.save(path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert VectorIndex.load(path).ntotal == 2


def test_a_new_file_gets_the_umask_mode(data: Data, tmp_path: Path) -> None:
    """Like the catalog beside it, not mkstemp's owner-only 0600: a shared index stays
    readable by the others the umask lets read it."""
    old = os.umask(0o022)
    try:
        VectorIndex(DIM, "Flat", device="cpu").save(tmp_path / "index.faiss")
        os.umask(0o002)
        VectorIndex(DIM, "Flat", device="cpu").save(tmp_path / "other.faiss")
    finally:
        os.umask(old)
    assert (tmp_path / "index.faiss").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "other.faiss").stat().st_mode & 0o777 == 0o664


def test_checksum_names_the_bytes_saved_and_loaded(data: Data, tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    index = VectorIndex(DIM, "Flat", device="cpu")
    index.add(np.arange(50), data["base"][:50])
    saved = index.save(path)
    assert saved == index.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert VectorIndex.load(path).checksum == saved
    # Overwritten in the middle, size kept: it still loads, but not as the file saved.
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = b"\x7f" * 16
    path.write_bytes(bytes(raw))
    assert VectorIndex.load(path).checksum != saved


def test_a_file_in_its_known_state_is_not_hashed_again(data: Data, tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    index = VectorIndex(DIM, "Flat", device="cpu")
    index.add(np.arange(50), data["base"][:50])
    saved = index.save(path)
    identity = index.identity
    assert identity == FileIdentity.of(path.stat())
    # The known sha256 is taken as it is: the bytes were not hashed.
    loaded = VectorIndex.load(path, known=(identity, "known"))
    assert loaded.checksum == "known" and loaded.identity == identity
    # Written since (same bytes, mtime put back): the ctime moved on, so it is hashed. The
    # loop waits for the clock tick in which the file was saved to pass.
    st = path.stat()
    while FileIdentity.of(path.stat()) == identity:
        path.write_bytes(path.read_bytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert VectorIndex.load(path, known=(identity, "known")).checksum == saved


@pytest.mark.parametrize("factory", FACTORIES)
def test_scores_are_cosines_within_minus_one_and_one(
    factory: str, data: Data, built: Built
) -> None:
    """A query longer than unit length (or rounding) never reports a cosine past 1."""
    scores, ids = built[factory].search(3.0 * data["queries"][:5], K)
    assert np.all(scores[ids >= 0] <= 1.0) and np.all(scores[ids >= 0] >= -1.0)
    assert np.any(scores[:, 0] == 1.0)


def test_load_refuses_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(VectorIndexError, match="no vector index"):
        VectorIndex.load(tmp_path / "absent.faiss")
    faiss.write_index(faiss.IndexFlatL2(8), str(tmp_path / "plain.faiss"))
    with pytest.raises(VectorIndexError, match="not a ghostmatch vector index"):
        VectorIndex.load(tmp_path / "plain.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(VectorIndexError, match="rebuild"):
        VectorIndex.load(tmp_path / "junk.faiss")


@pytest.mark.parametrize(
    ("factory", "hint"),
    [("IVF4096,Flat", "4096 lists"), ("IVF2,PQ8x8", "256")],
)
def test_too_few_vectors_to_train(factory: str, hint: str, data: Data) -> None:
    with pytest.raises(VectorIndexError, match="too few vectors") as caught:
        build_index(np.arange(100), data["base"][:100], factory, device="cpu")
    message = str(caught.value)
    assert "'Flat'" in message and "got 100" in message and hint in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, GhostmatchError)


def test_default_factory() -> None:
    assert default_factory(0, 256) == "Flat"
    assert default_factory(FLAT_LIMIT, 256) == "Flat"
    assert default_factory(FLAT_LIMIT + 1, 256) == "IVF2048,Flat"
    assert default_factory(1_000_000, 256) == "IVF4096,Flat"
    assert default_factory(10_000_000, 256) == "IVF16384_HNSW32,Flat"
    assert default_factory(1_000_000, 1024) == "IVF4096_HNSW32,Flat"


def test_build_index_defaults_to_flat(data: Data) -> None:
    index = build_index(data["ids"][:50], data["base"][:50], device="cpu")
    assert index.factory == "Flat" and index.ntotal == 50


def test_search_params(built: Built) -> None:
    assert built["Flat"].search_params == {}
    assert built["HNSW32"].search_params == {"ef_search": 64}
    ivf_hnsw = built["IVF64_HNSW32,Flat"].search_params
    assert ivf_hnsw["ef_search"] == 64 and 16 <= ivf_hnsw["nprobe"] <= 64
    with pytest.raises(VectorIndexError, match="IVF indexes only"):
        built["Flat"].set_search_params(nprobe=4)
    with pytest.raises(VectorIndexError, match="HNSW indexes only"):
        built["IVF64,Flat"].set_search_params(ef_search=4)
    with pytest.raises(VectorIndexError, match=re.escape("1..64")):
        built["IVF64,Flat"].set_search_params(nprobe=65)


def test_wider_search_params_do_not_lose_recall(data: Data, tmp_path: Path, built: Built) -> None:
    index = copy_of(built["IVF64,Flat"], tmp_path)
    index.set_search_params(nprobe=1)
    narrow = recall_at(index.search(data["queries"], K)[1], data["truth_ids"])
    index.set_search_params(nprobe=64)
    assert index.search_params == {"nprobe": 64}
    full = recall_at(index.search(data["queries"], K)[1], data["truth_ids"])
    assert narrow <= full == 1.0


def test_device_and_factory_errors() -> None:
    with pytest.raises(VectorIndexError, match="device must be"):
        VectorIndex(8, device="tpu")
    with pytest.raises(VectorIndexError, match="index factory"):
        VectorIndex(8, "NoSuchIndex42")
    assert not VectorIndex(8, device="cpu").on_gpu
    if faiss.get_num_gpus() == 0:
        assert not VectorIndex(8).on_gpu
        with pytest.raises(VectorIndexError, match="GPU"):
            VectorIndex(8, device="cuda")
    else:
        assert VectorIndex(8).on_gpu
        assert not VectorIndex(8, "HNSW32").on_gpu
