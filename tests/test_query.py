"""Queries: how many results can be asked for, a changed file as the query, and which
weights an existing index accepts."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ghostmatch
from ghostmatch.errors import GhostmatchError
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.weights import save_descriptor
from ghostmatch.retrieval.refine import PLAIN

pytestmark = pytest.mark.filterwarnings("ignore:using RANDOM weights")

NAMES = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")


@pytest.fixture
def gallery(photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(folder, index) of four photos, indexed with random weights."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(photos / name, folder / name)
    index = tmp_path / "index"
    with ghostmatch.open(index, weights="random", runtime="torch") as lib:
        lib.index([folder])
    return folder, index


def _query(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ghostmatch.cli.app", "query", *map(os.fspath, args)],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        check=False,
        timeout=300,
    )


def test_k_is_capped_at_the_index_size(gallery: tuple[Path, Path]) -> None:
    folder, index = gallery
    # FAISS would allocate room for k results up front: 10**9 of them take tens of GB, and
    # 10**20 does not fit its integers.
    for k in ("1000000000", "99999999999999999999"):
        done = _query(folder / "chelsea.jpg", "--index", index, "-k", k, "--json")
        assert done.returncode == 0, done.stderr
        [result] = json.loads(done.stdout)
        assert len(result["matches"]) == len(NAMES) - 1  # every other photo, once
    for k in ("0", "-5"):
        bad = _query(folder / "chelsea.jpg", "--index", index, "-k", k)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_library_refuses_a_meaningless_k(gallery: tuple[Path, Path]) -> None:
    folder, index = gallery
    with ghostmatch.open(index, create=False) as lib:
        assert len(lib.query(folder / "coffee.jpg", k=10**20)) == len(NAMES) - 1
        for k in (0, -1, 2.5, True):
            with pytest.raises(GhostmatchError, match="number of matches") as raised:
                lib.query(folder / "coffee.jpg", k=k)  # type: ignore[arg-type]
            assert "-k" not in str(raised.value)  # the library names no command-line flag
            with pytest.raises(GhostmatchError, match="number of matches"):
                lib.duplicates_of(folder / "coffee.jpg", k=k)  # type: ignore[arg-type]


def test_a_changed_file_is_embedded_afresh_and_never_matches_itself(
    gallery: tuple[Path, Path],
) -> None:
    folder, index = gallery
    changed = folder / "chelsea.jpg"
    changed.write_bytes((folder / "coffee.jpg").read_bytes())  # now another photo
    with ghostmatch.open(index, create=False) as lib:
        matches = lib.query(changed, k=10, refine=PLAIN)  # scores are the plain cosines
        copies = lib.duplicates_of(changed, threshold=0.999)
    # Its catalog entry still describes chelsea: the query is the coffee it now holds ...
    assert matches[0].path.name == "coffee.jpg" and matches[0].score > 0.999
    # ... and that entry, the same file as it was, is not a match of it.
    assert changed not in {m.path for m in matches}
    assert len(matches) == len(NAMES) - 1
    assert [(m.path.name, m.tier) for m in copies] == [("coffee.jpg", "exact")]


def _weights_file(model: Descriptor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_descriptor(model, path)
    return path


def test_a_weights_file_is_the_index_s_own_by_content_not_by_name(
    random_model: Descriptor, photos: Path, tmp_path: Path
) -> None:
    own = _weights_file(random_model, tmp_path / "a" / "model.safetensors")
    other_model = copy.deepcopy(random_model)
    with torch.no_grad():
        next(other_model.parameters()).add_(0.1)
    other = _weights_file(other_model, tmp_path / "b" / "model.safetensors")
    renamed = tmp_path / "c" / "renamed.safetensors"
    renamed.parent.mkdir()
    shutil.copy(own, renamed)
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder)
    index = tmp_path / "index"
    with ghostmatch.open(index, weights=own, runtime="torch") as lib:
        lib.index([folder])
    # Same file name, other weights: refused, not silently swapped for the index's file.
    for wrong in (other, "bundled", tmp_path / "missing" / "model.safetensors"):
        with pytest.raises(GhostmatchError, match=r"built with weights 'model\.safetensors'"):
            ghostmatch.open(index, weights=wrong, create=False)
    # The index's own file, by its path or as a copy under another name: accepted.
    for same in (own, renamed):
        with ghostmatch.open(index, weights=same, create=False, runtime="torch") as lib:
            assert [m.path.name for m in lib.query(folder / "coffee.jpg")] == []
