"""Shared fixtures; every test runs offline with its own cache directory.

Catalog tests run on both back ends (``catalog_url``): an SQLite file, and a database of
its own on a PostgreSQL server started once per session in a temporary folder.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import URL

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


def postgres_bindir() -> Path | None:
    """The folder of the PostgreSQL server's initdb and pg_ctl, or None where there is none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    # Debian puts the server beside, not on PATH; the newest first.
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@dataclass
class PostgresServer:
    """A PostgreSQL server of the test session, listening on a unix socket only."""

    socket_dir: Path
    counter: itertools.count[int]

    def url(self, database: str) -> URL:
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database=database,
            query={"host": str(self.socket_dir)},
        )

    def new_database(self) -> URL:
        """A fresh, empty database for one test: CREATE DATABASE copies a template, in
        well under a second."""
        import psycopg

        name = f"test_{next(self.counter)}"
        with psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """initdb and pg_ctl of the machine's PostgreSQL in a temporary folder, stopped at the
    end of the session whatever happens. The server refuses to run as root, so there it
    runs as the ``postgres`` user."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server here (initdb, pg_ctl); .ci/run installs one")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'ghostmatch[postgresql]'")
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="ghostmatch-pg-"))
    folder.chmod(0o755)
    if as_user:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, log = folder / "data", folder / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stderr}{done.stdout}{server_log}")

    started = False
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        run(*initdb, "--no-sync", "--encoding=UTF8", "--locale=C")
        # Throwaway data: no fsync. No TCP listener: the socket is in the folder, so several
        # sessions on one machine never clash over a port.
        options = f"-k {folder} -c listen_addresses='' -F -c full_page_writes=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        started = True
        yield PostgresServer(folder, itertools.count())
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                cwd=folder,
            )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """A new, empty catalog database: an SQLite file, or a database on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return URL.create("sqlite", database=os.fspath(tmp_path / "shared-catalog.db"))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()
