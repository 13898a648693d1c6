"""Loading every checkpoint format, the model card, and the real download code offline."""

from __future__ import annotations

import hashlib
import http.server
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ghostmatch.descriptor import Descriptor
from ghostmatch.download import download
from ghostmatch.errors import GhostmatchError
from ghostmatch.ghostnet import GhostNet
from ghostmatch.modelcard import ModelCard
from ghostmatch.weights import BUNDLED_PATH, load_descriptor, save_descriptor


def _ghostnet_state(width: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return GhostNet(width).state_dict()


def _first_conv(model: Descriptor) -> torch.Tensor:
    return model.backbone.conv_stem.weight.detach()


@pytest.mark.parametrize("container", ["plain", "state_dict", "model", "module-prefix"])
def test_official_pth_layouts_load(tmp_path: Path, container: str) -> None:
    state = _ghostnet_state()
    obj: object = state
    if container == "state_dict":
        obj = {"state_dict": state, "epoch": 10}
    elif container == "model":
        obj = {"model": state}
    elif container == "module-prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ghostnet.pth"
    torch.save(obj, path)
    model = load_descriptor(path)
    assert torch.equal(_first_conv(model), state["conv_stem.weight"])
    assert model.card.weights == "ghostnet.pth"
    assert model.card.resize == "center-crop" and model.card.dim == 960


def test_timm_safetensors_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _ghostnet_state(1.3, seed=2)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = load_descriptor(path)
    assert model.card.width == 1.3
    assert model.card.dim == 1248
    assert torch.equal(_first_conv(model), state["conv_stem.weight"])


def test_ghostmatch_file_round_trip_keeps_card(tmp_path: Path) -> None:
    card = ModelCard(weights="x", weights_sha256="0" * 64, projection="linear", dim=128)
    model = Descriptor(card).eval()
    path = tmp_path / "mine.safetensors"
    # A crashed save's owner-only temp file is not reused with its mode.
    stale = tmp_path / "mine.safetensors.tmp"
    stale.write_bytes(b"half a model")
    stale.chmod(0o600)
    digest = save_descriptor(model, path, half=True)
    loaded = load_descriptor(path)
    assert loaded.card.dim == 128 and loaded.card.projection == "linear"
    assert loaded.card.weights_sha256 == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        cos = (model(x) * loaded(x)).sum(1)
    assert cos.min() > 0.999  # fp16 storage
    # The file has the mode any new file gets here, not safetensors' owner-only one.
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert not (tmp_path / "mine.safetensors.tmp").exists()


def test_wrong_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(GhostmatchError, match="does not exist"):
        load_descriptor(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(GhostmatchError, match="not a readable"):
        load_descriptor(junk)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(GhostmatchError, match="not a GhostNet"):
        load_descriptor(other)


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        model = load_descriptor("random")
    assert model.card.weights == "random"


def test_bundled_model_loads_with_unit_norm() -> None:
    if not BUNDLED_PATH.exists():
        pytest.skip("no bundled model in this build yet (issue: training)")
    model = load_descriptor("bundled")
    assert model.card.weights == "bundled"
    with torch.no_grad():
        out = model(torch.rand(3, 3, model.card.input_size, model.card.input_size))
    assert out.shape == (3, model.card.dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_card_fingerprint_ignores_runtime_but_not_preprocessing() -> None:
    card = ModelCard(weights="a", weights_sha256="1" * 64)
    assert card.fingerprint == ModelCard.from_json(card.to_json()).fingerprint
    assert card.fingerprint != card.with_changes(input_size=256).fingerprint
    assert card.fingerprint != card.with_changes(weights_sha256="2" * 64).fingerprint


class _Server:
    """A local HTTP server over a folder that honours Range requests (as the hub does)."""

    def __init__(self, root: Path, fail_after: int | None = None) -> None:
        parent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if "Range" in self.headers:
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                limit = parent.fail_after
                if limit is not None:
                    parent.fail_after = None
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

        self.fail_after = fail_after
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_Server, Path, bytes]]:
    root = tmp_path / "srv"
    root.mkdir()
    payload = bytes(range(256)) * 20_000
    (root / "w.bin").write_bytes(payload)
    server = _Server(root)
    yield server, root, payload
    server.close()


def test_download_verifies_and_caches(
    served: tuple[_Server, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    server, _, payload = served
    seen: list[int] = []
    dest = tmp_path / "cache" / "w.bin"
    digest = hashlib.sha256(payload).hexdigest()
    download(f"{server.url}/w.bin", dest, digest, progress=lambda done, total: seen.append(done))
    assert dest.read_bytes() == payload and seen[-1] == len(payload)
    server.close()  # cached: no request needed any more
    assert download(f"{server.url}/w.bin", dest, digest) == dest


def test_download_resumes_after_interruption(
    served: tuple[_Server, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    server, _, payload = served
    server.fail_after = 100_000
    dest = tmp_path / "w.bin"
    with pytest.raises(GhostmatchError):
        download(f"{server.url}/w.bin", dest)
    part = dest.with_name("w.bin.part")
    assert 0 < part.stat().st_size < len(payload)
    download(f"{server.url}/w.bin", dest)  # hash comes from the server's X-Linked-Etag
    assert dest.read_bytes() == payload and not part.exists()


def test_download_rejects_wrong_hash(
    served: tuple[_Server, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    server, _, _ = served
    dest = tmp_path / "w.bin"
    with pytest.raises(GhostmatchError, match="corrupt"):
        download(f"{server.url}/w.bin", dest, "0" * 64)
    assert not dest.exists()


def test_imagenet_through_local_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    root = tmp_path / "hub"
    root.mkdir()
    state = _ghostnet_state(seed=5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    server = _Server(root)
    try:
        monkeypatch.delenv("GHOSTMATCH_OFFLINE")
        monkeypatch.setenv("GHOSTMATCH_IMAGENET_URL", f"{server.url}/model.safetensors")
        model = load_descriptor("imagenet")
    finally:
        server.close()
    assert model.card.weights == "imagenet"
    assert torch.equal(_first_conv(model), state["conv_stem.weight"])


def test_offline_fails_fast_with_advice() -> None:
    start = time.monotonic()
    with pytest.raises(GhostmatchError, match="--weights PATH"):
        load_descriptor("imagenet")
    assert time.monotonic() - start < 10


def test_unreachable_host_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    # A closed local port: connection refused, as on a machine without network.
    monkeypatch.setenv("GHOSTMATCH_IMAGENET_URL", "http://127.0.0.1:9/model.safetensors")
    with pytest.raises(GhostmatchError, match="offline"):
        load_descriptor("imagenet")
