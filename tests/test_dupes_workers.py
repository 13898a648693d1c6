"""Duplicate grouping on worker processes: the same groups as one process, progress to
its total, and a failure or an interruption that leaves no process behind."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

import ghostmatch
from ghostmatch.dupes import finder as finder_module
from ghostmatch.dupes.finder import PairJudge
from ghostmatch.dupes.groups import components
from ghostmatch.dupes.workers import can_fork, run_parts, usable_cores
from ghostmatch.errors import GhostmatchError

pytestmark = [
    pytest.mark.skipif(not can_fork(), reason="worker processes are forked"),
    # The model's ONNX exports made once for all of these searches.
    pytest.mark.usefixtures("shared_model_cache"),
]


@pytest.fixture(scope="module")
def families(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of three photos with copies each (a family of files that are candidates of
    one another) and two photos without: several parts of the candidate graph."""
    folder = tmp_path_factory.mktemp("families")
    for name in ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field"):
        shutil.copy(photos / f"{name}.jpg", folder / f"{name}.jpg")
    chelsea = Image.open(photos / "chelsea.jpg")
    shutil.copy(photos / "chelsea.jpg", folder / "chelsea_exact.jpg")
    chelsea.save(folder / "chelsea_q40.jpg", quality=40)
    chelsea.resize((chelsea.width // 2, chelsea.height // 2)).save(folder / "chelsea_half.jpg")
    coffee = Image.open(photos / "coffee.jpg")
    w, h = coffee.size
    coffee.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(folder / "coffee_crop.jpg")
    coffee.save(folder / "coffee_q40.jpg", quality=40)
    astronaut = Image.open(photos / "astronaut.jpg")
    ImageOps.mirror(astronaut).save(folder / "astronaut_flip.jpg")
    astronaut.rotate(90, expand=True).save(folder / "astronaut_turned.jpg")
    index = tmp_path_factory.mktemp("families-index") / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([folder])
    return index


@pytest.fixture(scope="module")
def crowd(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of independent pictures of smooth noise, which the descriptor cannot tell
    apart (one part of the candidates, most of its files crowded), two copies of one of
    them, and a photo with a copy (a part of its own)."""
    from benchmarks import synthetic

    folder = tmp_path_factory.mktemp("crowd")
    for n in range(CROWD):
        synthetic.make_image("noise", n, seed=5).save(folder / f"noise-{n:02d}.jpg", quality=92)
    noise = synthetic.make_image("noise", 0, seed=5)
    noise.save(folder / "noise-00-q60.jpg", quality=60)
    noise.resize((noise.width // 2, noise.height // 2)).save(folder / "noise-00-half.jpg")
    shutil.copy(photos / "chelsea.jpg", folder / "chelsea.jpg")
    Image.open(photos / "chelsea.jpg").save(folder / "chelsea_q40.jpg", quality=40)
    index = tmp_path_factory.mktemp("crowd-index") / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([folder])
    return index


# Pictures of noise: enough that most have more candidates than a file keeps
# (``finder.MAX_CANDIDATES``).
CROWD = 60


class _Spy:
    """Records the parts each call of ``run_parts`` hands out, and runs it."""

    def __init__(self) -> None:
        self.orders: list[list[int]] = []

    def __call__(self, order: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        self.orders.append(list(order))
        return run_parts(order, *args, **kwargs)


def test_two_processes_make_the_groups_of_one(
    families: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy()
    monkeypatch.setattr(finder_module, "run_parts", spy)
    steps: list[tuple[str, int, int | None]] = []
    with ghostmatch.open(families, create=False) as lib:
        one = lib.find_duplicates(similar=True, workers=1)
        assert spy.orders == []
        two = lib.find_duplicates(
            similar=True, workers=2, progress=lambda *step: steps.append(step)
        )
    assert len(spy.orders) == 1 and len(spy.orders[0]) >= 2
    # Every field of every group and member, turns and similar lists too, in order.
    assert two == one
    assert [g.to_dict() for g in two] == [g.to_dict() for g in one]
    names = {m.path.name for g in one for m in g.members}
    assert {"chelsea_q40.jpg", "coffee_crop.jpg", "astronaut_flip.jpg"} <= names
    assert any(m.turn for g in one for m in g.members)  # the turned copy, turn and all
    # The bar moves file by file up to its total.
    done = [d for _, d, _ in steps]
    assert done == list(range(1, len(done) + 1))
    assert steps[-1][1] == steps[-1][2]
    assert multiprocessing.active_children() == []


def test_a_crowd_too_large_to_share_out_is_decided_ahead_by_kept_file(
    crowd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy()
    monkeypatch.setattr(finder_module, "run_parts", spy)
    with ghostmatch.open(crowd, create=False) as lib:
        one = lib.find_duplicates(similar=True, workers=1)
        two = lib.find_duplicates(similar=True, workers=2)
    # The crowd's kept files handed out in slices, besides the photo's part.
    assert len(spy.orders) == 1 and len(spy.orders[0]) > 2
    assert two == one
    copies = {(g.keep.path.name, m.path.name) for g in one for m in g.members}
    assert {("noise-00.jpg", "noise-00-q60.jpg"), ("chelsea.jpg", "chelsea_q40.jpg")} <= copies


def test_a_crowds_files_are_decoded_once_before_the_processes_start(
    crowd: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each process meets most of a crowd's files: their captures are made once, by the
    caller, and not again in any process (those of files in a pair that the thumbnails'
    gate lets through: the others are never decoded, see below)."""
    log = tmp_path / "decoded"
    real = PairJudge._made

    def made(self: PairJudge, i: int) -> Any:
        with log.open("a") as out:
            out.write(f"{os.getpid()} {self.records[i].path.name}\n")
        return real(self, i)

    monkeypatch.setattr(PairJudge, "_made", made)
    with ghostmatch.open(crowd, create=False) as lib:
        one = lib.find_duplicates(similar=True, workers=1)
        log.unlink()
        two = lib.find_duplicates(similar=True, workers=2)
    assert two == one
    rows = [line.split(" ", 1) for line in log.read_text().splitlines()]
    crowd_files = [(pid, name) for pid, name in rows if name.startswith("noise-")]
    assert len(crowd_files) >= 3  # the noise picture and its two copies at least
    assert {pid for pid, _ in crowd_files} == {str(os.getpid())}
    assert len({name for _, name in crowd_files}) == len(crowd_files)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crowd_gated_on_the_catalogs_thumbnails_decodes_fewer_files_and_decides_alike(
    crowd: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Crowded pairs whose thumbnails do not correlate are not compared; the catalog's
    thumbnails (the same pixels as the captures') tell so before any decode, and every
    group, tier and similar file stays what the captures' own thumbnails give."""
    decoded: list[str] = []
    real = PairJudge._made

    def made(self: PairJudge, i: int) -> Any:
        decoded.append(self.records[i].path.name)
        return real(self, i)

    monkeypatch.setattr(PairJudge, "_made", made)
    with ghostmatch.open(crowd, create=False) as lib:
        gated = lib.find_duplicates(similar=True, workers=workers)
        with_catalog = set(decoded)
        decoded.clear()
        monkeypatch.setattr(PairJudge, "use_thumbnails", lambda *_: None)
        plain = lib.find_duplicates(similar=True, workers=workers)
    assert gated == plain
    assert any(m.path.name == "noise-00-q60.jpg" for g in gated for m in g.members)
    # With two processes, the files decoded here: the crowd's, before the processes start.
    noise = {n for n in with_catalog if n.startswith("noise-")}
    assert noise < {n for n in decoded if n.startswith("noise-")}
    assert len(noise) < CROWD


def test_a_crowd_decided_ahead_is_not_decided_again(
    crowd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grouping of a crowd from the decisions made ahead asks for none anew, turned
    pairs that failed their check included (they are left out of a decision)."""
    from ghostmatch.dupes import turns

    parent, returned = os.getpid(), threading.Event()
    late: list[str] = []

    def parts(order: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        found = run_parts(order, *args, **kwargs)
        returned.set()
        return found

    def spied(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, leader: int, others: Any) -> Any:
            if os.getpid() == parent and returned.is_set():
                late.append(name)
            return method(self, leader, others)

        return call

    monkeypatch.setattr(finder_module, "run_parts", parts)
    monkeypatch.setattr(PairJudge, "__call__", spied("upright", PairJudge.__call__))
    monkeypatch.setattr(
        turns.TurnedCandidates, "decide", spied("turned", turns.TurnedCandidates.decide)
    )
    with ghostmatch.open(crowd, create=False) as lib:
        lib.find_duplicates(similar=True, workers=2)
    assert returned.is_set()
    assert late == []


def test_by_default_the_main_thread_alone_starts_processes(
    crowd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy()
    monkeypatch.setattr(finder_module, "run_parts", spy)
    found: list[Any] = []
    with ghostmatch.open(crowd, create=False) as lib:
        # As ``serve`` searches: on a thread of its own, beside others.
        thread = threading.Thread(target=lambda: found.append(lib.find_duplicates()))
        thread.start()
        thread.join()
        assert spy.orders == [] and found[0]
        if usable_cores() > 1:
            assert lib.find_duplicates() == found[0]
            assert len(spy.orders) == 1


def test_the_command_line_takes_the_number_of_processes(families: Path) -> None:
    def dupes(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ghostmatch.cli.app", "dupes", "--index", str(families)]
        return subprocess.run(
            [*command, *options], capture_output=True, text=True, timeout=600, check=False
        )

    two = dupes("--json", "--workers", "2")
    assert two.returncode == 0
    with ghostmatch.open(families, create=False) as lib:
        one = lib.find_duplicates(workers=1)
        with pytest.raises(GhostmatchError, match="workers must be at least 1"):
            lib.find_duplicates(workers=0)
    assert json.loads(two.stdout)["groups"] == [g.to_dict() for g in one] != []
    refused = dupes("--workers", "0")
    assert refused.returncode == 2 and "--workers" in refused.stderr


def test_a_failure_in_a_process_reaches_the_caller_and_no_process_stays(
    families: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    judge = PairJudge.__call__

    def failing(self: PairJudge, leader: int, others: Sequence[tuple[int, float]]) -> Any:
        if self.records[leader].path.name == "coffee.jpg":
            raise GhostmatchError("cannot judge coffee.jpg")
        return judge(self, leader, others)

    monkeypatch.setattr(PairJudge, "__call__", failing)
    with ghostmatch.open(families, create=False) as lib, pytest.raises(GhostmatchError) as raised:
        lib.find_duplicates(workers=2)
    # One line for the command line; where it failed, in a note beside it.
    assert str(raised.value) == "cannot judge coffee.jpg"
    assert multiprocessing.active_children() == []


def _work(fail: int | None = None) -> Callable[[int, Callable[[int], None]], int]:
    def work(part: int, step: Callable[[int], None]) -> int:
        if part == fail:
            raise _Unpicklable(part)
        for _ in range(part):
            step(1)
        return part * part

    return work


class _Unpicklable(Exception):
    def __init__(self, part: int) -> None:
        super().__init__(f"part {part} failed")
        self.lock = multiprocessing.Lock().__enter__  # a bound method of a lock: no pickle


def test_parts_come_back_by_part_with_their_steps() -> None:
    heard: list[int] = []
    found = run_parts([5, 3, 0, 4, 1, 2], _work(), 2, heard.append)
    assert found == {n: n * n for n in range(6)}
    assert sum(heard) == 15
    assert multiprocessing.active_children() == []


def test_an_exception_that_cannot_cross_is_named() -> None:
    with pytest.raises(RuntimeError) as raised:
        run_parts([1, 2, 3, 4], _work(fail=3), 2)
    assert str(raised.value) == "_Unpicklable: part 3 failed"
    assert multiprocessing.active_children() == []


def test_an_interruption_in_the_caller_stops_every_process() -> None:
    pids: list[int] = []

    def work(part: int, step: Callable[[int], None]) -> int:
        step(os.getpid())
        return part

    def interrupt(pid: int) -> None:
        pids.append(pid)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_parts(list(range(10)), work, 2, interrupt)
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no zombie, no orphan


def test_components_split_the_graph_and_keep_the_order() -> None:
    pairs = [(1, 2, 0.9), (5, 6, 0.8), (3, 4, 0.7), (2, 3, 0.6), (7, 8, 0.5), (6, 9, 0.4)]
    assert components(pairs) == [
        [(1, 2, 0.9), (3, 4, 0.7), (2, 3, 0.6)],
        [(5, 6, 0.8), (6, 9, 0.4)],
        [(7, 8, 0.5)],
    ]


def test_the_search_runs_the_model_on_the_cpu_and_leaves_the_device_asked_for(
    families: Path,
) -> None:
    # Worker processes cannot share a CUDA context, and a GPU does not speed up the
    # search's small model passes: it loads the model on the CPU, whatever the library's
    # device, unless the model is loaded already.
    with ghostmatch.open(families, create=False) as lib:
        binding = lib.finder.model
        # Asked for a GPU this machine may not have: loading there would fail.
        binding._device = "cuda"
        seen: list[str] = []
        with binding.on_cpu() as on_cpu:
            seen.append(binding.embedder.device)
        assert on_cpu and seen == ["cpu"] and binding._device == "cuda"
        # Loaded for another device than the one asked for: dropped after the search.
        assert binding._embedder is None
        binding._device = "auto"
        binding.embedder  # noqa: B018 - loaded before the search
        # Loaded already: it stays where it is.
        with binding.on_cpu() as again:
            assert again == (binding.embedder.device == "cpu") and binding._embedder is not None


def test_the_processes_never_collect_what_they_inherit() -> None:
    # ONNX Runtime's sessions wait in their destructors for thread pools that a fork does
    # not carry over: a process that collected one made before the fork hung. Everything
    # a process inherits is frozen out of its garbage collections, and the sessions of the
    # local maps made before the fork are kept, never destroyed, there.
    from ghostmatch.dupes import verify

    def frozen(part: int, step: Callable[[int], None]) -> tuple[int, int]:
        return gc.get_freeze_count(), len(verify._INHERITED)

    verify._SESSIONS[("inherited", 0)] = object()
    try:
        found = run_parts([0], frozen, 1)
    finally:
        verify._SESSIONS.pop(("inherited", 0))
    count, inherited = found[0]
    assert count > 0 and inherited >= 1
    assert gc.get_freeze_count() == 0  # here, the objects are collected as before


@pytest.mark.parametrize("cores,made_ahead", [(4, True), (1, False)])
def test_maps_are_made_ahead_only_where_a_core_is_left_idle(
    families: Path, monkeypatch: pytest.MonkeyPatch, cores: int, made_ahead: bool
) -> None:
    # One process on four cores leaves three idle, where the background thread makes maps
    # ahead; one on one core leaves none, and the thread would only contend with it.
    monkeypatch.setattr(finder_module, "usable_cores", lambda: cores)
    asked: list[int] = []
    prefetch = PairJudge.prefetch

    def counted(judge: PairJudge, leader: int, *args: Any, **kwargs: Any) -> None:
        asked.append(leader)
        prefetch(judge, leader, *args, **kwargs)

    monkeypatch.setattr(PairJudge, "prefetch", counted)
    with ghostmatch.open(families, create=False) as lib:
        groups = lib.find_duplicates(workers=1)
    assert bool(asked) == made_ahead
    assert len(groups) == 3


def test_the_catalogs_thumbnails_are_the_captures_own(crowd: Path) -> None:
    """The gate's thumbnails from the catalog are, to the bit, those of the captures that
    the comparison decodes; a JPEG whose decode for the capture takes another DCT scale
    than indexing did (a shorter side of 1,017 to 1,279 pixels) keeps none."""
    import numpy as np

    from ghostmatch.dupes.samecapture import DECODE_SIDE, prepare_capture
    from ghostmatch.ingest.images import decodes_alike, load_image

    with ghostmatch.open(crowd, create=False) as lib:
        catalog = lib.catalog
        screens = catalog.turn_screens()
        records = {r.id: r for r in catalog.get(sorted(screens))}
        card = lib.model.card
        assert card is not None
        judge = PairJudge(lib.model, records, 0.5, 8)
        judge.use_thumbnails(screens, card.input_size)
    # The photo (451 x 300) is decoded at half size for the capture and whole for indexing.
    left_out = {records[i].path.name for i in records.keys() - judge.thumbs.keys()}
    assert left_out == {"chelsea.jpg", "chelsea_q40.jpg"}
    assert not decodes_alike("JPEG", (451, 300), card.input_size, DECODE_SIDE)
    for i, thumb in judge.thumbs.items():
        image = load_image(records[i].path, DECODE_SIDE).image
        np.testing.assert_array_equal(thumb, prepare_capture(image).thumb)
    assert decodes_alike("PNG", (1600, 1100), 160, DECODE_SIDE)
    assert decodes_alike("JPEG", (1600, 960), 160, DECODE_SIDE)
    assert not decodes_alike("JPEG", (1600, 1100), 160, DECODE_SIDE)
