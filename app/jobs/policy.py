"""Sharing the one worker: who may queue (:class:`Limits`) and who goes next (:func:`fair_order`). Pure functions of
the queue's state; :class:`app.jobs.JobManager` calls them under its lock.

A user may have at most ``max_jobs_per_user`` runs queued or running (:class:`UserQueueLimitError`, HTTP 429); the
waiting runs together may cost at most ``cost_budget`` (and number at most ``queue_size``; :class:`QueueFullError`,
HTTP 503), where a run's cost is ``(effective steps + 1) x samples`` (one sample more for a counterfactual edited to
the map's region) (:func:`app.jobs.job.job_cost`: the samples run as one batch, so every denoising step costs about
one UNet evaluation per sample; the model's fixed resolution makes the image size irrelevant). The worker does not
take the oldest run but the next run of the user who has waited longest since their last run ended (or since they
queued, if later): round robin between users, first come first served within a user (:func:`fair_order`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from app.jobs.errors import QueueFullError, UserQueueLimitError
from app.jobs.job import Job
from app.runs.review import ReviewRequest

__all__ = ["Limits", "fair_order"]


@dataclass(frozen=True)
class Limits:
    """What one server takes: the queue's length and cost, each user's share, and the largest request.

    Attributes:
        queue_size: jobs that may wait behind the running one (>= 1).
        max_jobs_per_user: runs one owner may have queued or running at once; ``None`` = no limit.
        cost_budget: total :func:`app.jobs.job.job_cost` of the waiting jobs, step-samples; a job that would pass
            it is refused (a job always fits an empty queue); ``None`` = no limit.
        max_steps, max_samples: limits on what a user may ask for (on top of the engine's own ranges).

    Raises:
        ValueError: ``queue_size`` below 1.
    """

    queue_size: int = 8
    max_jobs_per_user: int | None = None
    cost_budget: int | None = None
    max_steps: int = 1000
    max_samples: int = 16

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size={self.queue_size} must be at least 1")

    def check_request(self, req: ReviewRequest) -> None:
        """Refuse parameters past this server's limits.

        Raises:
            ValueError: ``steps`` or ``samples`` too large; the message names the limit.
        """
        if req.steps > self.max_steps:
            raise ValueError(f"steps={req.steps} exceeds this server's limit of {self.max_steps}")
        if req.samples > self.max_samples:
            raise ValueError(f"samples={req.samples} exceeds this server's limit of {self.max_samples}")

    def is_full(self, pending: Sequence[Job]) -> bool:
        """A submission now would get :class:`QueueFullError` (whatever its cost)."""
        return len(pending) >= self.queue_size or (
            self.cost_budget is not None and queued_cost(pending) >= self.cost_budget)

    def admit(self, owner: str, cost: int, pending: Sequence[Job], running: Job | Sequence[Job] | None) -> None:
        """Refuse a job of ``owner`` costing ``cost`` step-samples: the user's limit, the queue's length, then its
        cost budget.

        Args:
            owner: user id string.
            cost: the new job's cost, step-samples.
            pending: the waiting jobs; running: the jobs the workers hold (one job, or none, for one worker).

        Raises:
            UserQueueLimitError: ``owner`` has ``max_jobs_per_user`` runs queued or running.
            QueueFullError: ``queue_size`` jobs wait already, or the new one would pass ``cost_budget``.
        """
        own = [j for j in _jobs(running) if j.owner == owner]
        active = sum(j.owner == owner for j in pending) + len(own)
        etas = [j.eta_s for j in own if j.eta_s is not None]
        wait = min(etas) if etas else None
        self.admit_counts(owner_active=active, waiting=len(pending), waiting_cost=queued_cost(pending), cost=cost,
                          retry_after_s=wait)

    def admit_counts(self, *, owner_active: int, waiting: int, waiting_cost: int, cost: int,
                     retry_after_s: float | None = None) -> None:
        """:meth:`admit` from counts (the shared job table counts every front's jobs: ``app.jobs.jobtable``).

        Args:
            owner_active: the owner's runs queued or running.
            waiting: jobs waiting; waiting_cost: their total cost, step-samples.
            cost: the new job's cost, step-samples.
            retry_after_s: when the owner's running job should end, seconds (``None``: unknown, 30 s is said).

        Raises:
            UserQueueLimitError, QueueFullError: as for :meth:`admit`.
        """
        if self.max_jobs_per_user is not None and owner_active >= self.max_jobs_per_user:
            raise UserQueueLimitError(owner_active, self.max_jobs_per_user, max(5, int(retry_after_s or 30)))
        if waiting >= self.queue_size:
            raise QueueFullError(waiting, self.queue_size)
        if self.cost_budget is not None and waiting_cost and waiting_cost + cost > self.cost_budget:
            raise QueueFullError(waiting, self.queue_size, queued_cost=waiting_cost, cost=cost,
                                 budget=self.cost_budget)


def queued_cost(pending: Sequence[Job]) -> int:
    """Total cost of the waiting jobs, step-samples."""
    return sum(j.cost for j in pending)


def _jobs(running: Job | Sequence[Job] | None) -> list[Job]:
    return [] if running is None else [running] if isinstance(running, Job) else list(running)


def fair_order(pending: Sequence[Job], served: Mapping[str, int], running_owner: str | Collection[str] | None,
               tick: int) -> list[Job]:
    """The waiting jobs in the order the worker will take them, if nothing else arrives.

    Each pick goes to the user who has waited longest: since their latest job ended, or since their oldest waiting
    job was queued if that is later (ties: the older job); the owner of the running job is being served now. A
    user's own jobs keep their order. So users take turns, the user whose job runs goes after everyone who is
    waiting, and a newcomer waits behind users who have waited longer but ahead of a user who has just been served.

    Args:
        pending: the waiting jobs in submission order (each with its ``queued_tick``).
        served: owner -> tick at which their latest job ended.
        running_owner: the owner of the running job, if any (several workers: the running jobs' owners).
        tick: "now", a tick after every job queued so far.

    Returns:
        ``pending``'s jobs, reordered.
    """
    served = dict(served)
    owners = [] if running_owner is None else [running_owner] if isinstance(running_owner, str) else running_owner
    for running in owners:
        served[running] = tick
    waiting: dict[str, list[Job]] = {}
    for j in pending:
        waiting.setdefault(j.owner, []).append(j)
    order: list[Job] = []
    while waiting:
        owner = min(waiting, key=lambda o: (max(served.get(o, 0), waiting[o][0].queued_tick),
                                            waiting[o][0].queued_tick))
        order.append(waiting[owner].pop(0))
        if not waiting[owner]:
            del waiting[owner]
        tick += 1
        served[owner] = tick
    return order
