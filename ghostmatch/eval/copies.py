"""Make a near-duplicate test set: each source image, seeded edited copies of it, and the truth.

Layout under ``out``: ``originals/<stem><suffix>`` (the source bytes, unchanged),
``copies/<stem>__<transform>.jpg`` (the transform is the text between ``__`` and the first
``.`` after it) and ``truth.json`` with the groups of paths that show the same image.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from PIL import Image, ImageOps

from ghostmatch.errors import GhostmatchError
from ghostmatch.train.transforms import (
    add_border,
    blur,
    change_aspect,
    color_shift,
    grayscale,
    hflip,
    overlay_text,
    random_color,
    random_crop,
    random_text,
    reencode_jpeg,
    resize,
    rotate,
    to_rgb,
)

logger = logging.getLogger(__name__)

CopyTransform = Callable[[Image.Image, random.Random], Image.Image]

SEPARATOR = "__"
TRUTH_NAME = "truth.json"
# High enough that saving a copy adds little beyond the edit it is meant to show.
COPY_JPEG_QUALITY = 95


def _color(img: Image.Image, rng: random.Random) -> Image.Image:
    return color_shift(
        img,
        hue=rng.uniform(-0.1, 0.1),
        saturation=rng.uniform(0.5, 1.5),
        brightness=rng.uniform(0.7, 1.3),
        contrast=rng.uniform(0.7, 1.3),
    )


def _blur(img: Image.Image, rng: random.Random) -> Image.Image:
    # Relative to the image so that a 4000 px photo is as blurred as a 400 px thumbnail.
    return blur(img, max(1.0, 0.006 * max(img.size)))


def _combo(img: Image.Image, rng: random.Random) -> Image.Image:
    return reencode_jpeg(_color(random_crop(img, 0.8, rng), rng), 50)


TRANSFORMS: Mapping[str, CopyTransform] = MappingProxyType(
    {
        "reencode-q20": lambda img, rng: reencode_jpeg(img, 20),
        "resize-40": lambda img, rng: resize(img, 0.4),
        "crop-80": lambda img, rng: random_crop(img, 0.8, rng),
        "crop-60": lambda img, rng: random_crop(img, 0.6, rng),
        "flip": lambda img, rng: hflip(img),
        "rotate-8": lambda img, rng: rotate(img, rng.choice((-8.0, 8.0))),
        "color": _color,
        "gray": lambda img, rng: grayscale(img),
        "blur": _blur,
        "text": lambda img, rng: overlay_text(img, random_text(rng), rng),
        "border": lambda img, rng: add_border(img, 0.1, random_color(rng)),
        "aspect": lambda img, rng: change_aspect(img, rng.choice((2.0 / 3.0, 1.5))),
        "combo": _combo,
    }
)

# "near": the same picture re-encoded or re-toned; "edited": content was cut, moved or added.
TIER_OF_TRANSFORM: Mapping[str, str] = MappingProxyType(
    {
        "reencode-q20": "near",
        "resize-40": "near",
        "crop-80": "edited",
        "crop-60": "edited",
        "flip": "edited",
        "rotate-8": "edited",
        "color": "near",
        "gray": "near",
        "blur": "near",
        "text": "edited",
        "border": "edited",
        "aspect": "edited",
        "combo": "edited",
    }
)


def make_copies(
    sources: Sequence[Path],
    out: Path,
    seed: int,
    transforms: Sequence[str] | None = None,
    per_image: int | None = None,
) -> Path:
    """Write originals, copies and ``truth.json`` under ``out``; return the truth path.

    Copy ``t`` of source ``s`` draws from ``random.Random(f"{seed}:{s.name}:{t}")``: the
    output does not depend on the order of ``sources``, on which other transforms run, or
    on where the source folder lives. ``per_image`` keeps a seeded subset of that many
    transforms per source (None = all). Unreadable sources are logged, listed under
    ``"skipped"`` in the truth file and left out.
    """
    names = _check_transforms(transforms)
    if per_image is not None and not 1 <= per_image <= len(names):
        raise GhostmatchError(f"per_image must be between 1 and {len(names)}, got {per_image}")
    ordered = _check_sources(sources)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GhostmatchError(f"{out} is not an empty folder; choose a new or empty one")
    (out / "originals").mkdir(parents=True, exist_ok=True)
    (out / "copies").mkdir(exist_ok=True)

    groups: list[list[str]] = []
    skipped: list[dict[str, str]] = []
    for source in ordered:
        try:
            with Image.open(source) as opened:
                image = to_rgb(ImageOps.exif_transpose(opened))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            logger.warning("skipping %s: %s", source, exc)
            skipped.append({"path": str(source), "reason": str(exc) or type(exc).__name__})
            continue
        original = f"originals/{source.stem}{source.suffix.lower()}"
        shutil.copyfile(source, out / original)
        group = [original]
        for name in _pick(names, per_image, random.Random(f"{seed}:{source.name}:subset")):
            copy = TRANSFORMS[name](image, random.Random(f"{seed}:{source.name}:{name}"))
            relative = f"copies/{source.stem}{SEPARATOR}{name}.jpg"
            copy.save(out / relative, format="JPEG", quality=COPY_JPEG_QUALITY)
            group.append(relative)
        groups.append(group)
    if not groups:
        raise GhostmatchError(f"none of the {len(ordered)} source files could be read as an image")

    truth = out / TRUTH_NAME
    partial = truth.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"seed": seed, "groups": groups, "skipped": skipped}, indent=1))
    os.replace(partial, truth)
    return truth


def read_truth(path: Path) -> list[list[Path]]:
    """The groups of a truth file as absolute paths; each group shows one source image."""
    try:
        data = json.loads(path.read_text())
        groups = data["groups"]
        if not all(isinstance(g, list) and all(isinstance(p, str) for p in g) for g in groups):
            raise TypeError("groups must be lists of paths")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GhostmatchError(
            f"cannot read truth file {path} ({exc}); make one with `ghostmatch make-copies`"
        ) from exc
    base = path.resolve().parent
    return [[base / p for p in group] for group in groups]


def transform_of(path: str | os.PathLike[str]) -> str | None:
    """The transform that made a copy, parsed from ``<stem>__<transform>.<ext>``; else None."""
    stem = Path(path).name.split(".", 1)[0]
    head, separator, name = stem.rpartition(SEPARATOR)
    return name if separator and head and name in TRANSFORMS else None


def _check_transforms(transforms: Sequence[str] | None) -> list[str]:
    if transforms is None:
        return list(TRANSFORMS)
    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown:
        raise GhostmatchError(
            f"unknown transform(s) {', '.join(unknown)}; choose from {', '.join(TRANSFORMS)}"
        )
    if not transforms:
        raise GhostmatchError("no transforms chosen; name at least one")
    # Keep the canonical order so that the truth file does not depend on how they were listed.
    return [name for name in TRANSFORMS if name in transforms]


def _check_sources(sources: Sequence[Path]) -> list[Path]:
    ordered = sorted({Path(s) for s in sources}, key=str)
    if not ordered:
        raise GhostmatchError("no source images given")
    seen: dict[str, Path] = {}
    for source in ordered:
        if transform_of(source) is not None:
            raise GhostmatchError(
                f"{source} is named like a copy (`{SEPARATOR}<transform>`); rename it"
            )
        if source.stem in seen:
            raise GhostmatchError(
                f"{seen[source.stem]} and {source} share the name {source.stem!r}; rename one"
            )
        seen[source.stem] = source
    return ordered


def _pick(names: list[str], per_image: int | None, rng: random.Random) -> list[str]:
    if per_image is None:
        return names
    chosen = set(rng.sample(names, per_image))
    return [name for name in names if name in chosen]
