"""Shared fixtures; every test runs offline with its own cache directory."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch the network, and none reads the user's real cache."""
    monkeypatch.setenv("GHOSTMATCH_OFFLINE", "1")
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GHOSTMATCH_WEIGHTS", raising=False)
    monkeypatch.delenv("GHOSTMATCH_INDEX", raising=False)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GHOSTMATCH_CACHE for the session, so the random model is exported to ONNX once."""
    return tmp_path_factory.getbasetemp() / "model-cache"


@pytest.fixture
def shared_model_cache(_offline: None, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    """Use the session's model cache instead of the per-test one."""
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(model_cache))


@pytest.fixture(scope="session")
def random_model():  # type: ignore[no-untyped-def]
    """A seeded random-weight descriptor with non-trivial BatchNorm statistics."""
    import torch

    from ghostmatch.model.weights import load_descriptor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_descriptor("random")
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder of real photos from scikit-image, saved as JPEG and PNG."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field"]
    for name in names:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(
            folder / f"{name}.jpg", quality=92
        )
    Image.fromarray(data.camera()).save(folder / "camera.png")
    yield folder


def shared_caltech() -> Path | None:
    """The caltech101 folder of ../shared/data, when this checkout sits beside it."""
    path = SHARED_DATA / "caltech101"
    return path if (path / "test.txt").exists() else None


os.environ.setdefault("PYTHONHASHSEED", "0")
