"""``create_app``: the review server's FastAPI application.

The model is loaded once, in the lifespan (or injected by tests), and stays resident for the life of the
process; one :class:`app.jobs.JobManager` worker thread owns it. Run it with ONE process (``vald-md serve``):
every worker process would hold its own model copy and its own queue -- unless ``VALD_MD_JOB_STATE=database``
makes the database's job table the queue of several front processes (``app.jobs.jobtable``; then unfinished runs
are not marked ``interrupted`` at start-up: other fronts may be running them, and the table recovers dead ones).

Start-up: the model starts loading in a thread of its own (with ``compile_unet``: compiled and warmed up); beside
it, in order, the accounts/audit database (migrations, append-only triggers), the UID/CSRF secret file, runs left
unfinished by the previous process marked ``interrupted`` (not with ``VALD_MD_JOB_STATE=database``: other fronts may
be running them), the lung segmenter (optional: a missing folder is a warning, and maps are then not restricted to
the lungs), the lesion classifier (optional likewise: without it the classifier-guided map method is not offered);
then, once the model is loaded, the job worker (with the job table: this front's stale claims recovered first),
``app_start``. A failure at any step after the data folder's modes stops the worker and closes the backend (if
made) and disposes of the database (if opened). The server answers (``/readyz`` included) only after all of it.
Shut-down: the worker stops (cancelling the running job; with ``VALD_MD_JOB_STATE=database`` nothing is cancelled:
the running job may finish, else another front queues it again), ``app_stop``. Middleware, outermost first: security
headers, the ``Host`` check (``trusted_hosts``), forwarded headers (only from ``trusted_proxies``), upload size
limit, authentication + CSRF (:mod:`app.web.auth`). The data folder is owner-only (:mod:`app.filemodes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import __version__, audit, filemodes
from app.config import Settings
from app.engine import CounterfactualEngine, load_engine_in_short_lived_thread
from app.jobs import Backend, JobManager
from app.serving.loading import load_classifier, load_segmenter
from app.web import accounts, admin, api, pacs, pages, tokens, viewing
from app.web.auth import AuthMiddleware, LoginRateLimiter, TrustedHostsMiddleware
from app.web.errors import UploadTooLargeError, error_response, install_error_handlers
from app.web.templating import STATIC_DIR, make_templates

logger = logging.getLogger("vald_md.web")

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=(), serial=(), display-capture=()"
"""Features Chromium recognises (an unknown one is a console warning on every page)."""
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()), (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
    (b"permissions-policy", PERMISSIONS_POLICY.encode()), (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"))
"""Added to every response that does not set them itself."""
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
    """Baseline response headers: a strict CSP (no inline script, no eval, no framing), no sniffing, no referrer,
    no powerful browser features; ``Cache-Control: no-store`` on everything but static files (responses carry
    patient-derived images and session-bound pages); HSTS when served over HTTPS or with secure cookies."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        static = scope["path"].startswith("/static/")
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = list(SECURITY_HEADERS)
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                if https or self.hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                for k, v in extra:
                    if k not in present:
                        headers.append((k, v))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _close_after_failed_start(jobs: JobManager | None, backend: Backend | None) -> None:
    """After a failed start-up: stop the job worker (if made) and close the backend (the manager's, else the one
    made for it); an error here is logged, so that the start-up's own error is the one raised."""
    try:
        if jobs is not None:
            jobs.stop()
        made = jobs.backend if jobs is not None else backend
        if made is not None:
            made.close()
    except Exception:
        logger.exception("could not release the job worker or backend after a failed start-up")


def make_backend(settings: Settings, model_sha256: str) -> Backend | None:
    """The job queue's backend for ``settings.backend``: ``None`` for ``local`` (the manager's in-process default,
    no Ray imported), else an ``app.serving.RayBackend`` serving the model with ``model_sha256`` (connects to or
    starts the cluster and deploys; seconds to minutes)."""
    if settings.backend == "local":
        return None
    from app.serving import RayBackend

    return RayBackend.from_settings(settings, model_sha256=model_sha256)


def checkpoint(db: Any, settings: Settings) -> None:
    """Appends a signed checkpoint of the audit chain's head to ``settings.resolved_audit_anchor_file`` (at start-up
    and shut-down); a failure is logged, never fatal (``vald-md audit anchor`` writes one by hand)."""
    try:
        point = audit.write_checkpoint(db, settings.resolved_audit_anchor_file)
    except (OSError, ValueError) as e:
        logger.warning("audit checkpoint not written to %s: %s", settings.resolved_audit_anchor_file, e)
        return
    logger.info("audit checkpoint: event #%d %s", point.seq, point.hash[:16])


def create_app(settings: Settings | None = None, engine: CounterfactualEngine | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: validated settings; ``None`` reads them from the environment (``VALD_MD_*``).
        engine: an already loaded engine (tests); ``None`` loads ``settings.model_dir`` in the lifespan.

    Returns:
        The FastAPI app. Its lifespan opens the audit database, loads the model, the lung segmenter
        (``settings.resolved_lung_segmenter``) and the lesion classifier (``settings.resolved_lesion_classifier``),
        starts the job worker, and stops it on shutdown (cancelling the
        running job).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # 0. owner-only storage: patient-derived images, the database and the secrets live under data_dir
        filemodes.private_dir(settings.data_dir)
        filemodes.private_sqlite(settings.resolved_database_url)
        # the model, most of a start-up, loads beside steps 1-2; in a thread that then ends, so that the job worker
        # is the only thread with an OpenMP team (see load_engine_in_short_lived_thread: otherwise every CPU run
        # is up to ~1.9x slower); with compile_unet, compiled and warmed up there before the server answers
        loading = None if engine is not None else asyncio.ensure_future(run_in_threadpool(
            lambda: load_engine_in_short_lived_thread(
                settings.resolved_model_dir, device=settings.device, dtype=settings.dtype,
                cpu_autocast=settings.cpu_autocast, compile_unet=settings.compile_unet,
                warm_up=settings.compile_unet)))
        db = None
        backend: Backend | None = None
        jobs: JobManager | None = None
        try:
            # 1. the audit database, its secret (outside the database) and the runs the last process left unfinished
            keys = audit.resolve_audit_keys(settings.audit_key_path,
                                            settings.audit_key.get_secret_value() if settings.audit_key else None)
            db = await run_in_threadpool(lambda: audit.init_db(settings.resolved_database_url, keys=keys))
            secret = audit.load_or_create_secret(settings.uid_secret_path)
            filemodes.private_sqlite(settings.resolved_database_url)  # and the journal files SQLite has made
            # with the shared job table, other fronts' runs are alive: the table's recovery handles dead ones
            interrupted = (0 if settings.job_state == "database" else
                           await run_in_threadpool(audit.mark_interrupted_runs, db))
            # 2. a few MB on the CPU, segmenting in the job worker (~10-20 ms per image at 128 px)
            segmenter = await run_in_threadpool(load_segmenter, settings.resolved_lung_segmenter)
            classifier = await run_in_threadpool(load_classifier, settings.resolved_lesion_classifier)
            # 3. the model and the worker that owns it
            if engine is not None:
                eng = engine
            else:
                assert loading is not None  # started above whenever no engine was injected
                eng = await loading
            # where runs execute: this process (default), or Ray Serve replicas of the same model (issue 14)
            backend = await run_in_threadpool(make_backend, settings, eng.info.model_hash)
            jobs = JobManager.from_settings(settings, eng, db=db, uid_secret=secret, segmenter=segmenter,
                                            classifier=classifier, backend=backend)
            # (with job_state=database this reads and writes the job table: a failure here disposes of the db too)
            jobs.start()
            # 4. say so
            start_detail = {
                "version": __version__, "model_sha256": eng.info.model_hash, "interrupted_runs": interrupted,
                "database": db.dialect.name, "de_identified_uploads": not settings.store_identified_uploads,
                "plain_uids": settings.store_plain_uids,
                "lung_segmenter_sha256": segmenter.info.sha256 if segmenter is not None else None,
                "lesion_classifier_sha256": classifier.info["sha256"] if classifier is not None else None}
            if jobs.backend.name != "local":
                start_detail |= {"backend": jobs.backend.name, "backend_concurrency": jobs.backend.concurrency}
            audit.append_event(db, audit.AuditAction.APP_START, detail=start_detail)
            checkpoint(db, settings)
        except BaseException:
            await run_in_threadpool(_close_after_failed_start, jobs, backend)
            if loading is not None:
                await asyncio.wait([loading])  # (a thread cannot be stopped) no loader left behind a failed start
                if not loading.cancelled():
                    loading.exception()  # retrieved: the error that stopped the start-up is the one raised
            if db is not None:
                db.dispose()
            raise
        app.state.db = db
        app.state.uid_secret = secret
        app.state.engine = eng
        app.state.segmenter = segmenter
        app.state.classifier = classifier
        app.state.jobs = jobs
        app.state.login_limiter = LoginRateLimiter(settings.login_attempts_per_minute)
        if not accounts.has_admin(db):
            logger.warning("no administrator account exists yet: create one on this machine with `%s` "
                           "(it asks for the password; from a source checkout, in a second terminal: "
                           "`.venv/bin/%s`), then sign in at /login", accounts.FIRST_ADMIN_HINT,
                           accounts.FIRST_ADMIN_HINT)
        logger.info("review server ready: model %s, data in %s, queue size %d, database %s", eng.info.name,
                    settings.data_dir, settings.queue_size, db.dialect.name)
        try:
            yield
        finally:
            jobs.stop()
            jobs.backend.close()
            try:
                audit.append_event(db, audit.AuditAction.APP_STOP, detail={"version": __version__})
                checkpoint(db, settings)
            finally:
                db.dispose()

    app = FastAPI(title="VALD-MD review", version="1", lifespan=lifespan, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.settings = settings
    app.state.templates = make_templates()
    install_error_handlers(app)
    # the last added runs first: headers on every response, then the size limit, then who is asking
    app.add_middleware(AuthMiddleware)
    app.add_middleware(UploadLimitMiddleware, limit_bytes=settings.max_upload_bytes, limit_mb=settings.max_upload_mb)
    if settings.trusted_proxy_list:  # the client address and scheme from X-Forwarded-* of these proxies only
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxy_list)
    app.add_middleware(TrustedHostsMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.cookie_secure)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api.router)
    app.include_router(viewing.router)
    app.include_router(accounts.router)
    app.include_router(pacs.router)
    app.include_router(admin.router)
    app.include_router(tokens.router)
    app.include_router(pages.router)
    app.openapi = api.openapi_with_server_limits(app, settings)  # type: ignore[method-assign]

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
