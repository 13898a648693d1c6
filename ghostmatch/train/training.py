"""Training descriptors: self-supervised copy detection (SSCD-style) or supervised classes.

Resumable: a checkpoint holds model, optimiser, schedule and position; every random choice
is derived from (seed, epoch, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ghostmatch.errors import GhostmatchError
from ghostmatch.ingest.images import ImageRejected, load_image
from ghostmatch.ingest.scan import scan
from ghostmatch.model.card import POOLINGS, ModelCard
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.embedder import channels_last as channels_last_model
from ghostmatch.model.embedder import to_batch
from ghostmatch.model.scorenorm import DEFAULT_BACKGROUND_SIZE, ScoreNorm, pick_background
from ghostmatch.model.weights import load_descriptor, save_descriptor
from ghostmatch.train.augment import CopyAugment

MODES = ("ssl", "supervised")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the result of a run (stored in checkpoints)."""

    mode: str = "ssl"
    init: str = "random"
    width: float = 1.0
    epochs: int = 20
    batch_size: int = 64
    image_size: int = 160
    dim: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    koleo: float = 2.0
    margin: float = 0.2
    scale: float = 30.0
    cache_side: int = 288
    seed: int = 0
    max_images: int | None = None
    # Training photos whose descriptors become the model's score background (0: none).
    background: int = DEFAULT_BACKGROUND_SIZE
    # Probabilities of the grey and blur augmentations (see CopyAugment).
    grey: float = 0.1
    blur: float = 0.2
    # What the descriptor pools: GeM or average over the 960 channels, or the 1280-d head.
    pooling: str = "gem"
    # ssl: 0 draws batches at random; N > 0 fills each batch with groups of N photos that
    # the model of the epoch's start finds alike, so every photo meets look-alikes as
    # negatives (other airplanes in an even sky, other motorbikes on white).
    neighbour_groups: int = 0


@dataclass
class EpochReport:
    """What one epoch did: mean loss, throughput and, in supervised mode, k-NN accuracy."""

    epoch: int
    loss: float
    images_per_s: float
    seconds: float
    knn_top1: float | None = None


Reporter = Callable[[str, dict[str, Any]], None]


def list_images(root: Path, list_file: Path | None = None) -> list[Path]:
    """Training images: those named in ``list_file`` (relative to root), else all under root."""
    if list_file is not None:
        lines = list_file.read_text().split()
        return [root / line for line in lines if line]
    return [entry.path for entry in scan([root])]


def label_of(path: Path, root: Path) -> str:
    """A class label: the first folder below the root."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _decode_all(paths: Sequence[Path], side: int, threads: int) -> list[Image.Image | None]:
    """Decode every image once, reduced so its shorter side is about ``side``."""

    def one(path: Path) -> Image.Image | None:
        try:
            image = load_image(path, min_side=side).image
        except ImageRejected:
            return None
        scale = side / min(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.BILINEAR,
            )
        return image

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths))


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate (Sablayrolles et al., ICLR 2019): push each
    descriptor away from its nearest neighbour so the batch spreads over the sphere."""
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=1)
    return -torch.log(distances + 1e-8).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss over 2N views: each view's positive is the other view of its image."""
    x = torch.cat([a, b])
    n = a.shape[0]
    logits = x @ x.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


class MarginHead(nn.Module):
    """ArcFace-style additive angular margin on cosine logits (Deng et al., CVPR 2019)."""

    def __init__(self, dim: int, classes: int, margin: float, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.margin, self.scale = margin, scale

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = x @ F.normalize(self.weight, dim=1).t()
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(theta + self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(onehot, target, cos) * self.scale
        return F.cross_entropy(logits, labels)


def _build_model(config: TrainConfig) -> Descriptor:
    card_changes: dict[str, Any] = {
        "pooling": config.pooling,
        "projection": "linear",
        "dim": config.dim,
        "input_size": config.image_size,
    }
    if config.init == "random":
        card = ModelCard(
            weights="trained", weights_sha256="0" * 64, width=config.width, **card_changes
        )
        torch.manual_seed(config.seed)
        return Descriptor(card)
    base = load_descriptor(config.init)
    # extra holds what was measured for the init weights (thresholds, score background
    # settings): none of it holds for the weights this run makes.
    card = base.card.with_changes(resize="squash", crop_fraction=1.0, extra={}, **card_changes)
    model = Descriptor(card, base.backbone)
    same_input = base.card.pooling == config.pooling
    if isinstance(base.projection, nn.Linear) and base.card.dim == config.dim and same_input:
        model.projection.load_state_dict(base.projection.state_dict())
    return model


def _views(
    images: Sequence[Image.Image], augment: CopyAugment, seed: int, epoch: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    first, second = [], []
    for i, image in enumerate(images):
        rng = random.Random(f"{seed}:{epoch}:{step}:{i}")
        first.append(np.asarray(augment(image, rng)))
        second.append(np.asarray(augment(image, rng)))
    return to_batch(first), to_batch(second)


def _channels_last(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)


def train(
    root: Path,
    out: Path,
    config: TrainConfig,
    list_file: Path | None = None,
    resume: bool = False,
    report: Reporter | None = None,
    checkpoint_every_s: float = 600.0,
    stop_after_steps: int | None = None,
) -> list[EpochReport]:
    """Train a descriptor on the images under ``root`` and write it to ``out``.

    A checkpoint ``out.ckpt`` is written every epoch and every ``checkpoint_every_s``
    seconds; ``resume=True`` continues from it. ``stop_after_steps`` ends the call early
    (after a checkpoint), as an interrupt would.
    """
    if config.mode not in MODES:
        raise GhostmatchError(f"mode must be one of {', '.join(MODES)}")
    if config.pooling not in POOLINGS:
        raise GhostmatchError(f"pooling must be one of {', '.join(POOLINGS)}")
    ckpt_path = out.with_name(out.name + ".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)
    say = report or (lambda event, data: None)
    paths, images, skipped = _training_images(root, list_file, config)
    say("data", {"images": len(images), "skipped": skipped})

    labels: list[int] = []
    train_idx = list(range(len(images)))
    held_out: list[int] = []
    classes: list[str] = []
    if config.mode == "supervised":
        names = [label_of(p, root) for p in paths]
        classes = sorted(set(names))
        if len(classes) < 2:
            raise GhostmatchError("supervised training needs at least two class folders")
        labels = [classes.index(n) for n in names]
        split = random.Random(config.seed)
        held_out = sorted(i for i in train_idx if split.random() < 0.1)
        held = set(held_out)
        train_idx = [i for i in train_idx if i not in held]

    # channels_last makes CPU training of the depthwise-heavy GhostNet about 10x faster.
    model = _build_model(config)
    channels_last_model(model)
    head: MarginHead | None = None
    if config.mode == "supervised":
        head = MarginHead(config.dim, len(classes), config.margin, config.scale)
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = min(steps_per_epoch, total_steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    start_epoch, start_step, history = 0, 0, []
    resumed_batches: list[list[int]] | None = None
    epoch_batches: list[list[int]] = []
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config):
            raise GhostmatchError(
                f"{ckpt_path} was made with other settings; rerun with the same options "
                "or delete it to start over"
            )
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
        history = [EpochReport(**h) for h in state["history"]]
        resumed_batches = state.get("batches")
        say("resume", {"epoch": start_epoch, "step": start_step})

    def save_checkpoint(epoch: int, step: int) -> None:
        state = {
            "config": asdict(config),
            "model": model.state_dict(),
            "head": head.state_dict() if head is not None else None,
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "history": [asdict(h) for h in history],
            # This epoch's batches, when they came from the model (neighbour groups).
            "batches": epoch_batches if config.neighbour_groups and step else None,
        }
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    augment = CopyAugment(config.image_size, grey=config.grey, blur=config.blur)
    steps_done = 0
    last_save = time.monotonic()
    with ThreadPoolExecutor(1) as prefetch:
        for epoch in range(start_epoch, config.epochs):
            order = list(train_idx)
            random.Random(f"{config.seed}:order:{epoch}").shuffle(order)
            if epoch == start_epoch and resumed_batches is not None:
                batches = resumed_batches  # made from the weights of this epoch's start
            elif config.neighbour_groups and config.mode == "ssl":
                say("grouping", {"epoch": epoch})
                vectors = _embed_images(model, [images[i] for i in order])
                batches = neighbour_batches(
                    vectors, order, config.neighbour_groups, config.batch_size, steps_per_epoch
                )
            else:
                batches = [
                    order[i * config.batch_size : (i + 1) * config.batch_size]
                    for i in range(steps_per_epoch)
                ]
            epoch_batches = batches
            first_step = start_step if epoch == start_epoch else 0
            model.train()
            losses: list[float] = []
            t0 = time.monotonic()
            pending: Future[tuple[np.ndarray, np.ndarray]] | None = None

            def submit(
                step: int, batches: list[list[int]] = batches, epoch: int = epoch
            ) -> Future[tuple[np.ndarray, np.ndarray]]:
                picked = [images[i] for i in batches[step]]
                return prefetch.submit(_views, picked, augment, config.seed, epoch, step)

            for step in range(first_step, steps_per_epoch):
                pending = pending or submit(step)
                a_np, b_np = pending.result()
                pending = submit(step + 1) if step + 1 < steps_per_epoch else None
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps_per_epoch + step)
                a = model(_channels_last(a_np))
                if head is not None:
                    y = torch.tensor([labels[i] for i in batches[step]])
                    b = model(_channels_last(b_np))
                    loss = head(torch.cat([a, b]), torch.cat([y, y]))
                else:
                    b = model(_channels_last(b_np))
                    loss = info_nce(a, b, config.temperature)
                    # Per view set: across the two sets each view's nearest is its positive.
                    spread = (koleo_loss(a) + koleo_loss(b)) / 2
                    loss = loss + config.koleo * spread
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                steps_done += 1
                elapsed = time.monotonic() - t0
                rate = len(losses) * config.batch_size * 2 / max(elapsed, 1e-9)
                say(
                    "step",
                    {
                        "epoch": epoch,
                        "step": step + 1,
                        "steps": steps_per_epoch,
                        "loss": losses[-1],
                        "images_per_s": rate,
                    },
                )
                stop = stop_after_steps is not None and steps_done >= stop_after_steps
                if stop or time.monotonic() - last_save > checkpoint_every_s:
                    if pending is not None:
                        pending.result()
                    save_checkpoint(epoch, step + 1)
                    last_save = time.monotonic()
                if stop:
                    return history
            seconds = time.monotonic() - t0
            report_ = EpochReport(
                epoch=epoch,
                loss=float(np.mean(losses)) if losses else float("nan"),
                images_per_s=len(losses) * config.batch_size * 2 / max(seconds, 1e-9),
                seconds=seconds,
            )
            if head is not None and held_out:
                report_.knn_top1 = knn_accuracy(model, images, labels, train_idx, held_out)
            history.append(report_)
            save_checkpoint(epoch + 1, 0)
            last_save = time.monotonic()
            export = model.eval()
            if epoch + 1 == config.epochs and config.background > 0:
                say("background", {"images": min(config.background, len(train_idx))})
                export.score_norm = fit_background(
                    export, [images[i] for i in train_idx], config.background, config.seed
                )
            save_descriptor(export, out, half=True)
            say("epoch", asdict(report_))
    return history


def fit_background(
    model: Descriptor, images: Sequence[Image.Image], size: int, seed: int = 0
) -> ScoreNorm:
    """A score background (``ghostmatch.model.scorenorm``) from ``size`` of the training images,
    chosen by ``seed``, embedded as the model sees them at inference."""
    picked = pick_background(len(images), size, seed)
    vectors = _embed_images(model, [images[i] for i in picked])
    return ScoreNorm(vectors.numpy())


def add_background(
    weights: Path,
    root: Path,
    out: Path,
    list_file: Path | None = None,
    config: TrainConfig | None = None,
) -> str:
    """Give a trained model file the score background that an ssl ``train`` run with
    ``config`` would have given it (same images, decoding, choice and ``config.background``
    size); writes ``out`` and returns its sha256."""
    config = config or TrainConfig()
    model = load_descriptor(weights)
    _, images, _ = _training_images(root, list_file, config)
    model.score_norm = fit_background(model, images, config.background, config.seed)
    return save_descriptor(model, out, half=True)


def _training_images(
    root: Path, list_file: Path | None, config: TrainConfig
) -> tuple[list[Path], list[Image.Image], int]:
    """(paths, decoded images, how many failed to decode) of a run's training photos."""
    paths = list_images(root, list_file)
    if config.max_images is not None:
        paths = sorted(paths)[: config.max_images]
    if not paths:
        raise GhostmatchError(f"no training images under {root}")
    decoded = _decode_all(paths, config.cache_side, max(1, os.cpu_count() or 1))
    pairs = [(p, im) for p, im in zip(paths, decoded, strict=True) if im is not None]
    return [p for p, _ in pairs], [im for _, im in pairs], len(paths) - len(pairs)


def neighbour_batches(
    vectors: torch.Tensor, order: Sequence[int], group: int, batch_size: int, steps: int
) -> list[list[int]]:
    """``steps`` batches of ``batch_size`` image indices built from groups of ``group``
    look-alikes: rows of ``vectors`` are the images of ``order``; taken in that order, each
    image not yet placed starts a group with its nearest neighbours not yet placed."""
    x = torch.nn.functional.normalize(vectors.float(), dim=1)
    n = len(order)
    k = min(n, 4 * group)
    nearest = torch.cat(
        [(x[i : i + 1024] @ x.t()).topk(k, dim=1).indices for i in range(0, n, 1024)]
    ).tolist()
    placed = [False] * n
    flat: list[int] = []
    for row in range(n):
        if placed[row]:
            continue
        members = 0
        for candidate in [row, *nearest[row]]:
            if members == group:
                break
            if not placed[candidate]:
                placed[candidate] = True
                flat.append(order[candidate])
                members += 1
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _embed_images(model: Descriptor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Descriptors of decoded images with the model's own preprocessing (eval mode)."""
    from ghostmatch.model.embedder import prepare

    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            arrays = [prepare(image, model.card) for image in images[i : i + 64]]
            out.append(model(torch.from_numpy(to_batch(arrays))))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.card.dim)


def knn_accuracy(
    model: Descriptor,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    train_idx: Sequence[int],
    test_idx: Sequence[int],
) -> float:
    """Top-1 accuracy of 1-NN classification of ``test_idx`` against ``train_idx``."""
    train_vecs = _embed_images(model, [images[i] for i in train_idx])
    test_vecs = _embed_images(model, [images[i] for i in test_idx])
    nearest = (test_vecs @ train_vecs.t()).argmax(dim=1).tolist()
    hits = sum(labels[train_idx[n]] == labels[t] for n, t in zip(nearest, test_idx, strict=True))
    return hits / max(1, len(test_idx))
