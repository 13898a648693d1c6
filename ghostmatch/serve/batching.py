"""Micro-batching: the work of concurrent requests done in shared calls.

One model call on a batch of n images costs far less than n calls on one image each, and
one FAISS search of n queries reads the stored vectors once instead of n times, so requests
that arrive within ``max_wait_s`` of each other share both. A batch waits only while
another request is still preparing its item (``expecting``): a lone request never waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Runs ``run`` (items -> one result per item, in order) on one worker thread over
    batches of at most ``max_batch`` submitted items. A forming batch waits at most
    ``max_wait_s`` for more; it goes as soon as it is full or nobody is ``expecting``."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result]],
        max_batch: int = 16,
        max_wait_s: float = 0.005,
    ) -> None:
        self._run_batch = run
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._items: list[tuple[Item, Future[Result]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._expected = 0  # callers preparing an item they will submit
        # Sizes of the latest batches (at most 1,000), for the benchmark and tests.
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._work, name="ghostmatch-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Wrap the preparation of an item and its ``submit``: while any caller is inside,
        a forming batch waits (up to ``max_wait_s``) for its item."""
        with self._cond:
            self._expected += 1
        try:
            yield
        finally:
            with self._cond:
                self._expected -= 1
                self._cond.notify_all()

    def submit(self, item: Item) -> Future[Result]:
        """The future result of one item."""
        future: Future[Result] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._items.append((item, future))
            self._cond.notify_all()
        return future

    @property
    def pending(self) -> int:
        """Items submitted and not yet taken into a batch."""
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Stop the worker once the submitted items are done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[tuple[Item, Future[Result]]]:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._items) < self.max_batch and self._expected and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._items[: self.max_batch]
            del self._items[: self.max_batch]
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run_batch([item for item, _ in live])
            except BaseException as error:  # the callers get the error, the worker goes on
                for _, future in live:
                    future.set_exception(error)
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(live)]
            for (_, future), result in zip(live, results, strict=True):
                future.set_result(result)
