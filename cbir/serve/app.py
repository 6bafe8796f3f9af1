"""The FastAPI application: routes, the page, error shapes, limits, and the service's life."""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from cbir.errors import CbirError

from . import api, cytomine, schemas
from .auth import Guard
from .config import ServeConfig
from .engine import RetrievalService
from .errors import status_of

log = logging.getLogger("cbir.serve")
PAGE_FILES = resources.files("cbir.serve") / "static"
# The page loads nothing from elsewhere (no CDN: it works offline) and runs no inline script.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with a 413 and one line of JSON: at once when its Content-Length
    says so, else as soon as the bytes received pass the limit.

    Before answering, the rest of a body up to four times the limit is read and dropped: most clients (httpx,
    requests) send the whole body before reading the answer, and one refused mid-body sees a broken connection
    instead of the message. A larger body gets the answer and a closed connection straight away.
    """

    DRAIN_FACTOR = 4

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= self.DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive, 0)
            return await self._refuse(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._drain(receive, received)
                await self._refuse(send)

    async def _drain(self, receive, received: int) -> None:
        while received <= self.DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            received += len(message.get("body", b""))

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"the request is larger than this server's limit of "
                                     f"{self.max_bytes / 2**20:.1f} MB (cbir-serve --max_upload_mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class SecurityHeaders:
    """Headers every answer carries: no MIME sniffing, no referrer, no framing by other sites."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _one_line(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "form"))
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def create_app(config: ServeConfig, service: RetrievalService | None = None) -> FastAPI:
    """The application over ``service`` (made and started here when not given; closed when the app stops)."""
    service = service or RetrievalService(config)

    # The async routes' blocking work (see api.off_loop); as many threads as AnyIO gives plain routes, so that
    # requests arriving together wait in the model's queue and share its forward pass.
    workers = ThreadPoolExecutor(max_workers=40, thread_name_prefix="cbir-serve")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not service.started:
            service.start()
        try:
            yield
        finally:
            workers.shutdown(wait=True)  # requests in flight finish first
            service.close()  # saves every FAISS index: a graceful stop loses nothing

    app = FastAPIOffline(
        title="cbir-serve",
        summary="Content-based image retrieval for biomedical images: search a database with an image.",
        lifespan=lifespan,
        static_url="/docs-static",
    )
    app.state.config = config
    app.state.service = service
    app.state.workers = workers
    app.state.guard = Guard(config.auth, config.token)

    @app.exception_handler(CbirError)
    async def user_error(request: Request, error: CbirError):
        return JSONResponse({"detail": str(error)}, status_code=status_of(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _one_line(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); the server log has the details"},
                            status_code=500)

    @app.get("/health", response_model=schemas.Health, tags=["cbir"])
    def health(request: Request):
        """Liveness: answers without a token."""
        guard = request.app.state.guard
        return {"status": "ok", "database": config.db_name, "auth": guard.mode, "writes": guard.writes_enabled,
                "extractor": service.default.info["name"] if service.default else ""}

    page = (PAGE_FILES / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    @app.get("/db/{name}", include_in_schema=False)
    def web_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(PAGE_FILES)), name="static")
    app.include_router(api.router)
    app.include_router(cytomine.router)

    app.add_middleware(SecurityHeaders)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"])
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_upload_bytes)
    return app
