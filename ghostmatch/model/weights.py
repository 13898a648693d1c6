"""Resolving a weights spec (imagenet, bundled, random or a file) into a descriptor model."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.card import (
    NAMED_WEIGHTS,
    SCORE_NORM_BETA_KEY,
    SCORE_NORM_RANK_KEY,
    ModelCard,
)
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.download import HubFile, fetch, sha256_of
from ghostmatch.model.exports import BUNDLED_PATH, cache_dir
from ghostmatch.model.ghostnet import GhostNet, infer_width, unwrap_state_dict
from ghostmatch.model.scorenorm import BACKGROUND_KEY, from_tensors
from ghostmatch.pathtext import path_text

CARD_KEY = "ghostmatch_card"


@dataclass(frozen=True)
class RemoteWeights:
    """A checkpoint on the Hugging Face hub and the card its weights need."""

    file: HubFile
    card: dict[str, Any]


# timm's ImageNet-1k GhostNet 1.0x (73.9% top-1, the paper's figure), preprocessed the way
# timm evaluates it: bicubic, crop 0.875, ImageNet mean/std. The revision is the model repo's
# commit of 2023-08-20 ("Update model config and README"); model.safetensors came in with
# d461b859 the day before and has this git-lfs sha256 in both.
IMAGENET = RemoteWeights(
    file=HubFile(
        repo_id="timm/ghostnet_100.in1k",
        filename="model.safetensors",
        revision="700dcdf6314c1b68f170e6ba1ee85ee94e5b37b5",
        sha256="8efbcf55d97872c828768b096d4ebebc51f8b7e29623fd3b3933d78cc230e2e2",
    ),
    card={"resize": "center-crop", "crop_fraction": 0.875, "pooling": "gem", "dim": 960},
)


def fetch_imagenet() -> Path:
    """The cached ImageNet checkpoint, downloading it the first time (``HF_ENDPOINT`` points
    the download at a mirror of the hub)."""
    return fetch(IMAGENET.file, cache_dir() / "hub")


def default_weights() -> str:
    """The weights used when none are named: a file the user configured
    (``GHOSTMATCH_WEIGHTS``), else the bundled model, the one whose duplicate rule and
    quality figures were measured (ImageNet weights have neither)."""
    return os.environ.get("GHOSTMATCH_WEIGHTS") or "bundled"


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first sentence-sized line (torch's run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        if path.exists():
            raise GhostmatchError(f"weights file {path} is not a file")
        raise GhostmatchError(
            f"weights file {os.fsdecode(path)} does not exist; weights takes "
            f"{', '.join(NAMED_WEIGHTS)} or a checkpoint file (.pth, .pt, .safetensors)"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise GhostmatchError(
                f"{path} is not a readable safetensors file: {_first_line(err)}"
            ) from err
        return tensors, metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # Only tensors are loaded, never pickled code: a file holding other Python objects is
        # refused with torch's page of advice, of which the offending name is the useful part.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = (
            f"it holds a Python object ({found.group(1)}), and only tensors are loaded"
            if found
            else _first_line(err)
        )
        raise GhostmatchError(
            f"{path} is not a readable PyTorch checkpoint (a model's state dict): {reason}"
        ) from err
    try:
        return unwrap_state_dict(obj), {}
    except TypeError as err:
        raise GhostmatchError(
            f"{path} is not a model checkpoint: it holds a {type(obj).__name__}, not a "
            "state dict of tensors"
        ) from err


def load_descriptor(
    weights: str | Path | None = None,
    **card_changes: Any,
) -> Descriptor:
    """A descriptor model in eval mode for ``weights`` (a name or a checkpoint path).

    Official Huawei, timm and ghostmatch checkpoints (.pth, .pt, .safetensors) load; a
    ghostmatch file carries its own model card, the others get ImageNet preprocessing.
    ``card_changes`` override card fields (pooling, input size) for experiments.
    """
    if weights is None:
        return load_descriptor(default_weights(), **card_changes)
    spec = str(weights)
    if spec == "random":
        warnings.warn(
            "using RANDOM weights: descriptors are meaningless (tests and speed checks only)",
            stacklevel=2,
        )
        card = ModelCard(weights="random", weights_sha256="0" * 64).with_changes(**card_changes)
        torch.manual_seed(0)
        return Descriptor(card).eval()
    if spec == "imagenet":
        path = fetch_imagenet()
        name, base = "imagenet", dict(IMAGENET.card)
    elif spec == "bundled":
        if not BUNDLED_PATH.exists():
            raise GhostmatchError(
                "this ghostmatch build has no bundled model; use weights imagenet or a "
                "checkpoint file"
            )
        path, name, base = BUNDLED_PATH, "bundled", {}
    else:
        path = Path(spec).expanduser()
        name, base = path.name, dict(IMAGENET.card)
    tensors, metadata = _read_checkpoint(path)
    digest = sha256_of(path)
    if CARD_KEY in metadata:
        card_data = json.loads(metadata[CARD_KEY])
        card_data.update(weights=name, weights_sha256=digest)
        card = _with_learnt_p(ModelCard.from_dict(card_data), tensors)
        background = tensors.pop(BACKGROUND_KEY, None)
        model = Descriptor(card.with_changes(**card_changes))
        _load(model, tensors, path, prefixed=True)
        if background is not None:
            model.score_norm = from_tensors(background.float().numpy(), card.extra)
        return model.eval()
    try:
        width = infer_width(tensors)
    except (KeyError, ValueError) as err:
        raise GhostmatchError(f"{path} is not a GhostNet checkpoint ({err})") from err
    card = ModelCard(weights=name, weights_sha256=digest, width=width, **base)
    card = card.with_changes(**card_changes)
    backbone = GhostNet(width, num_classes=0)
    backbone_keys = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    _load(backbone, backbone_keys, path, prefixed=False)
    model = Descriptor(_fix_dim(card, backbone), backbone)
    return model.eval()


def _with_learnt_p(card: ModelCard, tensors: dict[str, torch.Tensor]) -> ModelCard:
    """The card with GeM's p as the weights hold it: p is learnt, and a card written when
    training began still says the starting value."""
    learnt = tensors.get("pool.p")
    if card.pooling != "gem" or learnt is None:
        return card
    return card.with_changes(gem_p=float(learnt))


def _fix_dim(card: ModelCard, backbone: GhostNet) -> ModelCard:
    if card.projection != "none":
        return card
    dim = 1280 if card.pooling == "head" else backbone.num_features
    return card.with_changes(dim=dim)


def _load(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path, prefixed: bool
) -> None:
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        kind = "ghostmatch" if prefixed else "GhostNet"
        raise GhostmatchError(f"{path} does not match the {kind} layout: {err}") from err


def save_descriptor(model: Descriptor, path: Path, half: bool = False) -> str:
    """Write ``model`` as safetensors with its card (and its score background, if any)
    inside; returns the file's sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    card_obj = model.card
    if model.score_norm is not None:
        state[BACKGROUND_KEY] = torch.from_numpy(model.score_norm.background.copy())
        card_obj = card_obj.with_changes(extra={**card_obj.extra, **model.score_norm.card_extra()})
    else:  # the card must not promise a background the file lacks
        extra = {
            k: v
            for k, v in card_obj.extra.items()
            if k not in (SCORE_NORM_RANK_KEY, SCORE_NORM_BETA_KEY)
        }
        card_obj = card_obj.with_changes(extra=extra)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    card = card_obj.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors makes its file readable by the owner alone; a model file gets the mode
    # any new file gets here (the umask's), so that a model shared on a server stays usable.
    tmp.unlink(missing_ok=True)  # a crashed save's file would lend its own mode
    with open(tmp, "wb"):
        pass
    mode = stat.S_IMODE(tmp.stat().st_mode)
    save_file(state, str(tmp), metadata={CARD_KEY: json.dumps(card)})
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return sha256_of(path)


def load_classifier(weights: str | Path = "imagenet") -> tuple[GhostNet, ModelCard]:
    """A GhostNet with its classifier head (eval mode) and the card of its preprocessing.

    ``imagenet`` (the default) or a timm / official checkpoint with ``classifier.*``; the
    descriptor path drops that head, and ghostmatch's own models were never given one.
    ``random`` is a seeded random 1000-class network, for tests.
    """
    spec = str(weights)
    if spec == "random":
        warnings.warn(
            "using RANDOM weights: classes are meaningless (tests and speed checks only)",
            stacklevel=2,
        )
        torch.manual_seed(0)
        card = ModelCard(weights="random", weights_sha256="0" * 64, **IMAGENET.card)
        return GhostNet(1.0, num_classes=1000).eval(), card
    if spec == "imagenet":
        path, name = fetch_imagenet(), "imagenet"
    elif spec == "bundled":
        raise GhostmatchError(
            "the bundled model is a descriptor without a classifier; use weights imagenet"
        )
    else:
        path = Path(spec).expanduser()
        name = path.name
    tensors, metadata = _read_checkpoint(path)
    head = tensors.get("classifier.weight")
    if CARD_KEY in metadata or head is None:
        raise GhostmatchError(
            f"{path_text(path)} holds no classifier head (classifier.weight); use weights "
            "imagenet or a timm GhostNet checkpoint"
        )
    try:
        width = infer_width(tensors)
    except (KeyError, ValueError) as err:
        raise GhostmatchError(f"{path} is not a GhostNet checkpoint ({err})") from err
    network = GhostNet(width, num_classes=int(head.shape[0]))
    _load(network, tensors, path, prefixed=False)
    card = ModelCard(weights=name, weights_sha256=sha256_of(path), width=width, **IMAGENET.card)
    return network.eval(), card
