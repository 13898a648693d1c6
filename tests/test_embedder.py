"""Every runtime agrees with eager PyTorch; preprocessing follows the model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.card import ModelCard
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.embedder import Embedder, fuse_batchnorm, prepare, to_batch
from ghostmatch.model.exports import export_name


def _arrays(n: int, size: int = 224) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_folded_equals_unfolded(random_model: Descriptor) -> None:
    x = torch.rand(4, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(
            fuse_batchnorm(random_model)(x), random_model(x), atol=1e-5, rtol=1e-4
        )
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in fuse_batchnorm(random_model).modules()
    )


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_runtime_matches_eager(random_model: Descriptor, runtime: str) -> None:
    arrays = _arrays(5)
    eager = Embedder(random_model, runtime="eager").embed_arrays(arrays)
    fast = Embedder(random_model, runtime=runtime)
    assert fast.runtime == runtime
    out = fast.embed_arrays(arrays)
    assert out.shape == (5, 960) and out.dtype == np.float32
    assert np.min(np.sum(out * eager, axis=1)) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_batch_size_invariance(random_model: Descriptor) -> None:
    embedder = Embedder(random_model, runtime="onnx")
    arrays = _arrays(6)
    together = embedder.embed_arrays(arrays)
    alone = np.concatenate([embedder.embed_arrays([a]) for a in arrays])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("pooling,dim", [("gem", 960), ("avg", 960), ("head", 1280)])
def test_poolings(pooling: str, dim: int) -> None:
    card = ModelCard(weights="r", weights_sha256="0" * 64, pooling=pooling, dim=dim)
    out = Embedder(Descriptor(card).eval(), runtime="torch").embed_arrays(_arrays(2))
    assert out.shape == (2, dim)


def test_prepare_follows_card() -> None:
    image = Image.new("RGB", (400, 200), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 100, 200))  # red strip on the left quarter
    squash = ModelCard(weights="r", weights_sha256="0" * 64, resize="squash")
    crop = squash.with_changes(resize="center-crop", crop_fraction=0.875)
    assert prepare(image, squash).shape == (224, 224, 3)
    assert prepare(image, squash)[112, 5, 0] > 200  # the strip survives squashing
    assert prepare(image, crop)[112, 5, 0] < 50  # and is cut off by the centre crop


def test_bad_runtime_and_device_are_user_errors(random_model: Descriptor) -> None:
    with pytest.raises(GhostmatchError):
        Embedder(random_model, runtime="tensorrt")
    with pytest.raises(GhostmatchError):
        Embedder(random_model, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GhostmatchError, match="no CUDA"):
            Embedder(random_model, device="cuda")


@pytest.mark.parametrize("runtime", ["eager", "torch", "onnx"])
def test_regions_come_from_the_same_pass(random_model: Descriptor, runtime: str) -> None:
    from ghostmatch.model.regions import REGIONS, RegionalDescriptor

    arrays = _arrays(3)
    embedder = Embedder(random_model, runtime=runtime)
    whole, parts = embedder.embed_with_regions(arrays)
    np.testing.assert_allclose(whole, embedder.embed_arrays(arrays), atol=1e-5)
    assert parts.shape == (3, REGIONS, 960) and parts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(parts, axis=2), 1.0, atol=1e-5)
    with torch.no_grad():
        _, eager = RegionalDescriptor(random_model.eval())(torch.from_numpy(to_batch(arrays)))
    assert np.min(np.sum(parts * eager.numpy(), axis=2)) >= 0.9999


def test_region_windows_are_the_corners_and_the_centre() -> None:
    from ghostmatch.model.regions import windows

    assert windows(5, 5) == [(0, 3, 0, 3), (0, 3, 2, 5), (2, 5, 0, 3), (2, 5, 2, 5), (1, 4, 1, 4)]
    assert windows(1, 1) == [(0, 1, 0, 1)] * 5


def test_the_export_cuts_no_ghost_module(random_model: Descriptor) -> None:
    import onnx

    from ghostmatch.model.weights import cache_dir

    Embedder(random_model, runtime="onnx")
    path = cache_dir() / "onnx" / f"{export_name(random_model.card)}.onnx"
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    # GhostNet's channel counts are even: both halves of every Ghost module are kept whole,
    # with no Slice for ONNX Runtime to copy.
    assert "Concat" in ops and "Slice" not in ops


def test_a_ghost_module_of_odd_width_is_cut_to_it() -> None:
    from ghostmatch.model.ghostnet import GhostModule

    odd, even = GhostModule(8, 7).eval(), GhostModule(8, 6).eval()
    x = torch.rand(1, 8, 5, 5)
    assert odd(x).shape[1] == 7 and even(x).shape[1] == 6


def test_an_exported_model_runs_without_loading_and_as_the_loaded_one(
    random_model: Descriptor, tmp_path: Path
) -> None:
    from ghostmatch.dupes.verify import local_features
    from ghostmatch.model.exports import exported_model
    from ghostmatch.model.scorenorm import ScoreNorm
    from ghostmatch.model.weights import load_descriptor, save_descriptor

    background = np.random.default_rng(2).normal(size=(40, 960)).astype(np.float32)
    random_model.score_norm = ScoreNorm(background / np.linalg.norm(background, axis=1)[:, None])
    try:
        weights = tmp_path / "model.safetensors"
        save_descriptor(random_model, weights)
    finally:
        random_model.score_norm = None
    model = load_descriptor(str(weights))
    loads: list[int] = []

    def load() -> Descriptor:
        loads.append(1)
        return model

    card = model.card
    # Not before the descriptor's export is cached, nor for other bytes than the card's.
    assert exported_model(str(weights), card, load) is None
    loaded = Embedder(model, runtime="onnx")
    assert exported_model("random", card, load) is None
    other = card.with_changes(weights_sha256="f" * 64)
    assert exported_model(str(weights), other, load) is None
    exported = exported_model(str(weights), card, load)
    assert exported is not None
    embedder = Embedder(exported, device="cpu")
    assert embedder.exported and embedder.runtime == "onnx"
    arrays = _arrays(3)
    np.testing.assert_array_equal(embedder.embed_arrays(arrays), loaded.embed_arrays(arrays))
    assert embedder.score_norm is not None and loaded.score_norm is not None
    np.testing.assert_array_equal(embedder.score_norm.background, loaded.score_norm.background)
    assert (embedder.score_norm.rank, embedder.score_norm.beta) == (
        loaded.score_norm.rank,
        loaded.score_norm.beta,
    )
    # The local maps: exported on first use (the model loads for that), the same to the bit.
    batch = to_batch(_arrays(2, 160))
    maps = local_features(embedder.local_maps_model, batch)
    assert loads == [1]
    np.testing.assert_array_equal(maps, local_features(loaded.local_model, batch))
    again = Embedder(exported, device="cpu")
    np.testing.assert_array_equal(local_features(again.local_maps_model, batch), maps)
    assert loads == [1]
    with pytest.raises(GhostmatchError, match="ONNX Runtime on the CPU"):
        Embedder(exported, runtime="torch", device="cpu")
