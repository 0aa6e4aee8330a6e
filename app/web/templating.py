"""Jinja2 set-up and the page-or-partial rule.

One template source renders both the full page and the HTMX swap (datasette style): a full page
``extends "base.html"`` and ``include``s ``_partial.html`` fragments; an HTMX request gets the fragment alone.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from app.config import REPO_ROOT
from app.jobs import JobState
from app.runs.review import DISCLAIMER

TEMPLATES_DIR = REPO_ROOT / "templates"
STATIC_DIR = REPO_ROOT / "static"
SHORT_DISCLAIMER = "AI-generated — not for diagnostic use"


def is_htmx(request: Request) -> bool:
    """An HTMX request that expects a fragment (history restores get the full page)."""
    return (request.headers.get("HX-Request") == "true"
            and request.headers.get("HX-History-Restore-Request") != "true")


HISTORY_STATE_CHOICES = tuple(s.value for s in JobState)
"""The history panel's status filter: every job state."""


def _asset_version(static_dir: Path) -> str:
    """A short hash of our own static files, appended to their URLs so browsers refetch after an upgrade."""
    h = hashlib.sha256()
    for f in sorted(static_dir.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(static_dir).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _short_time(value: str | datetime | None) -> str:
    """``2026-12-06 21:40 UTC``: every page writes times in UTC with the zone (the admin pages and the audit trail
    are in UTC; the server's local zone is nobody's business). A naive value is taken as UTC."""
    if value is None:
        return ""
    t = datetime.fromisoformat(value) if isinstance(value, str) else value
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def make_templates(static_dir: Path = STATIC_DIR, templates_dir: Path = TEMPLATES_DIR) -> Jinja2Templates:
    """The app's template environment with its filters and globals."""
    templates = Jinja2Templates(directory=str(templates_dir))
    env = templates.env
    env.globals.update(asset_version=_asset_version(static_dir), disclaimer=SHORT_DISCLAIMER,
                       long_disclaimer=DISCLAIMER, history_states=HISTORY_STATE_CHOICES)
    env.filters.update(short_time=_short_time, duration=_duration, ordinal=_ordinal)
    env.trim_blocks = True
    env.lstrip_blocks = True
    return templates


def render(request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200,
           headers: dict[str, str] | None = None) -> HTMLResponse:
    """Render ``name`` with the request and the signed-in caller in the context; ``Vary: HX-Request`` because pages
    and fragments differ."""
    templates: Jinja2Templates = request.app.state.templates
    # the signed-in caller (``app.web.auth.Caller``) for base.html: user name, logout form, CSRF token
    context = {"caller": getattr(request.state, "caller", None), **(context or {})}
    response = templates.TemplateResponse(request, name, context, status_code=status_code, headers=headers)
    response.headers["Vary"] = "HX-Request"
    return response
