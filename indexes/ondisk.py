"""Indexes too large to build in one piece: IVF trained once on a sample, filled shard by
shard, and merged into inverted lists kept on disk, so memory stays bounded by one shard.

The result is an ordinary :class:`VectorIndex` (``IndexIDMap2`` over the IVF) whose lists
live in an ``.ivfdata`` file beside the index file, named in it by absolute path, and
memory-mapped when loaded.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from ghostmatch.errors import GhostmatchError
from ghostmatch.indexes.vector_index import (
    VectorIndex,
    VectorIndexError,
    _as_ids,
    _find_ivf,
)

# Above this many vectors the catalog's index is built on disk. A one-piece build holds
# the catalog's float32 vectors and the index's copy of them: the 1M Flat baseline of
# benchmarks/scale10m.py peaked at 2.3 GB RSS, so 2M is about 4.5 GB; the sharded build
# holds one shard (0.5 GB of half-precision codes at 256-d) whatever the size.
ONDISK_LIMIT = 2_000_000
# Sets another limit (a number of vectors): lower, to keep a smaller index's memory down.
LIMIT_ENV = "GHOSTMATCH_ONDISK_LIMIT"
SHARD_SIZE = 1_000_000
DATA_SUFFIX = ".ivfdata"
# k-means points per list: faiss warns below 39; 40 keeps the 10M training to minutes on
# a shared two-core machine.
TRAIN_POINTS_PER_LIST = 40
_TRAIN_ITERATIONS = 10
# Lists are capped so that assigning 10M vectors to them stays well under the build's time
# budget on two cores: every added vector is compared with every centroid.
_MAX_LISTS = 4096
SEED = 1234
# The coarse graph's beam while adding: wide enough to put every vector in its nearest list.
ADD_EF_SEARCH = 64
# Search settings an on-disk index is saved with: the cheapest that reached recall@10 >= 0.95
# at 10M clustered vectors (`python -m benchmarks.scale10m`: 0.959 at 6.8 ms p50, where
# nprobe 16 with the graph's beam at 64 gave 0.92). The beam must be wider than the lists
# it returns, or it misses some of the nearest lists.
SEARCH_NPROBE = 64
SEARCH_EF_SEARCH = 128

Progress = Callable[[int, int, str], None]


def ondisk_limit() -> int:
    """How many vectors an index holds at most before it is built on disk: ``LIMIT_ENV``
    from the environment when set, else ``ONDISK_LIMIT``."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return ONDISK_LIMIT
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise GhostmatchError(
            f"{LIMIT_ENV} must be a whole number of vectors (0 or more), not {text!r}; "
            f"unset it for the default, {ONDISK_LIMIT:,}"
        )
    return limit


def ondisk_factory(n: int, dim: int) -> str:
    """IVF with half-precision codes: exact enough to keep recall (scores within ~1e-4 of
    float32) at half the disk and memory bandwidth of ``Flat`` codes."""
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    nlist = min(_MAX_LISTS, 2 ** round(math.log2(4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // TRAIN_POINTS_PER_LIST))
    # The coarse quantizer is a HNSW graph: assigning each added vector to its list then
    # takes a few hundred distance computations instead of one per list.
    return f"IVF{nlist}_HNSW32,SQfp16"


def training_size(factory: str, dim: int) -> int:
    """How many vectors :func:`build_ondisk` wants as its training sample."""
    probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _find_ivf(probe)
    lists = ivf.nlist if ivf is not None else 1
    return max(TRAIN_POINTS_PER_LIST * lists, 1000)


def build_ondisk(
    training: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    factory: str,
    *,
    shard_size: int = SHARD_SIZE,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    total: int = 0,
) -> VectorIndex:
    """Train ``factory`` (an IVF) on ``training``, add ``chunks`` of (ids, unit vectors) in
    shards of ``shard_size``, merge the shards into ``path`` + ``.ivfdata`` and return the
    loaded index. Memory: the training sample, one shard's codes and one chunk.

    Shards are written to ``workdir`` (default: beside ``path``) and deleted once merged;
    the disk needed at the peak is twice the codes. ``progress(done, total, stage)`` is
    called after each chunk (``total`` as given, 0 if unknown) and at each stage.
    """
    target = Path(path)
    x = np.ascontiguousarray(training, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a training sample of shape (n, dim), got {x.shape}")
    dim = x.shape[1]
    trained = _trained(x, factory)
    graph = _hnsw_quantizer(trained)
    if graph is not None:
        # Adding puts each vector in the list the graph finds nearest. At the default beam
        # (16) only 86.7% of 10M clustered vectors reached their nearest of 4096 lists, and
        # recall@10 stalled at 0.89 however many lists a query probed; 64 gave 99.1%,
        # 256 all (benchmarks/scale10m.py's index, checked against exact search).
        graph.hnsw.efSearch = ADD_EF_SEARCH
    report = progress or (lambda done, total, stage: None)
    scratch = Path(tempfile.mkdtemp(prefix=".shards-", dir=workdir or target.parent))
    shards: list[Path] = []
    ids_parts: list[np.ndarray] = []
    done = 0
    try:
        shard = faiss.clone_index(trained)
        for ids, vectors in chunks:
            keys = _as_ids(ids)
            v = np.ascontiguousarray(vectors, dtype=np.float32)
            if v.shape != (len(keys), dim):
                raise ValueError(f"expected {len(keys)} vectors of {dim}, got {v.shape}")
            # The lists hold each vector's position in the whole index; the id map on top
            # turns positions into catalog ids, like an in-memory VectorIndex.
            shard.add_with_ids(v, np.arange(done, done + len(keys), dtype=np.int64))
            ids_parts.append(keys)
            done += len(keys)
            report(done, total, "adding")
            if shard.ntotal >= shard_size:
                shards.append(_write_shard(shard, scratch, len(shards)))
                shard = faiss.clone_index(trained)
        if shard.ntotal or not shards:
            shards.append(_write_shard(shard, scratch, len(shards)))
        del shard
        all_ids = np.concatenate([np.empty(0, np.int64), *ids_parts])
        del ids_parts
        if np.unique(all_ids).size != all_ids.size:
            raise ValueError("ids must be unique")
        report(done, total, "merging")
        # A new name per build: a reader still mapping the previous lists keeps them.
        data = target.with_name(f"{target.name}.{os.urandom(6).hex()}{DATA_SUFFIX}")
        # The id map must wrap the IVF while it is empty; merging then sets both totals.
        wrapped = faiss.IndexIDMap2(trained)
        merge_ondisk(wrapped, [str(s) for s in shards], str(data.resolve()))
    finally:
        for s in shards:
            s.unlink(missing_ok=True)
        _remove_tree(scratch)
    faiss.copy_array_to_vector(all_ids, wrapped.id_map)
    wrapped.ntotal = trained.ntotal
    wrapped.construct_rev_map()
    index = VectorIndex._wrap(wrapped, device="cpu")
    index.set_search_params(
        nprobe=min(SEARCH_NPROBE, trained.nlist),
        ef_search=SEARCH_EF_SEARCH if index.search_params.get("ef_search") else None,
    )
    index.save(target)
    del index, wrapped, trained
    for old in target.parent.glob(f"{target.name}.*{DATA_SUFFIX}"):
        if old != data:
            old.unlink(missing_ok=True)
    report(done, total, "done")
    return VectorIndex.load(target, device="cpu")


def is_ondisk(index: VectorIndex) -> bool:
    """Whether the index's inverted lists live in a memory-mapped ``.ivfdata`` file."""
    ivf = index._ivf()
    lists = ivf.invlists if ivf is not None else None
    return lists is not None and isinstance(
        faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists
    )


def lists_file(index: VectorIndex) -> Path | None:
    """The ``.ivfdata`` file an on-disk index maps (None for an in-memory index)."""
    ivf = index._ivf()
    lists = ivf.invlists if ivf is not None else None
    if lists is None:
        return None
    ondisk = faiss.downcast_InvertedLists(lists)
    if not isinstance(ondisk, faiss.OnDiskInvertedLists):
        return None
    return Path(ondisk.filename)


def _trained(x: np.ndarray, factory: str) -> faiss.IndexIVF:
    try:
        made = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise VectorIndexError(f"faiss cannot build index factory {factory!r}") from exc
    ivf = faiss.downcast_index(made)
    if not isinstance(ivf, faiss.IndexIVF):
        raise VectorIndexError(f"an on-disk index must be an IVF factory, not {factory!r}")
    # The downcast proxy takes ownership, else the index dies with ``made``.
    made.this.disown()  # type: ignore[attr-defined]  # swig attribute, not in stub
    ivf.this.own(True)  # type: ignore[attr-defined]  # swig attribute, not in stub
    if len(x) < ivf.nlist:
        raise VectorIndexError(
            f"too few training vectors for {factory!r}: got {len(x)}, need {ivf.nlist}"
        )
    # Seeded and shorter than faiss's 25 iterations: k-means on the training sample is
    # the longest single step of a large build, and later iterations barely move recall.
    clustering = faiss.ClusteringParameters()
    clustering.niter = _TRAIN_ITERATIONS
    clustering.seed = SEED
    clustering.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    # Centroids of unit vectors compared by inner product belong on the sphere too (faiss
    # requires it for a HNSW quantizer under inner product).
    clustering.spherical = True
    ivf.cp = clustering
    ivf.train(x)
    return ivf


def _hnsw_quantizer(ivf: faiss.IndexIVF) -> faiss.IndexHNSW | None:
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _write_shard(shard: faiss.Index, folder: Path, number: int) -> Path:
    path = folder / f"shard-{number:04d}.index"
    faiss.write_index(shard, str(path))
    return path


def _remove_tree(folder: Path) -> None:
    for entry in folder.iterdir():
        entry.unlink(missing_ok=True)
    folder.rmdir()
