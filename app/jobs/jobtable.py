"""The shared job state: every accepted job as a row of the database's ``job`` table (``VALD_MD_JOB_STATE=database``).

Several front processes (``vald-md serve`` on one or more hosts) share one database (PostgreSQL; SQLite for one
host) and one ``data_dir`` volume. Each keeps its jobs in memory as before, and :class:`JobTable` makes the table
the queue of all of them:

- **admission** (:meth:`JobTable.admit`, :meth:`JobTable.insert`): the per-user limit, the queue's length and its
  cost budget are counted over every front's jobs, and the count and the insert are one transaction (PostgreSQL:
  under the advisory lock :data:`JOB_QUEUE_LOCK_KEY`; SQLite: ``BEGIN IMMEDIATE``), so two fronts never both take
  the last slot;
- **claim** (:meth:`JobTable.claim_first`): a worker takes a queued job with one compare-and-set
  ``UPDATE job SET state = 'running' ... WHERE id = :id AND state = 'queued'``; on PostgreSQL a
  ``SELECT ... FOR UPDATE SKIP LOCKED`` goes first, so a row another front is claiming is passed over instead of
  waited for. Each queued job is executed exactly once;
- **heartbeat** (:meth:`JobTable.heartbeat`): the front running a job renews its claim every
  ``job_heartbeat_s`` seconds (with its progress) and learns there whether another front asked to cancel it, and
  for whom (``cancel_requested_by``: the audit record names who cancelled);
- **recovery** (:meth:`JobTable.recover_stale`): a ``running`` job whose claim was not renewed for
  ``job_stale_after_s`` seconds belongs to a front that died: it is queued again once (its attempt 2), then marked
  ``failed`` with :data:`STALE_FAILED`; never left "running". Queued jobs simply stay queued across restarts;
- **changes** (:meth:`JobTable.changes`): what each front polls to show other fronts' jobs (state, progress).

The run folder's ``job.json`` stays the artifact of record (written as in the single-process mode, on the shared
volume) and the only place of the request's parameters: the table holds no request (its case label is free text
that may name the patient, and stays out of the database); a front that claims a job it did not accept reads it
from there (:meth:`app.jobs.store.JobStore.load`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, text, update
from sqlalchemy import Engine as Database
from sqlmodel import Session, col, select

from app import audit
from app.jobs.job import Job, JobState, now
from app.jobs.policy import Limits

__all__ = ["JOB_QUEUE_LOCK_KEY", "MAX_ATTEMPTS", "STALE_FAILED", "CancelRequest", "JobTable", "QueueCounts",
           "Recovered", "default_front_id"]

logger = logging.getLogger("vald_md.jobs")

JOB_QUEUE_LOCK_KEY = 0x56414C51  # "VALQ": admissions of every front are serialized; the audit chain's key differs
"""Key of the PostgreSQL transaction-scoped advisory lock held while a front counts the queue and inserts a job."""

MAX_ATTEMPTS = 2
"""A job is claimed at most this many times: once, and once more after the front running it died."""

STALE_FAILED = ("The server process running this job stopped twice before the job finished, so it was not run "
                "again. Please submit it again.")
"""The error of a job given up after :data:`MAX_ATTEMPTS` claims whose fronts died."""

_LIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


def default_front_id() -> str:
    """A name for this process in ``claimed_by``: host name, process id and 6 random hex digits (new every start)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class QueueCounts:
    """The site's queue as one owner's submission sees it (every front's jobs).

    Attributes:
        owner_active: the owner's jobs queued or running.
        waiting: queued jobs; waiting_cost: their total cost, step-samples.
    """

    owner_active: int
    waiting: int
    waiting_cost: int


@dataclass(frozen=True)
class CancelRequest:
    """A cancel asked for a running job (:meth:`JobTable.heartbeat`): ``by`` is the id of the user who asked
    (``None``: its owner, or unknown); ``lost``: not a user's cancel, the row is no longer this front's claim (it
    stalled and the job was queued again, given up or ended elsewhere): the run stops and keeps nothing."""

    by: uuid.UUID | None = None
    lost: bool = False


@dataclass(frozen=True)
class Recovered:
    """What :meth:`JobTable.recover_stale` did: job ids queued again, job ids given up (``failed``), and job ids
    ended ``cancelled`` (a cancel had been asked for them)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


class JobTable:
    """The ``job`` table of the audit database, seen from one front process.

    Args:
        db: the database (``audit.init_db``: migration ``0003_job_table`` made the table).
        front_id: this front's name, written to ``claimed_by`` / ``submitted_by`` (at most 128 characters).
        stale_after_s: a running job's claim older than this many seconds is its dead front's (> 0).

    Raises:
        ValueError: an empty or too long ``front_id``, or ``stale_after_s`` not above 0.
    """

    def __init__(self, db: Database, front_id: str, *, stale_after_s: float = 30.0) -> None:
        if not front_id or len(front_id) > 128:
            raise ValueError(f"front_id={front_id!r} must be 1 to 128 characters")
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s={stale_after_s} must be above 0 seconds")
        self.db = db
        self.front_id = front_id
        self.stale_after_s = stale_after_s

    @contextmanager
    def _queue_lock(self) -> Iterator[Session]:
        """A write transaction that holds the queue's admission lock (see the module's docstring)."""
        with Session(self.db, expire_on_commit=False) as session, session.begin():
            if self.db.dialect.name == "postgresql":
                session.connection().execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": JOB_QUEUE_LOCK_KEY})
            else:
                session.connection()  # SQLite: BEGIN IMMEDIATE now (app.audit.db), before the counts are read
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction without the admission lock (claims, heartbeats, ends: row-level)."""
        with Session(self.db, expire_on_commit=False) as session, session.begin():
            yield session

    # -- admission ------------------------------------------------------------------------------------------------
    @staticmethod
    def _counts(session: Session, owner: str) -> QueueCounts:
        rows = session.exec(select(audit.JobRecord.state, audit.JobRecord.owner, func.count(),
                                   func.coalesce(func.sum(audit.JobRecord.cost), 0))
                            .where(col(audit.JobRecord.state).in_(_LIVE))
                            .group_by(audit.JobRecord.state, audit.JobRecord.owner)).all()
        active = sum(int(n) for _state, who, n, _cost in rows if who == owner)
        waiting = sum(int(n) for state, _who, n, _cost in rows if state == JobState.QUEUED.value)
        cost = sum(int(c) for state, _who, _n, c in rows if state == JobState.QUEUED.value)
        return QueueCounts(owner_active=active, waiting=waiting, waiting_cost=cost)

    def counts(self, owner: str) -> QueueCounts:
        """The queue now, for ``owner`` (one read)."""
        with audit.read_session(self.db) as session:
            return self._counts(session, owner)

    def admit(self, owner: str, cost: int, limits: Limits) -> None:
        """Refuse early what :meth:`insert` would refuse now (a read; :meth:`insert` checks again).

        Raises:
            UserQueueLimitError, QueueFullError: see :meth:`app.jobs.policy.Limits.admit_counts`.
        """
        c = self.counts(owner)
        limits.admit_counts(owner_active=c.owner_active, waiting=c.waiting, waiting_cost=c.waiting_cost, cost=cost)

    def insert(self, job: Job, limits: Limits) -> None:
        """Queue ``job`` for every front: count the site's queue and insert its row in one locked transaction.

        Raises:
            UserQueueLimitError, QueueFullError: the owner's limit, or the site's queue, is full; nothing inserted.
        """
        with self._queue_lock() as session:
            c = self._counts(session, job.owner)
            limits.admit_counts(owner_active=c.owner_active, waiting=c.waiting, waiting_cost=c.waiting_cost,
                                cost=job.cost)
            # no request: its parameters (and the case label, free text that may name the patient) stay in job.json
            session.add(audit.JobRecord(id=job.id, owner=job.owner, state=JobState.QUEUED.value, cost=job.cost,
                                        created_at=job.created_at, updated_at=now(), submitted_by=self.front_id))

    # -- the worker's side ------------------------------------------------------------------------------------------
    def claim_first(self, job_ids: Sequence[str], started_at: datetime) -> str | None:
        """Claim the first of ``job_ids`` (in that order) that is still queued, for this front.

        Args:
            job_ids: candidates, best first (the front's fair order of the queue).
            started_at: the claim's time (aware), the job's ``started_at``.

        Returns:
            The id claimed (now ``running``, ``claimed_by`` this front, ``attempts`` + 1), or ``None`` when every
            candidate was claimed, cancelled or removed by someone else.
        """
        pg = self.db.dialect.name == "postgresql"
        for job_id in job_ids:
            with self._write() as session:
                if pg:  # pass over a row another front is claiming right now instead of waiting for its lock
                    locked = session.exec(select(audit.JobRecord.id)
                                          .where(audit.JobRecord.id == job_id,
                                                 audit.JobRecord.state == JobState.QUEUED.value)
                                          .with_for_update(skip_locked=True)).first()
                    if locked is None:
                        continue
                claimed = session.connection().execute(
                    update(audit.JobRecord)
                    .where(col(audit.JobRecord.id) == job_id, col(audit.JobRecord.state) == JobState.QUEUED.value)
                    .values(state=JobState.RUNNING.value, claimed_by=self.front_id, started_at=started_at,
                            heartbeat_at=now(), updated_at=now(), attempts=audit.JobRecord.attempts + 1, step=0,
                            total=0, error=None))
                if claimed.rowcount == 1:
                    return job_id
        return None

    def heartbeat(self, job_id: str, step: int, total: int) -> CancelRequest | None:
        """Renew this front's claim on its running job and publish its progress.

        Returns:
            The cancel requested for it (from any front), or ``CancelRequest(lost=True)`` when no row was renewed
            (the claim is no longer this front's): the caller cancels the run; ``None``: neither.
        """
        with self._write() as session:
            renewed = session.connection().execute(
                update(audit.JobRecord)
                .where(col(audit.JobRecord.id) == job_id, col(audit.JobRecord.claimed_by) == self.front_id,
                       col(audit.JobRecord.state) == JobState.RUNNING.value)
                .values(heartbeat_at=now(), updated_at=now(), step=step, total=total))
            row = session.exec(select(audit.JobRecord.cancel_requested, audit.JobRecord.cancel_requested_by)
                               .where(audit.JobRecord.id == job_id)).first()
        if renewed.rowcount != 1:
            return CancelRequest(lost=True)
        if row is None or not row[0]:
            return None
        return CancelRequest(by=row[1])

    def finish(self, job: Job, state: JobState, error: str | None, finished_at: datetime) -> bool:
        """Write a job's end to its row, if the row is still this front's claim, or still queued (a queued job
        cancelled here, or one whose stalled front ends it before another front claimed it again).

        Args:
            job: the job (its progress, ``step`` / ``total``, is written too).
            state: its terminal state; error: the message for the user (``None`` unless failed);
            finished_at: when it ended (aware).

        Returns:
            Whether the row changed (``False``: another front owns it now, or it ended already).
        """
        with self._write() as session:
            result = session.connection().execute(
                update(audit.JobRecord)
                .where(col(audit.JobRecord.id) == job.id, col(audit.JobRecord.state).in_(_LIVE),
                       (col(audit.JobRecord.claimed_by) == self.front_id)
                       | (col(audit.JobRecord.state) == JobState.QUEUED.value))
                .values(state=state.value, error=error, finished_at=finished_at, updated_at=now(), step=job.step,
                        total=job.total))
        return bool(result.rowcount == 1)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job if it is still queued (compare-and-set).

        Returns:
            Whether it was queued (and is cancelled now); ``False``: a front claimed or ended it first.
        """
        with self._write() as session:
            result = session.connection().execute(
                update(audit.JobRecord)
                .where(col(audit.JobRecord.id) == job_id, col(audit.JobRecord.state) == JobState.QUEUED.value)
                .values(state=JobState.CANCELLED.value, error=None, finished_at=now(), updated_at=now(),
                        cancel_requested=True))
        return bool(result.rowcount == 1)

    def request_cancel(self, job_id: str, actor: uuid.UUID | None = None) -> None:
        """Ask whichever front runs the job to cancel it (it sees the flag at its next heartbeat).

        The first request's user is kept: a later one (the owner's after an administrator's, say) does not replace it.

        Args:
            job_id: the job.
            actor: the id of the user who cancels (recorded with the run); ``None``: its owner.
        """
        live = (col(audit.JobRecord.id) == job_id, col(audit.JobRecord.state).in_(_LIVE))
        with self._write() as session:
            session.connection().execute(
                update(audit.JobRecord).where(*live, col(audit.JobRecord.cancel_requested).is_(False))
                .values(cancel_requested_by=actor))
            session.connection().execute(
                update(audit.JobRecord).where(*live).values(cancel_requested=True, updated_at=now()))

    def recover_stale(self, *, own_claims: bool = False) -> Recovered:
        """Release the running jobs of fronts that died: queued again before their :data:`MAX_ATTEMPTS`-th claim,
        else ``failed`` with :data:`STALE_FAILED`; a job whose cancel was asked is ended ``cancelled`` instead.

        Args:
            own_claims: also treat every running job claimed under this front's id as dead, however recent its
                heartbeat (at start-up, with a fixed ``front_id``: this process cannot be running anything yet).

        Returns:
            The ids queued again, failed and cancelled.
        """
        cutoff = now() - timedelta(seconds=self.stale_after_s)
        stale = (col(audit.JobRecord.heartbeat_at) < cutoff) | col(audit.JobRecord.heartbeat_at).is_(None)
        if own_claims:
            stale = stale | (col(audit.JobRecord.claimed_by) == self.front_id)
        done = Recovered()
        with audit.read_session(self.db) as session:  # a read first: most beats find nothing to take the lock for
            if session.exec(select(audit.JobRecord.id).where(audit.JobRecord.state == JobState.RUNNING.value, stale)
                            .limit(1)).first() is None:
                return done
        with self._write() as session:
            rows = session.exec(select(audit.JobRecord.id, audit.JobRecord.attempts, audit.JobRecord.claimed_by,
                                       audit.JobRecord.cancel_requested)
                                .where(audit.JobRecord.state == JobState.RUNNING.value, stale)
                                .with_for_update(skip_locked=True)).all()
            for job_id, attempts, claimed_by, cancel_requested in rows:
                values: dict[str, object]
                if cancel_requested:  # nobody wants it run again
                    values, ids, what = ({"state": JobState.CANCELLED.value, "error": None, "finished_at": now()},
                                         done.cancelled, "cancelled (a cancel was asked)")
                elif attempts < MAX_ATTEMPTS:
                    values, ids, what = ({"state": JobState.QUEUED.value, "claimed_by": None, "heartbeat_at": None,
                                          "step": 0, "total": 0},
                                         done.requeued, f"queued again (attempt {attempts + 1})")
                else:
                    values, ids, what = ({"state": JobState.FAILED.value, "error": STALE_FAILED, "finished_at": now()},
                                         done.failed, "failed")
                session.connection().execute(
                    update(audit.JobRecord)
                    .where(col(audit.JobRecord.id) == job_id, col(audit.JobRecord.state) == JobState.RUNNING.value)
                    .values(updated_at=now(), **values))
                ids.append(job_id)
                logger.warning("job %s: its front %s stopped renewing its claim; %s", job_id, claimed_by, what)
        return done

    # -- reading ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> audit.JobRecord | None:
        """The job's row, or ``None``."""
        with audit.read_session(self.db) as session:
            return session.get(audit.JobRecord, job_id)

    def changes(self, since: datetime | None) -> list[audit.JobRecord]:
        """Rows queued or running, and rows changed at or after ``since`` (every row for ``None``), oldest first."""
        where: ColumnElement[bool] = col(audit.JobRecord.state).in_(_LIVE)
        if since is not None:
            where = where | (col(audit.JobRecord.updated_at) >= since)
        with audit.read_session(self.db) as session:
            return list(session.exec(select(audit.JobRecord).where(where)
                                     .order_by(col(audit.JobRecord.created_at), col(audit.JobRecord.id))).all())

    def existing(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` still have a row (the others' runs were deleted, on any front)."""
        if not job_ids:
            return set()
        with audit.read_session(self.db) as session:
            return set(session.exec(select(audit.JobRecord.id).where(col(audit.JobRecord.id).in_(list(job_ids)))))

    def last_served(self, owners: Sequence[str]) -> dict[str, datetime]:
        """For each of ``owners`` with an ended job: when their latest job ended (the fair order's "served")."""
        if not owners:
            return {}
        with audit.read_session(self.db) as session:
            rows = session.exec(select(audit.JobRecord.owner, func.max(audit.JobRecord.finished_at))
                                .where(col(audit.JobRecord.owner).in_(list(owners)),
                                       col(audit.JobRecord.finished_at).is_not(None))
                                .group_by(audit.JobRecord.owner)).all()
        return {str(owner): t for owner, t in rows if t is not None}

    def delete(self, job_id: str) -> None:
        """Remove an ended job's row (its run was deleted)."""
        with self._write() as session:
            row = session.get(audit.JobRecord, job_id)
            if row is not None and row.state not in _LIVE:
                session.delete(row)
