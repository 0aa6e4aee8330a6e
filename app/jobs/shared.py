"""The job manager's half that speaks to the shared job table (``VALD_MD_JOB_STATE=database``): several front
processes on one database and one run volume.

:class:`SharedTableSync` is a mixin of :class:`app.jobs.manager.JobManager`: it holds no state of its own and works
on the manager's (declared below for the type checker) under the manager's lock ``_cond``, with the database I/O
outside that lock. What it does: start-up (which unfinished ``job.json`` files the table still runs), adopting a job
another front accepted, cancelling across fronts, the heartbeat thread (renew this front's claims, recover dead
fronts' jobs, poll for every front's changes, retry the ends the database refused) and bringing a job to what its
row says.

A run whose claim this front lost (its heartbeat renewed no row, or the table gave the job up) is cancelled here
with the reason :data:`CLAIM_LOST`; its end is then not this front's to keep (the row says who ends it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from app import audit
from app.jobs.job import Job, JobState, now
from app.jobs.jobtable import STALE_FAILED, JobTable, Recovered

if TYPE_CHECKING:
    from app.jobs.store import JobStore

__all__ = ["CLAIM_LOST", "END_RETRY_S", "SharedTableSync", "micros"]

logger = logging.getLogger("vald_md.jobs")

CLAIM_LOST = "claim lost"
"""The cancel reason of a run whose claim on its table row this front no longer holds."""

END_RETRY_S = (0.2, 0.5, 1.0)
"""Waits, seconds, before each further try to write a job's end to its row after a database error (then the
heartbeat thread retries it at every beat)."""

SWEEP_EVERY = 10
"""Every this many beats, forget the finished jobs another front deleted (their row and run folder are gone)."""


class SharedTableSync:
    """The shared job table's side of the manager (a mixin; see the module docstring)."""

    # the manager's state this half reads and changes (set by JobManager.__init__)
    table: JobTable | None
    heartbeat_s: float
    store: JobStore
    _cond: threading.Condition
    _jobs: dict[str, Job]
    _pending: list[Job]
    _running: list[Job]
    _served: dict[str, int]
    _busy_owners: set[str]
    _synced_at: datetime | None
    _submitting: set[str]
    _stopping: bool
    _pending_ends: dict[str, tuple[Job, JobState, str | None, datetime]]
    _awaiting_final: set[str]

    @property
    def _any_worker_alive(self) -> bool:
        raise NotImplementedError

    def _end(self, job: Job, state: JobState, *, error: str | None = None, reason: str | None = None,
             artifact_hashes: dict[str, str] | None = None, row_ended: bool = False) -> None:
        raise NotImplementedError

    def _alive_in_table(self, job: Job) -> bool:
        """The unfinished ``job.json`` of ``job`` is still queued or running in the job table, or its row ended and
        the front that ended it writes its final ``job.json`` (start-up): either way it is not ``interrupted``.

        A job whose row ended is awaited: the heartbeat thread re-reads it until its ``job.json`` is final."""
        assert self.table is not None
        row = self.table.get(job.id)
        if row is None:
            return False
        if JobState(row.state).finished:
            self._awaiting_final.add(job.id)
        return True

    def _adopt(self, job_id: str) -> Job | None:
        """The job ``job_id`` from the table and the shared volume, now known here too; ``None`` if unknown."""
        assert self.table is not None
        row = self.table.get(job_id)
        loaded = self.store.load(job_id) if row is not None else None
        if row is None or loaded is None:
            return None
        with self._cond:
            if job_id in self._submitting:  # its submission registers it
                return None
            job = self._jobs.setdefault(job_id, loaded)
            self._apply_row(job, row, final=loaded)
        return job

    def _cancel_here(self, job: Job, actor: audit.User | None) -> bool:
        """With a job table: whether :meth:`cancel` goes on as in one process (the job was still queued and is
        cancelled in the table now, or this front runs it); else another front runs it and was asked to cancel, on
        behalf of ``actor`` (``None``: the owner)."""
        assert self.table is not None
        if job.state is JobState.QUEUED and self.table.cancel_queued(job.id):
            return True
        with self._cond:
            if job in self._running:
                return True
        self.table.request_cancel(job.id, actor.id if actor is not None else None)
        return False

    def _beat(self) -> None:
        """The job table's thread: renew the running job's claim, recover dead fronts' jobs and poll for changes,
        every ``heartbeat_s`` seconds, until the worker has stopped."""
        beats = 0
        while True:
            finished = self._stopping and not self._any_worker_alive
            try:
                self._retry_ends()
                self._sync_shared()
                assert self.table is not None
                self._recover(self.table.recover_stale())
                if beats % SWEEP_EVERY == 0:
                    self._forget_deleted()
            except Exception:  # a database hiccup: try again at the next beat
                logger.exception("could not update the job table")
            if finished:
                return
            beats += 1
            time.sleep(self.heartbeat_s)

    def _finish_row(self, job: Job, state: JobState, error: str | None, finished_at: datetime) -> bool | None:
        """Write a job's end to its row, trying again after a database error (:data:`END_RETRY_S`); no lock held.

        Returns:
            What :meth:`JobTable.finish` says (``False``: the row was not this front's claim, nor queued); ``None``:
            the database failed every try (logged).
        """
        assert self.table is not None
        for wait_s in (*END_RETRY_S, None):
            try:
                return self.table.finish(job, state, error, finished_at)
            except Exception:
                if wait_s is None:
                    logger.exception("job %s: could not write its end (%s) to the job table", job.id, state.value)
                    return None
                logger.warning("job %s: could not write its end (%s) to the job table; trying again in %.1f s",
                               job.id, state.value, wait_s, exc_info=True)
                time.sleep(wait_s)
        return None  # (not reached)

    def _retry_ends(self) -> None:
        """Write the ends the database refused before (:meth:`app.jobs.manager.JobManager._end_row`) to their rows."""
        assert self.table is not None
        with self._cond:
            ends = list(self._pending_ends.items())
        for job_id, (job, state, error, finished_at) in ends:
            try:
                written = self.table.finish(job, state, error, finished_at)
            except Exception:  # still failing: the next beat tries again
                logger.warning("job %s: still could not write its end to the job table", job_id, exc_info=True)
                continue
            if not written:
                logger.warning("job %s: its end (%s) reached the job table too late: another front owns the row now",
                               job_id, state.value)
            with self._cond:
                self._pending_ends.pop(job_id, None)

    def _recover(self, recovered: Recovered) -> None:
        """Record the end of jobs :meth:`JobTable.recover_stale` ended (given up, or cancelled as asked): the audit
        run and ``job.json``. A run of such a job still going on here (this front stalled) is cancelled."""
        for state, job_ids in ((JobState.FAILED, recovered.failed), (JobState.CANCELLED, recovered.cancelled)):
            for job_id in job_ids:
                job = self._jobs.get(job_id) or self.store.load(job_id)
                if job is None or job.state.finished:
                    continue
                by = None
                if state is JobState.CANCELLED and job._cancelled_by is None:
                    asked = self.table.get(job_id) if self.table is not None else None
                    by = self._user(asked.cancel_requested_by) if asked and asked.cancel_requested_by else None
                with self._cond:
                    if job in self._pending:
                        self._pending.remove(job)
                    job = self._jobs.setdefault(job_id, job)
                    if job in self._running and not job.cancel_event.is_set():
                        job._cancel_reason = CLAIM_LOST
                        job.cancel_event.set()
                    job._cancelled_by = job._cancelled_by or by
                if state is JobState.FAILED:
                    self._end(job, state, error=STALE_FAILED, row_ended=True)
                else:
                    self._end(job, state, reason="cancelled by the user", row_ended=True)

    def _forget_deleted(self) -> None:
        """Forget the finished jobs whose run another front deleted: their row and their run folder are gone."""
        assert self.table is not None
        with self._cond:
            finished = [job for job in self._jobs.values() if job.state.finished]
        gone = [job for job in finished if not job.run_dir.exists()]
        if not gone:
            return
        kept = self.table.existing([job.id for job in gone])
        with self._cond:
            for job in gone:
                if job.id not in kept and self._jobs.get(job.id) is job:
                    del self._jobs[job.id]

    def _sync_shared(self) -> None:
        """Renew the running jobs' claims (a cancel asked on another front cancels one here), then bring every
        front's queued, running and recently ended jobs into this front's view."""
        table = self.table
        assert table is not None
        with self._cond:
            running_now = list(self._running)
        for running in running_now:
            asked = table.heartbeat(running.id, running.step, running.total)
            if asked is None or running.cancel_event.is_set():
                continue
            if asked.lost:
                logger.warning("job %s: this front no longer holds its claim (it stalled); its run stops", running.id)
            actor = self._user(asked.by) if asked.by is not None else None
            with self._cond:
                if running in self._running and not running.cancel_event.is_set():
                    if asked.lost:
                        running._cancel_reason = CLAIM_LOST
                    else:
                        running._cancelled_by = actor or running._cancelled_by  # who asked, on whichever front
                        running._cancel_reason = running._cancel_reason or "cancelled by the user"
                    running.cancel_event.set()
                    running.touch()
        started = now()
        since = None if self._synced_at is None else self._synced_at - timedelta(seconds=5 + self.heartbeat_s)
        rows = table.changes(since)
        with self._cond:
            awaited = sorted(self._awaiting_final - {row.id for row in rows})
        for job_id in awaited:  # ended rows whose job.json was not final yet, maybe no longer in the window
            row = table.get(job_id)
            if row is not None:
                rows.append(row)
            else:  # deleted meanwhile
                with self._cond:
                    self._awaiting_final.discard(job_id)
        with self._cond:  # which rows need job.json (read outside the lock): unknown jobs, and ends to show
            known = set(self._jobs) | self._submitting
            ended = {row.id for row in rows if JobState(row.state).finished and row.id in self._jobs
                     and not self._jobs[row.id].state.finished and self._jobs[row.id] not in self._running}
        loaded = {job_id: job for job_id in [row.id for row in rows if row.id not in known] + sorted(ended)
                  for job in [self.store.load(job_id)] if job is not None}
        served = table.last_served(sorted({row.owner for row in rows if row.state == JobState.QUEUED.value}))
        with self._cond:
            for row in rows:
                if row.id in self._submitting:
                    continue
                job = self._jobs.get(row.id)
                if job is None and row.id in loaded:
                    job = self._jobs[row.id] = loaded[row.id]
                if job is not None:
                    self._apply_row(job, row, final=loaded.get(row.id))
            self._served = {owner: micros(t) for owner, t in served.items()}
            self._busy_owners = {row.owner for row in rows if row.state == JobState.RUNNING.value}
            self._synced_at = started
            if self._pending:
                self._cond.notify_all()

    def _user(self, user_id: uuid.UUID) -> audit.User | None:
        """The account ``user_id`` (who asked to cancel a job on another front); ``None`` if unknown or unreadable."""
        assert self.table is not None
        try:
            return audit.get_user(self.table.db, user_id=user_id)
        except Exception:  # the cancel goes on; the record then names the owner
            logger.exception("could not read the user %s who cancelled a job", user_id)
            return None

    def _apply_row(self, job: Job, row: audit.JobRecord, *, final: Job | None = None) -> None:
        """Bring ``job`` to what its table row says (caller holds the lock); this front's running jobs are its own.

        Args:
            final: the job's ``job.json`` as read (outside the lock) after the row: an ended row's results come from
                there; ``None`` or not final yet: the job is awaited (``_awaiting_final``), the next beats show
                the end."""
        if job in self._running or job.state.finished:  # a row read before the end must not bring a job back
            self._awaiting_final.discard(job.id)
            return
        state = JobState(row.state)
        if state is JobState.QUEUED:
            if job not in self._pending:
                job.state, job.started_at, job.step, job.total = JobState.QUEUED, None, 0, 0
                job.queued_tick = micros(job.created_at)
                self._pending.append(job)
                self._pending.sort(key=lambda j: j.queued_tick)
                job.touch()
            return
        if job in self._pending:
            self._pending.remove(job)
        if state is JobState.RUNNING:
            if job.state is not JobState.RUNNING or (job.step, job.total) != (row.step, row.total):
                job.state, job.started_at, job.step, job.total = state, row.started_at, row.step, row.total
                job.touch()
            return
        # the front that ended it writes job.json right after the row (and its audit record)
        if final is None or not final.state.finished:
            grace = self.table.stale_after_s if self.table is not None else 30.0
            if row.finished_at is None or (now() - row.finished_at).total_seconds() < grace:
                self._awaiting_final.add(job.id)  # not yet: every beat reads its row and job.json again until final
                return
            # no job.json a whole stale delay after the row's end: the front that ended it died in between, so the
            # row's end is the job's (its results stay in the run folder's record.json, if the run wrote one)
            logger.warning("job %s: its row ended %s ago without a final job.json; showing the row's end",
                           job.id, now() - row.finished_at)
            final = None
        self._awaiting_final.discard(job.id)
        if final is not None:
            job.unet_evaluations, job.effective_steps = final.unet_evaluations, final.effective_steps
            job.seeds, job.timings_s = final.seeds, final.timings_s
        job.state, job.error, job.finished_at, job.eta_s = state, row.error, row.finished_at, None
        job._decoded = job._mask = None
        job.touch()


def micros(t: datetime) -> int:
    """``t`` as microseconds since the epoch: the fair order's ticks when the queue is the job table's."""
    return int(t.timestamp() * 1_000_000)
