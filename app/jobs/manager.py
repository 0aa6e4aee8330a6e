"""The review queue: a bounded, fair queue of jobs and the worker threads that hand them to the backend.

Requests only enqueue; the worker threads, one per run the :class:`~app.jobs.backend.Backend` takes at once, run
them. With the default :class:`~app.jobs.backend.LocalBackend` that is one thread, the only one that runs
:func:`app.artifacts.run_review` on this process's model copy (the diffusion pipeline is not thread-safe); a Ray
Serve backend (:mod:`app.serving`) takes one run per replica. Memory holds only small state: the progress counters, the
latest preview (a latent-sized array) and, while a job waits, its decoded pixels. The manager delegates the rest:
files to the :class:`~app.jobs.store.JobStore`, the audit trail to a :class:`~app.jobs.recorder.Recorder`, who may
queue and who goes next to :mod:`app.jobs.policy`, time estimates to the
:class:`~app.jobs.estimate.RateEstimator`.

Jobs belong to an ``owner`` (a user id string); every lookup takes the owner and treats another user's job as
unknown, so one user can never learn that another user's job id exists (administrators pass ``any_owner``).

Queue positions and start estimates follow :meth:`JobManager.fair_order`. A job's end and the release of its
worker's slot are one step under the lock, so whoever sees a job finished may queue the next one at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
from sqlalchemy import Engine as Database

from app import attribution, audit, imaging
from app.artifacts import ReviewRequest, resolve_request, run_review
from app.config import Settings
from app.engine import CounterfactualEngine, GenerationCancelled, effective_steps
from app.imaging import gray_png
from app.jobs.backend import Backend, LocalBackend, Runner
from app.jobs.errors import BackendError, JobNotFoundError, WorkerStoppedError
from app.jobs.estimate import RateEstimator
from app.jobs.job import Job, JobState, final_timings, job_cost, now
from app.jobs.policy import Limits, fair_order, queued_cost
from app.jobs.recorder import AuditRecorder, NullRecorder, Recorder
from app.jobs.store import JobStore
from app.lungs import LungSegmenter

__all__ = ["JobManager", "Runner"]

logger = logging.getLogger("vald_md.jobs")


class JobManager:
    """Owns the queue, the worker threads and the backend's time.

    Args:
        engine: the loaded engine (or any object with ``generate_request``, ``check_inputs`` and ``info`` for tests).
        store: the runs folder; its ``job.json`` files are loaded as history now.
        recorder: the audit trail (:class:`AuditRecorder`), or :class:`NullRecorder` to keep no records beyond
            ``job.json`` (tests).
        limits: the queue's length and cost budget, each user's share, the largest request.
        runner: the function that performs one run; :func:`app.artifacts.run_review` unless a test injects one.
        segmenter: the lung segmenter handed to every run (``ReviewRequest.lung_mask`` restricts the map to the
            lungs it finds); ``None``: runs are not restricted and their records say why.
        classifier: the lesion classifier (``app.lesions.LesionClassifier``) handed to every run; the
            ``classifier_guided`` map method needs it (and the segmenter), and is refused at submission without.
        preview_size: longest side in pixels of preview PNGs.
        backend: where runs execute; ``None`` = :class:`LocalBackend` (``runner`` on ``engine`` in this process).
            The engine, segmenter and classifier still check every request at submission.
    """

    def __init__(self, engine: CounterfactualEngine, store: JobStore, recorder: Recorder, limits: Limits, *,
                 runner: Runner = run_review, segmenter: LungSegmenter | None = None, classifier: Any = None,
                 preview_size: int = 192, backend: Backend | None = None) -> None:
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
        self._jobs: dict[str, Job] = {job.id: job for job in self.store.load_history(self.recorder.recorded_status)}

    @classmethod
    def from_settings(cls, settings: Settings, engine: CounterfactualEngine, *, db: Database | None,
                      uid_secret: bytes | None = None, segmenter: LungSegmenter | None = None,
                      classifier: Any = None, runner: Runner = run_review,
                      backend: Backend | None = None) -> JobManager:
        """The server's manager, built from its settings.

        Args:
            settings: reads ``runs_dir``, ``thumbnail_size``, ``store_identified_uploads``, ``store_plain_uids``,
                ``queue_size``, ``max_jobs_per_user``, ``queue_cost_budget``, ``max_steps``, ``max_samples`` and
                ``preview_size``.
            engine, segmenter, classifier, runner, backend: as for the constructor (the web app builds a Ray
                backend when ``settings.backend`` is ``ray``).
            db: the audit database; ``None`` keeps no records beyond ``job.json``.
            uid_secret: the HMAC key for DICOM UIDs; required with ``db``.

        Raises:
            ValueError: ``db`` without ``uid_secret``, or a limit out of range.
        """
        recorder: Recorder = (NullRecorder() if db is None else
                              AuditRecorder(db, uid_secret, store_plain_uids=settings.store_plain_uids))
        limits = Limits(queue_size=settings.queue_size, max_jobs_per_user=settings.max_jobs_per_user,
                        cost_budget=settings.queue_cost_budget, max_steps=settings.max_steps,
                        max_samples=settings.max_samples)
        store = JobStore(settings.runs_dir, thumbnail_size=settings.thumbnail_size,
                         identified_uploads=settings.store_identified_uploads)
        return cls(engine, store, recorder, limits, runner=runner, segmenter=segmenter, classifier=classifier,
                   preview_size=settings.preview_size, backend=backend)

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
        count = max(1, self.backend.concurrency)
        self._threads = [threading.Thread(target=self._work, name="vald-md-worker" if count == 1 else
                                          f"vald-md-worker-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, stop the workers and wait up to ``timeout`` seconds for them.

        Jobs still waiting stay ``queued`` on disk and are marked ``interrupted`` at the next start.
        """
        with self._cond:
            self._stopping = True
            for job in self._running:
                job._cancel_reason = "the server was shutting down"
                job.cancel_event.set()
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    @property
    def worker_alive(self) -> bool:
        """Every worker thread is running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

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
        with the model's map recommendations filled in (:func:`app.artifacts.resolve_request`).

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
        # 2. decode, validate and de-identify (raises ImagingError / ValueError; nothing is stored yet)
        try:
            if decoded is None:
                decoded = imaging.decode_image(data, window=req.window)
            if req.seed is None:
                req = replace(req, seed=int(np.random.default_rng().integers(0, 2**31 - 1)))
            req = self.check_request(decoded, req)
            mask = attribution.load_mask_png(mask_png, decoded.pixels.shape) if mask_png else None
            summary = decoded.meta.public_summary()
            source_format = str(summary.get("source_format"))
            stored = self.store.stored_upload(data, source_format)
        except (imaging.ImagingError, ValueError) as e:
            self.recorder.refused(user, data, e)
            raise
        # 3. the audit records: the upload, then the run, whose id becomes the job id
        seeds = [req.seed + i for i in range(req.samples)]
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
            # 5. queue (limits re-checked under the lock: another request may have won the last slot)
            with self._cond:
                self._check_capacity(owner_id, job.cost)
                self._tick += 1
                job.queued_tick = self._tick
                self._jobs[job_id] = job
                self._pending.append(job)
                self._cond.notify_all()
        except BaseException as e:
            self.store.remove(job)
            self.recorder.finish(job, JobState.FAILED, f"not queued: {type(e).__name__}")
            raise
        logger.info("job %s queued (position %s, %d effective steps, cost %d)", job_id, self.queue_position(job),
                    job.effective_steps, job.cost)
        return job

    def _check_capacity(self, owner: str, cost: int) -> None:
        """Refuse a job of ``owner`` costing ``cost`` (caller holds the lock): stopped worker, then
        :meth:`Limits.admit`."""
        if self._stopping or not self.worker_alive:
            raise WorkerStoppedError("The review worker is not running; the server may be restarting. "
                                     "Please try again in a minute.")
        self.limits.admit(owner, cost, self._pending, self._running)

    # -- queries ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str, *, any_owner: bool = False) -> Job:
        """The job, if it belongs to ``owner`` (or to anyone, with ``any_owner``: administrators).

        Raises:
            JobNotFoundError: unknown id, or another user's job (indistinguishable on purpose).
        """
        job = self._jobs.get(job_id)
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
        with self._cond:
            queued = job.state is JobState.QUEUED and job in self._pending
            if queued:
                self._pending.remove(job)
                job._decoded = job._mask = None
            if not job.state.finished:
                job._cancelled_by = actor
                job._cancel_reason = "cancelled by the user"
            if job.state is JobState.RUNNING:
                job.cancel_event.set()
                job.touch()
        if queued:
            self.recorder.finish(job, JobState.CANCELLED, job._cancel_reason)
            with self._cond:
                self._finish(job, JobState.CANCELLED)
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
        with self._cond:
            self._jobs.pop(job.id, None)
        self.store.remove(job)
        logger.info("job %s deleted", job.id)
        return job

    # -- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.fair_order()[0]
                self._pending.remove(job)
                job.state = JobState.RUNNING
                job.started_at = now()
                self._running.append(job)
                job.touch()
            try:
                self.store.save(job)
                self.recorder.start(job)
                self._execute(job)
            except Exception:  # never let one job kill the worker
                logger.exception("job %s: unexpected error in the worker", job.id)
                message = "The run failed because of an internal error. It has been logged; please try again."
                if not job.state.finished:
                    self.recorder.finish(job, JobState.FAILED, "internal error")
                with self._cond:
                    if not job.state.finished:
                        self._finish(job, JobState.FAILED, message)
            finally:
                with self._cond:
                    if job in self._running:  # _finish frees the slot; this covers a _finish that raised
                        self._release(job)

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
            self.recorder.finish(job, JobState.CANCELLED, job._cancel_reason or "cancelled")
            with self._cond:
                self._finish(job, JobState.CANCELLED)
            return
        except (imaging.ImagingError, ValueError, BackendError) as e:
            self.recorder.finish(job, JobState.FAILED, str(e))
            with self._cond:
                self._finish(job, JobState.FAILED, str(e))
            return
        run_s = time.perf_counter() - t0
        job.unet_evaluations = int(record.get("unet_evaluations", job.total))
        job.effective_steps = int(record.get("effective_steps", job.effective_steps))
        job.seeds = list(record.get("seeds", job.seeds))
        job.timings_s = {**record.get("timings_s", {}), "run": round(run_s, 4)}
        denoise = job.timings_s.get("denoising")
        if denoise and job.unet_evaluations > 1 and record.get("map_method", "sdedit") == "sdedit":
            # per UNet evaluation and sample (job_cost's unit), and the rest of the run (decoding, maps, files).
            # The engine times denoising from the first step's end to the last's: unet_evaluations - 1
            # evaluations. Other map methods time their whole method as "denoising" (encode, inversion, decode),
            # so they do not teach the rate.
            self.estimator.learn(float(denoise), job.unet_evaluations - 1, job.request.samples, run_s)
        hashes = record.get("artifacts_sha256")
        self.recorder.finish(job, JobState.DONE, None,
                             artifact_hashes=dict(hashes) if isinstance(hashes, dict) else None)
        with self._cond:
            self._finish(job, JobState.DONE)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Move a job to a terminal state (caller holds the lock), free the worker's slot if it held it, persist.

        The state and the free slot change in the same lock section: a caller that sees the job finished and
        then takes the lock (a submission's capacity check) never finds the slot still held."""
        self.store.make_private(job)
        job.state = state
        job.error = error
        job.finished_at = now()
        job.eta_s = None
        job.timings_s = final_timings(job, job.finished_at)
        if job in self._running:
            self._release(job)
        job.touch()
        self.store.save(job)
        logger.info("job %s %s", job.id, state.value)

    def _release(self, job: Job) -> None:
        """Free the worker's slot after ``job`` (caller holds the lock): its owner's turn ended now."""
        self._running.remove(job)
        self._tick += 1
        self._served[job.owner] = self._tick
        job._decoded = job._mask = None
