"""``ghostmatch serve``: the query engine over HTTP, and a web page to search and review
duplicates."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ghostmatch.cli.output import CatalogOpt
from ghostmatch.errors import GhostmatchError
from ghostmatch.pathtext import path_text

err = Console(stderr=True, soft_wrap=True)

# Short tokens can be guessed by anyone who can reach the port.
MIN_TOKEN_LENGTH = 16


def serve(
    index: Annotated[Path | None, typer.Option("--index", help="Index folder.")] = None,
    catalog: CatalogOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (others need --token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="GHOSTMATCH_TOKEN",
            help="Every request must send Authorization: Bearer TOKEN "
            "(required to listen beyond this machine).",
        ),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001)] = 50.0,
    max_megapixels: Annotated[float, typer.Option("--max-megapixels", min=0.01)] = 100.0,
    move_to: Annotated[
        Path | None,
        typer.Option("--move-to", help="Folder the page and API may move copies into."),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Uploads embedded together at most.")
    ] = 16,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0.0, help="How long an upload waits for others."),
    ] = 5.0,
    queue: Annotated[
        int, typer.Option("--queue", min=1, help="Requests in progress before 503.")
    ] = 64,
    runtime: Annotated[str, typer.Option("--runtime", help="auto, torch, onnx or eager.")] = (
        "auto"
    ),
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Serve top-k matches and duplicate review over HTTP (API at /api/v1, page at /)."""
    from ghostmatch.library import default_index_path
    from ghostmatch.serve.app import is_loopback

    if not is_loopback(host) and not token:
        raise GhostmatchError(
            f"--host {host} lets other machines reach your photos: add --token SECRET "
            f"(at least {MIN_TOKEN_LENGTH} characters; clients send Authorization: Bearer SECRET)"
        )
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise GhostmatchError(f"--token must be at least {MIN_TOKEN_LENGTH} characters")
    listener = _listen(host, port)
    try:
        import uvicorn

        from ghostmatch.serve.app import create_app
        from ghostmatch.serve.engine import ServeSettings

        bound = listener.getsockname()[1]
        settings = ServeSettings(
            index=index if index is not None else default_index_path(),
            catalog=catalog,
            host=host,
            port=bound,
            token=token,
            max_upload_bytes=int(max_upload_mb * 1e6),
            max_megapixels=max_megapixels,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            queue=queue,
            move_to=move_to,
            runtime=runtime,
            device=device,
        )
        app = create_app(settings)
        shown = f"[{host}]" if ":" in host else host
        err.print(
            f"serving {path_text(settings.index)} on http://{shown}:{bound}/ "
            f"(API: /api/v1, docs: /docs; Ctrl-C stops)",
            markup=False,
            highlight=False,
        )
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        # uvicorn re-raises Ctrl-C once it has shut down cleanly: stopping a server this
        # way is the normal end, not an interruption of work.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[listener])
        err.print("stopped")
    finally:
        listener.close()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise GhostmatchError(
            f"cannot listen on {host}:{port}: {error.strerror}; choose another --port or --host"
        ) from error
    return sock


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
