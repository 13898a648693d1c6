"""Decoding and embedding on a pool of Ray actors, for indexing across machines: the driver
lists the files and commits; each actor loads the model once and turns batches of files into
vectors. Ray is imported only here, and only when it is asked for."""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Collection, Container, Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.indexer import _Embedded, _Failed, read_entry
from ghostmatch.ingest.scan import FileEntry

if TYPE_CHECKING:
    from ghostmatch.model.descriptor import Descriptor
    from ghostmatch.model.embedder import Embedder

# What an address may be besides "host:port" and "ray://host:port": Ray's own words for a
# new cluster on this machine and for the one already running here (or at $RAY_ADDRESS).
LOCAL = "local"
AUTO = "auto"

# A local cluster holds only the model and batches of results in its object store; Ray's
# default (30% of the machine's memory) would reserve gigabytes of shared memory for nothing.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20

# Seconds to wait for a cluster's port to answer: Ray itself retries an address that does not
# answer for minutes.
CONNECT_TIMEOUT_S = 10.0

# Batches queued per actor: while the driver collects one, the actor works on the next.
QUEUED_PER_ACTOR = 2


class EmbedWorker:
    """One Ray actor's state: the model loaded once, and the vanished images' content hashes,
    so that a moved file is recognised here without being decoded."""

    def __init__(
        self,
        model: Descriptor,
        runtime: str,
        device: str,
        max_megapixels: float,
        movable: Container[str],
    ) -> None:
        from ghostmatch.model.embedder import Embedder

        # One thread per actor: Ray gives each actor one CPU, and the pool is as wide as
        # the cluster, so more threads would only fight over the same cores.
        self.embedder = Embedder(model, runtime=runtime, device=device, threads=1)
        self.max_megapixels = max_megapixels
        self.movable = movable

    def embed(self, entries: Sequence[FileEntry], changed: Sequence[bool]) -> list[Any]:
        """Each file's result, in order: a failure, a move (no vector: the catalog has it) or
        an image with its vector and regional descriptors. A changed file is never taken for
        a move."""
        card = self.embedder.card
        results = [
            read_entry(entry, card, self.max_megapixels, () if was_indexed else self.movable)
            for entry, was_indexed in zip(entries, changed, strict=True)
        ]
        images = [r for r in results if isinstance(r, _Embedded) and r.pixels is not None]
        # The regional descriptors too, from the same pass, as a local run stores them: an
        # image without them would be read again by the next run.
        vectors, regions = self.embedder.embed_with_regions(
            [r.pixels for r in images if r.pixels is not None]
        )
        # The pixels stay here: only the vectors travel back to the driver, the regional
        # ones in float16, as the catalog stores them.
        done = {
            id(r): replace(r, pixels=None, vector=v, regions=p.astype(np.float16))
            for r, v, p in zip(images, vectors, regions, strict=True)
        }
        return [done.get(id(r), r) for r in results]


class RayEmbedding:
    """Decodes and embeds an indexing run's files on Ray actors (see ``Indexer.run``).

    ``address``: ``local`` starts a cluster on this machine for the run, ``auto`` joins the
    one running here (or at ``$RAY_ADDRESS``), anything else is a cluster's address. When
    this process is already connected to Ray, that connection is used. ``actors``: how many
    (default: one per CPU of the cluster).
    """

    def __init__(self, address: str = LOCAL, actors: int | None = None) -> None:
        if actors is not None and actors < 1:
            raise GhostmatchError(f"the number of Ray actors must be at least 1, not {actors}")
        self.address = address
        self.actors = actors

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
        """One result per file of ``todo``, in order; images come with their vector and
        regional descriptors."""
        ray = _import_ray()
        started = self._connect(ray)
        pool: list[Any] = []
        try:
            pool = self._start_actors(ray, embedder, max_megapixels, movable)
            batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
            idle = deque(pool * QUEUED_PER_ACTOR)
            queued: deque[tuple[Any, Any]] = deque()
            position = 0
            while position < len(batches) or queued:
                while position < len(batches) and idle:
                    actor = idle.popleft()
                    batch = batches[position]
                    flags = [entry.path in changed for entry in batch]
                    queued.append((actor, actor.embed.remote(batch, flags)))
                    position += 1
                # In order, so that checkpoints and the pause hook count as the local path.
                actor, pending = queued.popleft()
                yield from _collect(ray, pending)
                idle.append(actor)
        finally:
            # Ctrl-C, an error or the end of the run: no actor outlives it.
            for actor in pool:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Join or start the cluster; True when this run must disconnect at its end."""
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {
            "include_dashboard": False,
            # Actors' output would land on the driver's stdout, which --json keeps clean;
            # their errors reach the driver as exceptions.
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if self.address == LOCAL:
            options["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
        try:
            _check_reachable(self.address)
            ray.init(address=self.address, **options)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise GhostmatchError(
                f"cannot reach a Ray cluster at {self.address!r}: {error}; start the cluster "
                f"first, or use the address {LOCAL!r} for a cluster on this machine"
            ) from error
        return True

    def _start_actors(
        self, ray: Any, embedder: Embedder, max_megapixels: float, movable: Collection[str]
    ) -> list[Any]:
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 1.0)
        count = self.actors or max(1, int(cpus))
        # More actors than the cluster has CPUs (or GPUs) share them: asking each for a whole
        # one would leave the rest waiting for ever, and with them the batches queued there.
        options: dict[str, float] = {"num_cpus": min(1.0, cpus / count)}
        if embedder.device == "cuda":
            gpus = resources.get("GPU", 0.0)
            if gpus == 0:
                raise GhostmatchError("the Ray cluster has no GPU; use the device cpu")
            options["num_gpus"] = min(1.0, gpus / count)
        worker = ray.remote(**options)(EmbedWorker)
        # Put once and shared: each actor gets the model and the hashes from the object
        # store instead of its own copy in every constructor call.
        model = ray.put(embedder.model)
        hashes = ray.put(frozenset(movable))
        # The driver's runtime and device, so that the vectors equal a local run's.
        return [
            worker.remote(model, embedder.runtime, embedder.device, max_megapixels, hashes)
            for _ in range(count)
        ]


def _collect(ray: Any, pending: Any) -> list[_Embedded | _Failed]:
    """A batch's results; a lost actor or node is an error the user can retry."""
    try:
        results: list[_Embedded | _Failed] = ray.get(pending)
    except ray.exceptions.RayTaskError:
        raise  # an error in the actor's code, raised as its own type: it says what went wrong
    except ray.exceptions.RayError as error:
        raise GhostmatchError(
            f"a Ray worker was lost ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "the work committed so far is kept: index again to resume"
        ) from error
    return results


def _check_reachable(address: str) -> None:
    """Raise ConnectionError at once when nothing answers at a ``host:port`` address."""
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        return  # a word for Ray to resolve, or Ray Client, which gives up by itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {address} ({error})") from error


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise GhostmatchError(
            "Ray is not installed; install it with: pip install 'ghostmatch[ray]'"
        ) from error
    return ray
