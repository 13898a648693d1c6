"""The FastAPI app of ``ghostmatch serve``: the JSON API under ``/api/v1``, the web page at
``/``, and the guard every request passes (Host, token, origin, body size)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ghostmatch import __version__
from ghostmatch.errors import GhostmatchError
from ghostmatch.retrieval.refine import PLAIN, QUICK
from ghostmatch.serve.engine import QueryEngine, RequestRefused, ServeSettings

API = "/api/v1"
# Scope key the guard sets when a body goes over the upload limit while it is read.
TOO_LARGE = "ghostmatch.too_large"
TOKEN_COOKIE = "ghostmatch_token"
# POST routes that change files or the index: token (when set), same origin, JSON body.
_ACTIONS = frozenset(f"{API}/{name}" for name in ("index", "actions", "undo", "not-duplicate"))
# Room for the multipart envelope around an upload of the largest allowed size.
_FORM_OVERHEAD = 64 * 1024
# How much of a refused body is read and dropped before answering.
_DRAIN_BYTES = 64 * 1024 * 1024
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a file name's undecodable bytes (lone surrogates)
    become ``\\udcNN``, exactly as ``--json`` writes them, instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """Checks every request before the app sees it.

    - Host: on a loopback address only ``127.0.0.1``, ``localhost`` or ``[::1]`` (with the
      port), so a web page cannot reach the API by pointing its own name at 127.0.0.1
      (DNS rebinding).
    - Token: when one is set, ``Authorization: Bearer TOKEN`` or the cookie that opening
      ``/?token=TOKEN`` once sets (images on the page cannot send a header).
    - Actions (``_ACTIONS``): refused from another origin (``Origin``, ``Sec-Fetch-Site``)
      and without a JSON body, which a cross-site form cannot send: no CSRF.
    - Body size: over the upload limit is 413 before or while it is read.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_upload_bytes + _FORM_OVERHEAD
        self.local = is_loopback(settings.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._problem(scope, headers)
        if problem is not None:
            status, message, extra = problem
            await _error(status, message, extra)(scope, receive, send)
            return
        if scope["path"] == "/" and self.settings.token and "token" in _query(scope):
            # The token arrived in the address: keep it in a cookie, drop it from the URL.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, self.settings.token, httponly=True, samesite="strict", path="/"
            )
            await response(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _drain(receive)
            await _error(413, self._too_large())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            # Past the limit the app sees the client go away (Starlette raises
            # ClientDisconnect); the mark in the scope turns that into 413.
            nonlocal seen
            if TOO_LARGE in scope:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    scope[TOO_LARGE] = self._too_large()
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and TOO_LARGE in scope:
                await _drain(receive)
            await send(message)

        await self.app(scope, counted, sending)

    def _too_large(self) -> str:
        return f"the upload is over the limit of {self.settings.max_upload_bytes / 1e6:g} MB"

    def _problem(
        self, scope: Scope, headers: dict[str, str]
    ) -> tuple[int, str, dict[str, str]] | None:
        host = headers.get("host", "")
        if self.local and host.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
            return 421, f"unexpected Host {host!r}: open http://127.0.0.1:{self.settings.port}/", {}
        token = self.settings.token
        if token:
            given = ""
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            elif scope["path"] == "/" and "token" in _query(scope):
                given = _query(scope)["token"][0]
            else:
                given = _cookie(headers.get("cookie", ""), TOKEN_COOKIE)
            if not hmac.compare_digest(given.encode(), token.encode()):
                return (
                    401,
                    "this server needs its token: send Authorization: Bearer TOKEN "
                    "(or open /?token=TOKEN once in a browser)",
                    {"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] == "POST" and scope["path"] in _ACTIONS:
            origin = headers.get("origin")
            scheme = scope.get("scheme", "http")
            if origin is not None and origin != f"{scheme}://{host}":
                return 403, f"refused: a request from another origin ({origin})", {}
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return 403, f"refused: a {site} request", {}
            if headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return 415, "send a JSON body (Content-Type: application/json)", {}
        return None


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of a refused body (up to ``_DRAIN_BYTES``), so that a
    client still sending it reads the answer instead of a reset connection."""
    dropped = 0
    while dropped < _DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return AsciiJSONResponse({"detail": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------- request bodies


class PathQuery(BaseModel):
    """Query by an indexed file: its path exactly as the index lists it."""

    path: str = Field(min_length=1, max_length=4096)


class GroupChoice(BaseModel):
    """One group to act on: the file to keep and the copies to move or trash (catalog ids,
    all from one listed duplicate group)."""

    keep: int
    copies: list[int] = Field(min_length=1, max_length=10_000)


class ActionRequest(BaseModel):
    op: Literal["delete", "move"]
    groups: list[GroupChoice] = Field(min_length=1, max_length=10_000)
    dry_run: bool = False


class UndoRequest(BaseModel):
    journal: str = Field(min_length=1, max_length=200)


class NotDuplicateRequest(BaseModel):
    a: int
    b: int


_MULTIPART = "multipart/form-data"
_FORM: dict[str, Any] = {
    "schema": {
        "type": "object",
        "properties": {"image": {"type": "string", "format": "binary"}},
        "required": ["image"],
    }
}
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            _MULTIPART: _FORM,
            "application/json": {"schema": PathQuery.model_json_schema()},
        },
    }
}


# ---------------------------------------------------------------------- the app


def create_app(settings: ServeSettings, engine: QueryEngine | None = None) -> ASGIApp:
    """The guarded app; loads the index and model now (``engine``: one already loaded).
    The engine is closed when the server shuts down."""
    engine = engine or QueryEngine(settings)
    static = resources.files("ghostmatch.serve") / "static"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="ghostmatch",
        version=__version__,
        description="Top-k image matches and duplicate review over an index.",
        default_response_class=AsciiJSONResponse,
        lifespan=lifespan,
        # /docs is served below from a local copy of Swagger UI: the default one loads it
        # from a CDN, which a machine without internet access cannot reach.
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, error: RequestRefused) -> Response:
        return _error(error.status, str(error), error.headers)

    @app.exception_handler(GhostmatchError)
    async def user_error(_: Request, error: GhostmatchError) -> Response:
        return _error(400, str(error))

    # ------------------------------------------------------------------ page

    def page_file(name: str, media: str) -> Response:
        data = (static / name).read_bytes()
        return Response(
            data,
            media_type=media,
            headers={
                "Content-Security-Policy": _PAGE_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return page_file("index.html", "text/html; charset=utf-8")

    @app.get("/static/app.js", include_in_schema=False)
    def script() -> Response:
        return page_file("app.js", "text/javascript; charset=utf-8")

    @app.get("/static/style.css", include_in_schema=False)
    def style() -> Response:
        return page_file("style.css", "text/css; charset=utf-8")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ghostmatch API",
            swagger_js_url="/docs/swagger-ui-bundle.js",
            swagger_css_url="/docs/swagger-ui.css",
            swagger_favicon_url="/docs/favicon-32x32.png",
        )

    def swagger_file(name: str, media: str) -> Response:
        import swagger_ui_bundle

        data = (Path(swagger_ui_bundle.swagger_ui_path) / name).read_bytes()
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/docs/swagger-ui-bundle.js", include_in_schema=False)
    def swagger_script() -> Response:
        return swagger_file("swagger-ui-bundle.js", "text/javascript; charset=utf-8")

    @app.get("/docs/swagger-ui.css", include_in_schema=False)
    def swagger_style() -> Response:
        return swagger_file("swagger-ui.css", "text/css; charset=utf-8")

    @app.get("/docs/favicon-32x32.png", include_in_schema=False)
    def swagger_icon() -> Response:
        return swagger_file("favicon-32x32.png", "image/png")

    # ------------------------------------------------------------------ API

    @app.get(f"{API}/health", summary="Liveness, image count and index generation")
    def health() -> dict[str, Any]:
        return engine.health()

    @app.get(f"{API}/info", summary="What `ghostmatch info --json` prints")
    def info() -> dict[str, Any]:
        return engine.info()

    @app.post(
        f"{API}/query",
        summary="Top-k matches of an upload (multipart field `image`) or an indexed file "
        '(JSON `{"path": ...}`): the `query --json` object, each match with its `id`',
        openapi_extra=_UPLOAD_BODY,
    )
    async def query(
        request: Request,
        k: Annotated[int, Query(ge=1, le=1000)] = 10,
        min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
        under: Annotated[str | None, Query(max_length=4096)] = None,
        plain: Annotated[
            bool, Query(description="A plain cosine search, as `query --plain`")
        ] = False,
        rerank: Annotated[
            int,
            Query(
                ge=0,
                le=100,
                description="Top results re-ranked by local features, as `query --rerank N` "
                "(default 0 here: each costs a network pass; `query` re-ranks 20)",
            ),
        ] = 0,
    ) -> dict[str, Any]:
        refine = (PLAIN if plain else QUICK).with_changes(rerank=rerank)
        with engine.admitted():
            if _content_type(request) == "application/json":
                # Checked by hand, not by pydantic: a file name's undecodable bytes arrive as
                # lone surrogates (\udcNN), which pydantic refuses as a string.
                body = await _json(request)
                path = body.get("path") if isinstance(body, dict) else None
                if not isinstance(path, str) or not 0 < len(path) <= 4096:
                    raise RequestRefused(422, 'send {"path": "/an/indexed/file.jpg"}')
                return await run_in_threadpool(engine.query_path, path, k, min_score, under, refine)
            data, name = await _upload(request)
            return await run_in_threadpool(
                engine.query_upload, data, name, k, min_score, under, refine
            )

    @app.post(
        f"{API}/duplicates-of",
        summary="Indexed duplicates of an upload (multipart field `image`): `dupes --of --json`",
        openapi_extra={"requestBody": {"required": True, "content": {_MULTIPART: _FORM}}},
    )
    async def duplicates_of(request: Request) -> dict[str, Any]:
        with engine.admitted():
            data, name = await _upload(request)
            return await run_in_threadpool(engine.duplicates_of_upload, data, name)

    @app.get(f"{API}/duplicates", summary="Duplicate groups of the index, a page at a time")
    def duplicates(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        threshold: Annotated[
            float | None,
            Query(ge=-3.0, le=1.0, description="Threshold instead of the index's own"),
        ] = None,
        verify: Annotated[bool, Query(description="Run the geometric check")] = True,
        similar: Annotated[
            bool, Query(description="Also list other captures (tier similar, never acted on)")
        ] = False,
    ) -> dict[str, Any]:
        return engine.duplicates(offset, limit, threshold, verify, similar)

    @app.get(f"{API}/images/{{image_id}}/thumbnail", summary="A JPEG thumbnail by catalog id")
    def thumbnail(
        image_id: Annotated[int, PathParam(ge=1)],
        size: Annotated[int, Query()] = 256,
    ) -> Response:
        return Response(
            engine.thumbnail(image_id, size),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"},
        )

    @app.get(f"{API}/images/{{image_id}}/file", summary="The indexed file by catalog id")
    def file(image_id: Annotated[int, PathParam(ge=1)]) -> Response:
        fd, media, name = engine.open_file(image_id)
        return StreamingResponse(
            _chunks(fd),
            media_type=media,
            headers={
                "Content-Disposition": f"inline; filename*=UTF-8''{_quoted(name)}",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.post(f"{API}/index", status_code=202, summary="Start an incremental index run")
    def start_index() -> dict[str, Any]:
        return engine.start_index().to_dict()

    @app.get(f"{API}/jobs/{{job_id}}", summary="Progress of an index run")
    def job(job_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        return engine.job(job_id).to_dict()

    @app.post(f"{API}/actions", summary="Move or trash the copies of chosen groups (journaled)")
    def actions(body: ActionRequest) -> dict[str, Any]:
        choices = [(g.keep, list(g.copies)) for g in body.groups]
        return engine.act(body.op, choices, body.dry_run)

    @app.post(f"{API}/undo", summary="Put back what one actions call moved or trashed")
    def undo(body: UndoRequest) -> dict[str, Any]:
        return engine.undo(body.journal)

    @app.post(f"{API}/not-duplicate", summary="Never group these two images again")
    def not_duplicate(body: NotDuplicateRequest) -> dict[str, Any]:
        return engine.not_duplicate(body.a, body.b)

    return Guard(app, settings)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _over_limit(request: Request) -> None:
    message = request.scope.get(TOO_LARGE)
    if message is not None:
        raise RequestRefused(413, message)


async def _json(request: Request) -> Any:
    try:
        body = await request.body()
    except ClientDisconnect:
        _over_limit(request)
        raise
    try:
        return json.loads(body)
    except ValueError:
        raise RequestRefused(422, "the body is not valid JSON") from None


async def _upload(request: Request) -> tuple[bytes, str]:
    """The bytes and client file name of the multipart field ``image``."""
    if _content_type(request) != "multipart/form-data":
        raise RequestRefused(415, "send the image as multipart/form-data in the field 'image'")
    try:
        form = await request.form(max_files=1, max_fields=10)
    except ClientDisconnect:
        _over_limit(request)
        raise
    except Exception as error:  # a malformed multipart body is the client's
        raise RequestRefused(400, f"cannot read the form: {error}") from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise RequestRefused(422, "send the image as a file in the form field 'image'")
        data = await image.read()
        return data, image.filename or "upload"
    finally:
        await form.close()


def _chunks(fd: int, size: int = 1 << 16) -> Iterator[bytes]:
    try:
        while chunk := os.read(fd, size):
            yield chunk
    finally:
        os.close(fd)


def _quoted(name: str) -> str:
    from urllib.parse import quote

    return quote(name.encode("utf-8", "surrogateescape"), safe="")
