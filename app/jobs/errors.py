"""The queue's refusals and failed lookups, each with a message written for the user (``app.web.errors`` maps them
to HTTP statuses)."""

from __future__ import annotations

__all__ = ["BackendError", "JobNotFoundError", "JobNotReadyError", "QueueFullError", "UserQueueLimitError",
           "WorkerStoppedError"]


class QueueFullError(RuntimeError):
    """The queue holds ``capacity`` waiting jobs already, or the new one would take the waiting jobs' total cost
    past the budget (``cost`` and ``budget`` then say by how much). The message is written for the user."""

    def __init__(self, queue_length: int, capacity: int, *, queued_cost: int | None = None, cost: int | None = None,
                 budget: int | None = None) -> None:
        self.queue_length = queue_length
        self.capacity = capacity
        self.queued_cost, self.cost, self.budget = queued_cost, cost, budget
        if budget is None:
            message = (f"The review queue is full ({queue_length} of {capacity} runs waiting). "
                       f"Please try again when a run has finished.")
        else:
            message = (f"The review queue is fully booked: the {queue_length} runs waiting need {queued_cost} "
                       f"step-samples and this run {cost}, more than this server's {budget}. Please try again "
                       f"when a run has finished, or ask for fewer steps or samples.")
        super().__init__(message)


class UserQueueLimitError(RuntimeError):
    """The user already has ``limit`` runs queued or running. The message is written for the user."""

    def __init__(self, active: int, limit: int, retry_after_s: int) -> None:
        self.active = active
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"You already have {active} runs queued or running; this server takes at most {limit} per "
                         f"user at a time so that everyone gets a turn. Please wait for one to finish, or cancel "
                         f"one.")


class JobNotFoundError(LookupError):
    """No job with that id belongs to this user."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__("No such run. It may belong to another user or have been removed.")


class WorkerStoppedError(RuntimeError):
    """The worker thread is not running (server shutting down, or it crashed)."""


class JobNotReadyError(RuntimeError):
    """The job has no artifacts (yet): it is queued, running, failed or cancelled."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(f"This run is {state}; its images are available once it is done.")


class BackendError(RuntimeError):
    """The backend could not finish a run for a reason of its own (a model replica lost twice, a replica that
    cannot see the run folder): the job fails with this message, which is written for the user."""
