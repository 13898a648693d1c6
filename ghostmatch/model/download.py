"""Fetching model files from the Hugging Face hub once: a pinned revision, checked by sha256,
resumed after a dropped connection, quick to give up offline."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ghostmatch.errors import GhostmatchError

CHUNK = 1 << 20
# Offline machines must hear "no" quickly: the hub client gives up on its first request after
# this many seconds, so the whole failure stays under the promised 10 s.
CONNECT_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository at a fixed commit.

    ``revision`` is a full commit hash, so the file cannot change under it; ``sha256`` is
    the file's git-lfs object id at that commit, checked after every download.
    """

    repo_id: str
    filename: str
    revision: str
    sha256: str


def offline() -> bool:
    """True when the user asked for no network (``GHOSTMATCH_OFFLINE=1``)."""
    return os.environ.get("GHOSTMATCH_OFFLINE", "").strip().lower() in {"1", "true", "yes"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` (a mirror of the hub), read on each call: huggingface_hub itself reads
    it once, at import, so a later change would otherwise be ignored."""
    return os.environ.get("HF_ENDPOINT") or None


def fetch(file: HubFile, cache: Path) -> Path:
    """The path of ``file`` in the hub cache under ``cache``, downloading it the first time.

    With ``GHOSTMATCH_OFFLINE`` set only the cache is looked at. A cached or downloaded file
    whose sha256 is not the pinned one is deleted and refused.
    """
    # Without this the hub client first looks up a registry on huggingface.co for its
    # telemetry (up to 3 s more without network, past the 10 s promise); the client reads
    # the setting once, when first imported. ghostmatch sends no telemetry.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{file.repo_id}/{file.filename} at {file.revision[:12]}"
    try:
        path = Path(
            hf_hub_download(
                file.repo_id,
                file.filename,
                revision=file.revision,
                cache_dir=cache,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:
        if offline():
            raise GhostmatchError(
                f"cannot download {where}: GHOSTMATCH_OFFLINE is set; {_ADVICE}"
            ) from None
        path = _download(file, cache, where)
    actual = sha256_of(path)
    if actual != file.sha256:
        # The cache holds a symlink to a blob: both must go, or the next run would find
        # the bad blob again without downloading.
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise GhostmatchError(
            f"download of {where} is corrupt (sha256 {actual[:12]}..., expected "
            f"{file.sha256[:12]}...); run the command again"
        )
    return path


_ADVICE = (
    "download it on a machine with network and pass its path as weights, or use the bundled weights"
)


def _download(file: HubFile, cache: Path, where: str) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = hub_endpoint()
    url = hf_hub_url(file.repo_id, file.filename, revision=file.revision, endpoint=endpoint)
    # One request, not retried, under our own timeout: when it fails the client would ask
    # again with a 60 s timeout and back-offs, minutes on a host that never answers.
    # Whatever the client raises (no route, timeout, HTTP error) means the same: no file.
    try:
        announced = get_hf_file_metadata(url, timeout=CONNECT_TIMEOUT_S, endpoint=endpoint).etag
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise GhostmatchError(
            f"cannot download {where} ({reason}); this machine seems offline or the hub "
            f"does not answer; {_ADVICE}"
        ) from err
    if announced != file.sha256:
        raise GhostmatchError(
            f"the hub announces sha256 {str(announced)[:12]}... for {where}, not the pinned "
            f"{file.sha256[:12]}...; check HF_ENDPOINT (a mirror must serve the same file)"
        )
    try:
        return Path(
            hf_hub_download(
                file.repo_id,
                file.filename,
                revision=file.revision,
                cache_dir=cache,
                etag_timeout=CONNECT_TIMEOUT_S,
                endpoint=endpoint,
            )
        )
    except Exception as err:  # a transfer cut short after the client's retries, a full disk
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise GhostmatchError(
            f"download of {where} stopped ({reason}); run the command again"
        ) from err
