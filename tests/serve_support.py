"""A real ``ghostmatch serve`` app on uvicorn in a thread, over a real index of photos, for
the API and browser tests."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from skimage import data

XSS_NAME = "<img src=x onerror=alert(1)>.jpg"


def jpeg(name: str, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    if size is not None:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_gallery(folder: Path) -> dict[str, Path]:
    """Photos with two exact-copy groups: astronaut (and a copy), coffee (and a copy whose
    name is an HTML tag); chelsea, rocket and camera stand alone."""
    folder.mkdir(parents=True)
    (folder / "copies").mkdir()
    files = {
        "astronaut": folder / "astronaut.jpg",
        "astronaut-copy": folder / "copies" / "astronaut-copy.jpg",
        "coffee": folder / "coffee.jpg",
        "coffee-copy": folder / "copies" / XSS_NAME,
        "chelsea": folder / "chelsea.jpg",
        "rocket": folder / "rocket.jpg",
    }
    astronaut, coffee = jpeg("astronaut"), jpeg("coffee")
    files["astronaut"].write_bytes(astronaut)
    files["astronaut-copy"].write_bytes(astronaut)
    files["coffee"].write_bytes(coffee)
    files["coffee-copy"].write_bytes(coffee)
    files["chelsea"].write_bytes(jpeg("chelsea"))
    files["rocket"].write_bytes(jpeg("rocket"))
    # The originals are older, so they are kept (same pixels and size: then the oldest).
    for name in ("astronaut", "coffee"):
        os.utime(files[name], ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    Image.fromarray(data.camera()).save(folder / "camera.png")
    files["camera"] = folder / "camera.png"
    return files


@dataclass
class Indexed:
    root: Path
    gallery: Path
    index: Path
    files: dict[str, Path]


@contextmanager
def model_env(model_cache: Path) -> Iterator[None]:
    """Offline, with the session's model cache (the ONNX export is made once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GHOSTMATCH_OFFLINE", "1")
        patch.setenv("GHOSTMATCH_CACHE", str(model_cache))
        patch.delenv("GHOSTMATCH_WEIGHTS", raising=False)
        yield


def build_index(root: Path) -> Indexed:
    """The gallery indexed with the bundled model (its measured duplicate rule)."""
    import ghostmatch

    files = make_gallery(root / "photos")
    index = root / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        report = lib.index([root / "photos"])
    assert report.added == len(files), report.to_dict()
    return Indexed(root, root / "photos", index, files)


def copy_index(source: Indexed, root: Path) -> Indexed:
    """A copy of gallery and index (file times kept), for tests that change either."""
    import ghostmatch

    shutil.copytree(source.gallery, root / "photos", symlinks=True)
    index = root / "index"
    with ghostmatch.open(index, weights="bundled") as lib:
        lib.index([root / "photos"])
    files = {k: root / "photos" / v.relative_to(source.gallery) for k, v in source.files.items()}
    return Indexed(root, root / "photos", index, files)


class Server:
    """``create_app`` on uvicorn in a thread, on a free loopback port."""

    def __init__(self, index: Path, **settings: Any) -> None:
        from ghostmatch.serve.app import create_app
        from ghostmatch.serve.engine import QueryEngine, ServeSettings

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.settings = ServeSettings(index=index, port=self.port, **settings)
        self.engine = QueryEngine(self.settings)
        config = uvicorn.Config(
            create_app(self.settings, self.engine), log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.thread.start()
        headers = {}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/health", headers=headers).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not come up")
            time.sleep(0.05)

    def client(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 120, **options})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
        self.sock.close()


@contextmanager
def serving(index: Path, **settings: Any) -> Iterator[Server]:
    server = Server(index, **settings).start()
    try:
        yield server
    finally:
        server.stop()
