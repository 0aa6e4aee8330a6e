"""The administrators' pages: the audit trail, run records and the reproducibility check. Admin role only (403).

=======  ===============================  ==============================================================================
GET      /admin                           filters, the first page of audit events, recent runs, accounts
GET      /admin/events                    the events table for ``user``, ``since``, ``until``, ``action``, ``page``
                                          (HTMX: the ``_audit_table.html`` fragment)
GET      /admin/events/export             the filtered events as ``format=csv`` or ``json`` (a download)
GET      /admin/runs/{run_id}             one run: parameters, seeds, model and library versions, input record,
                                          timings, artifact hashes, ``record.json``, its re-runs
POST     /admin/runs/{run_id}/rerun       queue the same input + parameters + seed again as a new job
GET      /admin/reruns/{job_id}           a re-run's status; once done, whether ``counterfactual.png`` reproduces
=======  ===============================  ==============================================================================

Reading the trail is audited (``audit_view``, ``audit_export``), opening a run record too (``view``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import Engine as Database
from sqlmodel import select

from app import audit
from app.jobs import MASK_UPLOAD, Job, JobManager, JobNotFoundError, JobState
from app.runs.folder import COUNTERFACTUAL, RunFolder, RunFolderError
from app.web.api import submit_job
from app.web.deps import AdminUser, DbDep, JobsDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/admin", tags=["admin"], include_in_schema=False)

PAGE_SIZE = 50
REPRODUCED_ARTIFACT = COUNTERFACTUAL
"""The artifact whose SHA-256 decides whether a re-run reproduced its original."""
_ACTIONS = [a.value for a in audit.AuditAction]
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9998, 12, 31)
"""The date filters' range: ``until`` is inclusive, so the query runs to the next midnight, which must exist."""


@dataclasses.dataclass(frozen=True)
class EventFilters:
    """The admin page's filters, parsed from the query string."""

    user: str | None = None
    since: date | None = None
    until: date | None = None
    action: str | None = None
    page: int = 1

    @classmethod
    def parse(cls, user: str | None, since: str | None, until: str | None, action: str | None,
              page: int) -> EventFilters:
        """Empty fields mean "any"; dates are ``YYYY-MM-DD`` (UTC days, ``until`` inclusive) from
        :data:`FIRST_DAY` to :data:`LAST_DAY`, ``since`` not after ``until``.

        Raises:
            ValueError: a malformed or out-of-range date, dates in the wrong order or an unknown action, naming it.
        """
        def day(name: str, value: str | None) -> date | None:
            if not value:
                return None
            try:
                parsed = date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a date: use YYYY-MM-DD") from None
            if not FIRST_DAY <= parsed <= LAST_DAY:
                raise ValueError(f"{name}={value!r} is out of range: use a date from {FIRST_DAY} to {LAST_DAY}")
            return parsed

        if action and action not in _ACTIONS:
            raise ValueError(f"action={action!r} is not an audited action: choose one from the list")
        first, last = day("since", since), day("until", until)
        if first is not None and last is not None and first > last:
            raise ValueError(f"since={first} is after until={last}: swap them or leave one empty")
        return cls(user=(user or "").strip() or None, since=first, until=last, action=action or None,
                   page=max(1, page))

    def query_args(self) -> dict[str, Any]:
        """Keyword arguments of ``audit.query_events`` / ``count_events`` / ``export_events``."""
        since = datetime.combine(self.since, time.min, tzinfo=UTC) if self.since else None
        until = datetime.combine(self.until + timedelta(days=1), time.min, tzinfo=UTC) if self.until else None
        return {"user": self.user, "action": self.action, "since": since, "until": until}

    def query_string(self, page: int | None = None) -> str:
        """The filters as a query string (for paging and export links)."""
        from urllib.parse import urlencode

        pairs = {"user": self.user or "", "since": self.since.isoformat() if self.since else "",
                 "until": self.until.isoformat() if self.until else "", "action": self.action or ""}
        if page is not None:
            pairs["page"] = str(page)
        return urlencode({k: v for k, v in pairs.items() if v})

    def used(self) -> list[str]:
        """Names of the filters in use (audited; their values may be free text)."""
        return [k for k in ("user", "since", "until", "action") if getattr(self, k)]


def _events_context(db: Database, filters: EventFilters) -> dict[str, Any]:
    where = audit.EventFilter(**filters.query_args())
    total = audit.count_events(db, where)
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(filters.page, pages)
    events = audit.query_events(db, where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return {"events": events, "total": total, "page": page, "pages": pages, "filters": filters,
            "prev_qs": filters.query_string(page - 1) if page > 1 else None,
            "next_qs": filters.query_string(page + 1) if page < pages else None,
            "export_qs": filters.query_string(), "actions": _ACTIONS}


Filter = Annotated[str | None, Query(max_length=150)]
Page = Annotated[int, Query(ge=1, le=1_000_000)]


@router.get("", response_class=HTMLResponse)
def admin_page(request: Request, admin: AdminUser, db: DbDep, user: Filter = None, since: Filter = None,
               until: Filter = None, action: Filter = None, page: Page = 1) -> HTMLResponse:
    """The audit trail (filtered, paged), recent runs and the accounts."""
    filters = EventFilters.parse(user, since, until, action, page)
    context = _events_context(db, filters)
    audit.append_event(db, audit.AuditAction.AUDIT_VIEW, user=admin.user,
                       detail={"filters": filters.used(), "page": context["page"]})
    users = audit.list_users(db)
    context.update(runs=audit.list_runs(db, limit=20), usernames={u.id: u.username for u in users}, users=users,
                   now=audit.utc_now())
    return render(request, "admin.html", context)


@router.get("/events", response_class=HTMLResponse)
def admin_events(request: Request, admin: AdminUser, db: DbDep, user: Filter = None, since: Filter = None,
                 until: Filter = None, action: Filter = None, page: Page = 1) -> HTMLResponse:
    """The events table (a fragment for HTMX, else the whole admin page)."""
    if not is_htmx(request):
        return admin_page(request, admin, db, user, since, until, action, page)
    filters = EventFilters.parse(user, since, until, action, page)
    context = _events_context(db, filters)
    audit.append_event(db, audit.AuditAction.AUDIT_VIEW, user=admin.user,
                       detail={"filters": filters.used(), "page": context["page"]})
    return render(request, "_audit_table.html", context, headers={"HX-Push-Url":
                                                                  f"/admin?{filters.query_string(context['page'])}"})


@router.get("/events/export")
def admin_export(admin: AdminUser, db: DbDep, format: Literal["csv", "json"] = "csv",
                 user: Filter = None, since: Filter = None, until: Filter = None,
                 action: Filter = None) -> StreamingResponse:
    """The filtered events, oldest first, as CSV or JSON (``audit.export_events``)."""
    filters = EventFilters.parse(user, since, until, action, 1)
    chunks = audit.export_events(db, format, audit.EventFilter(**filters.query_args()))
    # the framing and the first event now, so that a database error is an error page rather than a cut-off download
    chunks = itertools.chain(list(itertools.islice(chunks, 2)), chunks)
    audit.append_event(db, audit.AuditAction.AUDIT_EXPORT, user=admin.user,
                       detail={"format": format, "filters": filters.used()})
    stamp = audit.utc_now().strftime("%Y%m%dT%H%M%SZ")
    media = "text/csv; charset=utf-8" if format == "csv" else "application/json"
    return StreamingResponse(chunks, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="vald-md-audit-{stamp}.{format}"'})


def _run_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise audit.RunNotFoundError("There is no run with that id.") from None


def _job_of(jobs: JobManager, run_id: uuid.UUID) -> Job | None:
    try:
        return jobs.get(run_id.hex, "", any_owner=True)
    except JobNotFoundError:
        return None


def _record(job: Job | None) -> dict[str, Any] | None:
    """The run's record as the admin page shows it; ``None`` without a job or a readable record."""
    if job is None:
        return None
    try:
        return RunFolder(job.run_dir).record().to_dict()
    except RunFolderError:
        return None


def rerun_verdict(db: Database, job: Job) -> dict[str, Any]:
    """Whether a re-run reproduced its original: ``state`` ``pending`` | ``reproduced`` | ``differs`` | ``failed``
    with both SHA-256s of ``counterfactual.png`` (from the runs' database records)."""
    original = audit.get_run(db, uuid.UUID(job.rerun_of)) if job.rerun_of else None
    again = audit.get_run(db, uuid.UUID(job.id))
    expected = (original.artifact_hashes or {}).get(REPRODUCED_ARTIFACT) if original else None
    got = (again.artifact_hashes or {}).get(REPRODUCED_ARTIFACT) if again else None
    if not job.state.finished:
        state = "pending"
    elif job.state is not JobState.DONE or got is None or expected is None:
        state = "failed"
    else:
        state = "reproduced" if got == expected else "differs"
    return {"job": job, "state": state, "expected": expected, "got": got}


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def admin_run(request: Request, run_id: str, admin: AdminUser, db: DbDep, jobs: JobsDep) -> HTMLResponse:
    """One run's record: everything needed to reproduce it, and its re-runs."""
    rid = _run_id(run_id)
    run = audit.get_run(db, rid)
    if run is None:
        raise audit.RunNotFoundError("There is no run with that id.")
    with audit.read_session(db) as session:
        input_image = session.get(audit.InputImage, run.input_id)
        owner = session.get(audit.User, run.user_id)
        exports = list(session.exec(select(audit.Export).where(audit.Export.run_id == rid)).all())
    job = _job_of(jobs, rid)
    audit.append_event(db, audit.AuditAction.VIEW, user=admin.user, object_type="run", object_id=rid,
                       detail={"what": "record", "via": admin.via})
    context = {"run": run, "input": input_image, "owner": owner, "exports": exports, "job": job,
               "record": _record(job), "can_rerun": job is not None and job.state is JobState.DONE
               and job.upload_path.is_file(),
               "reruns": [rerun_verdict(db, j) for j in jobs.reruns_of(rid.hex)],
               "params_json": json.dumps(run.params, indent=2, sort_keys=True),
               "versions_json": json.dumps(run.library_versions, indent=2, sort_keys=True)}
    return render(request, "admin_run.html", context)


@router.post("/runs/{run_id}/rerun")
async def admin_rerun(request: Request, run_id: str, admin: AdminUser, db: DbDep, jobs: JobsDep) -> Response:
    """Queue the run again: its stored input (and mask), parameters and first seed, as a new job of this admin.
    HTMX gets the re-run's status fragment, which polls until the verdict is in."""
    rid = _run_id(run_id)
    job = _job_of(jobs, rid)
    if job is None or not job.upload_path.is_file():
        raise audit.RunNotFoundError("This run's stored input is gone, so it cannot be re-run.")
    if job.state is not JobState.DONE:
        raise ValueError(f"This run is {job.state.value}; only finished runs can be re-run.")
    data = job.upload_path.read_bytes()
    mask_path = job.run_dir / MASK_UPLOAD
    mask = mask_path.read_bytes() if mask_path.is_file() else None
    req = dataclasses.replace(job.request, seed=job.seeds[0] if job.seeds else job.request.seed)
    again = await submit_job(jobs, admin.user, data, req, mask, rerun_of=job.id)
    if not is_htmx(request):
        return RedirectResponse(f"/admin/runs/{rid}", status_code=303)
    return render(request, "_rerun.html", {"item": rerun_verdict(db, again)})


@router.get("/reruns/{job_id}", response_class=HTMLResponse)
def admin_rerun_status(request: Request, job_id: str, admin: AdminUser, db: DbDep, jobs: JobsDep) -> HTMLResponse:
    """A re-run's status fragment (polls itself every second until the verdict is in)."""
    job = jobs.get(job_id, "", any_owner=True)
    if job.rerun_of is None:
        raise JobNotFoundError(job_id)
    return render(request, "_rerun.html", {"item": rerun_verdict(db, job)})
