"""The ``ghostmatch`` command run as a subprocess on real photos: its output formats, its
exit codes and one-line errors, and indexing that survives Ctrl-C and kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_support import (
    CLI,
    assert_resumes,
    catalog_count,
    cli_env,
    consistent_count,
    ok,
    paused_env,
    run_cli,
    small_jpegs,
    stop_paused_run,
)
from corpus import NON_UTF8_NAME, UNREADABLE_NAME, make_bad_files
from PIL import Image, ImageOps
from sqlalchemy import URL

import ghostmatch
from ghostmatch.retrieval.refine import DEFAULT

pytestmark = [
    pytest.mark.filterwarnings("ignore:using RANDOM weights"),
    pytest.mark.usefixtures("shared_model_cache"),
]

MATCH_KEYS = {"rank", "path", "score", "width", "height", "bytes"}


@dataclass(frozen=True)
class Indexed:
    """The test run's gallery, indexed once by ``ghostmatch index --json``."""

    gallery: Path
    index: Path
    report: dict[str, Any]
    good: frozenset[Path]
    bad: dict[str, str]  # file name -> reason


@pytest.fixture(scope="session")
def indexed(photos: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Indexed:
    gallery = tmp_path_factory.mktemp("cli-gallery")
    for file in sorted(photos.iterdir()):
        shutil.copy2(file, gallery / file.name)
    (gallery / "copies").mkdir()
    shutil.copy2(photos / "astronaut.jpg", gallery / "copies" / "astronaut-copy.jpg")
    (gallery / "variants").mkdir()
    with Image.open(photos / "coffee.jpg") as coffee:
        coffee.resize((300, 200)).save(gallery / "variants" / "coffee-small.jpg", quality=85)
    with Image.open(photos / "rocket.jpg") as rocket:
        ImageOps.mirror(rocket).save(gallery / "variants" / "rocket-mirrored.jpg", quality=90)
    (gallery / "bad").mkdir()
    expected = make_bad_files(gallery / "bad")
    if os.access(gallery / "bad" / UNREADABLE_NAME, os.R_OK):
        expected[UNREADABLE_NAME] = "ok"  # running as root: chmod 000 does not stop reads
    bad = {name: reason for name, reason in expected.items() if reason != "ok"}
    good = {gallery / "bad" / name for name, reason in expected.items() if reason == "ok"}
    good |= {p for p in gallery.rglob("*") if p.parent.name != "bad" and p.is_file()}

    index = tmp_path_factory.getbasetemp() / "cli-index"
    args = ["index", gallery, "--index", index, "--weights", "random", "--batch-size", "4"]
    result = run_cli([*args, "--json"], model_cache)
    # Bad files are reported, not fatal: exit code 0.
    assert result.returncode == 0, result.stderr
    return Indexed(gallery, index, json.loads(result.stdout), frozenset(good), bad)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error of a user mistake: exit code 2, one line on stderr, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# ---------------------------------------------------------------------------- index, info


def test_index_json_reports_what_it_did(indexed: Indexed) -> None:
    report = indexed.report
    assert report["added"] == len(indexed.good)
    assert (report["updated"], report["moved"], report["removed"]) == (0, 0, 0)
    assert report["interrupted"] is False
    assert report["failed"] == dict(Counter(indexed.bad.values()))
    assert {Path(f["path"]).name: f["reason"] for f in report["failures"]} == indexed.bad
    assert report["index"] == str(indexed.index)
    assert "weights random" in report["model"]


def test_info_json(indexed: Indexed, model_cache: Path) -> None:
    info = json.loads(ok(run_cli(["info", "--index", indexed.index, "--json"], model_cache)).stdout)
    assert info["index"] == str(indexed.index)
    assert info["images"] == len(indexed.good)
    assert info["folders"] == [str(indexed.gallery)]
    assert info["model"]["weights"] == "random" and info["model"]["dim"] == 960
    assert info["index_type"] == "Flat"
    assert info["failures"] == dict(Counter(indexed.bad.values()))
    assert info["catalog_bytes"] > 0 and info["index_bytes"] > 0


# ---------------------------------------------------------------------------- query


def library_answer(indexed: Indexed, query: Path, k: int, **options: Any) -> list[dict[str, Any]]:
    """What the engine itself answers, refined as ``ghostmatch query`` refines by default."""
    with ghostmatch.open(indexed.index, create=False) as lib:
        return [m.to_dict() for m in lib.query(query, k, **{"refine": DEFAULT, **options})]


def test_query_json(indexed: Indexed, tmp_path: Path, model_cache: Path) -> None:
    known = indexed.gallery / "astronaut.jpg"
    new = tmp_path / "new.jpg"  # not indexed: embedded on the fly
    with Image.open(indexed.gallery / "coffee.jpg") as coffee:
        ImageOps.mirror(coffee).save(new, quality=90)
    result = ok(
        run_cli(["query", known, new, "-k", "50", "--index", indexed.index, "--json"], model_cache)
    )
    answer = json.loads(result.stdout)

    assert isinstance(answer, list) and len(answer) == 2
    assert [set(entry) for entry in answer] == [{"query", "matches"}] * 2
    assert [entry["query"] for entry in answer] == [str(known), str(new)]
    for entry in answer:
        matches = entry["matches"]
        # Re-ranked results also say how many local matches confirmed them.
        assert all(set(m) - {"inliers"} == MATCH_KEYS for m in matches)
        assert [m["rank"] for m in matches] == list(range(1, len(matches) + 1))
        assert all(isinstance(m["score"], float) and -1.0 <= m["score"] <= 1.0001 for m in matches)
        scores = [m["score"] for m in matches]
        assert scores == sorted(scores, reverse=True)
        for m in matches:
            path = Path(m["path"])  # non-UTF-8 names come back as the same bytes
            assert path.is_absolute() and Path(m["path"]).stat().st_size == m["bytes"]
            assert all(isinstance(m[key], int) and m[key] > 0 for key in ("width", "height"))
        assert {Path(m["path"]) for m in matches} <= indexed.good

    known_matches, new_matches = answer[0]["matches"], answer[1]["matches"]
    assert len(known_matches) == len(indexed.good) - 1  # everything but itself
    assert str(known) not in {m["path"] for m in known_matches}
    copy = str(indexed.gallery / "copies" / "astronaut-copy.jpg")
    assert copy in {m["path"] for m in known_matches}
    # By the plain cosine the exact copy comes first, at 1 within rounding.
    plain = ["query", known, "-k", "1", "--plain", "--index", indexed.index, "--json"]
    [first] = json.loads(ok(run_cli(plain, model_cache)).stdout)[0]["matches"]
    assert first["path"] == copy and first["score"] >= 0.999
    assert len(new_matches) == len(indexed.good)
    if (indexed.gallery / "bad" / NON_UTF8_NAME).exists():
        assert str(indexed.gallery / "bad" / NON_UTF8_NAME) in {m["path"] for m in new_matches}
    expected = library_answer(indexed, known, 50)
    assert [m["path"] for m in known_matches] == [m["path"] for m in expected]
    np.testing.assert_allclose(
        [m["score"] for m in known_matches], [m["score"] for m in expected], atol=2e-6
    )


def test_query_table(indexed: Indexed, model_cache: Path) -> None:
    known = indexed.gallery / "astronaut.jpg"
    # A plain search, where an identical copy scores exactly 1.
    result = ok(
        run_cli(["query", known, "-k", "3", "--plain", "--index", indexed.index], model_cache)
    )
    lines = result.stdout.splitlines()
    assert lines[0] == str(known)
    header = next(line for line in lines if "rank" in line)
    assert [word for word in header.split() if word.isalpha()] == [
        "rank",
        "score",
        "path",
        "width",
        "height",
        "bytes",
    ]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]
    expected = library_answer(indexed, known, 3, refine=None)
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert [row[2] for row in rows] == [m["path"] for m in expected]
    assert [row[1] for row in rows] == [f"{m['score']:.4f}" for m in expected]
    assert rows[0][1] == "1.0000"
    assert [row[3:] for row in rows] == [
        [str(m["width"]), str(m["height"]), str(m["bytes"])] for m in expected
    ]


def test_query_under_a_folder_with_a_min_score(indexed: Indexed, model_cache: Path) -> None:
    known = indexed.gallery / "rocket.jpg"
    folder = indexed.gallery / "bad"
    inside = library_answer(indexed, known, 100, under=folder)
    assert all(Path(m["path"]).parent == folder for m in inside)
    assert len(inside) >= 4
    cut = (inside[1]["score"] + inside[2]["score"]) / 2  # keeps exactly two
    args = ["query", known, "--under", folder, "--min-score", str(cut), "-k", "5"]
    result = ok(run_cli([*args, "--index", indexed.index, "--json"], model_cache))
    matches = json.loads(result.stdout)[0]["matches"]
    assert [m["path"] for m in matches] == [m["path"] for m in inside[:2]]
    assert all(m["score"] >= cut for m in matches)


# ---------------------------------------------------------------------------- remove


def test_remove_forgets_files_and_folders(
    indexed: Indexed, tmp_path: Path, model_cache: Path
) -> None:
    index = tmp_path / "index"
    shutil.copytree(indexed.index, index)
    variants = indexed.gallery / "variants"
    single = indexed.gallery / "coffee.jpg"
    result = ok(run_cli(["remove", variants, single, "--index", index, "--json"], model_cache))
    assert json.loads(result.stdout) == {"removed": 3}
    assert single.exists() and len(list(variants.iterdir())) == 2  # files stay on disk
    with ghostmatch.open(index, create=False) as lib:
        remaining = set(lib.catalog.all_stat())
        assert remaining == indexed.good - {single, *variants.iterdir()}
        assert lib.vector_index is not None
        np.testing.assert_array_equal(lib.vector_index.ids(), lib.catalog.ids())


# ---------------------------------------------------------------------------- mistakes


def test_user_mistakes_print_one_line_and_exit_2(
    indexed: Indexed, tmp_path: Path, model_cache: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(indexed.index, copy)
    not_an_index = tmp_path / "photos"
    not_an_index.mkdir()
    photo = indexed.gallery / "rocket.jpg"
    cases: dict[str, tuple[list[object], str]] = {
        "missing folder": (["index", tmp_path / "nowhere", "--index", copy], "does not exist"),
        "folder that is no index": (
            ["info", "--index", not_an_index],
            f"no index at {not_an_index}; create one with: ghostmatch index DIR --index",
        ),
        "other weights": (
            ["index", indexed.gallery, "--index", copy, "--weights", "imagenet"],
            "built with weights 'random'",
        ),
        "bad option": (["query", photo, "--index", copy, "--bogus"], "--bogus"),
    }
    # Two at a time: each one pays for starting Python and importing torch.
    names = list(cases)
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    for start in range(0, len(names), 2):
        running = {
            name: subprocess.Popen(
                [*CLI, *map(os.fspath, cases[name][0])],  # type: ignore[arg-type]
                env=cli_env(model_cache),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in names[start : start + 2]
        }
        for name, proc in running.items():
            out, err = proc.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name, (_, needle) in cases.items():
        line = one_line_error(results[name])
        assert needle in line, (name, line)
    assert list(not_an_index.iterdir()) == []  # no catalog.db left behind
    with ghostmatch.open(copy, create=False) as lib:  # the refused run changed nothing
        assert lib.catalog.count() == len(indexed.good)
        assert lib.card is not None and lib.card.weights == "random"


# ---------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_interrupted_and_killed_indexing_resumes(
    tmp_path: Path, model_cache: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Ctrl-C, then kill -9 twice, each while the run is held mid-way (past two checkpoints,
    between the next two) by the indexer's pause hook, so the signal always lands mid-run
    however loaded the machine is; every time the index opens consistent, and the last
    run does only what is left. With the catalog in the folder, and on a PostgreSQL
    server (whose transaction of a killed client is rolled back)."""
    url: URL | None = None
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
    files = small_jpegs(tmp_path / "many", 160)
    index = tmp_path / "index"
    marker = tmp_path / "paused"
    args = ["index", tmp_path / "many", "--index", index, "--weights", "random"]
    args += ["--batch-size", "8", "--json"]
    if url is not None:
        args += ["--catalog", url.render_as_string(hide_password=False)]
    committed = 0
    for stop in (signal.SIGINT, signal.SIGKILL, signal.SIGKILL):
        before = committed

        def paused(before: int = before) -> None:
            # Two checkpoints of 20 are in; the next 10 images are not yet.
            assert catalog_count(index, url) == before + 40

        returncode, out, err = stop_paused_run(
            [*CLI, *args], paused_env(model_cache, marker), marker, stop, paused
        )
        if stop == signal.SIGINT:
            assert returncode == 130, err
            report = json.loads(out)
            assert report["interrupted"] is True
            # Whatever went through the model is kept: 48 of the 50 (batches of 8).
            assert catalog_count(index, url) == report["added"] == before + 48
        else:
            assert returncode == -signal.SIGKILL
            assert catalog_count(index, url) == before + 40
        committed = consistent_count(index, files, before)
    assert_resumes(index, tmp_path / "many", files, committed)
