"""Progress streams: an async generator that yields whenever a job changes, for server-sent events.

The worker thread only bumps ``job.version``; streams poll it every ``interval`` seconds (cheap: an integer
compare), so the denoising loop never waits on a slow client and no cross-thread event loop plumbing is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from app.jobs import Job, JobManager


async def job_changes(request: Request, jobs: JobManager, job: Job, interval: float) -> AsyncIterator[Job]:
    """Yield ``job`` now and after every change (progress, state, queue position); stop after it finishes or
    when the client goes away. The job keeps running either way."""
    last: tuple[int, int | None] | None = None
    while True:
        key = (job.version, jobs.queue_position(job))
        if key != last:
            last = key
            yield job
            if job.state.finished:
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(interval)
