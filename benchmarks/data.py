"""What the benchmarks measure on: caltech101 test photos beside the checkout, synthetic
12-megapixel JPEGs, new photos to query with and clustered unit vectors, all seeded."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "data" / "caltech101"
DUPLICATES_FILE = Path(__file__).with_name("caltech_test_duplicates.txt")
LARGE_SIZE = (4000, 3000)
# Colour photos from scikit-image (bundled with it, no download).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


@dataclass(frozen=True)
class Photo:
    """A caltech101 photo and its class (its folder name)."""

    path: Path
    label: str


def caltech_test(root: Path | None = None, distinct: bool = True) -> list[Photo] | None:
    """The photos of ``test.txt`` (never trained on), or None when the data is absent.

    ``distinct`` leaves out the second photo of each pair in ``caltech_test_duplicates.txt``
    (the same photograph twice in the data set), so that no two photos are duplicates
    unless a benchmark made them so.
    """
    root = root or CALTECH
    listing = root / "test.txt"
    if not listing.is_file():
        return None
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if distinct:
        dropped = {second for _, second in known_duplicates()}
        lines = [line for line in lines if line not in dropped]
    return [Photo(root / line, line.split("/", 1)[0]) for line in lines]


def known_duplicates() -> list[tuple[str, str]]:
    """Pairs of caltech101 test photos (``class/file``) that are the same photograph."""
    pairs = []
    for line in DUPLICATES_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            first, second = line.split()
            pairs.append((first, second))
    return pairs


def missing_caltech_note(what: str) -> str:
    return f"{what} skipped: no caltech101 test photos at {CALTECH} (a checkout without ../shared)"


def sample(photos: Sequence[Photo], n: int, seed: int) -> list[Photo]:
    """``n`` photos chosen by ``seed`` (all when there are fewer), in the list's order."""
    if n >= len(photos):
        return list(photos)
    chosen = set(random.Random(seed).sample(range(len(photos)), n))
    return [p for i, p in enumerate(photos) if i in chosen]


def split_photos(
    photos: Sequence[Photo], n_sources: int, n_distractors: int | None, seed: int
) -> tuple[list[Photo], list[Photo]]:
    """(sources, distractors): ``n_sources`` photos chosen by ``seed``, and ``n_distractors``
    of the others chosen by ``seed + 1`` (all the others when None)."""
    sources = sample(photos, n_sources, seed)
    chosen = set(sources)
    others = [p for p in photos if p not in chosen]
    if n_distractors is None:
        return sources, others
    return sources, sample(others, n_distractors, seed + 1)


def copy_set(
    sources: Sequence[Photo], distractors: Sequence[Photo], folder: Path, seed: int
) -> tuple[Path, Path]:
    """A near-duplicate set under ``folder``: ``set/`` holds the sources' originals and
    seeded copies (``ghostmatch.eval.copies``) and the distractors; returns (``set/``, truth)."""
    from ghostmatch.eval.copies import make_copies

    links = link_photos(sources, folder / "sources")
    truth = make_copies(links, folder / "set", seed=seed)
    link_photos(distractors, folder / "set" / "distractors")
    return folder / "set", truth


def link_photos(photos: Sequence[Photo], folder: Path) -> list[Path]:
    """Symlink ``photos`` into ``folder`` as ``<class>-<file>``, so the data is read in place
    and file names are unique (caltech repeats ``image_0001.jpg`` in every class)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for photo in photos:
        link = folder / f"{photo.label}-{photo.path.name}"
        link.symlink_to(photo.path)
        links.append(link)
    return links


def skimage_photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _PHOTOS]


def new_photos(n: int, seed: int, size: tuple[int, int] = (1024, 768)) -> list[Image.Image]:
    """``n`` distinct photos of ``size``: seeded crops of scikit-image photos, so none of
    them is in any index a benchmark builds."""
    rng = random.Random(seed)
    sources = skimage_photos()
    photos = []
    for i in range(n):
        source = sources[i % len(sources)]
        w, h = source.size
        fraction = rng.uniform(0.5, 0.9)
        cw, ch = int(w * fraction), int(h * fraction)
        left, top = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        crop = source.crop((left, top, left + cw, top + ch))
        photos.append(crop.resize(size, Image.Resampling.BICUBIC))
    return photos


def make_large_jpegs(
    folder: Path, n: int, size: tuple[int, int] = LARGE_SIZE, seed: int = 0
) -> list[Path]:
    """Write ``n`` distinct JPEGs of ``size`` the way a phone camera makes them: photos
    upscaled a little past ``size``, sensor-like noise in the low 3 bits, a different crop
    (and every other round mirrored) per file, quality 95 (about 3 MB at 12 MP)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    margin_w, margin_h = max(1, width // 20), max(1, height // 20)
    canvas = (width + margin_w, height + margin_h)
    noise = rng.integers(0, 8, size=(canvas[1], canvas[0], 3), dtype=np.uint8)
    sources = skimage_photos()[:n]
    bases = [
        np.asarray(ImageOps.fit(photo, canvas, Image.Resampling.BICUBIC)) ^ noise
        for photo in sources
    ]
    paths = []
    for i in range(n):
        base = bases[i % len(bases)]
        x, y = int(rng.integers(0, margin_w + 1)), int(rng.integers(0, margin_h + 1))
        pixels = base[y : y + height, x : x + width]
        if (i // len(bases)) % 2:
            pixels = pixels[:, ::-1]
        path = folder / f"large-{i:04d}.jpg"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=95)
        paths.append(path)
    return paths


def clustered_unit_vectors(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """``n`` float32 unit vectors around ``clusters`` random centres (neighbours in a
    cluster score about 0.5), the kind of structure descriptors of a photo library have;
    uniform random vectors would make every approximate index look worse than it is."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), np.float32)
    step = 1 << 16
    for start in range(0, n, step):
        stop = min(start + step, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:stop] = _unit(centres[rng.integers(0, clusters, stop - start)] + noise)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
