"""``create_app``: the review server's FastAPI application.

The model is loaded once, in the lifespan (or injected by tests), and stays resident for the life of the
process; one :class:`app.jobs.JobManager` worker thread owns it. Run it with ONE process (``vald-md serve``):
every worker process would hold its own model copy and its own queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.engine import CounterfactualEngine
from app.jobs import JobManager
from app.web import api, pages
from app.web.errors import UploadTooLargeError, error_response, install_error_handlers
from app.web.templating import STATIC_DIR, make_templates

logger = logging.getLogger("vald_md.web")

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
_BODY_SLACK = 64 * 1024  # multipart boundaries and the small form fields around the file


class UploadLimitMiddleware:
    """Refuse request bodies over the limit: at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, limit_bytes: int, limit_mb: int) -> None:
        self.app = app
        self.limit = limit_bytes + _BODY_SLACK
        self.limit_mb = limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = error_response(Request(scope), UploadTooLargeError(self.limit_mb))
            await response(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLargeError(self.limit_mb)
            return message

        await self.app(scope, counting_receive, send)


class SecurityHeadersMiddleware:
    """Baseline response headers: a strict CSP (no inline script, no eval), no sniffing, no framing, no referrer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for k, v in ((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                             (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                             (b"referrer-policy", b"no-referrer")):
                    if k not in present:
                        headers.append((k, v))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings | None = None, engine: CounterfactualEngine | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: validated settings; ``None`` reads them from the environment (``VALD_MD_*``).
        engine: an already loaded engine (tests); ``None`` loads ``settings.model_dir`` in the lifespan.

    Returns:
        The FastAPI app. Its lifespan loads the model, starts the job worker, and stops it on shutdown
        (cancelling the running job).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        eng = engine
        if eng is None:
            eng = await run_in_threadpool(CounterfactualEngine, settings.resolved_model_dir,
                                          device=settings.device, dtype=settings.dtype)
        jobs = JobManager(eng, settings.runs_dir, queue_size=settings.queue_size,
                          preview_size=settings.preview_size, thumbnail_size=settings.thumbnail_size,
                          max_steps=settings.max_steps, max_samples=settings.max_samples)
        jobs.start()
        app.state.engine = eng
        app.state.jobs = jobs
        logger.info("review server ready: model %s, data in %s, queue size %d", eng.info.name, settings.data_dir,
                    settings.queue_size)
        try:
            yield
        finally:
            jobs.stop()

    app = FastAPI(title="VALD-MD review", version="1", lifespan=lifespan, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.settings = settings
    app.state.templates = make_templates()
    install_error_handlers(app)
    app.add_middleware(UploadLimitMiddleware, limit_bytes=settings.max_upload_bytes, limit_mb=settings.max_upload_mb)
    app.add_middleware(SecurityHeadersMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up (says nothing about the model)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> JSONResponse:
        """200 when the model is loaded, the worker is alive and the queue has room; else 503 with the reasons."""
        jobs: JobManager | None = getattr(request.app.state, "jobs", None)
        checks = {"model_loaded": getattr(request.app.state, "engine", None) is not None,
                  "worker_alive": bool(jobs and jobs.worker_alive),
                  "queue_has_room": bool(jobs and not jobs.is_full)}
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", **checks,
                "queue_length": jobs.queue_length if jobs else None, "queue_size": settings.queue_size}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app
