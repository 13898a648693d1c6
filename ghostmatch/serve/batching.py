"""Micro-batching: descriptors of concurrent uploads computed in shared model calls.

One model call on a batch of n images costs far less than n calls on one image each (and
the model's threads are not fought over), so requests that arrive within ``max_wait_s`` of
each other share a call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    """Runs ``embed`` (uint8 HWC arrays -> (n, dim) descriptors) on one worker thread over
    batches of at most ``max_batch`` submitted arrays. The first array of a batch waits at
    most ``max_wait_s`` for others; a batch also goes as soon as it is full."""

    def __init__(
        self,
        embed: Callable[[Sequence[np.ndarray]], np.ndarray],
        max_batch: int = 16,
        max_wait_s: float = 0.005,
    ) -> None:
        self._embed = embed
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._items: list[tuple[np.ndarray, Future[np.ndarray]]] = []
        self._cond = threading.Condition()
        self._closed = False
        # Sizes of the batches run so far (bounded), for the benchmark and tests.
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._run, name="ghostmatch-batcher", daemon=True)
        self._thread.start()

    def submit(self, array: np.ndarray) -> Future[np.ndarray]:
        """The future descriptor (dim,) of one prepared image."""
        future: Future[np.ndarray] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._items.append((array, future))
            self._cond.notify_all()
        return future

    @property
    def pending(self) -> int:
        """Arrays submitted and not yet taken into a batch."""
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Stop the worker once the submitted arrays are done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[tuple[np.ndarray, Future[np.ndarray]]]:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._items) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._items[: self.max_batch]
            del self._items[: self.max_batch]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            live = [(a, f) for a, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                vectors = self._embed([a for a, _ in live])
            except BaseException as error:  # the callers get the error, the worker goes on
                for _, future in live:
                    future.set_exception(error)
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(live)]
            for (_, future), vector in zip(live, vectors, strict=True):
                future.set_result(vector)
