"""The review queue: a bounded, fair queue of jobs and the worker threads that hand them to a backend.

Package layout (imports flow down the list; nothing here imports ``app.web``):

- ``errors``: the refusals (:class:`QueueFullError`, :class:`UserQueueLimitError`, ...), messages for the user;
- ``job``: one run in memory (:class:`Job`, :class:`JobState`, :func:`job_cost`, ``job.json``'s content);
- ``policy``: who may queue (:class:`Limits`) and who goes next (:func:`fair_order`);
- ``estimate``: the measured rate and overhead, run and start estimates (:class:`RateEstimator`);
- ``store``: the runs folder: uploads, ``job.json``, the history, thumbnails (:class:`JobStore`);
- ``recorder``: the audit trail, or none (:class:`AuditRecorder`, :class:`NullRecorder`);
- ``jobtable``: the queue shared by several front processes in the database (:class:`JobTable`;
  ``VALD_MD_JOB_STATE=database``);
- ``backend``: where a run executes (:class:`Backend`; :class:`LocalBackend`, this process's model, is the
  default; ``app.serving.RayBackend`` runs on Ray Serve replicas);
- ``manager``: the queue, the worker, cancel and lookup (:class:`JobManager`; ``JobManager.from_settings`` for the
  server).

Typical use::

    jobs = JobManager.from_settings(settings, engine, db=db, uid_secret=secret)
    jobs.start()
    job = jobs.submit(user, data, ReviewRequest(prompt="small effusion"))
    jobs.get(job.id, str(user.id)).state                 # queued -> running -> done | failed | cancelled

The PNG helpers the pages use (``gray_png``, ``read_png_unit``) live in :mod:`app.imaging` and are re-exported here
for the callers that import them from this package.
"""

from __future__ import annotations

from app.imaging import gray_png, read_png_unit
from app.jobs.backend import Backend, LocalBackend
from app.jobs.errors import (
    BackendError,
    JobNotFoundError,
    JobNotReadyError,
    QueueFullError,
    UserQueueLimitError,
    WorkerStoppedError,
)
from app.jobs.estimate import RateEstimator
from app.jobs.job import METHOD_COST_FACTOR, Job, JobState, job_cost
from app.jobs.jobtable import JobTable
from app.jobs.manager import JobManager, Runner
from app.jobs.policy import Limits, fair_order
from app.jobs.recorder import AuditRecorder, NullRecorder, Recorder
from app.jobs.store import JOB_FILE, MASK_UPLOAD, THUMBNAIL, UPLOAD_STEM, JobStore

__all__ = [
    "JOB_FILE",
    "MASK_UPLOAD",
    "METHOD_COST_FACTOR",
    "THUMBNAIL",
    "UPLOAD_STEM",
    "AuditRecorder",
    "Backend",
    "BackendError",
    "Job",
    "JobManager",
    "JobNotFoundError",
    "JobNotReadyError",
    "JobState",
    "JobStore",
    "JobTable",
    "Limits",
    "LocalBackend",
    "NullRecorder",
    "QueueFullError",
    "RateEstimator",
    "Recorder",
    "Runner",
    "UserQueueLimitError",
    "WorkerStoppedError",
    "fair_order",
    "gray_png",
    "job_cost",
    "read_png_unit",
]
