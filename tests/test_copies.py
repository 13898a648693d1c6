"""The near-duplicate test-set maker: deterministic under a seed, truth lists every file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ghostmatch.errors import GhostmatchError
from ghostmatch.eval.copies import (
    TIER_OF_TRANSFORM,
    TRANSFORMS,
    make_copies,
    read_truth,
    transform_of,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small photos (two JPEG, one PNG) and a file that is not an image."""
    folder = tmp_path_factory.mktemp("sources")
    paths = []
    for name, ext in (("astronaut", "jpg"), ("coffee", "jpg"), ("chelsea", "png")):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image.thumbnail((160, 160))
        image.save(folder / f"{name}.{ext}")
        paths.append(folder / f"{name}.{ext}")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return [*paths, folder / "broken.jpg"]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _structure(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Grey levels at ``size``, standardised so that a change of tone alone does not count."""
    grey = np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=float)
    return (grey - grey.mean()) / grey.std()


def test_each_copy_is_what_its_tier_says(sources: list[Path], tmp_path: Path) -> None:
    # "near": the copy maps onto the whole original (re-encoded, resized, re-toned);
    # "edited": content was cut, moved or added, or the shape changed.
    assert set(TIER_OF_TRANSFORM) == set(TRANSFORMS)
    groups = read_truth(make_copies(sources, tmp_path / "out", seed=7))
    assert len(groups) == 3
    for group in groups:
        with Image.open(group[0]) as opened:
            original = opened.convert("RGB")
        base = _structure(original, original.size)
        shape = original.size[0] / original.size[1]
        alike: dict[str, float] = {}
        worst_block: dict[str, float] = {}
        reshaped: dict[str, float] = {}
        for path in group[1:]:
            name = transform_of(path)
            assert name is not None
            with Image.open(path) as copy:
                structure = _structure(copy, original.size)
                reshaped[name] = abs(math.log(copy.size[0] / copy.size[1] / shape))
            alike[name] = float(np.corrcoef(base.ravel(), structure.ravel())[0, 1])
            diff = np.abs(base - structure)
            h, w = (d // 8 * 8 for d in diff.shape)
            worst_block[name] = float(diff[:h, :w].reshape(h // 8, 8, w // 8, 8).mean((1, 3)).max())
        near = [n for n in alike if TIER_OF_TRANSFORM[n] == "near"]
        edited = [n for n in alike if TIER_OF_TRANSFORM[n] == "edited"]
        assert near and edited
        for name in near:
            assert alike[name] > 0.9 and reshaped[name] < 0.03, (group[0], name)
        for name in edited:
            cut_or_moved = alike[name] < 0.9
            added = worst_block[name] > max(worst_block[n] for n in near)
            assert cut_or_moved or added or reshaped[name] > 0.1, (group[0], name)


def test_make_copies_is_deterministic_and_complete(sources: list[Path], tmp_path: Path) -> None:
    first = make_copies(sources, tmp_path / "one", seed=7)
    second = make_copies(list(reversed(sources)), tmp_path / "two", seed=7)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")

    truth = json.loads(first.read_text())
    assert truth["seed"] == 7
    assert [s["path"] for s in truth["skipped"]] == [str(sources[-1])]
    expected_groups = [
        ["originals/astronaut.jpg"] + [f"copies/astronaut__{t}.jpg" for t in TRANSFORMS],
        ["originals/chelsea.png"] + [f"copies/chelsea__{t}.jpg" for t in TRANSFORMS],
        ["originals/coffee.jpg"] + [f"copies/coffee__{t}.jpg" for t in TRANSFORMS],
    ]
    assert truth["groups"] == expected_groups
    assert (tmp_path / "one/originals/chelsea.png").read_bytes() == sources[2].read_bytes()

    groups = read_truth(second)
    assert all(p.is_absolute() and p.is_file() for group in groups for p in group)
    assert [transform_of(p) for p in groups[0]] == [None, *TRANSFORMS]
    for group in groups:
        for path in group[1:]:
            with Image.open(path) as copy:
                assert copy.mode == "RGB" and min(copy.size) > 16

    other = make_copies(sources, tmp_path / "three", seed=8)
    assert _files(tmp_path / "three") != _files(tmp_path / "one")
    assert other.name == "truth.json"


def test_per_image_subset_is_seeded(sources: list[Path], tmp_path: Path) -> None:
    chosen = ["flip", "gray", "crop-80", "blur"]
    truth = make_copies(sources[:2], tmp_path / "a", seed=3, transforms=chosen, per_image=2)
    again = make_copies(sources[:2], tmp_path / "b", seed=3, transforms=chosen, per_image=2)
    assert truth.read_text() == again.read_text()
    for group in read_truth(truth):
        names = [transform_of(p) for p in group[1:]]
        assert len(names) == 2 and set(names) <= set(chosen)
        assert names == [t for t in TRANSFORMS if t in names]


def test_make_copies_rejects_bad_requests(sources: list[Path], tmp_path: Path) -> None:
    with pytest.raises(GhostmatchError, match="unknown transform"):
        make_copies(sources, tmp_path / "x", seed=1, transforms=["flip", "sepia"])
    with pytest.raises(GhostmatchError, match="per_image must be between"):
        make_copies(sources, tmp_path / "x", seed=1, per_image=99)
    with pytest.raises(GhostmatchError, match="could be read"):
        make_copies(sources[-1:], tmp_path / "x", seed=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(GhostmatchError, match="not an empty folder"):
        make_copies(sources, tmp_path / "full", seed=1)
    with pytest.raises(GhostmatchError, match="make-copies"):
        read_truth(tmp_path / "missing.json")


def test_transform_of_parses_copy_names() -> None:
    assert transform_of("copies/a__flip.jpg") == "flip"
    assert transform_of(Path("/x/my__photo__crop-80.jpg")) == "crop-80"
    assert transform_of("copies/a__reencode-q20.jpeg") == "reencode-q20"
    assert transform_of("originals/a.jpg") is None
    assert transform_of("a__sepia.jpg") is None
    assert transform_of("__flip.jpg") is None


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTMATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "ghostmatch.cli.app", "make-copies", *map(str, args)],
        env={**env, "GHOSTMATCH_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_copies_command_writes_the_same_set(sources: list[Path], tmp_path: Path) -> None:
    folder = sources[0].parent
    result = _cli(folder, tmp_path / "cli", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "cli" / "truth.json") in result.stdout
    make_copies(sources, tmp_path / "api", seed=7)
    cli_files, api_files = _files(tmp_path / "cli"), _files(tmp_path / "api")
    assert cli_files.keys() == api_files.keys()
    # The truth file names its sources; every image is the same byte for byte.
    assert {k: v for k, v in cli_files.items() if k != "truth.json"} == {
        k: v for k, v in api_files.items() if k != "truth.json"
    }
    assert read_truth(tmp_path / "cli" / "truth.json")[0][0].name == "astronaut.jpg"

    limited = _cli(folder, tmp_path / "one", "--seed", "7", "--limit", "1")
    assert limited.returncode == 0, limited.stderr
    assert [len(g) for g in read_truth(tmp_path / "one" / "truth.json")] == [1 + len(TRANSFORMS)]

    again = _cli(folder, tmp_path / "cli", "--seed", "7")
    assert again.returncode == 2
    assert "not an empty folder" in again.stderr and "Traceback" not in again.stderr
