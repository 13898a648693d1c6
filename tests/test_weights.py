"""Loading every checkpoint format, the model card, and the real download code offline."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ghostmatch.errors import GhostmatchError
from ghostmatch.model import download, weights
from ghostmatch.model.card import ModelCard
from ghostmatch.model.descriptor import Descriptor
from ghostmatch.model.ghostnet import GhostNet
from ghostmatch.model.weights import BUNDLED_PATH, IMAGENET, load_descriptor, save_descriptor


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
    # The package must ship it: the default weights and every measured figure are its.
    assert BUNDLED_PATH.is_file()
    model = load_descriptor("bundled")
    assert model.card.weights == "bundled"
    # The card says the p that GeM pools with (learnt in training: 3.19, not the initial 3).
    assert model.card.gem_p == model.pool.p.item() == pytest.approx(3.19, abs=0.01)
    with torch.no_grad():
        out = model(torch.rand(3, 3, model.card.input_size, model.card.input_size))
    assert out.shape == (3, model.card.dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_card_fingerprint_ignores_runtime_but_not_preprocessing() -> None:
    card = ModelCard(weights="a", weights_sha256="1" * 64)
    assert card.fingerprint == ModelCard.from_json(card.to_json()).fingerprint
    assert card.fingerprint != card.with_changes(input_size=256).fingerprint
    assert card.fingerprint != card.with_changes(weights_sha256="2" * 64).fingerprint


class _Hub:
    """A local HTTP server that answers the hub's resolve requests for one file, as
    huggingface.co does: HEAD with the commit and the file's git-lfs sha256, GET with Range.

    ``sent`` replaces the bytes a GET sends (not the announced ones); ``cut_after`` closes
    the first GET's connection after that many body bytes;
    ``requests`` records (method, path, Range header) of every request.
    """

    def __init__(self, repo_id: str, revision: str, filename: str, payload: bytes) -> None:
        hub = self
        self.payload = payload
        self.sent: bytes | None = None  # other bytes to send than the announced payload
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        resolve = f"/{repo_id}/resolve/{revision}/{filename}"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _head(self) -> int | None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                if self.path != resolve:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    size = len(hub.payload)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", revision)
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(hub.payload).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(hub.payload)))
                self.send_header("Content-Length", str(len(hub.payload) - start))
                self.end_headers()
                return start

            def do_HEAD(self) -> None:
                self._head()

            def do_GET(self) -> None:
                start = self._head()
                if start is None:
                    return
                body = (hub.sent or hub.payload)[start:]
                if hub.cut_after is not None:
                    body, hub.cut_after = body[: hub.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self) -> list[str | None]:
        """The Range header of each GET."""
        return [rng for method, _, rng in self.requests if method == "GET"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _checkpoint_bytes(tmp_path: Path) -> tuple[bytes, torch.Tensor]:
    from safetensors.torch import save_file

    state = _ghostnet_state(seed=5)
    path = tmp_path / "made.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes(), state["conv_stem.weight"]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Hub, torch.Tensor]]:
    """The ImageNet file's repo and pinned revision served locally through ``HF_ENDPOINT``,
    with a made checkpoint whose sha256 is pinned in its place."""
    payload, first_conv = _checkpoint_bytes(tmp_path)
    pinned = IMAGENET.file
    server = _Hub(pinned.repo_id, pinned.revision, pinned.filename, payload)
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(weights, "IMAGENET", replace(IMAGENET, file=replace(pinned, sha256=digest)))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server, first_conv
    server.close()


def test_imagenet_pins_a_commit_and_a_sha256() -> None:
    # A branch name would let the file change under the same name; the sha256 checks it.
    assert re.fullmatch(r"[0-9a-f]{40}", IMAGENET.file.revision)
    assert re.fullmatch(r"[0-9a-f]{64}", IMAGENET.file.sha256)


def test_imagenet_downloads_the_pinned_revision_once(
    hub: tuple[_Hub, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, first_conv = hub
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    model = load_descriptor("imagenet")
    assert model.card.weights == "imagenet"
    assert torch.equal(_first_conv(model), first_conv)
    pinned = IMAGENET.file
    resolve = f"/{pinned.repo_id}/resolve/{pinned.revision}/{pinned.filename}"
    assert {path for _, path, _ in server.requests} == {resolve}
    assert server.gets() == [None]
    # Cached: loads again without a request, and with GHOSTMATCH_OFFLINE too.
    server.close()
    assert torch.equal(_first_conv(load_descriptor("imagenet")), first_conv)
    monkeypatch.setenv("GHOSTMATCH_OFFLINE", "1")
    assert torch.equal(_first_conv(load_descriptor("imagenet")), first_conv)
    assert len(server.requests) == 3  # HEAD (ours), HEAD and GET (the hub client's)


def test_download_resumes_after_a_dropped_connection(
    hub: tuple[_Hub, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, first_conv = hub
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    cut = len(server.payload) - 1000
    server.cut_after = cut
    model = load_descriptor("imagenet")
    assert torch.equal(_first_conv(model), first_conv)
    # The second GET asks only for (a whole number of the client's chunks short of) what the
    # first delivered, not for the whole file again.
    first, second = server.gets()
    assert first is None and second is not None
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut


def test_a_file_announced_with_another_sha256_is_not_downloaded(
    hub: tuple[_Hub, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = hub
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    # A mirror with other bytes than the pinned ones, announcing their own hash.
    server.payload = server.payload[:-1] + bytes([server.payload[-1] ^ 1])
    with pytest.raises(GhostmatchError, match="not the pinned"):
        load_descriptor("imagenet")
    assert server.gets() == []


def test_a_download_with_another_sha256_is_refused_and_dropped(
    hub: tuple[_Hub, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = hub
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    # A mirror that announces the pinned hash but sends other bytes.
    server.sent = server.payload[:-1] + bytes([server.payload[-1] ^ 1])
    with pytest.raises(GhostmatchError, match="corrupt"):
        load_descriptor("imagenet")
    # Nothing of it stays in the cache, so the next run downloads again.
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() or p.is_symlink()]
    assert not [p for p in cached if "blobs" in p.parts or "snapshots" in p.parts]
    with pytest.raises(GhostmatchError, match="corrupt"):
        load_descriptor("imagenet")
    assert len(server.gets()) == 2


def test_offline_uses_the_cache_and_never_the_network(hub: tuple[_Hub, torch.Tensor]) -> None:
    server, _ = hub
    # GHOSTMATCH_OFFLINE is set (conftest) and the hub would answer: it must not be asked.
    with pytest.raises(GhostmatchError, match=r"GHOSTMATCH_OFFLINE.*pass its path as weights"):
        load_descriptor("imagenet")
    assert server.requests == []


def test_unreachable_host_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # A host that takes the connection and never answers, as a dead proxy does: the request
    # must give up after the timeout instead of waiting (or retrying) for minutes.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.delenv("GHOSTMATCH_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(download, "CONNECT_TIMEOUT_S", 0.5)
    with listener:
        with pytest.raises(GhostmatchError, match="offline or the hub does not answer") as info:
            load_descriptor("imagenet")
        # The kernel queued the connection and its request; nothing ever read or answered it.
        listener.settimeout(30)  # only a guard against hanging if no request came
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(4096).startswith(b"HEAD /timm/ghostnet_100.in1k/resolve/")
    causes = []
    err: BaseException | None = info.value
    while err is not None:
        causes.append(type(err).__name__)
        err = err.__cause__ or err.__context__
    assert any("Timeout" in name for name in causes), causes
