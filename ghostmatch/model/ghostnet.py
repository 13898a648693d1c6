"""GhostNet v1 (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020).

Module names follow the official Huawei checkpoint and timm's ``ghostnet_100`` so that
either state_dict loads with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# One list per stage; each block is (kernel, expansion channels, output channels, SE ratio,
# stride), exactly the table of the paper (Table 1) at width 1.0.
STAGES: list[list[tuple[int, int, int, float, int]]] = [
    [(3, 16, 16, 0.0, 1)],
    [(3, 48, 24, 0.0, 2)],
    [(3, 72, 24, 0.0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0.0, 2)],
    [
        (3, 200, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ],
    [(5, 672, 160, 0.25, 2)],
    [
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
    ],
]

WIDTHS = (0.5, 1.0, 1.3)
HEAD_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The SE gate of the paper: relu6(x + 3) / 6."""
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """Channel attention: average pool, reduce, ReLU, expand, hard-sigmoid gate."""

    def __init__(self, channels: int, ratio: float = 0.25) -> None:
        super().__init__()
        reduced = make_divisible(channels * ratio, 4)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * hard_sigmoid(s)


class GhostModule(nn.Module):
    """Half the channels from a 1x1 conv, the other half from a cheap 3x3 depthwise conv."""

    def __init__(self, in_chs: int, out_chs: int, relu: bool = True) -> None:
        super().__init__()
        self.out_chs = out_chs
        primary = math.ceil(out_chs / 2)
        self.cut = 2 * primary != out_chs
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, primary, 1, bias=False),
            nn.BatchNorm2d(primary),
            nn.ReLU(inplace=True) if relu else nn.Identity(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(primary, primary, 3, padding=1, groups=primary, bias=False),
            nn.BatchNorm2d(primary),
            nn.ReLU(inplace=True) if relu else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        # Cut only for an odd channel count: an exported graph holds no whole-tensor
        # Slice, which ONNX Runtime copies (a tenth of the local maps' time).
        return out[:, : self.out_chs] if self.cut else out


class GhostBottleneck(nn.Module):
    """Expansion Ghost module, optional strided depthwise conv and SE, linear projection."""

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        kernel: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.stride = stride
        pad = (kernel - 1) // 2
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True)
        self.conv_dw: nn.Module | None = None
        self.bn_dw: nn.Module | None = None
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_chs, mid_chs, kernel, stride, pad, groups=mid_chs, bias=False
            )
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se: nn.Module | None = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut: nn.Module = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, kernel, stride, pad, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.conv_dw is not None and self.bn_dw is not None:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        return y + self.shortcut(x)


class ConvBnAct(nn.Module):
    """1x1 conv + BN + ReLU; the last feature layer (960 channels at width 1.0)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostNet(nn.Module):
    """GhostNet v1 classifier; ``forward_features`` gives the 960 x H/32 x W/32 map."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.width = width
        self.dropout = dropout
        stem = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        prev = stem
        stages: list[nn.Module] = []
        exp = 0
        for stage in STAGES:
            layers = []
            for kernel, exp, out, se_ratio, stride in stage:
                mid = make_divisible(exp * width, 4)
                out_chs = make_divisible(out * width, 4)
                layers.append(GhostBottleneck(prev, mid, out_chs, kernel, stride, se_ratio))
                prev = out_chs
            stages.append(nn.Sequential(*layers))
        self.num_features = make_divisible(exp * width, 4)
        stages.append(nn.Sequential(ConvBnAct(prev, self.num_features)))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(self.num_features, HEAD_CHANNELS, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the last 1x1 conv (stride 32)."""
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pool, ``conv_head`` + ReLU, dropout, classifier."""
        x = self.act2(self.conv_head(features.mean((2, 3), keepdim=True))).flatten(1)
        if pre_logits:
            return x
        x = F.dropout(x, p=self.dropout, training=self.training)
        out: torch.Tensor = self.classifier(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Take the tensors out of the containers checkpoints come in.

    Official and timm training checkpoints nest the weights under ``state_dict``, ``model``
    or ``state_dict_ema``, and DataParallel prefixes every key with ``module.``.
    """
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not isinstance(obj, Mapping):
        raise TypeError(f"not a checkpoint: {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_width(state_dict: Mapping[str, torch.Tensor]) -> float:
    """The width multiplier of a GhostNet state_dict, read off its last feature layer."""
    channels = state_dict["blocks.9.0.conv.weight"].shape[0]
    for width in WIDTHS:
        if make_divisible(960 * width, 4) == channels:
            return width
    raise ValueError(f"no GhostNet width has {channels} final channels")
