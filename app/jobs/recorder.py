"""The audit trail of the queue: :class:`AuditRecorder` writes to the audit database, :class:`NullRecorder` (tests,
tools) keeps no records beyond ``job.json``. :class:`app.jobs.JobManager` talks to either as a :class:`Recorder`.

With an audit database, the database is the record of every run: a submission records the upload
(``audit.record_input``: hashes, size, HMAC'd DICOM UIDs) and the run (``audit.create_run``: parameters, seeds,
model hash, library versions), and the run's id becomes the job id; the worker moves the run to ``running`` and
finishes it as ``done`` / ``failed`` / ``cancelled`` with the reason, effective steps, timings and artifact
hashes, always *before* the job's in-memory state changes (with the shared job table, ``VALD_MD_JOB_STATE=database``:
after the job's row, and only if the row was still this front's claim). In the single-process mode, at start-up
``audit.mark_interrupted_runs`` marks unfinished runs ``interrupted`` and the job store does the same to their
``job.json``, taking the database's word (:meth:`Recorder.recorded_status`) where the two differ. With the job
table, neither happens: unfinished runs may be another front's; the table's recovery
(``app.jobs.jobtable.JobTable.recover_stale``) queues a dead front's run again or fails it, and the store marks only
the ``job.json`` of a run whose row is no longer queued or running. ``job.json`` keeps what the pages need without
a query.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy import Engine as Database

from app import audit, imaging
from app.fileio import sha256_bytes as sha256
from app.jobs.job import Job, JobState, final_timings, now
from app.provenance import library_versions
from app.runs.review import ReviewRequest

__all__ = ["AuditRecorder", "NullRecorder", "Recorder"]

logger = logging.getLogger("vald_md.jobs")


class Recorder:
    """What the job manager records, and where; this base records nothing (see :class:`NullRecorder`).

    Every method is called outside the manager's lock. Job ids come from here: a recorder that keeps records makes
    the job's id its record's id.
    """

    def require_user(self, user: audit.User | None) -> None:
        """Refuse a submission without a real user when records name one (here: any owner will do).

        Raises:
            ValueError: ``user`` is ``None`` and this recorder keeps records (a programming error).
        """

    def record_submission(self, user: audit.User | None, data: bytes, decoded: imaging.DecodedImage,
                          req: ReviewRequest, seeds: list[int], has_mask: bool, rerun_of: str | None,
                          model_sha256: str) -> tuple[str | None, str]:
        """Record an accepted upload and its run.

        Returns:
            (the upload's input id, ``None`` here; the new job id, 32 hex digits: here a fresh uuid4).
        """
        return None, uuid.uuid4().hex

    def refused(self, user: audit.User | None, data: bytes, error: Exception) -> None:
        """A refused submission leaves a trace (never raises)."""

    def start(self, job: Job) -> None:
        """The worker took the job (never raises)."""

    def finish(self, job: Job, state: JobState, reason: str | None, *,
               artifact_hashes: dict[str, str] | None = None) -> None:
        """The job's run ended in ``state``: called before the job's own state changes; never raises."""

    def deleted(self, job: Job, actor: audit.User | None) -> None:
        """A finished run is about to be deleted (raises if it cannot be recorded: then nothing is deleted)."""

    def recorded_status(self, job: Job) -> JobState | None:
        """The recorded status of the job's run; ``None`` without a record (here: always)."""
        return None


class NullRecorder(Recorder):
    """Keeps no records (tests, tools): job ids are fresh uuid4s and every event is dropped. The null object that
    spares the manager an ``if db`` before every record."""


class AuditRecorder(Recorder):
    """Records the queue's events in the audit database.

    Args:
        db: the audit database (``audit.init_db``).
        uid_secret: the HMAC key for DICOM UIDs (``audit.load_or_create_secret``).
        store_plain_uids: also store DICOM UIDs in clear in the database (site opt-in).

    Raises:
        ValueError: no ``uid_secret``.
    """

    def __init__(self, db: Database, uid_secret: bytes | None, *, store_plain_uids: bool = False) -> None:
        if uid_secret is None:
            raise ValueError("uid_secret is required with db: pass audit.load_or_create_secret(path)")
        self.db = db
        self.uid_secret = uid_secret
        self.store_plain_uids = store_plain_uids

    def require_user(self, user: audit.User | None) -> None:
        """Records name their user: an owner given as a plain string is refused."""
        if user is None:
            raise ValueError("submit: pass the audit.User as owner when the manager keeps an audit database")

    def record_submission(self, user: audit.User | None, data: bytes, decoded: imaging.DecodedImage,
                          req: ReviewRequest, seeds: list[int], has_mask: bool, rerun_of: str | None,
                          model_sha256: str) -> tuple[str | None, str]:
        """``audit.record_input`` + ``audit.create_run``; returns (input id, job id = the run id's hex).

        Raises:
            ValueError: no ``user``.
        """
        self.require_user(user)
        assert user is not None
        meta = decoded.meta
        record = audit.record_input(
            self.db, user=user, upload_sha256=sha256(data),
            pixel_sha256=sha256(np.ascontiguousarray(decoded.pixels).tobytes()), rows=meta.rows, cols=meta.columns,
            source_format=meta.source_format, uid_secret=self.uid_secret, modality=meta.modality,
            study_instance_uid=meta.study_instance_uid, series_instance_uid=meta.series_instance_uid,
            sop_instance_uid=meta.sop_instance_uid, store_plain_uids=self.store_plain_uids)
        # the operator's case label is theirs to see on the result, never the audit's
        params: dict[str, Any] = {**{k: v for k, v in asdict(req).items() if k != "case_label"}, "mask": has_mask}
        if rerun_of is not None:
            params["rerun_of"] = rerun_of
        run = audit.create_run(self.db, user=user, input_id=record.id, params=params, seeds=seeds,
                               model_sha256=model_sha256, library_versions=library_versions())
        return str(record.id), run.id.hex

    def refused(self, user: audit.User | None, data: bytes, error: Exception) -> None:
        """Who, how many bytes, which kind of refusal (never the message)."""
        try:
            audit.append_event(self.db, audit.AuditAction.UPLOAD, user=user, outcome=audit.Outcome.MINOR_FAILURE,
                               detail={"refused": type(error).__name__, "size_bytes": len(data)})
        except Exception:  # the refusal itself must still reach the user
            logger.exception("could not audit a refused upload")

    def start(self, job: Job) -> None:
        """Move the job's run to ``running`` (jobs without a recorded input have no run)."""
        if job.input_id is None:
            return
        try:
            audit.start_run(self.db, uuid.UUID(job.id), now=job.started_at)
        except audit.InvalidRunTransitionError:  # a job queued again after its front died (app.jobs.jobtable)
            logger.info("job %s: its run was started by an earlier attempt", job.id)
        except Exception:  # see finish
            logger.exception("job %s: could not record its start in the audit database", job.id)

    def finish(self, job: Job, state: JobState, reason: str | None, *,
               artifact_hashes: dict[str, str] | None = None) -> None:
        """Finish the job's run: status, reason, effective steps, timings, artifact hashes and who cancelled."""
        if job.input_id is None:
            return
        try:
            audit.finish_run(self.db, uuid.UUID(job.id), state.value, reason=reason,
                             effective_steps=job.effective_steps, timings=final_timings(job, now()),
                             artifact_hashes=artifact_hashes, actor=job._cancelled_by)
        except audit.InvalidRunTransitionError as e:  # another front ended it (this one lost its claim)
            logger.warning("job %s: its end (%s) is not recorded: %s", job.id, state.value, e)
        except Exception:  # a database hiccup must not kill the worker; job.json still says it
            logger.exception("job %s: could not record its end (%s) in the audit database", job.id, state.value)

    def deleted(self, job: Job, actor: audit.User | None) -> None:
        """A ``run_delete`` event by ``actor`` (default: the job's submitter)."""
        audit.append_event(self.db, audit.AuditAction.RUN_DELETE, user=actor or job._user, object_type="run",
                           object_id=uuid.UUID(job.id), detail={"state": job.state.value})

    def recorded_status(self, job: Job) -> JobState | None:
        """The run's status in the database; ``None`` for a job without a recorded input or run."""
        if job.input_id is None:
            return None
        try:
            run = audit.get_run(self.db, uuid.UUID(job.id))
        except (ValueError, LookupError):
            return None
        return JobState(run.status) if run is not None else None
