"""The review queue: a bounded, fair queue of jobs and the worker threads that hand them to the backend.

Requests only enqueue; the worker threads, one per run the :class:`~app.jobs.backend.Backend` takes at once, run
them. With the default :class:`~app.jobs.backend.LocalBackend` that is one thread, the only one that runs
:func:`app.runs.review.run_review` on this process's model copy (the diffusion pipeline is not thread-safe); a Ray
Serve backend (:mod:`app.serving`) takes one run per replica. Memory holds only small state: the progress counters, the
latest preview (a latent-sized array) and, while a job waits, its decoded pixels. The manager delegates the rest:
files to the :class:`~app.jobs.store.JobStore`, the audit trail to a :class:`~app.jobs.recorder.Recorder`, who may
queue and who goes next to :mod:`app.jobs.policy`, time estimates to the
:class:`~app.jobs.estimate.RateEstimator`.

Jobs belong to an ``owner`` (a user id string); every lookup takes the owner and treats another user's job as
unknown, so one user can never learn that another user's job id exists (administrators pass ``any_owner``).

Queue positions and start estimates follow :meth:`JobManager.fair_order`. A job's end and the release of its
worker's slot are one step under the lock, so whoever sees a job finished may queue the next one at once. The lock
guards memory: the database (audit records, the job table) is never read or written under it, nor is another front's
``job.json`` read under it, so a status read never waits for them. One file is written under it: the ended job's
``job.json`` (:meth:`JobManager._finish`), with its end; with a table that may be another front's job, when this
front records the end of a job the table gave up (:meth:`app.jobs.shared.SharedTableSync._recover`).

With a :class:`~app.jobs.jobtable.JobTable` (``VALD_MD_JOB_STATE=database``) the queue is the database's: several
front processes admit against the site's counts, claim jobs with a compare-and-set (each runs once), keep their
running job's claim alive, re-queue the jobs of a front that died, and poll the table to show every front's jobs.
A job's end is written to its row first; a front that lost its claim meanwhile keeps nothing of its attempt. That
half lives in :class:`app.jobs.shared.SharedTableSync`.

Size (about 700 lines, over the project's ~500): this module is the queue's state machine. Every change of a job's
state and of the worker slots happens here, under the one lock, and its invariants (a job ends once; its end and its
slot's release are one step; a front keeps a run's end only while it holds the claim) read in one place; whatever
needs no lock lives in the sibling modules.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine as Database

from app import attribution, audit, imaging
from app.config import Settings
from app.engine import CounterfactualEngine, GenerationCancelled, effective_steps
from app.generation import draw_seed
from app.imaging import gray_png
from app.jobs.backend import Backend, LocalBackend, Runner
from app.jobs.errors import BackendError, JobNotFoundError, WorkerStoppedError
from app.jobs.estimate import RateEstimator
from app.jobs.job import Job, JobState, final_timings, job_cost, now
from app.jobs.jobtable import JobTable, default_front_id
from app.jobs.policy import Limits, fair_order, queued_cost
from app.jobs.recorder import AuditRecorder, NullRecorder, Recorder
from app.jobs.shared import SharedTableSync, micros
from app.jobs.store import MASK_UPLOAD, JobStore
from app.lungs import LungSegmenter
from app.runs.review import ReviewRequest, resolve_request, run_review

__all__ = ["JobManager", "Runner"]

logger = logging.getLogger("vald_md.jobs")


class JobManager(SharedTableSync):
    """Owns the queue, the worker threads and the backend's time.

    Args:
        engine: the loaded engine (or any object with ``generate_request``, ``check_inputs`` and ``info`` for tests).
        store: the runs folder; its ``job.json`` files are loaded as history now.
        recorder: the audit trail (:class:`AuditRecorder`), or :class:`NullRecorder` to keep no records beyond
            ``job.json`` (tests).
        limits: the queue's length and cost budget, each user's share, the largest request.
        runner: the function that performs one run; :func:`app.runs.review.run_review` unless a test injects one.
        segmenter: the lung segmenter handed to every run (``ReviewRequest.lung_mask`` restricts the map to the
            lungs it finds); ``None``: runs are not restricted and their records say why.
        classifier: the lesion classifier (``app.lesions.LesionClassifier``) handed to every run; the
            ``classifier_guided`` map method needs it (and the segmenter), and is refused at submission without.
        preview_size: longest side in pixels of preview PNGs.
        table: the shared job table (several front processes on one database and one ``runs_dir`` volume);
            ``None`` (the default): this process's queue is in memory and ``job.json`` only.
        heartbeat_s: with ``table``: how often the running jobs' claims are renewed and the table polled, seconds.
        backend: where runs execute; ``None`` = :class:`LocalBackend` (``runner`` on ``engine`` in this process).
            The engine, segmenter and classifier still check every request at submission.
    """

    def __init__(self, engine: CounterfactualEngine, store: JobStore, recorder: Recorder, limits: Limits, *,
                 runner: Runner = run_review, segmenter: LungSegmenter | None = None, classifier: Any = None,
                 preview_size: int = 192, table: JobTable | None = None, heartbeat_s: float = 2.0,
                 backend: Backend | None = None) -> None:
        self.engine = engine
        self.store = store
        self.recorder = recorder
        self.limits = limits
        self.backend = backend or LocalBackend(engine, runner=runner, segmenter=segmenter, classifier=classifier)
        self.segmenter = segmenter
        self.classifier = classifier
        self.preview_size = preview_size
        self.estimator = RateEstimator()
        self._pending: list[Job] = []  # in submission order; the worker takes them in fair_order()
        self._tick = 0  # orders submissions and ends of runs (fair_order)
        self._served: dict[str, int] = {}  # owner -> tick at which their latest job ended
        self._running: list[Job] = []  # one per busy worker thread
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.table = table
        self.heartbeat_s = heartbeat_s
        self._busy_owners: set[str] = set()  # with a table: owners with a job running on any front
        self._synced_at: datetime | None = None  # with a table: when _sync_shared last read it
        self._submitting: set[str] = set()  # with a table: ids being inserted by submit (not yet registered)
        self._beat_thread: threading.Thread | None = None
        # with a table: ends the database refused (job, state, error, finished_at), retried at every beat
        self._pending_ends: dict[str, tuple[Job, JobState, str | None, datetime]] = {}
        # with a table: jobs whose row ended but whose final job.json was not yet readable, re-read at every beat
        self._awaiting_final: set[str] = set()
        alive = None if table is None else self._alive_in_table
        self._jobs: dict[str, Job] = {job.id: job for job in self.store.load_history(self.recorder.recorded_status,
                                                                                      alive=alive)}

    @classmethod
    def from_settings(cls, settings: Settings, engine: CounterfactualEngine, *, db: Database | None,
                      uid_secret: bytes | None = None, segmenter: LungSegmenter | None = None,
                      classifier: Any = None, runner: Runner = run_review,
                      backend: Backend | None = None) -> JobManager:
        """The server's manager, built from its settings.

        Args:
            settings: reads ``runs_dir``, ``thumbnail_size``, ``store_identified_uploads``, ``store_plain_uids``,
                ``queue_size``, ``max_jobs_per_user``, ``queue_cost_budget``, ``max_steps``, ``max_samples``,
                ``preview_size`` and ``job_state`` (with ``database``: ``front_id``, ``job_heartbeat_s`` and
                ``job_stale_after_s``).
            engine, segmenter, classifier, runner, backend: as for the constructor (the web app builds a Ray
                backend when ``settings.backend`` is ``ray``).
            db: the audit database; ``None`` keeps no records beyond ``job.json``.
            uid_secret: the HMAC key for DICOM UIDs; required with ``db``.

        Raises:
            ValueError: ``db`` without ``uid_secret``, ``job_state=database`` without ``db``, or a limit out of
                range.
        """
        recorder: Recorder = (NullRecorder() if db is None else
                              AuditRecorder(db, uid_secret, store_plain_uids=settings.store_plain_uids))
        limits = Limits(queue_size=settings.queue_size, max_jobs_per_user=settings.max_jobs_per_user,
                        cost_budget=settings.queue_cost_budget, max_steps=settings.max_steps,
                        max_samples=settings.max_samples)
        store = JobStore(settings.runs_dir, thumbnail_size=settings.thumbnail_size,
                         identified_uploads=settings.store_identified_uploads)
        table = None
        if settings.job_state == "database":
            if db is None:
                raise ValueError("job_state=database needs the database: pass db (audit.init_db)")
            table = JobTable(db, settings.front_id or default_front_id(), stale_after_s=settings.job_stale_after_s)
        return cls(engine, store, recorder, limits, runner=runner, segmenter=segmenter, classifier=classifier,
                   preview_size=settings.preview_size, table=table, heartbeat_s=settings.job_heartbeat_s,
                   backend=backend)

    @property
    def segmenter(self) -> LungSegmenter | None:
        """The lung segmenter that checks requests and, in process, restricts every run's map (replaceable)."""
        return self._segmenter

    @segmenter.setter
    def segmenter(self, value: LungSegmenter | None) -> None:
        self._segmenter = value
        if isinstance(self.backend, LocalBackend):
            self.backend.segmenter = value

    @property
    def classifier(self) -> Any:
        """The lesion classifier that checks requests and, in process, guides ``classifier_guided`` runs."""
        return self._classifier

    @classifier.setter
    def classifier(self, value: Any) -> None:
        self._classifier = value
        if isinstance(self.backend, LocalBackend):
            self.backend.classifier = value

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads, ``backend.concurrency`` of them (idempotent)."""
        if self.worker_alive:
            return
        self._stopping = False
        if self.table is not None:  # this front's id cannot be running anything yet: its claims are a past life's
            self._recover(self.table.recover_stale(own_claims=True))
            self._sync_shared()
        count = max(1, self.backend.concurrency)
        self._threads = [threading.Thread(target=self._work, name="vald-md-worker" if count == 1 else
                                          f"vald-md-worker-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()
        if self.table is not None and not (self._beat_thread is not None and self._beat_thread.is_alive()):
            self._beat_thread = threading.Thread(target=self._beat, name="vald-md-job-table", daemon=True)
            self._beat_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, stop the workers and wait up to ``timeout`` seconds for them.

        Jobs still waiting stay ``queued`` on disk and are marked ``interrupted`` at the next start. With a job
        table, nothing is cancelled: waiting jobs stay queued for the other fronts (or the next start), and the
        running job may finish within ``timeout``; past it, its claim stops being renewed with this process and
        another front queues it again (:meth:`JobTable.recover_stale`).
        """
        with self._cond:
            self._stopping = True
            for job in self._running if self.table is None else []:
                job._cancel_reason = "the server was shutting down"
                job.cancel_event.set()
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if self._beat_thread is not None and not self._any_worker_alive:
            self._beat_thread.join(max(0.0, end - time.monotonic()))

    @property
    def worker_alive(self) -> bool:
        """Every worker thread is running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def _any_worker_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def queue_length(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._pending)

    @property
    def is_full(self) -> bool:
        """A submission now would get :class:`QueueFullError` (whatever its cost)."""
        return self.limits.is_full(self._pending)

    @property
    def queued_cost(self) -> int:
        """Total :func:`job_cost` of the waiting jobs, step-samples."""
        return queued_cost(self._pending)

    # -- submission -----------------------------------------------------------------------------------------------
    def check_request(self, decoded: imaging.DecodedImage, req: ReviewRequest) -> ReviewRequest:
        """Refuse parameters before queueing (the engine's ranges plus this server's limits); returns the request
        with the model's map recommendations filled in (:func:`app.runs.review.resolve_request`).

        Raises:
            ValueError: a parameter is out of range; the message names it and the allowed range.
        """
        self.limits.check_request(req)
        req = resolve_request(req, self.engine.info, classifier=self.classifier, segmenter=self.segmenter)
        self.engine.check_inputs(decoded.pixels, request=req)
        return req

    def submit(self, owner: str | audit.User, data: bytes, req: ReviewRequest, *, mask_png: bytes | None = None,
               decoded: imaging.DecodedImage | None = None, rerun_of: str | None = None) -> Job:
        """Validate an upload and its parameters synchronously, store it, and queue a job.

        No job exists and nothing is stored unless every check passes (a refused upload is audited).

        Args:
            owner: the submitter: an ``audit.User`` (required with an audit database; the job's owner is then
                ``str(user.id)``) or a user id string.
            data: the uploaded file (DICOM with or without extension, PNG or JPEG).
            req: parameters, never changed; the job's request is a copy with the seed drawn now when ``None`` (it
                is recorded and shown) and the map method and reference resolved.
            mask_png: optional region mask image; must decode (see ``attribution.load_mask_png``).
            decoded: pass when the caller already decoded ``data`` with ``req.window``.
            rerun_of: the job id this submission re-runs (recorded with the run).

        Raises:
            UserQueueLimitError: the owner has ``max_jobs_per_user`` runs queued or running.
            QueueFullError: ``queue_size`` jobs are already waiting, or this one would pass ``cost_budget``.
            imaging.ImagingError: the file cannot be read as a radiograph (message for the clinician).
            ValueError: a parameter or the mask is invalid.
            WorkerStoppedError: the server is shutting down.
        """
        user = owner if isinstance(owner, audit.User) else None
        owner_id = str(user.id) if user is not None else str(owner)
        self.recorder.require_user(user)
        # 1. cheap refusals first: a stopped worker, the user's limit, a full queue need no decoding
        with self._cond:
            self._check_capacity(owner_id, job_cost(req))
        if self.table is not None:  # the site's counts: a read, outside the lock (the insert counts them again)
            self.table.admit(owner_id, job_cost(req), self.limits)
        # 2. decode, validate and de-identify (raises ImagingError / ValueError; nothing is stored yet)
        try:
            if decoded is None:
                decoded = imaging.decode_image(data, window=req.window)
            seed = req.seed if req.seed is not None else draw_seed()
            req = replace(req, seed=seed)
            req = self.check_request(decoded, req)
            mask = attribution.load_mask_png(mask_png, decoded.pixels.shape) if mask_png else None
            summary = decoded.meta.public_summary()
            source_format = str(summary.get("source_format"))
            stored = self.store.stored_upload(data, source_format)
        except (imaging.ImagingError, ValueError) as e:
            self.recorder.refused(user, data, e)
            raise
        # 3. the audit records: the upload, then the run, whose id becomes the job id
        seeds = [seed + i for i in range(req.samples)]
        input_id, job_id = self.recorder.record_submission(user, data, decoded, req, seeds, mask is not None,
                                                           rerun_of, self.engine.info.model_hash)
        # 4. store the upload under a server-chosen name
        job = Job(id=job_id, owner=owner_id, request=req, run_dir=self.store.run_dir(job_id),
                  upload_name=self.store.upload_name(source_format), input_summary=summary,
                  has_mask=mask is not None, effective_steps=effective_steps(req.steps, req.strength),
                  created_at=now(), seeds=seeds, input_id=input_id, rerun_of=rerun_of, _decoded=decoded,
                  _mask=mask, _user=user)
        self.store.create(job)
        try:
            self.store.write_upload(job, stored, mask_png)
            # 5. queue (limits re-checked: another request may have won the last slot)
            self._queue(job)
        except BaseException as e:
            self.store.remove(job)
            self.recorder.finish(job, JobState.FAILED, f"not queued: {type(e).__name__}")
            raise
        logger.info("job %s queued (position %s, %d effective steps, cost %d)", job_id, self.queue_position(job),
                    job.effective_steps, job.cost)
        return job

    def _queue(self, job: Job) -> None:
        """Queue a stored job: in memory, under the lock, with the limits checked again in the same lock section;
        with a job table, the site's counts and the row's insert are one database transaction
        (:meth:`JobTable.insert`), run outside the lock so that no status read waits for the database.

        Raises:
            UserQueueLimitError, QueueFullError, WorkerStoppedError: see :meth:`submit`; nothing is queued.
        """
        table = self.table
        with self._cond:
            self._check_capacity(job.owner, job.cost)
            if table is None:
                self._tick += 1
                job.queued_tick = self._tick
                self._register(job)
                return
            self._submitting.add(job.id)  # _sync_shared leaves the row to this submission meanwhile
        try:
            table.insert(job, self.limits)
            job.queued_tick = micros(job.created_at)
            with self._cond:
                self._register(job)
        finally:
            with self._cond:
                self._submitting.discard(job.id)

    def _register(self, job: Job) -> None:
        """Make a queued job known and waiting (caller holds the lock)."""
        self._jobs[job.id] = job
        if job not in self._pending:  # (with a job table, a poll may have found its row first)
            self._pending.append(job)
        self._cond.notify_all()

    def _check_capacity(self, owner: str, cost: int) -> None:
        """Refuse a job of ``owner`` costing ``cost`` (caller holds the lock): stopped worker, then, without a job
        table, :meth:`Limits.admit` over this process's queue (with one, :meth:`JobTable.admit` and
        :meth:`JobTable.insert` count the site's jobs, outside the lock)."""
        if self._stopping or not self.worker_alive:
            raise WorkerStoppedError("The review worker is not running; the server may be restarting. "
                                     "Please try again in a minute.")
        if self.table is None:
            self.limits.admit(owner, cost, self._pending, self._running)

    # -- queries ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str, *, any_owner: bool = False) -> Job:
        """The job, if it belongs to ``owner`` (or to anyone, with ``any_owner``: administrators).

        Raises:
            JobNotFoundError: unknown id, or another user's job (indistinguishable on purpose).
        """
        job = self._jobs.get(job_id)
        if job is None and self.table is not None:
            job = self._adopt(job_id)  # accepted by another front since the last poll
        if job is None or (job.owner != owner and not any_owner):
            raise JobNotFoundError(job_id)
        return job

    def list_jobs(self, owner: str | None, limit: int | None = None) -> list[Job]:
        """``owner``'s jobs (everyone's for ``None``), newest first."""
        jobs = sorted((j for j in self._jobs.values() if owner is None or j.owner == owner),
                      key=lambda j: j.created_at, reverse=True)
        return jobs[:limit] if limit else jobs

    def reruns_of(self, job_id: str) -> list[Job]:
        """Jobs submitted as re-runs of ``job_id``, newest first."""
        return sorted((j for j in self._jobs.values() if j.rerun_of == job_id), key=lambda j: j.created_at,
                      reverse=True)

    def fair_order(self) -> list[Job]:
        """The waiting jobs in the order the worker will take them, if nothing else arrives
        (:func:`app.jobs.policy.fair_order`: users take turns; a user's own jobs keep their order)."""
        with self._cond:
            pending, served = list(self._pending), dict(self._served)
            running_owners = [j.owner for j in self._running]
            tick = self._tick + 1  # "now": after every job queued so far
            if self.table is not None:  # ticks are microseconds (every front's clock), owners running anywhere
                tick = micros(now())
                served.update(dict.fromkeys(self._busy_owners, tick))
        return fair_order(pending, served, running_owners, tick)

    def queue_position(self, job: Job) -> int | None:
        """1 for the job that starts next, 2 behind it, ... in :meth:`fair_order`; ``None`` unless it is queued."""
        for i, j in enumerate(self.fair_order()):
            if j is job:
                return i + 1
        return None

    def estimated_run_s(self, job: Job) -> float | None:
        """Estimated seconds the job will hold the worker: its cost times the measured seconds per UNet evaluation
        and sample, plus the measured overhead of a run; ``None`` before a run has been measured."""
        return self.estimator.run_s(job.cost)

    def queue_eta_s(self, job: Job) -> float | None:
        """Estimated seconds until a queued job starts: what the running job has left plus
        :meth:`estimated_run_s` of every job ahead of it in :meth:`fair_order`, shared among the backend's
        ``concurrency`` slots (0 while a slot is free); ``None`` before a run has been measured or when the job is not
        queued."""
        if not self.estimator.measured:
            return None
        order = self.fair_order()
        if job not in order:
            return None
        slots = max(1, self.backend.concurrency)
        running = list(self._running)
        ahead = [j.cost for j in order[:order.index(job)]]
        if slots == 1:
            first = running[0] if running else None
            return self.estimator.wait_s(ahead, first.cost if first is not None else None,
                                         first.eta_s if first is not None else None)
        if len(running) + len(ahead) < slots:
            return 0.0
        # several slots: the work ahead, the running jobs' remainders included, spread evenly over them
        left = self.estimator.wait_s(ahead, None, None) or 0.0
        left += sum(self.estimator.wait_s([], j.cost, j.eta_s) or 0.0 for j in running)
        return left / slots

    def preview_png(self, job: Job) -> bytes | None:
        """The latest progress preview as a small PNG (encoded on request, cached per version)."""
        preview = job._preview
        if preview is None:
            return None
        cached = job._preview_png
        version = job.version
        if cached is not None and cached[0] == version:
            return cached[1]
        png = gray_png(preview, longest_side=self.preview_size, upscale=True)
        job._preview_png = (version, png)
        return png

    def thumbnail_png(self, job: Job) -> bytes | None:
        """A small PNG of the input for the history list, cached in the run folder; ``None`` before it exists."""
        return self.store.thumbnail_png(job)

    # -- cancellation -----------------------------------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str, *, any_owner: bool = False, actor: audit.User | None = None) -> Job:
        """Cancel a job: a queued one at once, a running one within one denoising step; finished: no change.

        Args:
            job_id, owner, any_owner: as for :meth:`get`.
            actor: who cancels (recorded with the run); default its owner.

        Raises:
            JobNotFoundError: unknown id or another user's job.
        """
        job = self.get(job_id, owner, any_owner=any_owner)
        if self.table is not None and not job.state.finished and not self._cancel_here(job, actor):
            job._cancelled_by = actor  # another front runs it: it cancels at its next heartbeat (and records actor)
            return job
        with self._cond:  # (with a table, a job still QUEUED here was just cancelled in it: _cancel_here)
            queued = job.state is JobState.QUEUED and (job in self._pending or self.table is not None)
            if queued and job in self._pending:
                self._pending.remove(job)
                job._decoded = job._mask = None
            if not job.state.finished:
                job._cancelled_by = actor
                job._cancel_reason = "cancelled by the user"
            if job.state is JobState.RUNNING:
                job.cancel_event.set()
                job.touch()
        if queued:
            self._end(job, JobState.CANCELLED, reason=job._cancel_reason)
        return job

    # -- deletion ---------------------------------------------------------------------------------------------------
    def delete(self, job_id: str, owner: str, *, actor: audit.User | None = None) -> Job:
        """Delete one of ``owner``'s finished runs: its folder (upload, artifacts, ``job.json``) and its history entry.

        Nothing else is touched: every run keeps its own copy of its upload (a re-run or a "reuse image" run
        included), so no other run loses a file. The audit trail keeps the run's record (parameters, hashes) and
        gains a ``run_delete`` event, written before anything is removed.

        Args:
            job_id, owner: as for :meth:`get` (owners only: an administrator deletes no one else's work here).
            actor: who deletes (recorded); default the owner.

        Raises:
            JobNotFoundError: unknown id or another user's job.
            ValueError: the run is queued or running (cancel it first).
        """
        job = self.get(job_id, owner)
        if not job.state.finished:  # a finished job never becomes unfinished again: no lock needed past this
            raise ValueError(f"This run is {job.state.value}; cancel it first, then delete it.")
        self.recorder.deleted(job, actor)
        if self.table is not None:
            self.table.delete(job.id)
        with self._cond:
            self._jobs.pop(job.id, None)
        self.store.remove(job)
        logger.info("job %s deleted", job.id)
        return job

    # -- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._take_next()
            if job is None:
                return
            try:
                self.store.save(job)
                self.recorder.start(job)
                self._execute(job)
            except Exception:  # never let one job kill the worker
                logger.exception("job %s: unexpected error in the worker", job.id)
                message = "The run failed because of an internal error. It has been logged; please try again."
                if not job.state.finished:
                    self._end(job, JobState.FAILED, error=message, reason="internal error")
            finally:
                with self._cond:
                    if job in self._running:  # _finish frees the slot; this covers a _finish that raised
                        self._release(job)

    def _take_next(self) -> Job | None:
        """Wait for a job and make it the running one (the next in :meth:`fair_order`; with a job table, the first of
        that order this front claims); ``None`` when the worker is stopping."""
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                order = self.fair_order()
                table = self.table
                if table is None:
                    self._pending.remove(order[0])
                    return self._mark_running(order[0], now())
            started = now()
            try:
                claimed = table.claim_first([j.id for j in order], started)
            except Exception:
                logger.exception("could not claim a job in the job table")
                claimed = None
            with self._cond:
                if claimed is None:  # other fronts took them (or the database failed): the next poll says more
                    for job in order:
                        if job in self._pending:
                            self._pending.remove(job)
                    self._cond.wait(self.heartbeat_s)
                    continue
                job = self._jobs[claimed]
                if job in self._pending:
                    self._pending.remove(job)
                self._mark_running(job, started)
            if job._decoded is None:  # accepted by another front: its upload and mask come from the shared volume
                try:
                    self._load_inputs(job)
                except imaging.ImagingError as e:  # the message is for the clinician
                    self._end(job, JobState.FAILED, error=f"The stored upload of this run could not be read: {e}")
                    continue
                except (ValueError, OSError) as e:  # paths and internals go to the log, not to the user
                    logger.warning("job %s: stored inputs unreadable: %s", job.id, e)
                    self._end(job, JobState.FAILED, error="The stored upload of this run could not be read from "
                              "the shared run volume. Please submit it again; if this repeats, tell the administrator.")
                    continue
            return job

    def _mark_running(self, job: Job, started: datetime) -> Job:
        """Make ``job`` a running one, this worker's (caller holds the lock)."""
        job.state = JobState.RUNNING
        job.started_at = started
        self._running.append(job)
        job.touch()
        return job

    def _load_inputs(self, job: Job) -> None:
        """Decode the job's stored upload and its region mask (a job this front did not accept)."""
        job._decoded = imaging.decode_image(job.upload_path.read_bytes(), window=job.request.window)
        mask_path = job.run_dir / MASK_UPLOAD
        if job.has_mask:
            job._mask = attribution.load_mask_png(mask_path.read_bytes(), job._decoded.pixels.shape)

    def _execute(self, job: Job) -> None:
        t0 = time.perf_counter()

        def progress(step: int, total: int, elapsed_s: float, preview: np.ndarray | None) -> None:
            job.step, job.total, job.elapsed_s = step, total, elapsed_s
            job.eta_s = elapsed_s / step * (total - step) if step else None
            if preview is not None:
                job._preview = preview
            job.touch()

        data = job.upload_path.read_bytes()
        try:
            record = self.backend.run(job, data, progress)
        except GenerationCancelled:
            self._end(job, JobState.CANCELLED, reason=job._cancel_reason or "cancelled")
            return
        except (imaging.ImagingError, ValueError, BackendError) as e:
            self._end(job, JobState.FAILED, error=str(e))
            return
        run_s = time.perf_counter() - t0
        job.unet_evaluations = int(record.unet_evaluations if record.unet_evaluations is not None else job.total)
        job.effective_steps = int(record.effective_steps if record.effective_steps is not None else job.effective_steps)
        job.seeds = list(record.seeds or job.seeds)
        job.timings_s = {**record.timings_s, "run": round(run_s, 4)}
        denoise = job.timings_s.get("denoising")
        if denoise and job.unet_evaluations > 1 and (record.map_method or "sdedit") == "sdedit":
            # per UNet evaluation and sample (job_cost's unit), and the rest of the run (decoding, maps, files).
            # The engine times denoising from the first step's end to the last's: unet_evaluations - 1
            # evaluations. Other map methods time their whole method as "denoising" (encode, inversion, decode),
            # so they do not teach the rate.
            # an edited counterfactual's extra sample is part of job_cost, so its seconds are not overhead
            edit = record.counterfactual_edit or {}
            edit_s = float(edit.get("seconds", 0.0)) if edit.get("applied") else 0.0
            self.estimator.learn(float(denoise), job.unet_evaluations - 1, job.request.samples, run_s - edit_s)
        hashes = record.artifacts_sha256
        self._end(job, JobState.DONE, artifact_hashes=dict(hashes) if hashes else None)

    def _end(self, job: Job, state: JobState, *, error: str | None = None, reason: str | None = None,
             artifact_hashes: dict[str, str] | None = None, row_ended: bool = False) -> None:
        """End a job: its job-table row first (with a table), then its audit run, then memory and ``job.json``.

        With a table, the end of a job this front ran is kept only if the row was still this front's claim: a front
        that lost its claim (it stalled past ``job_stale_after_s`` and another front runs the job again) records
        nothing, neither the audit run's end nor ``job.json``; the front that owns the job now records its own end.
        The database is written outside the lock.

        Args:
            job: the job; state: its terminal state.
            error: the message for the user (failed runs), else ``None``.
            reason: the audit run's reason; default ``error``.
            artifact_hashes: the files' SHA-256 (done runs).
            row_ended: the row says the end already (:meth:`JobTable.recover_stale` gave the job up).
        """
        finished_at = now()
        kept = True
        with self._cond:
            if job.state.finished:  # ended already: recover_stale gave it up while it ran here (_recover)
                return
            claimed = job in self._running
        if self.table is not None and not row_ended:
            kept = self._end_row(job, state, error, finished_at, claimed=claimed)
        if kept:
            self.recorder.finish(job, state, reason if reason is not None else error, artifact_hashes=artifact_hashes)
        with self._cond:
            self._finish(job, state, error, finished_at, kept=kept)

    def _end_row(self, job: Job, state: JobState, error: str | None, finished_at: datetime, *,
                 claimed: bool) -> bool:
        """Write the job's end to its table row (no lock held); whether the end is this front's to keep.

        A database error is tried again a few times (:meth:`_finish_row`); if it persists, the end is kept here
        (audit run, ``job.json``) and the heartbeat thread writes it to the row at its next beats (``_pending_ends``).
        Only a row that is no longer this front's claim (0 rows updated) loses the end.

        Args:
            claimed: this front runs the job: its end is kept only if the row was still its claim (or queued);
                otherwise (a queued job cancelled here) the row is best effort and the end is always kept.
        """
        written = self._finish_row(job, state, error, finished_at)
        if written is None:
            with self._cond:
                self._pending_ends[job.id] = (job, state, error, finished_at)
            return True
        if written or not claimed:
            return True
        logger.warning("job %s: this front's claim was taken over (it stalled); its end (%s) is not kept", job.id,
                       state.value)
        return False

    def _finish(self, job: Job, state: JobState, error: str | None, finished_at: datetime, *,
                kept: bool = True) -> None:
        """Move a job to a terminal state (caller holds the lock), free the worker's slot if it held it, persist.

        The state and the free slot change in the same lock section: a caller that sees the job finished and
        then takes the lock (a submission's capacity check) never finds the slot still held.

        Args:
            kept: ``False`` when this front lost its claim (:meth:`_end`): the slot is freed and nothing else
                changes; the job shows what its row says (:meth:`_apply_row`), the run of the front that owns it.
        """
        ran_here = job in self._running
        if not kept:
            if ran_here:
                self._release(job)
            job.touch()
            return
        self.store.make_private(job)
        job.state = state
        job.error = error
        job.finished_at = finished_at
        job.eta_s = None
        job.timings_s = final_timings(job, job.finished_at)
        if ran_here:
            self._release(job)
        job.touch()
        self.store.save(job)
        logger.info("job %s %s", job.id, state.value)

    def _release(self, job: Job) -> None:
        """Free the worker's slot after ``job`` (caller holds the lock): its owner's turn ended now."""
        self._running.remove(job)
        self._tick += 1
        self._served[job.owner] = self._tick if self.table is None else micros(now())
        job._decoded = job._mask = None
