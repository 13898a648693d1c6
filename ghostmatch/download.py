"""Downloading model files once: resumable, checked by sha256, quick to give up offline."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ghostmatch.errors import GhostmatchError

CHUNK = 1 << 20
# Offline machines must hear "no" quickly: each connection attempt and each read gives up
# after this many seconds, so the whole failure stays under the promised 10 s.
CONNECT_TIMEOUT_S = 8.0

Progress = Callable[[int, int | None], None]


def offline() -> bool:
    """True when the user asked for no network (``GHOSTMATCH_OFFLINE=1``)."""
    return os.environ.get("GHOSTMATCH_OFFLINE", "").strip().lower() in {"1", "true", "yes"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _announced_sha256(headers: object) -> str | None:
    """The Hugging Face hub announces the LFS sha256 of a file in ``X-Linked-Etag``."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    value = get("X-Linked-Etag") or ""
    value = value.strip().strip('"').removeprefix("W/").strip('"')
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    progress: Progress | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> Path:
    """Fetch ``url`` into ``dest`` unless a verified copy is already there.

    A partial ``dest.part`` left by an interrupted run is resumed with an HTTP Range request.
    The file is checked against ``sha256`` (or, when none is pinned, against the hash the
    server announces) before it is moved into place, so ``dest`` is never a bad file.
    """
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    if offline():
        raise GhostmatchError(
            f"cannot download {url}: GHOSTMATCH_OFFLINE is set. Download the file on a "
            f"machine with network and pass it with --weights PATH, or put it at {dest}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ghostmatch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            part.unlink()
            return download(url, dest, sha256, progress, timeout)
        raise GhostmatchError(f"cannot download {url}: HTTP {err.code}") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise GhostmatchError(
            f"cannot download {url} ({reason}); this machine seems offline. Download the "
            f"file elsewhere and pass it with --weights PATH, or put it at {dest}"
        ) from err
    with response:
        expected = sha256 or _announced_sha256(response.headers)
        if response.status != 206:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        try:
            with open(part, "ab" if have else "wb") as out:
                done = have
                while block := response.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            if total is not None and done < total:
                raise OSError(f"connection closed after {done} of {total} bytes")
        except (OSError, TimeoutError, http.client.HTTPException) as err:
            raise GhostmatchError(
                f"download of {url} stopped ({err}); run the command again to resume"
            ) from err
    actual = sha256_of(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise GhostmatchError(
            f"download of {url} is corrupt (sha256 {actual[:12]}..., expected "
            f"{expected[:12]}...); run the command again"
        )
    os.replace(part, dest)
    return dest
