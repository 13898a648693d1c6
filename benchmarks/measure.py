"""Measuring on a busy machine: interleaved timing rounds, percentiles and peak memory."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import psutil


def interleaved(tasks: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each task per round, running the tasks in turn every round, so that
    background load falls on all of them alike instead of on whichever ran last."""
    seconds: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def timed(task: Callable[[], object]) -> float:
    """Seconds one call of ``task`` takes."""
    with Stopwatch() as clock:
        task()
    return clock.seconds


class Stopwatch:
    """Wall-clock seconds of a ``with`` block, in ``seconds`` after it ends."""

    def __init__(self) -> None:
        self._start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


class PeakRSS:
    """Peak resident memory (bytes) of this process while the ``with`` block runs, sampled
    every ``interval`` seconds by a thread; ``before`` is the RSS on entry."""

    def __init__(self, interval: float = 0.01) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.before = 0
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
