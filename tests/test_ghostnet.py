"""Contracts of the GhostNet network over every width: layout, size, cost, invariances."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ghostmatch.model.ghostnet import (
    WIDTHS,
    GhostNet,
    infer_width,
    make_divisible,
    unwrap_state_dict,
)

# Parameter counts of the paper's 1.0x (5.2M) and of timm's ghostnet_050/100/130.
PARAMS = {0.5: 2_587_292, 1.0: 5_182_508, 1.3: 7_358_820}


@pytest.mark.parametrize("width", WIDTHS)
def test_parameter_count(width: float) -> None:
    model = GhostNet(width)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[width]
    assert len(model.state_dict()) == 512


def test_multiply_adds_at_224() -> None:
    model = GhostNet(1.0).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    # torch counts a multiply-add as two FLOPs; the paper's 141M are multiply-adds.
    assert counter.get_total_flops() == 2 * 141_150_512


def test_official_key_layout() -> None:
    keys = list(GhostNet(1.0).state_dict())
    assert keys[:2] == ["conv_stem.weight", "bn1.weight"]
    expected = {
        "blocks.0.0.ghost1.primary_conv.0.weight",
        "blocks.0.0.ghost1.primary_conv.1.running_var",
        "blocks.0.0.ghost1.cheap_operation.0.weight",
        "blocks.1.0.conv_dw.weight",
        "blocks.1.0.bn_dw.num_batches_tracked",
        "blocks.1.0.shortcut.0.weight",
        "blocks.1.0.shortcut.3.bias",
        "blocks.3.0.se.conv_reduce.weight",
        "blocks.3.0.se.conv_expand.bias",
        "blocks.6.4.ghost2.cheap_operation.1.weight",
        "blocks.9.0.conv.weight",
        "blocks.9.0.bn1.running_mean",
        "conv_head.weight",
        "conv_head.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert expected <= set(keys)
    assert not any(".act" in k for k in keys)
    assert "blocks.0.0.shortcut.0.weight" not in keys  # identity shortcut: in == out, stride 1


@pytest.mark.parametrize("width", WIDTHS)
def test_feature_shapes(width: float) -> None:
    model = GhostNet(width).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, make_divisible(960 * width), 7, 7)
    assert logits.shape == (2, 1000)


def test_batch_size_invariance_in_eval() -> None:
    torch.manual_seed(0)
    model = GhostNet(1.0).eval()
    x = torch.randn(5, 3, 128, 128)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_se_reduction_is_quarter_rounded_to_four() -> None:
    model = GhostNet(1.0)
    se = model.blocks[3][0].se
    assert se.conv_reduce.out_channels == make_divisible(72 * 0.25, 4) == 20


def test_unwrap_containers_and_prefixes() -> None:
    state = GhostNet(0.5).state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    unwrapped = unwrap_state_dict(wrapped)
    assert unwrapped.keys() == state.keys()
    assert infer_width(unwrapped) == 0.5
    GhostNet(0.5).load_state_dict(unwrap_state_dict({"model": state}), strict=True)


def test_timm_parity() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed (optional parity check)")
    torch.manual_seed(0)
    reference = timm.create_model("ghostnet_100", pretrained=False).eval()
    ours = GhostNet(1.0).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
