"""The audit events that routes write themselves (the data layer and the job manager write the rest).

=====================  ==================================================================================
``view``               a result page (``/runs/{id}`` once done), or a run file fetched on its own (a download, a
                       token client, an address typed into the browser: ``/api/v1/jobs/{id}/artifacts``,
                       ``/pixels/input.npy``)
``export``             an export leaving the system (``annotated.png``, ``secondary-capture.dcm``,
                       ``record.json``, ``bundle.zip``): ``audit.record_export`` with the SHA-256 of the bytes
=====================  ==================================================================================

One user action, one event. Opening a run is one ``view``: the images and pixels that the result page itself
fetches (a signed-in browser's ``Sec-Fetch-Dest: image`` or ``empty`` request, not a download:
:func:`part_of_page`) belong to it, as do thumbnails, progress previews and overlays re-rendered for the display
controls. Uploading a file for a run is one ``upload``, written by the job manager with the input record; the
facts preview that the form asks ``/inspect`` for when a file is chosen is a step of that upload (nothing is
stored; the facts go back to the sender only) and no event of its own. Blocking (database): sync routes call these
directly (FastAPI runs them in a thread), async routes through ``run_in_threadpool``.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Engine as Database
from starlette.requests import Request

from app import audit
from app.fileio import sha256_bytes
from app.jobs import Job
from app.web.auth import Caller


def run_uuid(job: Job) -> uuid.UUID:
    """The job's id as the UUID of its ``audit.Run`` (the job id is the run id's hex form)."""
    return uuid.UUID(job.id)


PAGE_FETCH_DESTINATIONS = frozenset({"image", "empty"})
"""``Sec-Fetch-Dest`` of a page's own ``<img>`` and ``fetch()`` requests (a typed address says ``document``)."""


def part_of_page(request: Request, caller: Caller, *, download: bool = False) -> bool:
    """Whether fetching a run file is part of viewing its result page, already audited as that page's ``view``: a
    signed-in browser's image or script fetch (``Sec-Fetch-Dest``), not a download. A token client, a download and
    a request without the header (not a browser, or an old one) are audited on their own."""
    return (caller.via == "session" and not download
            and request.headers.get("sec-fetch-dest", "") in PAGE_FETCH_DESTINATIONS)


def audit_view(db: Database, caller: Caller, job: Job, what: str) -> None:
    """One ``view`` event: ``what`` is ``"result"`` (the page) or an artifact's name."""
    audit.append_event(db, audit.AuditAction.VIEW, user=caller.user, object_type="run", object_id=run_uuid(job),
                       detail={"what": what, "via": caller.via})


def audit_export(db: Database, caller: Caller, job: Job, kind: str, content: bytes) -> None:
    """One ``export`` event with the exported bytes' SHA-256 (and an ``Export`` row when the run is recorded)."""
    digest = sha256_bytes(content)
    if job.input_id is not None:
        audit.record_export(db, run_id=run_uuid(job), kind=kind, sha256=digest, user=caller.user)
        return
    # a run from before the audit database existed: the event alone
    audit.append_event(db, audit.AuditAction.EXPORT, user=caller.user, object_type="run", object_id=run_uuid(job),
                       detail={"kind": kind, "sha256": digest})
