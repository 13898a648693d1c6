"""The bundled backbone's features of caltech101 and ukbench-dev photos, made once and
cached: the 256-d descriptor, the 960-d GeM-pooled last map (before the projection) and
the stride-16 map GeM-pooled (112-d), of each photo and of seeded augmented views of the
training photos. ``benchmarks.recognition_head`` trains and measures heads on them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks.data import CALTECH, REPO
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.embedder import fuse_batchnorm, prepare, to_batch

UKBENCH = REPO.parent / "shared" / "data" / "ukbench-dev"
# caltech101's clutter folder is no object class.
CLUTTER = "BACKGROUND_Google"
# Stage after which GhostNet's map has stride 16 (as the duplicate check's local features).
STRIDE16_STAGE = 7
BATCH = 64
# Augmented views of each training photo beyond the photo itself: its mirror image and
# random crops (share of the area, aspect relative to the photo's own).
CROPS = 2
CROP_AREA = (0.35, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
KINDS = ("descriptor", "gem960", "gem112")


@dataclass(frozen=True)
class Features:
    """Features of ``paths`` (one row per photo and view): ``view`` 0 is the photo, 1 its
    mirror image, 2.. crops; ``labels`` the class of each row."""

    paths: list[str]
    labels: list[str]
    view: np.ndarray
    arrays: dict[str, np.ndarray]

    def rows(self, mask: np.ndarray) -> Features:
        idx = np.flatnonzero(mask)
        return Features(
            [self.paths[i] for i in idx],
            [self.labels[i] for i in idx],
            self.view[idx],
            {k: v[idx] for k, v in self.arrays.items()},
        )


class PooledMaps(torch.nn.Module):
    """The descriptor and the two GeM-pooled maps from one pass of the network."""

    def __init__(self, model: Descriptor) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone = self.model.backbone
        x = backbone.act1(backbone.bn1(backbone.conv_stem(self.model.normalize(x))))
        for n in range(STRIDE16_STAGE):
            x = backbone.blocks[n](x)
        mid = x
        for n in range(STRIDE16_STAGE, len(backbone.blocks)):
            x = backbone.blocks[n](x)
        pooled = self.model.pool(x)
        descriptor = self.model.l2norm(self.model.projection(pooled))
        p = 3.0
        mid_pooled = mid.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1.0 / p)
        return descriptor, pooled, mid_pooled


def caltech_lists(root: Path = CALTECH) -> dict[str, list[tuple[str, str]]]:
    """``train`` and ``test``: (relative path, class) of caltech101's fixed split, without
    the clutter folder."""
    out = {}
    for part in ("train", "test"):
        lines = (root / f"{part}.txt").read_text().split()
        out[part] = [
            (line, line.split("/", 1)[0]) for line in lines if not line.startswith(CLUTTER)
        ]
    return out


def ukbench_list(root: Path = UKBENCH) -> list[tuple[str, str]]:
    """(file name, object) of the ukbench-dev photos: object = number // 4."""
    files = sorted(p.name for p in root.glob("ukbench*.jpg"))
    return [(name, f"object{int(name[7:12]) // 4:05d}") for name in files]


def views(image: Image.Image, n_views: int, rng: np.random.Generator) -> list[Image.Image]:
    """The photo, its mirror image, then random crops (half of them mirrored)."""
    out = [image]
    if n_views > 1:
        out.append(ImageOps.mirror(image))
    w, h = image.size
    for _ in range(n_views - 2):
        area = rng.uniform(*CROP_AREA) * w * h
        aspect = (w / h) * np.exp(rng.uniform(*np.log(CROP_ASPECT)))
        cw = round(min(w, float(np.sqrt(area * aspect))))
        ch = round(min(h, float(np.sqrt(area / aspect))))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        out.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return out


def extract(
    model: Descriptor,
    root: Path,
    items: Sequence[tuple[str, str]],
    n_views: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Features of every view of every photo in ``items`` (path under ``root``, class)."""
    card = model.card
    net = PooledMaps(fuse_batchnorm(model)).eval()
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    labels: list[str] = []
    view_ids: list[int] = []
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    pending: list[np.ndarray] = []

    def flush() -> None:
        if not pending:
            return
        with torch.inference_mode():
            results = net(torch.from_numpy(to_batch(pending)))
        for kind, value in zip(KINDS, results, strict=True):
            outputs[kind].append(value.float().numpy())
        pending.clear()

    for done, (rel, label) in enumerate(items):
        with Image.open(root / rel) as raw:
            image = ImageOps.exif_transpose(raw).convert("RGB")
        for v, view in enumerate(views(image, n_views, rng)):
            pending.append(prepare(view, card))
            paths.append(rel)
            labels.append(label)
            view_ids.append(v)
        if len(pending) >= BATCH:
            flush()
        if progress is not None:
            progress(done + 1, len(items))
    flush()
    arrays = {k: np.concatenate(v).astype(np.float32) for k, v in outputs.items()}
    return Features(paths, labels, np.asarray(view_ids, dtype=np.int8), arrays)


def cached(
    cache: Path | None,
    name: str,
    model: Descriptor,
    root: Path,
    items: Sequence[tuple[str, str]],
    n_views: int,
    seed: int,
) -> Features:
    """:func:`extract`, read from ``cache`` when a run with the same model, photos, views
    and seed saved it there."""
    key = hashlib.sha256(
        "\n".join(
            [model.card.fingerprint, str(n_views), str(seed), str(CROPS), *(p for p, _ in items)]
        ).encode()
    ).hexdigest()[:12]
    path = cache / f"{name}-{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        data = np.load(path)
        return Features(
            data["paths"].tolist(),
            data["labels"].tolist(),
            data["view"],
            {k: data[k] for k in KINDS},
        )
    start = time.perf_counter()
    last = [start]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            rate = done / (now - start)
            print(
                f"{name}: {done}/{total} photos, {rate:.1f}/s, ETA {(total - done) / rate:.0f} s",
                flush=True,
            )

    features = extract(model, root, items, n_views, seed, report)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {
            "paths": np.asarray(features.paths),
            "labels": np.asarray(features.labels),
            "view": features.view,
            **features.arrays,
        }
        # numpy's stubs read every keyword as its allow_pickle flag.
        np.savez(path, **columns)  # type: ignore[arg-type]
    return features
