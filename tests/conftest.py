"""Shared fixtures; every test runs offline with its own cache directory.

Catalog tests run on both back ends (``catalog_url``): an SQLite file, and a database of
its own on a PostgreSQL server started once per session in a temporary folder.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL

# pytest puts tests/ on sys.path, not the checkout root that holds benchmarks/, whose
# throwaway PostgreSQL server the catalog benchmark shares with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.postgres import (
    TemporaryServer,
    temporary_server,
    unavailable_reason,
)

# A suite started in the background by a shell without job control (``cmd &``, nohup)
# inherits Ctrl-C ignored, and so would every CLI run it starts: the tests that interrupt
# a run would wait on one that cannot be interrupted. Python's own Ctrl-C handler here
# lets those runs start with the default again (a handler does not survive exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch the network, and none reads the user's real cache."""
    monkeypatch.setenv("GHOSTMATCH_OFFLINE", "1")
    monkeypatch.setenv("GHOSTMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GHOSTMATCH_WEIGHTS", raising=False)
    monkeypatch.delenv("GHOSTMATCH_INDEX", raising=False)
    monkeypatch.delenv("GHOSTMATCH_CATALOG", raising=False)


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


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TemporaryServer]:
    """A PostgreSQL server for the session (the machine's initdb and pg_ctl, in a temporary
    folder), stopped at its end whatever happens; skipped where there is none."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with temporary_server() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """A new, empty catalog database: an SQLite file, or a database on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return URL.create("sqlite", database=os.fspath(tmp_path / "shared-catalog.db"))
    server: TemporaryServer = request.getfixturevalue("postgres_server")
    return server.new_database()
