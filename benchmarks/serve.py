"""``ghostmatch serve`` under load: latency and queries/s of 640x480 JPEG uploads at 1, 4
and 16 concurrent clients against 100k stored vectors, with micro-batching and with
one-request-at-a-time serving (``--max-batch 1``), beside ``ghostmatch query`` run once
per photo; then a soak at 16 clients that must see no errors.

Run: ``python -m benchmarks.serve`` (about 4 minutes; ``--duration`` and ``--soak`` set
the seconds per level and of the soak).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.data import clustered_unit_vectors, new_photos, skimage_photos
from benchmarks.measure import percentile_ms
from benchmarks.query import fill_catalog
from benchmarks.report import Figure, Report, run_and_save
from benchmarks.settings import benchmark_options
from ghostmatch.library import Library

CLIENTS = (1, 4, 16)
K = 10
UPLOAD_SIZE = (640, 480)
TARGET_P50_MS = 60.0
TARGET_BATCHING_GAIN = 1.5
CLI = [sys.executable, "-m", "ghostmatch.cli.app"]


def build(folder: Path, weights: str, n_vectors: int) -> Path:
    """A real index of scikit-image photos, plus ``n_vectors`` synthetic vectors."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for n, image in enumerate(skimage_photos()):
        image.save(photos / f"photo{n:02d}.jpg", quality=90)
    index = folder / "index"
    with Library(index, weights=weights, device="cpu") as lib:
        lib.index([photos])
        fill_catalog(lib, clustered_unit_vectors(n_vectors, lib.embedder.dim, seed=0))
        lib.rebuild()
    return index


def uploads(n: int) -> list[bytes]:
    result = []
    for photo in new_photos(n, seed=7, size=UPLOAD_SIZE):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        result.append(buffer.getvalue())
    return result


@contextmanager
def server(index: Path, *options: str) -> Iterator[str]:
    """``ghostmatch serve`` in its own process; yields its URL."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--index", os.fspath(index), "--port", "0", *options],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "serving" not in line:
            raise RuntimeError(f"ghostmatch serve did not start: {line}{proc.stderr.read()}")
        yield line.split(" on ", 1)[1].split()[0].rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def load(url: str, photos: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each posting photos one after another for ``seconds``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(n: int) -> None:
        # TCP_NODELAY, as browsers and curl set it: without it a request written in two
        # parts (headers, then body) waits for the server's delayed ACK, about 40 ms.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        with httpx.Client(base_url=url, timeout=60, transport=transport) as c:
            i = n
            while time.perf_counter() < deadline:
                files = {"image": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")}
                start = time.perf_counter()
                try:
                    response = c.post("/api/v1/query", params={"k": K}, files=files)
                    ok = response.status_code == 200 and len(response.json()["matches"]) == K
                    problem = None if ok else f"status {response.status_code}"
                except httpx.HTTPError as error:
                    problem = type(error).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors[problem] = errors.get(problem, 0) + 1
                i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "queries_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(percentile_ms(latencies, 50), 2) if latencies else None,
        "p99_ms": round(percentile_ms(latencies, 99), 2) if latencies else None,
    }


def cli_calls(index: Path, photos: list[bytes], folder: Path, calls: int) -> list[float]:
    """Seconds of ``ghostmatch query PHOTO --json``, one process per photo."""
    seconds = []
    for n in range(calls):
        photo = folder / f"cli{n}.jpg"
        photo.write_bytes(photos[n % len(photos)])
        start = time.perf_counter()
        subprocess.run(
            [*CLI, "query", os.fspath(photo), "--index", os.fspath(index), "-k", str(K), "--json"],
            check=True,
            capture_output=True,
        )
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(
    folder: Path, weights: str, n_vectors: int, duration: float, soak: float, cli: int
) -> Report:
    report = Report("serve", quick=False)
    index = build(folder, weights, n_vectors)
    photos = uploads(48)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, options in (("batched", ()), ("one at a time", ("--max-batch", "1"))):
        with server(index, *options) as url:
            load(url, photos, 4, 3.0)  # warm-up: caches, thread pools
            runs[name] = [load(url, photos, n, duration) for n in CLIENTS]
            if name == "batched" and soak > 0:
                report.details["soak"] = load(url, photos, 16, soak)
    cli_seconds = cli_calls(index, photos, folder, cli)
    batched = {r["clients"]: r for r in runs["batched"]}
    single = {r["clients"]: r for r in runs["one at a time"]}
    cli_p50 = percentile_ms(cli_seconds, 50)
    p50 = batched[1]["p50_ms"]
    report.add(
        Figure(
            "upload query p50, 1 client",
            p50,
            "ms",
            "`ghostmatch query` per photo (process start, model load, query) p50",
            cli_p50,
            target=f"< {TARGET_P50_MS:g} ms",
            met=p50 < TARGET_P50_MS,
        )
    )
    for n in CLIENTS:
        report.add(
            Figure(
                f"queries/s at {n} clients, micro-batching (p50 {batched[n]['p50_ms']} ms, "
                f"p99 {batched[n]['p99_ms']} ms)",
                batched[n]["queries_per_s"],
                "queries/s",
                f"one request at a time (p50 {single[n]['p50_ms']} ms, "
                f"p99 {single[n]['p99_ms']} ms)",
                single[n]["queries_per_s"],
                target=f">= {TARGET_BATCHING_GAIN}x" if n == 16 else "",
                met=(
                    batched[n]["queries_per_s"] >= TARGET_BATCHING_GAIN * single[n]["queries_per_s"]
                    if n == 16
                    else None
                ),
            )
        )
    if "soak" in report.details:
        s = report.details["soak"]
        errors = sum(s["errors"].values())
        report.add(
            Figure(
                f"errors at 16 clients for {soak:g} s ({s['requests']} queries, "
                f"{s['queries_per_s']} queries/s)",
                errors,
                "errors",
                "",
                float("nan"),
                target="0",
                met=errors == 0,
            )
        )
    report.details.update(
        {
            "vectors": n_vectors,
            "weights": weights,
            "upload": f"{UPLOAD_SIZE[0]}x{UPLOAD_SIZE[1]} JPEG, quality 90",
            "batched": runs["batched"],
            "one_at_a_time": runs["one at a time"],
            "cli_seconds": [round(s, 3) for s in cli_seconds],
        }
    )
    report.notes.append(
        f"server and clients on the same {os.cpu_count()}-core machine; clients are Python "
        "threads with httpx, each sending its next upload as soon as the last is answered"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_options("serve", __doc__.splitlines()[0], weights=True)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds at 16 clients")
    parser.add_argument("--cli", type=int, default=5, help="ghostmatch query calls")
    args = parser.parse_args(argv)

    def measure_in_folder() -> Report:
        with tempfile.TemporaryDirectory(prefix="ghostmatch-serve-bench-") as tmp:
            weights = args.weights or "bundled"
            return measure(Path(tmp), weights, args.vectors, args.duration, args.soak, args.cli)

    run_and_save("serve", argv, args.out, measure_in_folder)


if __name__ == "__main__":
    main()
