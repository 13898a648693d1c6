"""The near-duplicate test-set maker: deterministic under a seed, truth lists every file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from ghostmatch.copies import (
    TIER_OF_TRANSFORM,
    TRANSFORMS,
    make_copies,
    read_truth,
    transform_of,
)
from ghostmatch.errors import GhostmatchError


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


def test_transform_families_and_tiers() -> None:
    assert list(TRANSFORMS) == [
        "reencode-q20",
        "resize-40",
        "crop-80",
        "crop-60",
        "flip",
        "rotate-8",
        "color",
        "gray",
        "blur",
        "text",
        "border",
        "aspect",
        "combo",
    ]
    assert set(TIER_OF_TRANSFORM) == set(TRANSFORMS)
    assert set(TIER_OF_TRANSFORM.values()) == {"near", "edited"}


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
    with pytest.raises(GhostmatchError, match="per-image"):
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
