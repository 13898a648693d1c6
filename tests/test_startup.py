"""Commands that need no model load no torch or ONNX Runtime, and ``--help`` no faiss
either: each of those imports takes seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ghostmatch
from ghostmatch.model.exports import no_cuda_here

HEAVY = {"torch", "onnxruntime"}


def imported(args: list[object], model_cache: Path) -> set[str]:
    """The modules a ``ghostmatch`` command imports (``python -X importtime``): each one's
    full name and its top-level package's."""
    return imported_and_output(args, model_cache)[0]


def imported_and_output(args: list[object], model_cache: Path) -> tuple[set[str], str]:
    """:func:`imported`, and what the command wrote on its standard output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(GHOSTMATCH_OFFLINE="1", GHOSTMATCH_CACHE=str(model_cache))
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ghostmatch.cli.app", *map(os.fspath, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            names |= {name, name.split(".")[0]}
    assert "ghostmatch" in names  # the output is what it is taken for
    return names, result.stdout


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.jpg")
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="random") as lib:
        assert lib.index([photos]).added == 3
    return photos, index


def test_help_imports_no_model_and_no_faiss(model_cache: Path) -> None:
    assert not imported(["--help"], model_cache) & (HEAVY | {"faiss"})


def test_info_an_unchanged_rerun_and_remove_load_no_model(
    indexed: tuple[Path, Path], model_cache: Path
) -> None:
    photos, index = indexed
    # info reads the index type from the index file's stamp: no faiss either. The catalog
    # is SQLAlchemy Core: its ORM would add a tenth of a second to every command.
    assert not imported(["info", "--index", index], model_cache) & (
        HEAVY | {"faiss", "sqlalchemy.orm"}
    )
    assert not imported(["index", photos, "--index", index, "--quiet"], model_cache) & HEAVY
    assert not imported(["remove", photos / "0.jpg", "--index", index], model_cache) & HEAVY
    with ghostmatch.open(index, create=False) as lib:
        assert lib.catalog.count() == 2  # the remove did happen


def test_a_duplicate_search_runs_from_the_models_exports_without_torch(
    tmp_path: Path, model_cache: Path, random_model: object
) -> None:
    from ghostmatch.model.weights import save_descriptor

    weights = tmp_path / "model.safetensors"
    save_descriptor(random_model, weights)  # type: ignore[arg-type]
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    picture.save(photos / "a.png")
    picture.resize((112, 84)).save(photos / "a small.png")
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(photos / "b.png")
    index = tmp_path / "index"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    env.update(GHOSTMATCH_OFFLINE="1", GHOSTMATCH_CACHE=str(model_cache))
    command = [sys.executable, "-m", "ghostmatch.cli.app"]
    subprocess.run(
        [*command, "index", photos, "--index", index, "--weights", weights, "--quiet"],
        env=env,
        check=True,
        timeout=300,
    )

    search: list[object] = ["dupes", "--index", index, "--json", "--similar"]
    # The first search exports the local maps (torch loads for that, once); from then on
    # the model runs from its exports, and finds the same.
    _, first = imported_and_output(search, model_cache)
    exports = (model_cache / "onnx").glob("*-local*.onnx")
    assert [path for path in exports if "-regions" not in path.name]
    modules, again = imported_and_output(search, model_cache)
    assert "torch" not in modules and "onnxruntime" in modules
    assert again == first
    assert "a small.png" in first
    # So does a query, on the device a machine without CUDA gets by default.
    if no_cuda_here():
        query = ["query", photos / "a.png", "--index", index, "-k", "2", "--json"]
        modules, found = imported_and_output(query, model_cache)
        assert "torch" not in modules
        assert "a small.png" in found
