"""Indexing on Ray actors (``index --ray``), on a local Ray cluster of two worker CPUs that
the module starts once: the same vectors and failures as a local run, moves recognised on
the workers, and a killed or interrupted run that resumes like a local one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_support import (
    CLI,
    assert_resumes,
    catalog_count,
    consistent_count,
    paused_env,
    small_jpegs,
    stop_paused_run,
)
from test_startup import imported

import ghostmatch
from ghostmatch.cli.app import _with_option_values
from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.ray_embed import RayEmbedding
from ghostmatch.model.regions import REGIONS
from ghostmatch.store.catalog import TurnScreen

ray = pytest.importorskip("ray")

NO_WORK = {"batch_size": 1, "max_megapixels": 1.0, "movable": (), "changed": ()}

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]


@pytest.fixture(scope="module")
def cluster(model_cache: Path) -> Iterator[str]:
    """The address of a local Ray cluster with two worker CPUs (two actors). Its workers
    run offline with the session's model cache, so the model is exported to ONNX once."""
    saved = {k: os.environ.get(k) for k in ("GHOSTMATCH_CACHE", "GHOSTMATCH_OFFLINE")}
    # Worker processes inherit the environment the cluster starts with.
    os.environ.update(GHOSTMATCH_CACHE=str(model_cache), GHOSTMATCH_OFFLINE="1")
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            log_to_driver=False,
        )
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_an_address_where_no_cluster_answers_is_one_clear_error(
    photos: Path, tmp_path: Path
) -> None:
    # First in the module: this process is not connected to a cluster yet.
    assert not ray.is_initialized()
    with (
        ghostmatch.open(tmp_path / "index", weights="random") as lib,
        pytest.raises(GhostmatchError, match=r"cannot reach a Ray cluster at '127\.0\.0\.1:1'"),
    ):
        lib.index([photos / "cat.jpg"], ray="127.0.0.1:1")
    assert not ray.is_initialized()


def test_without_ray_installed_the_error_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what ``import ray`` meets without Ray
    with pytest.raises(GhostmatchError, match=r"pip install 'ghostmatch\[ray\]'"):
        next(RayEmbedding("local").results([], None, **NO_WORK))  # type: ignore[arg-type]


def vectors_by_path(index: Path) -> dict[Path, np.ndarray]:
    with ghostmatch.open(index, create=False) as lib:
        ids, vectors = lib.catalog.vectors()
        paths = {stat[0]: path for path, stat in lib.catalog.all_stat().items()}
    return {paths[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def regions_by_path(index: Path) -> dict[Path, np.ndarray]:
    with ghostmatch.open(index, create=False) as lib:
        ids, parts = lib.catalog.regions()
        paths = {stat[0]: path for path, stat in lib.catalog.all_stat().items()}
    return {paths[int(i)]: p for i, p in zip(ids, parts, strict=True)}


def screens_by_path(index: Path) -> dict[Path, TurnScreen]:
    with ghostmatch.open(index, create=False) as lib:
        paths = {stat[0]: path for path, stat in lib.catalog.all_stat().items()}
        return {paths[i]: s for i, s in lib.catalog.turn_screens().items()}


def test_ray_run_equals_the_local_one_and_recognises_a_move(
    cluster: str, photos: Path, tmp_path: Path
) -> None:
    """The same vectors and the same recorded failures as a local run; a file renamed since
    the last run is matched by content hash on a worker and keeps its vector."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "truncated.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    local, remote = tmp_path / "local", tmp_path / "ray"
    with ghostmatch.open(remote, weights="random") as lib:
        assert lib.index([folder / "cat.jpg"]).added == 1
    (folder / "cat.jpg").rename(folder / "kitten.jpg")
    with ghostmatch.open(local, weights="random") as lib:
        expected = lib.index([folder], batch_size=3)
    # "auto": this process is connected to the module's cluster already, and stays so.
    # Three actors on two CPUs share them, rather than one waiting for a CPU for ever.
    with ghostmatch.open(remote) as lib:
        report = lib.index([folder], batch_size=2, workers=3, ray="auto")
    assert ray.is_initialized()
    assert expected.added == 7
    assert (report.moved, report.added, report.embedded, report.removed) == (1, 6, 6, 0)
    assert report.failed == expected.failed
    assert sorted(report.failures) == sorted(expected.failures)
    assert len(report.failed) == 3  # three kinds of bad file, each recorded like a local run's
    want, got = vectors_by_path(local), vectors_by_path(remote)
    assert want.keys() == got.keys()
    cosines = [float(want[p] @ got[p]) for p in want]
    assert min(cosines) >= 0.9999
    # The regional descriptors too, as a local run makes them (the moved file keeps those
    # of its first run), so that a local run afterwards reads nothing again.
    want_parts, got_parts = regions_by_path(local), regions_by_path(remote)
    assert want_parts.keys() == got_parts.keys() == want.keys()
    for path in want:
        assert got_parts[path].shape == (REGIONS, want[path].shape[0])
        np.testing.assert_allclose(got_parts[path], want_parts[path], atol=2e-3)
    # And what the turned-copy screen needs, made on the workers from the same decode.
    assert screens_by_path(remote) == screens_by_path(local)
    with ghostmatch.open(remote) as lib:
        again = lib.index([folder])
    assert (again.unchanged, again.embedded, again.updated) == (7, 0, 0)


def test_interrupted_and_killed_ray_indexing_resumes(
    cluster: str, tmp_path: Path, model_cache: Path
) -> None:
    """Ctrl-C (the run on a cluster of its own, from a bare --ray), then kill -9 (on the
    module's cluster), each while the driver is held mid-way by the indexer's pause hook,
    past two checkpoints; every time the index opens consistent, and the last run does
    only what is left."""
    files = small_jpegs(tmp_path / "many", 120)
    index = tmp_path / "index"
    marker = tmp_path / "paused"
    args = [*CLI, "index", tmp_path / "many", "--index", index, "--weights", "random"]
    args += ["--batch-size", "8", "--json"]
    committed = 0
    # kill -9 only on the module's cluster: a killed driver cannot stop a cluster it started.
    for stop, ray_option in ((signal.SIGINT, ["--ray"]), (signal.SIGKILL, ["--ray", cluster])):
        before = committed

        def paused(before: int = before) -> None:
            assert catalog_count(index) == before + 40  # two checkpoints of 20

        returncode, out, err = stop_paused_run(
            [*args, *ray_option], paused_env(model_cache, marker), marker, stop, paused
        )
        if stop == signal.SIGINT:
            assert returncode == 130, err
            report = json.loads(out)
            assert report["interrupted"] is True
            # Every result the driver holds came back with its vector: all 50 are kept.
            assert catalog_count(index) == report["added"] == before + 50
        else:
            assert returncode == -signal.SIGKILL
            assert catalog_count(index) == before + 40
        committed = consistent_count(index, files, before)
    assert_resumes(index, tmp_path / "many", files, committed)


def test_a_bare_ray_option_means_a_local_cluster() -> None:
    assert _with_option_values(["index", "d", "--ray"]) == ["index", "d", "--ray", "local"]
    assert _with_option_values(["index", "--ray", "d"]) == ["index", "--ray", "local", "d"]
    assert _with_option_values(["index", "--ray", "-q", "d"])[:3] == ["index", "--ray", "local"]
    for address in ("auto", "local", "10.0.0.5:6379", "ray://head:10001"):
        assert _with_option_values(["index", "d", "--ray", address])[-1] == address
    assert _with_option_values(["index", "--", "--ray"]) == ["index", "--", "--ray"]


def test_indexing_without_ray_never_imports_it(tmp_path: Path, model_cache: Path) -> None:
    small_jpegs(tmp_path / "few", 3)
    args = ["index", tmp_path / "few", "--index", tmp_path / "index", "--weights", "random"]
    assert "ray" not in imported([*args, "--quiet"], model_cache)
