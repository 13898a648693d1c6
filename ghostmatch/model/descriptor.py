"""The descriptor model: GhostNet features -> pooling -> projection -> L2 normalisation.

Every step is a module, so an exported model (ONNX, safetensors) cannot forget to normalise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ghostmatch.model.card import ModelCard
from ghostmatch.model.ghostnet import GhostNet
from ghostmatch.model.scorenorm import ScoreNorm


class Normalize(nn.Module):
    """Maps RGB in [0, 1] to the mean/std the backbone was trained with."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al., TPAMI 2018); p = 1 is average pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.clamp(min=self.eps).pow(self.p).mean((2, 3))
        return pooled.pow(1.0 / self.p)


class AvgPool(nn.Module):
    """Global average pooling to (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class HeadPool(nn.Module):
    """The classifier's 1280-d pre-logits: average pool, ``conv_head``, ReLU."""

    def __init__(self, backbone: GhostNet) -> None:
        super().__init__()
        self.conv_head = backbone.conv_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_head(x.mean((2, 3), keepdim=True))).flatten(1)


class L2Norm(nn.Module):
    """Unit length, so cosine similarity is an inner product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class Descriptor(nn.Module):
    """Image batch (N, 3, H, W) in [0, 1] -> unit descriptors (N, dim)."""

    def __init__(self, card: ModelCard, backbone: GhostNet | None = None) -> None:
        super().__init__()
        self.card = card
        self.normalize = Normalize(card.mean, card.std)
        self.backbone = backbone if backbone is not None else GhostNet(card.width, num_classes=0)
        features = self.backbone.num_features
        self.pool: nn.Module
        if card.pooling == "gem":
            self.pool = GeM(card.gem_p)
        elif card.pooling == "avg":
            self.pool = AvgPool()
        else:
            self.pool = HeadPool(self.backbone)
        pooled = 1280 if card.pooling == "head" else features
        self.projection: nn.Module = nn.Identity()
        if card.projection != "none":
            self.projection = nn.Linear(pooled, card.dim)
        elif card.dim != pooled:
            raise ValueError(f"card says {card.dim}-d but {card.pooling} pooling gives {pooled}")
        self.l2norm = L2Norm()
        # Not a module: a model file may carry one for duplicate scores (model.scorenorm).
        self.score_norm: ScoreNorm | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (N, 960 * width, H/32, W/32)."""
        return self.backbone.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.l2norm(self.projection(self.pool(self.features(x))))
        return out
