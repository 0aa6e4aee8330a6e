"""The audit events that routes write themselves (the data layer and the job manager write the rest).

=====================  ==================================================================================
``view``               a result page (``/runs/{id}`` once done) or a run file (``/api/v1/jobs/{id}/artifacts``)
``export``             an export leaving the system (``annotated.png``, ``secondary-capture.dcm``,
                       ``record.json``, ``bundle.zip``): ``audit.record_export`` with the SHA-256 of the bytes
``upload``             a file inspected on ``/inspect`` (decoded for its facts, not stored)
=====================  ==================================================================================

Thumbnails, progress previews and overlays re-rendered for the display controls are part of the page view and
not audited one by one. Blocking (database): sync routes call these directly (FastAPI runs them in a thread),
async routes through ``run_in_threadpool``.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import Engine as Database

from app import audit
from app.jobs import Job
from app.web.auth import Caller


def run_uuid(job: Job) -> uuid.UUID:
    """The job's id as the UUID of its ``audit.Run`` (the job id is the run id's hex form)."""
    return uuid.UUID(job.id)


def audit_view(db: Database, caller: Caller, job: Job, what: str) -> None:
    """One ``view`` event: ``what`` is ``"result"`` (the page) or an artifact's name."""
    audit.append_event(db, audit.AuditAction.VIEW, user=caller.user, object_type="run", object_id=run_uuid(job),
                       detail={"what": what, "via": caller.via})


def audit_export(db: Database, caller: Caller, job: Job, kind: str, content: bytes) -> None:
    """One ``export`` event with the exported bytes' SHA-256 (and an ``Export`` row when the run is recorded)."""
    digest = hashlib.sha256(content).hexdigest()
    if job.input_id is not None:
        audit.record_export(db, run_id=run_uuid(job), kind=kind, sha256=digest, user=caller.user)
        return
    # a run from before the audit database existed: the event alone
    audit.append_event(db, audit.AuditAction.EXPORT, user=caller.user, object_type="run", object_id=run_uuid(job),
                       detail={"kind": kind, "sha256": digest})


def audit_inspect(db: Database, caller: Caller, summary: dict[str, Any], size_bytes: int) -> None:
    """An ``upload`` event for a file decoded on ``/inspect`` and not stored."""
    audit.append_event(db, audit.AuditAction.UPLOAD, user=caller.user, object_type=None,
                       detail={"stored": False, "source_format": summary.get("source_format"),
                               "modality": summary.get("modality"), "rows": summary.get("rows"),
                               "cols": summary.get("columns"), "size_bytes": size_bytes})
