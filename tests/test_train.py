"""Training: the loss goes down, resume equals an uninterrupted run, supervised mode learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghostmatch.errors import GhostmatchError
from ghostmatch.model.weights import load_descriptor, save_descriptor
from ghostmatch.train.training import TrainConfig, add_background, info_nce, koleo_loss, train

TINY = {"width": 0.5, "image_size": 64, "cache_side": 72, "dim": 32, "batch_size": 8}


def _folder(root: Path, classes: int = 2, per_class: int = 12, seed: int = 0) -> Path:
    """Class folders of generated photos: each class a colour family with its own texture."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (80, 96, 3)), 0, 255).astype(np.uint8)
            if c % 2:
                pixels[::8] = 255 - pixels[::8]  # stripes for odd classes
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_descriptor(path).state_dict()


def test_losses_are_sane() -> None:
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert info_nce(a, a, 0.05) < info_nce(a, a.roll(1, 0), 0.05)
    spread = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    clumped = torch.nn.functional.normalize(spread * 0.01 + torch.ones(16), dim=1)
    assert koleo_loss(spread) < koleo_loss(clumped)


def test_ssl_loss_goes_down(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=8)
    # The contrastive loss alone: the KoLeo term over batches of 8 swings more than four
    # tiny epochs learn (on an AVX-512 machine the total went from 3.87 to 3.88, with it),
    # while the contrastive loss fell by 6-17% on each of three photo seeds there.
    # test_losses_are_sane checks the KoLeo term itself.
    config = TrainConfig(epochs=4, lr=3e-3, koleo=0.0, **TINY)
    history = train(data, tmp_path / "m.safetensors", config)
    assert len(history) == 4
    assert history[-1].loss < history[0].loss
    model = load_descriptor(tmp_path / "m.safetensors")
    assert model.card.dim == 32 and model.card.projection == "linear"
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-3, rtol=0)
    # The finished model carries a score background of its training photos (all 16 here),
    # and add_background rebuilds the same one for a model trained without.
    assert model.score_norm is not None and model.score_norm.background.shape == (16, 32)
    model.score_norm = None
    save_descriptor(model, tmp_path / "plain.safetensors", half=True)
    add_background(
        tmp_path / "plain.safetensors", data, tmp_path / "again.safetensors", config=config
    )
    again = load_descriptor(tmp_path / "again.safetensors").score_norm
    first = load_descriptor(tmp_path / "m.safetensors").score_norm
    assert again is not None and first is not None
    np.testing.assert_allclose(again.background, first.background, atol=2e-3)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=8)
    config = TrainConfig(epochs=2, **TINY)
    whole = tmp_path / "whole.safetensors"
    train(data, whole, config)
    parts = tmp_path / "parts.safetensors"
    train(data, parts, config, stop_after_steps=3)  # an interrupt mid-epoch 2 of 2 steps each
    assert parts.with_name(parts.name + ".ckpt").exists()
    train(data, parts, config, resume=True)
    a, b = _state(whole), _state(parts)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    norm_a, norm_b = load_descriptor(whole).score_norm, load_descriptor(parts).score_norm
    assert norm_a is not None and norm_b is not None
    np.testing.assert_array_equal(norm_a.background, norm_b.background)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "m.safetensors"
    train(data, out, TrainConfig(epochs=1, **TINY), stop_after_steps=1)
    with pytest.raises(GhostmatchError, match="other settings"):
        train(data, out, TrainConfig(epochs=3, **TINY), resume=True)


def test_supervised_beats_chance(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=3, per_class=16, seed=1)
    config = TrainConfig(mode="supervised", epochs=3, lr=3e-3, **TINY)
    history = train(data, tmp_path / "s.safetensors", config)
    assert history[-1].knn_top1 is not None
    assert history[-1].knn_top1 > 1 / 3 + 0.15


def test_supervised_needs_classes(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=1, per_class=8)
    with pytest.raises(GhostmatchError, match="two class folders"):
        train(data, tmp_path / "s.safetensors", TrainConfig(mode="supervised", **TINY))


def test_train_command_writes_a_model_with_its_background(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = _folder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "cli [red].safetensors"  # printed as it is, not read as markup
    base = [sys.executable, "-m", "ghostmatch.cli.app", "train", str(data), "--out", str(out)]
    tiny = ["--width", "0.5", "--image-size", "64", "--dim", "32", "--batch-size", "8"]
    done = subprocess.run(
        [*base, *tiny, "--epochs", "1", "--threads", "1", "--grey", "0.5", "--background", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}\n" in done.stdout
    norm = load_descriptor(out).score_norm
    assert norm is not None and norm.background.shape == (5, 32)
    bad = subprocess.run([*base, "--grey", "1.5"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--grey" in bad.stderr


def test_a_run_from_trained_weights_keeps_none_of_their_measurements(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=8)
    first = tmp_path / "first.safetensors"
    train(data, first, TrainConfig(epochs=1, **TINY))
    model = load_descriptor(first)
    assert model.score_norm is not None
    model.card = model.card.with_changes(extra={**model.card.extra, "dupe_threshold": 0.5})
    save_descriptor(model, first)
    second = tmp_path / "second.safetensors"
    # Stopped in epoch 2 of 3: the file written after epoch 1 has no background yet.
    train(data, second, TrainConfig(init=str(first), epochs=3, **TINY), stop_after_steps=3)
    partial = load_descriptor(second)
    assert partial.score_norm is None and partial.card.extra == {}


@pytest.mark.parametrize("pooling", ["avg", "head"])
def test_other_poolings_train_and_load(tmp_path: Path, pooling: str) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=4)
    out = tmp_path / f"{pooling}.safetensors"
    train(data, out, TrainConfig(epochs=1, pooling=pooling, background=0, **TINY))
    model = load_descriptor(out)
    assert model.card.pooling == pooling
    # The head is 1280-d at every width (as in the official and timm models).
    assert model.projection.in_features == (1280 if pooling == "head" else 480)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 32)
    with pytest.raises(GhostmatchError, match="pooling must be one of"):
        train(data, out, TrainConfig(pooling="max", **TINY))


def test_neighbour_batches_group_look_alikes() -> None:
    from ghostmatch.train.training import neighbour_batches

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    cluster = np.repeat(np.arange(8), 6)  # 8 clusters of 6 photos
    vectors = torch.from_numpy(centres[cluster] + rng.normal(scale=0.05, size=(48, 16)))
    order = list(rng.permutation(48) + 100)  # image indices, not rows
    batches = neighbour_batches(vectors, order, group=6, batch_size=12, steps=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100, 148))  # every image once
    cluster_of = {image: cluster[row] for row, image in enumerate(order)}  # rows follow order
    for batch in batches:  # two whole clusters per batch
        counts = np.bincount([cluster_of[i] for i in batch], minlength=8)
        assert sorted(counts) == [0] * 6 + [6, 6]


def test_resume_equals_uninterrupted_with_neighbour_groups(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", classes=2, per_class=8)
    config = TrainConfig(epochs=2, neighbour_groups=4, background=0, **TINY)
    whole = tmp_path / "whole.safetensors"
    train(data, whole, config)
    parts = tmp_path / "parts.safetensors"
    train(data, parts, config, stop_after_steps=3)  # mid-epoch 2: its batches come from the ckpt
    train(data, parts, config, resume=True)
    a, b = _state(whole), _state(parts)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
