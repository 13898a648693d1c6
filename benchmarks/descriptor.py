"""Descriptor throughput of each Embedder runtime at batch 32, and its agreement with eager."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.data import new_photos
from benchmarks.measure import Stopwatch, interleaved, median
from benchmarks.plots import bar_chart
from benchmarks.report import Figure, Report
from benchmarks.settings import Settings
from ghostmatch.model.embedder import Embedder, prepare
from ghostmatch.model.weights import load_descriptor

BATCH = 32
ROUNDS, ROUNDS_QUICK = 10, 2
TARGET_SPEEDUP = 1.8
MIN_COSINE = 0.9999
RUNTIMES = ("eager", "torch", "onnx")
# Each runtime is also run on one thread: when another process holds a core, threads that
# wait on each other at every layer can cost more than they share, and torch suffers
# from it more than ONNX Runtime, which would flatter the speedup over eager.
ONE_THREAD = ", 1 thread"


def run(settings: Settings) -> Report:
    return measure(ROUNDS_QUICK if settings.quick else ROUNDS, settings.out, settings.quick)


def measure(rounds: int, out: Path, quick: bool = False, batch: int = BATCH) -> Report:
    """Images/s per runtime: the median of ``rounds`` interleaved batches after a warm-up,
    with default threads and with one thread.

    Weights do not change speed, so random ones stand in. Agreement is the smallest
    per-image cosine between a runtime's descriptors and eager's on the warm-up batch.
    """
    report = Report("descriptor", quick)
    model = load_descriptor("random")
    card = model.card
    arrays = [prepare(photo, card) for photo in new_photos(batch, seed=1)]

    tasks: dict[str, Callable[[], np.ndarray]] = {}
    setup: dict[str, float] = {}
    for name in RUNTIMES:
        with Stopwatch() as clock:
            embedder = Embedder(model, runtime=name, device="cpu")
        setup[name] = clock.seconds
        tasks[name] = _embedding(embedder, arrays)
        # ONNX Runtime takes its thread count per session; torch's is global, so it is
        # set around each call instead.
        single = (
            Embedder(model, runtime=name, device="cpu", threads=1) if name == "onnx" else embedder
        )
        tasks[name + ONE_THREAD] = _embedding(single, arrays, torch_threads=1)
    # The warm-up, and the outputs to compare; one-thread eager and torch reuse the models
    # warmed here, while one-thread ONNX is a session of its own.
    outputs = {name: tasks[name]() for name in (*RUNTIMES, "onnx" + ONE_THREAD)}
    seconds = interleaved(tasks, rounds)
    rate = {name: batch / median(s) for name, s in seconds.items()}

    add_speed_figures(report, rate, batch)
    agreement = {}
    for name in ("torch", "onnx"):
        cosine = np.sum(outputs[name].astype(np.float64) * outputs["eager"], axis=1)
        agreement[name] = float(cosine.min())
        report.add(
            Figure(
                f"{name} agreement: min cosine per image",
                agreement[name],
                "",
                "eager",
                1.0,
                target=f">= {MIN_COSINE}",
                met=agreement[name] >= MIN_COSINE,
            )
        )
    threads = torch.get_num_threads()
    report.details = {
        "batch": batch,
        "input_size": card.input_size,
        "rounds": rounds,
        "default_threads": threads,
        "images_per_s": rate,
        "batch_seconds": seconds,
        "setup_seconds": setup,
        "min_cosine_vs_eager": agreement,
        "images_compared": len(arrays),
    }
    report.notes.append(
        f"random weights, {card.input_size} px, CPU; median of {rounds} interleaved batches "
        f"per runtime after a warm-up; default threads: {threads} (torch's and the embedder's "
        "ONNX Runtime intra-op threads, one per CPU)"
    )
    report.plots.append(
        bar_chart(rate, "images/s", f"descriptor throughput, batch {batch}", out / "descriptor.png")
    )
    return report


def add_speed_figures(report: Report, rate: dict[str, float], batch: int) -> None:
    for suffix, threads in (("", "default threads"), (ONE_THREAD, "1 thread")):
        eager = rate["eager" + suffix]
        baseline = f"eager, {threads}"
        for name in ("torch", "onnx"):
            report.add(
                Figure(
                    f"{name} runtime, {threads}, batch {batch}",
                    rate[name + suffix],
                    "img/s",
                    baseline,
                    eager,
                )
            )
        best = max(("torch", "onnx"), key=lambda name: rate[name + suffix])
        report.add(
            Figure(
                f"best runtime ({best}), {threads}",
                rate[best + suffix],
                "img/s",
                baseline,
                eager,
                target=f">= {TARGET_SPEEDUP}x",
                met=rate[best + suffix] >= TARGET_SPEEDUP * eager,
            )
        )


def _embedding(
    embedder: Embedder, arrays: list[np.ndarray], torch_threads: int | None = None
) -> Callable[[], np.ndarray]:
    """A call that embeds ``arrays``, with torch's thread count set for its duration."""

    def embed() -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(torch_threads or before)
        try:
            return embedder.embed_arrays(arrays)
        finally:
            torch.set_num_threads(before)

    return embed
