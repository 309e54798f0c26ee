"""The FastAPI application: JSON endpoints over `ServeState`, the web page, and the security checks.

Every error is JSON `{"error": message}`. Files are only ever named by index id, so no request can reach a path the
index does not hold, and an indexed file is only sent while it is inside the index's roots and unchanged since
indexing (`serve.files`). Requests must carry a loopback Host header unless a token is set (DNS rebinding), requests
that change files must come from this origin (CSRF), and every response is `Cross-Origin-Resource-Policy:
same-origin`; requests a browser marks as coming from another site (`Sec-Fetch-Site: cross-site` or `same-site`)
are refused, but for top-level navigations to the page.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import decode_budget
from ..dedup.finder import DEFAULT_THRESHOLD
from ..errors import BadInputError, IndexLockedError, IndexStoreError, SimsearchError
from ..images import ImageLoadError, ImageTooLargeError, UnsupportedImageError
from .schemas import DuplicatesOut, ErrorOut, ResolveIn, ResolveOut, SearchOut, UndoIn, UndoListOut, UndoOut
from .state import (
    DECODE_WAIT_SECONDS,
    RERANK_SECONDS,
    THUMB_SIZES,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServeConfig,
    ServeState,
    TooLargeError,
)

log = logging.getLogger("simsearch.serve")
STATIC = Path(str(files("simsearch.serve") / "static"))
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# The page loads nothing but its own files; thumbnails arrive as blob: URLs.
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
_STATUS: list[tuple[type[Exception], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (IndexLockedError, 409),
    (TooLargeError, 413),
    (ForbiddenError, 403),
    (BadInputError, 400),
    (IndexStoreError, 503),
    (decode_budget.DecodeBusyError, 503),
    (SimsearchError, 400),
]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only accepts connections from this machine."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error, with the security headers (some errors are sent past `Guard`: its refusals, 500s)."""
    return JSONResponse({"error": message}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def create_app(
    index_path: str | Path,
    read_only: bool = False,
    token: str | None = None,
    move_to: str | Path | None = None,
    max_upload_bytes: int | None = None,
    max_pixels: int | None = None,
    engine: str = "auto",
    warm_up: bool = True,
    decode_bytes: int | None = None,
    rerank_seconds: float | None = RERANK_SECONDS,
) -> FastAPI:
    """The app for one index. With a token, /api needs `Authorization: Bearer TOKEN` and any Host is accepted.

    `decode_bytes` sets the process's decode budget (default `decode_budget.DEFAULT_BUDGET`, 512 MiB): decoded
    pixels in memory at once over all requests; a request waits at most `DECODE_WAIT_SECONDS` for its share (503).
    `rerank_seconds` bounds the geometric verification of one search (None: no limit).
    """
    cfg = ServeConfig(read_only=read_only, move_to=Path(move_to).expanduser().absolute() if move_to else None,
                      engine=engine, rerank_seconds=rerank_seconds)  # fmt: skip
    decode_budget.configure(decode_bytes, wait_s=DECODE_WAIT_SECONDS)
    if max_upload_bytes is not None:
        cfg.max_upload_bytes = max_upload_bytes
    if max_pixels is not None:
        cfg.max_pixels = max_pixels
    state = ServeState(index_path, cfg)
    if warm_up:
        state.warm_up()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="simsearch", summary="Image similarity search and duplicate review", version="1",
                  lifespan=lifespan)  # fmt: skip
    app.state.simsearch = state
    _install_errors(app)
    app.add_middleware(Guard, token=token, max_upload=cfg.max_upload_bytes)

    def authorise(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise _Unauthorised()

    errors = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 500)}
    api = APIRouter(prefix="/api", dependencies=[Depends(authorise)], responses=errors)
    _add_routes(api, state)
    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}
        return FileResponse(STATIC / "index.html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Unauthorised(Exception):
    pass


K = Annotated[int, Query(ge=1, le=1000, description="Number of matches.")]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, description="Only matches with cosine >= this.")]
MAX_RERANK = 200
Rerank = Annotated[
    int,
    Query(ge=0, le=MAX_RERANK, description=f"Verify the top N geometrically (same object or scene first); 0 = off. "
          f"At most {MAX_RERANK}, and for at most {RERANK_SECONDS:g} s: candidates not reached by then keep their "
          "global order, without inliers (see `rerank` in the answer)."),
]  # fmt: skip
ImageId = Annotated[int, PathParam(description="Id of an indexed image; any other integer is 404.")]


def _add_routes(api: APIRouter, state: ServeState) -> None:

    @api.get("/info")
    def info() -> dict[str, Any]:
        """The index's model, counts and generation, and what this server allows."""
        with state.lock:
            data = state.index().info()
        data["server"] = {"read_only": state.config.read_only, "move": state.config.move_to is not None,
                          "max_upload_bytes": state.config.max_upload_bytes, "max_pixels": state.config.max_pixels,
                          "generation": state.generation, "max_rerank": MAX_RERANK,
                          "rerank_seconds": state.config.rerank_seconds}  # fmt: skip
        return data

    @api.get("/search", response_model=SearchOut, response_model_exclude_unset=True)
    def search_by_id(
        id: Annotated[int, Query(description="Id of an indexed image (more like this); any other integer is 404.")],
        k: K = 10,
        min_score: MinScore = None,
        rerank: Rerank = 0,
    ) -> dict[str, Any]:
        """The indexed images most like an indexed one (more like this), best first."""
        return state.search_id(id, k, min_score, rerank)

    @api.post("/search", response_model=SearchOut, response_model_exclude_unset=True)
    async def search_upload(
        image: Annotated[UploadFile, File(description="The query image (any format simsearch reads).")],
        k: K = 10,
        min_score: MinScore = None,
        rerank: Rerank = 0,
    ) -> dict[str, Any]:
        """The indexed images most like an uploaded one, best first."""
        data = await image.read(state.config.max_upload_bytes + 1)
        return await run_in_threadpool(state.search_upload, data, image.filename, k, min_score, rerank)

    @api.get("/images/{image_id}", response_class=StreamingResponse)
    def image_file(image_id: ImageId) -> StreamingResponse:
        """The indexed file itself, if it is inside the index's folders, unchanged since indexing, and decodes as
        the image type it is sent as (404 / 409 otherwise)."""
        body, media, length = state.original(image_id)
        return StreamingResponse(body, media_type=media, headers={"Cache-Control": "private, max-age=60",
                                                                  "Content-Length": str(length)})  # fmt: skip

    @api.get("/images/{image_id}/thumbnail")
    def thumbnail(
        image_id: ImageId,
        size: Annotated[int, Query(ge=THUMB_SIZES[0], le=THUMB_SIZES[1])] = 256,
        t: Annotated[float | None, Query(ge=0, le=86_400, description="A video: the frame at t seconds.")] = None,
    ) -> Response:
        """An upright JPEG whose longer side is at most `size` (cached); of a video, its first keyframe, or the
        frame at `t` (a match's `time_s`)."""
        return Response(state.thumbnail(image_id, size, t), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60"})  # fmt: skip

    @api.get("/duplicates", response_model=DuplicatesOut)
    def duplicates(
        threshold: Annotated[float, Query(ge=-1.0, le=1.0)] = DEFAULT_THRESHOLD,
        group: Literal["connected", "star"] = "connected",
        keep: Annotated[str | None, Query(description="Keep rules, e.g. resolution,size,oldest")] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        similar: Annotated[bool, Query(description="Also list other shots of one scene (kind similar)")] = True,
    ) -> dict[str, Any]:
        """The dedup report (as `simsearch dedup --json`), one page of groups, each with its members' details."""
        return state.duplicates(threshold, group, keep, offset, limit, similar=similar)

    @api.post("/duplicates/resolve", response_model=ResolveOut)
    def resolve(body: ResolveIn) -> dict[str, Any]:
        """Move or trash the chosen files of one group, as `dedup --action`; answers the undo manifest's name."""
        return state.resolve(body.ids, body.remove, body.action, body.threshold, body.group, body.keep,
                             include_similar=body.include_similar)  # fmt: skip

    @api.get("/undo", response_model=UndoListOut)
    def undo_list() -> dict[str, Any]:
        """The undo manifests of this index, newest first."""
        return {"manifests": state.undo_list()}

    @api.post("/undo", response_model=UndoOut)
    def undo(body: UndoIn) -> dict[str, Any]:
        """Put back the files of one resolve (or CLI dedup action) and their index rows."""
        return state.undo(body.undo)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(SimsearchError)
    async def simsearch_error(request: Request, exc: SimsearchError) -> JSONResponse:
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        return _error(status, str(exc))

    @app.exception_handler(ImageLoadError)
    async def image_error(request: Request, exc: ImageLoadError) -> JSONResponse:
        status = 413 if isinstance(exc, ImageTooLargeError) else 415 if isinstance(exc, UnsupportedImageError) else 400
        return _error(status, str(exc))

    @app.exception_handler(_Unauthorised)
    async def unauthorised(request: Request, exc: _Unauthorised) -> JSONResponse:
        return _error(401, "missing or wrong token: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        return _error(400, f"bad parameter {where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


class Guard:
    """Pure ASGI checks before routing: Host (DNS rebinding), requests from other sites (Sec-Fetch-Site), Origin of
    changing requests (CSRF), body size; and the security headers on every response."""

    def __init__(self, app: Any, token: str | None, max_upload: int) -> None:
        self.app = app
        self.token = token
        self.body_limit = max_upload + 64 * 1024  # room for the multipart envelope
        self.max_upload = max_upload

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)  # made by _error: it carries the security headers

        received = 0
        refused = False  # a body over the limit without Content-Length (chunked): answered 413 while it streams

        async def counting_receive() -> dict:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit and not refused:
                    refused = True
                    await _error(413, f"request body over the limit of {self.max_upload} bytes")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_with_headers(message: dict) -> None:
            if refused:
                return  # the app's answer to the cut-off body: the 413 was already sent
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in _SECURITY_HEADERS if h[0] not in have)]
            await send(message)

        await self.app(scope, counting_receive, send_with_headers)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host_header = headers.get("host", "")
        host = urlsplit(f"//{host_header}").hostname or ""
        if self.token is None and not is_loopback(host):
            return _error(400, "unexpected Host header: without --token this server answers only localhost")
        site = headers.get("sec-fetch-site", "").lower()
        if site in ("cross-site", "same-site") and not _page_navigation(scope, headers):
            return _error(403, f"request from another site refused (Sec-Fetch-Site: {site})")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origin = headers.get("origin")
        if origin and urlsplit(origin).netloc != host_header:
            return _error(403, "cross-origin request refused")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, "bad Content-Length")
            if int(length) > self.body_limit:
                return _error(413, f"request body over the limit of {self.max_upload} bytes")
        return None


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",  # no other site may embed a thumbnail or read a response
}
_SECURITY_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def _page_navigation(scope: dict, headers: dict[str, str]) -> bool:
    """A link followed from another site to the page (or its static files, docs), not to the API: a top-level GET
    navigation, which shows the page to the user and gives the other site nothing."""
    return (scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
            and headers.get("sec-fetch-dest", "document") == "document"
            and not scope.get("path", "").startswith("/api"))  # fmt: skip


def run(
    index_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    read_only: bool = False,
    token: str | None = None,
    move_to: str | Path | None = None,
    log_level: str = "info",
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
) -> None:
    """Serve until interrupted (one process; requests run on uvicorn's thread pool); HTTPS with a certificate."""
    import uvicorn

    if not is_loopback(host) and not token:
        raise BadInputError(f"--host {host} is reachable from other machines: pass --token TOKEN too")
    tls = check_tls(ssl_certfile, ssl_keyfile)
    if token and not tls and not is_loopback(host):
        print(
            f"simsearch: warning: the token travels in clear text over plain HTTP to {host}; anyone on the network "
            "path can read it: pass --ssl-certfile/--ssl-keyfile, or put an HTTPS proxy in front",
            file=sys.stderr,
        )
    app = create_app(index_path, read_only=read_only, token=token, move_to=move_to)
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    print(f"simsearch: serving {app.state.simsearch.path} at {scheme}://{shown}:{port}/ (API docs: /docs)",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, **tls)


def check_tls(certfile: str | Path | None, keyfile: str | Path | None) -> dict[str, str]:
    """uvicorn's TLS options, after checking the certificate and key load (a one-line error otherwise)."""
    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        raise BadInputError("--ssl-certfile and --ssl-keyfile go together")
    import ssl

    cert, key = Path(certfile).expanduser(), Path(keyfile).expanduser()
    for f in (cert, key):
        if not f.is_file():
            raise BadInputError(f"file not found: {f}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise BadInputError(f"cannot use {cert} with {key} for HTTPS: {' '.join(str(e).split())}") from None
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
