"""Regional descriptors: the descriptor of a few sub-windows of an image, made from the same
forward pass as its global descriptor, so that a heavy crop can be matched to the part of
its source it shows."""

from __future__ import annotations

import torch
from torch import nn

from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.localmaps import STRIDE16_STAGE, stride16, unit_cells

# Each window keeps this share of each side of the last feature map (at least one cell): a
# copy cropped to 60% of each side shows about one such window of its source. With the
# bundled model's 5 x 5 map, 3 x 3 cells.
REGION_FRACTION = 0.6
# The centre and the four corners. More windows (a 3 x 3 grid of them) found hardly more
# crops of the benchmarks.othershots tuning photos, for nearly twice the storage.
REGIONS = 5


def windows(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The ``REGIONS`` windows (top, bottom, left, right, in cells) of a feature map of
    ``height`` x ``width`` cells: the four corners, then the centre."""
    h = max(1, round(height * REGION_FRACTION))
    w = max(1, round(width * REGION_FRACTION))
    tops, lefts = (0, height - h), (0, width - w)
    corners = [(top, top + h, left, left + w) for top in tops for left in lefts]
    top, left = (height - h) // 2, (width - w) // 2
    return [*corners, (top, top + h, left, left + w)]


class RegionalDescriptor(nn.Module):
    """Image batch (N, 3, H, W) in [0, 1] -> (unit global descriptors (N, dim), unit
    regional descriptors (N, REGIONS, dim)), each window through the descriptor's own
    pooling, projection and L2 normalisation: one backbone pass for both. With ``maps``,
    also the local maps (N, H/16, W/16, C) of ``ghostmatch.model.localmaps``, which that
    pass goes through on its way."""

    def __init__(self, descriptor: Descriptor, maps: bool = False) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.maps = maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.descriptor
        middle = stride16(d, x)
        features = middle
        blocks = d.backbone.blocks
        for n in range(STRIDE16_STAGE, len(blocks)):
            features = blocks[n](features)
        # Plain ints: the input size is fixed by the model card, so an ONNX export may
        # hold the windows as constants.
        height, width = int(features.shape[2]), int(features.shape[3])
        whole: torch.Tensor = d.l2norm(d.projection(d.pool(features)))
        parts = [
            d.l2norm(d.projection(d.pool(features[:, :, top:bottom, left:right])))
            for top, bottom, left, right in windows(height, width)
        ]
        if self.maps:
            return whole, torch.stack(parts, 1), unit_cells(middle)
        return whole, torch.stack(parts, 1)
