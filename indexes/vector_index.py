"""FAISS inner-product index of unit vectors keyed by int64 catalog ids, saved atomically.

Scores are inner products of L2-normalised float32 vectors (cosine): higher = more alike.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

from ghostmatch.errors import GhostmatchError

FLAT_LIMIT = 200_000
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
TARGET_RECALL = 0.95

_DEVICES = ("auto", "cpu", "cuda")
# faiss k-means subsamples to 256 points per centroid anyway; PQ codebooks have 256 centroids.
_TRAIN_POINTS_PER_CENTROID = 256
_SEED = 1234
# Floats a query scans to pick its IVF lists before a HNSW graph over the centroids wins.
_FLAT_QUANTIZER_BUDGET = 2**21
_TUNE_QUERIES = 256
_FEW_QUERIES = 4
_TUNE_K = 10


class FileIdentity(NamedTuple):
    """Which file, in which state: any write to it changes its ctime (which, unlike its
    mtime, cannot be set back), a replacement its inode."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VectorIndexError(GhostmatchError, ValueError):
    """A vector-index problem the user can fix: a factory the data cannot train, an
    unknown device, a missing or foreign index file. The message says what to do."""


class VectorIndex:
    """Unit vectors keyed by int64 ids in ``IndexIDMap2(index_factory(dim, factory, IP))``.

    The CPU index is the source of truth. With a GPU, searches go to a replica cloned from
    it on first use and dropped on every change, so mutations never need GPU support.
    """

    def __init__(self, dim: int, factory: str = "Flat", device: str = "auto") -> None:
        if dim < 1:
            raise VectorIndexError(f"vector dimension must be positive, got {dim}")
        try:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise VectorIndexError(
                f"faiss cannot build index factory {factory!r} ({_faiss_reason(exc)}); "
                "try 'Flat', 'IVF1024,Flat' or 'HNSW32'"
            ) from exc
        self._setup(faiss.IndexIDMap2(base), factory, device)
        ivf = _find_ivf(base)
        if ivf is not None:
            ivfpq = faiss.downcast_index(ivf)
            if isinstance(ivfpq, faiss.IndexIVFPQ):
                # index_factory turns on polysemous training (simulated annealing of the
                # code order, ~30 s at 8 bits); it only serves Hamming-filtered search,
                # which is never enabled here.
                ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]  # stub gap
        self.set_search_params(
            nprobe=min(DEFAULT_NPROBE, ivf.nlist) if ivf is not None else None,
            ef_search=DEFAULT_EF_SEARCH if _ef_search_name(base) else None,
        )

    def _setup(self, index: faiss.IndexIDMap2, factory: str, device: str) -> None:
        self._cpu = index
        self._factory = factory
        self._use_gpu = _resolve_device(device, index.index, factory)
        self._gpu: faiss.Index | None = None
        self._checksum: str | None = None
        self._identity: FileIdentity | None = None
        self._sorted_ids = np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
        ivf = _find_ivf(index.index)
        if ivf is not None and ivf.direct_map.no():
            # IndexIDMap2 reconstructs through the sub-index; IVF needs a direct map for it.
            ivf.make_direct_map(True)

    @property
    def dim(self) -> int:
        return int(self._cpu.d)

    @property
    def factory(self) -> str:
        return self._factory

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    @property
    def on_gpu(self) -> bool:
        return self._use_gpu

    @property
    def search_params(self) -> dict[str, int]:
        """The search-time knobs in effect: ``nprobe`` for IVF, ``ef_search`` for HNSW."""
        params: dict[str, int] = {}
        ivf = _find_ivf(self._cpu.index)
        if ivf is not None:
            params["nprobe"] = int(ivf.nprobe)
        hnsw = _hnsw_of(self._cpu.index)
        if hnsw is not None:
            params["ef_search"] = int(hnsw.hnsw.efSearch)
        return params

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantizers (IVF centroids, PQ codebooks) on a sample of the data."""
        x = self._as_vectors(vectors)
        if self.ntotal:
            raise ValueError(
                f"index {self._factory!r} already holds {self.ntotal} vectors; "
                "build a new index to retrain"
            )
        ivf = _find_ivf(self._cpu.index)
        if ivf is not None and len(x) < ivf.nlist:
            raise VectorIndexError(
                _too_few_message(self._factory, len(x), f"it has {ivf.nlist} lists", ivf)
            )
        clusterer = None
        if self._use_gpu and ivf is not None:
            # k-means is nearly all of the training time and runs well on GPU. The local
            # keeps the GPU index alive: the swig attribute does not own it.
            clusterer = faiss.index_cpu_to_all_gpus(
                faiss.IndexFlat(self.dim, ivf.quantizer.metric_type)
            )
            ivf.clustering_index = clusterer
        try:
            self._cpu.train(x)
        except RuntimeError as exc:
            raise VectorIndexError(
                _too_few_message(self._factory, len(x), _faiss_reason(exc), ivf)
            ) from exc
        finally:
            if clusterer is not None and ivf is not None:
                ivf.clustering_index = None  # type: ignore[assignment]  # stub: NULL allowed
        self._gpu = None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids; ids already present are refused (remove them first)."""
        new_ids = _as_ids(ids)
        x = self._as_vectors(vectors)
        if len(new_ids) != len(x):
            raise ValueError(f"{len(new_ids)} ids for {len(x)} vectors")
        if not self.is_trained:
            raise ValueError(f"index {self._factory!r} must be trained before adding vectors")
        order = np.sort(new_ids)
        repeated = order[1:][order[1:] == order[:-1]]
        if repeated.size:
            raise ValueError(f"ids repeated in one add: {_preview(np.unique(repeated))}")
        present = order[_isin_sorted(order, self._sorted_ids)]
        if present.size:
            raise ValueError(
                f"ids already in the index: {_preview(present)}; remove them first to replace them"
            )
        self._cpu.add_with_ids(x, new_ids)
        # Two sorted runs: the stable (tim)sort merges them in linear time.
        self._sorted_ids = np.sort(np.concatenate([self._sorted_ids, order]), kind="stable")
        self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids (absent ones are ignored); returns how many were removed."""
        gone = np.unique(_as_ids(ids))
        gone = gone[_isin_sorted(gone, self._sorted_ids)]
        if not gone.size:
            return 0
        keep = self._sorted_ids[~_isin_sorted(self._sorted_ids, gone)]
        ivf = _find_ivf(self._cpu.index)
        if isinstance(faiss.downcast_index(self._cpu.index), faiss.IndexFlat):
            self._cpu.remove_ids(faiss.IDSelectorBatch(gone))
        elif ivf is not None:
            self._remove_from_ivf(ivf, gone)
        else:
            # HNSW graphs cannot delete, so rebuild from the stored vectors. PQ codes
            # re-encode their own reconstruction unchanged.
            kept = self._cpu.reconstruct_batch(keep)
            self._cpu.reset()
            self._cpu.add_with_ids(kept, keep)
        self._sorted_ids = keep
        self._gpu = None
        return int(gone.size)

    def _remove_from_ivf(self, ivf: faiss.IndexIVF, gone: np.ndarray) -> None:
        """Delete from the inverted lists in place: no re-encoding, no re-assignment.

        IndexIDMap2 compacts its id map after a removal, as if the sub-index renumbered
        its entries; IVF lists keep the positions they were added under, so they are
        renumbered here to match (else every later hit would get the wrong id)."""
        positions = np.flatnonzero(
            _isin_sorted(faiss.vector_to_array(self._cpu.id_map).astype(np.int64), gone)
        )
        # The array direct map cannot delete; it is rebuilt once the lists are renumbered.
        ivf.make_direct_map(False)
        self._cpu.remove_ids(faiss.IDSelectorBatch(gone))
        invlists = ivf.invlists
        assert invlists is not None  # an IVF index always has its lists
        for number in range(ivf.nlist):
            size = invlists.list_size(number)
            if size == 0:
                continue
            pointer = invlists.get_ids(number)
            try:
                stored = faiss.rev_swig_ptr(pointer, size)
                stored -= np.searchsorted(positions, stored)
            finally:
                invlists.release_ids(number, pointer)  # type: ignore[attr-defined]  # not in stub
        ivf.make_direct_map(True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (n, k), ids int64 (n, k)), best first, padded -inf / -1."""
        x = self._as_vectors(queries)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.ntotal == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        if len(x) <= _FEW_QUERIES and not self._use_gpu:
            # A handful of queries cannot use a thread team; when another process holds a
            # core, OpenMP's spinning team made one 100k Flat search 5-6x slower (55 ms vs
            # 10 ms, benchmarks/query.py).
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                scores, ids = self._searcher().search(x, k)
            finally:
                faiss.omp_set_num_threads(threads)
        else:
            scores, ids = self._searcher().search(x, k)
        # Inner products of unit vectors are cosines; float rounding can step past 1.
        np.clip(scores, -1.0, 1.0, out=scores)
        scores[ids < 0] = -np.inf
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def ids(self) -> np.ndarray:
        """The ids present, sorted ascending (int64)."""
        return self._sorted_ids.copy()

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (float32 (n, dim)); approximate for PQ/SQ indexes."""
        wanted = _as_ids(ids)
        absent = wanted[~_isin_sorted(wanted, self._sorted_ids)]
        if absent.size:
            raise ValueError(f"ids not in the index: {_preview(np.unique(absent))}")
        if not wanted.size:
            return np.empty((0, self.dim), np.float32)
        return self._cpu.reconstruct_batch(wanted)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set IVF ``nprobe`` (lists scanned per query) and/or HNSW ``ef_search`` (graph
        beam width; for IVF..._HNSW it is the coarse quantizer's)."""
        sub = self._cpu.index
        space = faiss.ParameterSpace()
        if nprobe is not None:
            ivf = _find_ivf(sub)
            if ivf is None:
                raise VectorIndexError(f"nprobe applies to IVF indexes only, not {self._factory!r}")
            if not 1 <= nprobe <= ivf.nlist:
                raise VectorIndexError(f"nprobe must be in 1..{ivf.nlist}, got {nprobe}")
            space.set_index_parameter(self._cpu, "nprobe", nprobe)
        if ef_search is not None:
            name = _ef_search_name(sub)
            if name is None:
                raise VectorIndexError(
                    f"ef_search applies to HNSW indexes only, not {self._factory!r}"
                )
            if ef_search < 1:
                raise VectorIndexError(f"ef_search must be positive, got {ef_search}")
            space.set_index_parameter(self._cpu, name, ef_search)
        self._gpu = None

    @property
    def checksum(self) -> str | None:
        """sha256 of the file this index was last saved to or loaded from (None: neither)."""
        return self._checksum

    @property
    def identity(self) -> FileIdentity | None:
        """The file this index was last saved to or loaded from, as it was then."""
        return self._identity

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write atomically: a temp file in the same directory, fsync, rename, fsync the
        directory. A crash or full disk leaves the previous file intact. Returns the sha256
        of what was written, so a later load can tell the file was not changed since."""
        target = Path(path)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes the file owner-only; the index gets the mode it had, else
                # the umask's, like the catalog beside it, so a shared index stays readable.
                mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _umask_mode()
                os.fchmod(f.fileno(), mode)

                def write(data: bytes) -> None:
                    digest.update(data)
                    f.write(data)

                # Stream through Python so write errors (ENOSPC, EFBIG) raise; faiss's own
                # FILE* writer only reports a failed final flush on stderr.
                writer = faiss.PyCallbackIOWriter(write)  # type: ignore[attr-defined]  # not in stub
                try:
                    faiss.write_index(self._cpu, writer)
                finally:
                    del writer
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        self._checksum = digest.hexdigest()
        # After the rename, which changes the ctime.
        self._identity = FileIdentity.of(target.stat())
        return self._checksum

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str = "auto",
        known: tuple[tuple[int, int, int, int], str] | None = None,
    ) -> VectorIndex:
        """Read an index written by :meth:`save`; search parameters come with it, and
        :attr:`checksum` is the sha256 of the bytes read. ``known``: (identity, sha256) of
        a file hashed before; when the open file is still that one, its sha256 is not
        computed again (a second or more for each GB)."""
        source = Path(path)
        if not source.is_file():
            raise VectorIndexError(f"no vector index at {source}; build the index first")
        digest = hashlib.sha256()
        try:
            with source.open("rb") as f:
                # The identity of the file being read, not of whatever the path names later.
                identity = FileIdentity.of(os.fstat(f.fileno()))
                unchanged = known is not None and known[0] == identity

                def read(size: int) -> bytes:
                    data = f.read(size)
                    if not unchanged:
                        digest.update(data)
                    return data

                reader = faiss.PyCallbackIOReader(read)  # type: ignore[attr-defined]  # not in stub
                try:
                    index = faiss.read_index(reader)
                finally:
                    del reader
        except (RuntimeError, OSError) as exc:
            raise VectorIndexError(
                f"{source} is not a readable faiss index ({_faiss_reason(exc)}); rebuild it"
            ) from exc
        if (
            not isinstance(index, faiss.IndexIDMap2)
            or index.metric_type != faiss.METRIC_INNER_PRODUCT
        ):
            raise VectorIndexError(
                f"{source} is not a ghostmatch vector index (inner-product IndexIDMap2); rebuild it"
            )
        loaded = cls.__new__(cls)
        loaded._setup(index, _factory_of(index), device)
        loaded._checksum = known[1] if unchanged and known is not None else digest.hexdigest()
        loaded._identity = identity
        return loaded

    @classmethod
    def _wrap(cls, index: faiss.IndexIDMap2, device: str = "auto") -> VectorIndex:
        """A VectorIndex over an ``IndexIDMap2`` assembled elsewhere (an on-disk build)."""
        wrapped = cls.__new__(cls)
        wrapped._setup(index, _factory_of(index), device)
        return wrapped

    def _ivf(self) -> faiss.IndexIVF | None:
        return _find_ivf(self._cpu.index)

    def _searcher(self) -> faiss.Index:
        if not self._use_gpu:
            return self._cpu
        if self._gpu is None:
            self._gpu = faiss.index_cpu_to_all_gpus(self._cpu)
        return self._gpu

    def _as_vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {x.shape}")
        return x


def default_factory(n: int, dim: int) -> str:
    """Factory string for ``n`` vectors of ``dim`` floats: exact up to FLAT_LIMIT, IVF above."""
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    # Up to FLAT_LIMIT a query scans < 200k x dim floats (milliseconds) and duplicate
    # detection gets exact scores with no training. Beyond, IVF with ~4*sqrt(n) lists
    # (the faiss guideline) reaches recall@10 >= 0.95 at nprobe ~16, i.e. scanning well
    # under 1% of the vectors; Flat codes keep the scores of what it finds exact.
    if n <= FLAT_LIMIT:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    # Choosing the lists scans all nlist centroids per query; past ~2M floats a HNSW graph
    # over the centroids does it in a few hundred distance computations.
    if nlist * dim > _FLAT_QUANTIZER_BUDGET:
        return f"IVF{nlist}_HNSW32,Flat"
    return f"IVF{nlist},Flat"


def build_index(
    ids: np.ndarray,
    vectors: np.ndarray,
    factory: str | None = None,
    device: str = "auto",
) -> VectorIndex:
    """Build, train when needed (seeded sample), fill and tune an index over ``vectors``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"expected vectors of shape (n, dim), got {x.shape}")
    keys = _as_ids(ids)
    chosen = factory if factory is not None else default_factory(len(x), x.shape[1])
    index = VectorIndex(x.shape[1], chosen, device)
    if not index.is_trained:
        index.train(_training_sample(x, index))
    index.add(keys, x)
    _tune_nprobe(index, x, keys)
    return index


def _training_sample(x: np.ndarray, index: VectorIndex) -> np.ndarray:
    ivf = _find_ivf(index._cpu.index)
    centroids = max(ivf.nlist if ivf is not None else 1, 256)
    limit = _TRAIN_POINTS_PER_CENTROID * centroids
    if len(x) <= limit:
        return x
    rows = np.random.default_rng(_SEED).choice(len(x), size=limit, replace=False)
    return x[np.sort(rows)]


def _tune_nprobe(index: VectorIndex, x: np.ndarray, ids: np.ndarray) -> None:
    """Double nprobe from the default until recall@10 on a seeded sample of the data
    reaches TARGET_RECALL, or stops improving (then codes, not probing, limit recall)."""
    ivf = _find_ivf(index._cpu.index)
    if ivf is None or len(x) <= _TUNE_K:
        return
    rows = np.random.default_rng(_SEED).choice(
        len(x), size=min(len(x), _TUNE_QUERIES), replace=False
    )
    queries = x[rows]
    _, truth = faiss.knn(queries, x, _TUNE_K, faiss.METRIC_INNER_PRODUCT)
    true_ids = ids[truth]

    def recall_at(nprobe: int) -> float:
        index.set_search_params(nprobe=nprobe)
        _, found = index.search(queries, _TUNE_K)
        return float((found[:, :, None] == true_ids[:, None, :]).any(axis=2).mean())

    nprobe = int(ivf.nprobe)
    recall = recall_at(nprobe)
    while recall < TARGET_RECALL and nprobe < ivf.nlist:
        wider = min(2 * nprobe, int(ivf.nlist))
        wider_recall = recall_at(wider)
        if wider_recall < recall + 0.01:
            break
        nprobe, recall = wider, wider_recall
    index.set_search_params(nprobe=nprobe)


def _resolve_device(device: str, sub: faiss.Index, factory: str) -> bool:
    """True when searches should run on GPU."""
    if device not in _DEVICES:
        raise VectorIndexError(f"device must be one of {', '.join(_DEVICES)}, got {device!r}")
    if device == "cpu":
        return False
    if faiss.get_num_gpus() == 0:
        if device == "cuda":
            raise VectorIndexError(
                "device 'cuda' needs faiss with GPU support (pip install 'ghostmatch[gpu]') "
                "and a visible GPU; use device 'cpu' or 'auto'"
            )
        return False
    if not _gpu_capable(sub):
        if device == "cuda":
            raise VectorIndexError(
                f"faiss has no GPU version of {factory!r}; use device 'cpu' or a Flat/IVF factory"
            )
        return False
    return True


def _gpu_capable(sub: faiss.Index) -> bool:
    """faiss GPU runs Flat and IVF with a flat coarse quantizer; HNSW stays on CPU."""
    index = faiss.downcast_index(sub)
    if isinstance(index, faiss.IndexFlat):
        return True
    return isinstance(index, faiss.IndexIVF) and isinstance(
        faiss.downcast_index(index.quantizer), faiss.IndexFlat
    )


def _find_ivf(sub: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(sub)
    except RuntimeError:
        return None


def _hnsw_of(sub: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph searched: the index itself, or an IVF's coarse quantizer."""
    index = faiss.downcast_index(sub)
    if isinstance(index, faiss.IndexHNSW):
        return index
    ivf = _find_ivf(sub)
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            return quantizer
    return None


def _ef_search_name(sub: faiss.Index) -> str | None:
    """The ParameterSpace name of the HNSW beam width, if the index has a graph."""
    if isinstance(faiss.downcast_index(sub), faiss.IndexHNSW):
        return "efSearch"
    if _hnsw_of(sub) is not None:
        return "quantizer_efSearch"
    return None


def _factory_of(index: faiss.IndexIDMap2) -> str:
    try:
        return str(reverse_index_factory(index.index))
    except (NotImplementedError, AssertionError):
        return type(faiss.downcast_index(index.index)).__name__


def _too_few_message(factory: str, n: int, detail: str, ivf: faiss.IndexIVF | None) -> str:
    # faiss k-means wants >= 39 training points per centroid.
    fewer_lists = f", or fewer lists (IVF{max(1, n // 39)})" if ivf is not None else ""
    return (
        f"too few vectors to train index {factory!r}: got {n} ({detail}); use factory "
        f"'Flat' (exact, needs no training) for a collection this small{fewer_lists}"
    )


def _faiss_reason(exc: BaseException) -> str:
    """The human part of a faiss C++ exception ('Error in <signature> at <file>: ...')."""
    text = str(exc).strip()
    for marker in ("failed: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_ids(ids: np.ndarray) -> np.ndarray:
    keys = np.asarray(ids)
    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    return np.ascontiguousarray(keys, dtype=np.int64)


def _isin_sorted(values: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """Boolean mask of ``values`` found in the ascending array ``sorted_pool``."""
    if not sorted_pool.size:
        return np.zeros(values.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_pool, values), sorted_pool.size - 1)
    return np.asarray(sorted_pool[pos] == values)


def _preview(ids: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"{shown}, ... ({ids.size} in all)" if ids.size > limit else shown


def _umask_mode() -> int:
    """The mode a new file gets here (0o666 less the umask)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
