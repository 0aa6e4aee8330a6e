"""Progress streams: an async generator that yields whenever a job changes, for server-sent events.

The worker thread calls ``job.touch()`` after every denoising step and state change; a stream registers a
listener that wakes its event loop (``call_soon_threadsafe``) when an event is due, so the worker never waits
on a client and a finished job is announced at once. Step-by-step progress is thinned to one event per
``interval`` seconds (each event costs a JSON or HTML render in the server process, which shares the
interpreter with the worker); state changes (queued -> running -> done | failed | cancelled) are never
delayed. Queue position changes come from other jobs, so the stream also re-checks every ``interval`` seconds
without a wake-up. Every :data:`CREDENTIAL_RECHECK_S` seconds it also checks that the caller's session or token
still works, and ends when it does not (logout, expiry, a disabled account): a stream must not outlive its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.jobs import Job, JobManager
from app.web.auth import Caller, credential_is_valid

CREDENTIAL_RECHECK_S = 2.0
"""How often an open stream re-checks its caller's credential, seconds (one small database read)."""


async def job_changes(request: Request, jobs: JobManager, job: Job, interval: float) -> AsyncIterator[Job]:
    """Yield ``job`` now and after changes (progress at most once per ``interval`` seconds, state changes at
    once); stop after it finishes, when the client goes away or when its session or token stops working. The job
    keeps running either way."""
    loop = asyncio.get_running_loop()
    caller: Caller | None = getattr(getattr(request, "state", None), "caller", None)
    db = getattr(getattr(getattr(request, "app", None), "state", None), "db", None)
    checked = time.monotonic()
    woken = asyncio.Event()
    sent: dict[str, Any] = {"state": None, "at": -float("inf")}  # what the stream sent last, and when

    def notify() -> None:  # called from the worker thread after every step: wake the loop only when due
        if job.state == sent["state"] and time.monotonic() - sent["at"] < interval:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the stream is gone anyway
            loop.call_soon_threadsafe(woken.set)

    job.add_listener(notify)
    try:
        last: tuple[int, int | None] | None = None
        while True:
            woken.clear()
            key = (job.version, jobs.queue_position(job))
            now = time.monotonic()
            due = job.state != sent["state"] or now - sent["at"] >= interval
            if key != last and due:
                last = key
                sent.update(state=job.state, at=now)
                yield job
                if job.state.finished:
                    return
            if await request.is_disconnected():
                return
            if caller is not None and db is not None and time.monotonic() - checked >= CREDENTIAL_RECHECK_S:
                checked = time.monotonic()
                if not await run_in_threadpool(credential_is_valid, db, caller):
                    return
            # sleep until a change, but not past the moment a thinned-out progress event becomes due
            wait = interval if key == last else max(0.0, sent["at"] + interval - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=wait)
    finally:
        job.remove_listener(notify)
