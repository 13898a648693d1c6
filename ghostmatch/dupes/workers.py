"""Worker processes for the duplicate grouping: independent parts of the candidate graph
decided at once, each on a process forked from the caller, which inherits its state."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

from ghostmatch.errors import GhostmatchError

Result = TypeVar("Result")
# ``work(part, step)``: one part's result; ``step(n)`` reports n more units of it done.
Work = Callable[[int, Callable[[int], None]], Result]


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Whether worker processes can be forked here (not on Windows): the parts' shared
    state (records, candidates, the judge) is inherited, never pickled."""
    return "fork" in multiprocessing.get_all_start_methods()


def run_parts(
    order: Sequence[int],
    work: Work[Result],
    workers: int,
    progress: Callable[[int], None] | None = None,
    start: Callable[[], None] | None = None,
) -> dict[int, Result]:
    """``work(part, step)`` for each part in ``order`` (the first ones handed out first),
    on ``workers`` forked processes, each taking the next part when it is done with one;
    the results by part. ``start()`` runs in each process before its first part (to leave
    what a fork does not carry over: thread pools, database connections). The units each
    ``step`` reports reach ``progress`` in the caller as they happen.

    An exception in a process is raised here, with its type and message (a type that
    cannot cross processes becomes a ``RuntimeError`` naming it); then, as on Ctrl-C here,
    every process is stopped and waited for before this returns.
    """
    context = multiprocessing.get_context("fork")
    pending = list(order)
    results: dict[int, Result] = {}
    processes: list[Any] = []
    busy: dict[Connection, Any] = {}
    try:
        # The processes inherit every object of this one, garbage not yet collected too.
        # Some must never be destroyed there: ONNX Runtime's sessions wait in their
        # destructors for thread pools that a fork does not carry over, and a process
        # that collected one hung. So all of it is frozen out of the processes'
        # collections, garbage too, which they then never destroy (a collection here
        # first took 0.2 s of the search's wall clock with torch loaded).
        gc.freeze()
        try:
            for _ in range(min(workers, len(pending))):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_serve,
                    args=(theirs, work, start),
                    name="ghostmatch-dupes",
                    daemon=True,
                )
                process.start()
                theirs.close()
                processes.append(process)
                busy[ours] = process
                ours.send(pending.pop(0))
        finally:
            gc.unfreeze()
        while busy:
            for conn in wait(list(busy)):
                assert isinstance(conn, Connection)
                try:
                    message = conn.recv()
                except EOFError:
                    process = busy[conn]
                    process.join()
                    raise GhostmatchError(
                        f"a worker process deciding duplicate pairs ended with exit code "
                        f"{process.exitcode}; with workers=1 the search runs in this process"
                    ) from None
                kind = message[0]
                if kind == "step":
                    if progress is not None:
                        progress(message[1])
                elif kind == "done":
                    results[message[1]] = message[2]
                    if pending:
                        conn.send(pending.pop(0))
                    else:
                        conn.send(None)
                        busy.pop(conn).join()
                        conn.close()
                else:
                    error, text = message[1], message[2]
                    if hasattr(error, "add_note"):
                        error.add_note(f"in a worker process:\n{text}")
                    raise error
    finally:
        for conn in busy:
            conn.close()
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return results


def _serve(conn: Connection, work: Work[Any], start: Callable[[], None] | None) -> None:
    """A worker process: parts from ``conn`` until None, each answered with its result,
    its steps on the way; an exception ends it, sent back first."""
    # Ctrl-C in a terminal reaches the whole process group: the caller alone handles it,
    # and stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The caller's progress bar writes from a thread of its own: the fork may have copied
    # the lock of its stream held. A warning here goes through streams of this process.
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            fresh = open(stream.fileno(), "w", buffering=1, closefd=False)  # noqa: SIM115
        except (AttributeError, OSError, ValueError):  # no file under it (a test's capture)
            continue
        setattr(sys, name, fresh)

    def step(n: int) -> None:
        conn.send(("step", n))

    try:
        if start is not None:
            start()
        while (part := conn.recv()) is not None:
            conn.send(("done", part, work(part, step)))
    except BaseException as error:  # every failure goes back to the caller, Ctrl-C aside
        conn.send(("error", _portable(error), traceback.format_exc()))
    finally:
        conn.close()


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling as itself, else a ``RuntimeError`` that names it."""
    try:
        back = pickle.loads(pickle.dumps(error))
    except Exception:  # whatever stops it from crossing means the same
        back = None
    if type(back) is type(error) and str(back) == str(error):
        return error
    return RuntimeError(f"{type(error).__name__}: {error}")
