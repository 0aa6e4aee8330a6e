"""One place that maps domain errors to HTTP: JSON for ``/api/*``, the ``_error.html`` fragment for HTMX, a page
otherwise. No traceback ever reaches a browser: anything unexpected is logged and answered with a generic 500.

===============================================  ======  ======================================================
``NotAuthenticatedError``                        401     API: JSON + ``WWW-Authenticate``; pages: 303 to /login
``PermissionDeniedError`` (CSRF, cross-site,     403     why, without detail an attacker could use
admin only)
``TooManyAttemptsError`` (login rate limit)      429     Retry-After
``UploadTooLargeError``                          413     the limit in MB
``imaging.UnsupportedImageError``                415     the ingestion message (not DICOM/PNG/JPEG, CT, ...)
other ``imaging.ImagingError``                   422     the ingestion message (corrupt, too large, bad window)
``ValueError`` (parameters, mask, exports)       422     the message (names the field and the range)
``RequestValidationError``                       422     one message per field
``JobNotFoundError``, ``ArtifactNotFoundError``  404     also unknown routes
``JobNotReadyError``                             409     the run's state
``app.runs.folder.ArtifactChangedError``         409     which run file differs from its record's SHA-256
other ``app.runs.folder.RunFolderError``         409     which run file is missing or damaged (a conflict with
                                                        the server's state, not a bad request)
``app.pacs.client.PacsError``                    422/    unsuitable instance 422, not found 404, timeout 504,
                                                 404/    unreachable or refused 502: the message names the
                                                 504/    server and what to do
                                                 502
``UserQueueLimitError``                          429     the user's runs queued or running and the limit,
                                                        Retry-After
``QueueFullError``                               503     queue length and capacity (and the cost budget when
                                                        that was the limit), Retry-After
``WorkerStoppedError``                           503     Retry-After
anything else                                    500     a generic message; the traceback goes to the log
===============================================  ======  ======================================================
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, RedirectResponse, Response

from app import audit, imaging
from app.jobs import JobNotFoundError, JobNotReadyError, QueueFullError, UserQueueLimitError, WorkerStoppedError
from app.pacs.client import PacsError, PacsNotFoundError, PacsTimeoutError, PacsUnsuitableError
from app.runs.folder import ArtifactChangedError, RunFolderError
from app.web.templating import is_htmx, render
from app.web.views import ArtifactNotFoundError

logger = logging.getLogger("vald_md.web")

GENERIC_500 = "Something went wrong on the server. The error has been logged; please try again."
# HTMX requests whose errors belong next to the control that sent them rather than in the page's message area
_ERROR_TARGETS = {"/inspect": "#file-facts"}


class UploadTooLargeError(ValueError):
    """The request body exceeds ``max_upload_mb``."""

    def __init__(self, limit_mb: int) -> None:
        self.limit_mb = limit_mb
        super().__init__(f"The upload is larger than this server's limit of {limit_mb} MB. "
                         f"Export a single image (one frame) or a compressed file and try again.")


class NotAuthenticatedError(Exception):
    """The request carries no valid session cookie or API token."""

    def __init__(self, message: str = "Please sign in to continue.") -> None:
        super().__init__(message)


class PermissionDeniedError(Exception):
    """Signed in, but not allowed: a missing/wrong CSRF token, a cross-site request, or an admin-only page."""


class TooManyAttemptsError(Exception):
    """Too many login attempts from this address or for this username in the last minute."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"Too many sign-in attempts. Please wait {retry_after_s} seconds and try again.")


@dataclass
class Problem:
    """What an error looks like to a client."""

    status: int
    title: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _field_messages(exc: RequestValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
        name = ".".join(loc) or "request"
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            msg = "This field is required." if name != "file" else "Choose an image file to upload."
        elif "Expected UploadFile" in msg:  # "received: <class 'str'>": a Python type name means nothing to users
            msg = "Upload a file in this field (it was sent as text)."
        out.setdefault(name, public_message(msg))
    return out


_INTERNALS = re.compile(r"<[^<>]{1,200}? (?:object )?at 0x[0-9a-fA-F]+>|<class '[^']{1,200}'>")


def public_message(text: str) -> str:
    """``text`` without the Python internals a library may quote in an exception message (``<_io.BytesIO object
    at 0x7f...>``, ``<class 'str'>``): memory addresses and type names tell an attacker about the process and a
    clinician nothing."""
    return _INTERNALS.sub("(the value)", text)


def classify(exc: BaseException) -> Problem:
    """The status code and user-facing message for an exception (see the module table)."""
    if isinstance(exc, NotAuthenticatedError):
        return Problem(401, "Sign-in required", str(exc), headers={"WWW-Authenticate": 'Bearer realm="vald-md"'})
    if isinstance(exc, PermissionDeniedError):
        return Problem(403, "Forbidden", str(exc))
    if isinstance(exc, TooManyAttemptsError):
        return Problem(429, "Too many attempts", str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, UploadTooLargeError):
        return Problem(413, "Upload too large", str(exc), extra={"limit_mb": exc.limit_mb})
    if isinstance(exc, imaging.UnsupportedImageError):
        return Problem(415, "Unsupported image", public_message(str(exc)))
    if isinstance(exc, imaging.ImagingError):
        return Problem(422, "Unreadable image", public_message(str(exc)))
    if isinstance(exc, UserQueueLimitError):
        return Problem(429, "Too many runs", str(exc),
                       extra={"active_jobs": exc.active, "max_jobs_per_user": exc.limit},
                       headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, QueueFullError):
        extra: dict[str, Any] = {"queue_length": exc.queue_length, "queue_size": exc.capacity}
        if exc.budget is not None:
            extra.update(queued_cost=exc.queued_cost, cost=exc.cost, cost_budget=exc.budget)
        return Problem(503, "Queue full", str(exc), extra=extra, headers={"Retry-After": "30"})
    if isinstance(exc, WorkerStoppedError):
        return Problem(503, "Service unavailable", str(exc), headers={"Retry-After": "30"})
    if isinstance(exc, (JobNotFoundError, ArtifactNotFoundError, audit.RunNotFoundError)):
        return Problem(404, "Not found", str(exc))
    if isinstance(exc, PacsError):  # app.pacs: the message names the server and what to do
        status = (422 if isinstance(exc, PacsUnsuitableError) else 404 if isinstance(exc, PacsNotFoundError)
                  else 504 if isinstance(exc, PacsTimeoutError) else 502)
        return Problem(status, "PACS", str(exc), extra={"retry": exc.retry})
    if isinstance(exc, JobNotReadyError):
        return Problem(409, "Not ready", str(exc), extra={"state": exc.state})
    if isinstance(exc, ArtifactChangedError):
        return Problem(409, "Run folder changed", public_message(str(exc)))
    if isinstance(exc, RunFolderError):  # before ValueError: the run's files, not the request, are at fault
        return Problem(409, "Run folder damaged", public_message(str(exc)))
    if isinstance(exc, RequestValidationError):
        fields = _field_messages(exc)
        text = "; ".join(f"{k}: {v}" for k, v in fields.items())
        return Problem(422, "Invalid parameters", f"Please correct: {text}", fields=fields)
    if isinstance(exc, ValueError):
        return Problem(422, "Invalid request", public_message(str(exc)))
    if isinstance(exc, StarletteHTTPException):
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UploadTooLargeError):
            return classify(cause)
        titles = {404: "Not found", 405: "Method not allowed", 400: "Bad request"}
        message = {404: "There is no such page or resource.",
                   405: "This address does not accept that kind of request."}.get(exc.status_code, str(exc.detail))
        return Problem(exc.status_code, titles.get(exc.status_code, "Error"), message,
                       headers=dict(exc.headers or {}))
    return Problem(500, "Server error", GENERIC_500)


def login_redirect(request: Request) -> Response:
    """Send a browser to the login page (and back here afterwards, for a GET); HTMX gets ``HX-Redirect``."""
    target = "/login"
    if request.method == "GET" and request.url.path not in ("/", "/login"):
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target += "?next=" + quote(here, safe="")
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def error_response(request: Request, exc: BaseException) -> Response:
    """Render ``exc`` for this request: JSON under /api/, else the error fragment (HTMX) or page (401: the login
    page instead)."""
    if isinstance(exc, NotAuthenticatedError) and not request.url.path.startswith("/api/"):
        return login_redirect(request)
    problem = classify(exc)
    if problem.status >= 500 and not isinstance(exc, (QueueFullError, WorkerStoppedError, StarletteHTTPException,
                                                                PacsError)):
        logger.error("unhandled error on %s %s", request.method, request.url.path,
                     exc_info=(type(exc), exc, exc.__traceback__))
    if request.url.path.startswith("/api/"):
        body: dict[str, Any] = {"error": problem.title, "message": problem.message, "status": problem.status}
        if problem.fields:
            body["fields"] = problem.fields
        body.update(problem.extra)
        return JSONResponse(body, status_code=problem.status, headers=problem.headers)
    context = {"problem": problem}
    if is_htmx(request):
        target = _ERROR_TARGETS.get(request.url.path, "#messages")
        headers = {**problem.headers, "HX-Retarget": target, "HX-Reswap": "innerHTML"}
        return render(request, "_error.html", context, status_code=problem.status, headers=headers)
    return render(request, "error.html", context, status_code=problem.status, headers=problem.headers)


async def _handler(request: Request, exc: Exception) -> Response:
    return error_response(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one handler for every domain error, validation errors, HTTP errors and the catch-all."""
    for cls in (NotAuthenticatedError, PermissionDeniedError, TooManyAttemptsError, UploadTooLargeError,
                imaging.ImagingError, QueueFullError, UserQueueLimitError, WorkerStoppedError, JobNotFoundError,
                JobNotReadyError, ArtifactNotFoundError, audit.RunNotFoundError, RequestValidationError, ValueError,
                PacsError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, _handler)
