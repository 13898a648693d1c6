"""Local feature maps: the descriptor's network up to its stride-16 stage, one unit
descriptor a cell (NHWC), for the duplicate check's geometric stage
(``ghostmatch.dupes.verify``)."""

from __future__ import annotations

import torch
from torch import nn

from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.exports import STRIDE16_STAGE


def stride16(descriptor: Descriptor, x: torch.Tensor) -> torch.Tensor:
    """The backbone's map after ``STRIDE16_STAGE`` stages, for a (N, 3, H, W) batch in [0, 1];
    the rest of its blocks on this map give ``descriptor.features(x)``."""
    backbone = descriptor.backbone
    x = backbone.act1(backbone.bn1(backbone.conv_stem(descriptor.normalize(x))))
    for n in range(STRIDE16_STAGE):
        x = backbone.blocks[n](x)
    return x


def unit_cells(x: torch.Tensor) -> torch.Tensor:
    """A (N, C, H, W) map as (N, H, W, C) unit descriptors, in float32."""
    # NHWC is channels_last's own layout, so this permute copies nothing there.
    return nn.functional.normalize(x.float(), dim=1).permute(0, 2, 3, 1)


class LocalMaps(nn.Module):
    """Image batch (N, 3, H, W) in [0, 1] -> the local maps (N, H/16, W/16, C)."""

    def __init__(self, model: Descriptor) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_cells(stride16(self.model, x))
