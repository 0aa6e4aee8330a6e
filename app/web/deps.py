"""Dependencies of the routes, as ``Annotated`` aliases: ``SettingsDep``, ``EngineDep``, ``JobsDep``, ``DbDep``,
``CurrentUser`` and ``AdminUser``.

The resources live on ``app.state`` (created once in the lifespan, or injected by tests); routes reach them only
through these aliases, so a test or a later feature swaps one function, not every route. The caller itself is
established by :class:`app.web.auth.AuthMiddleware` before any route runs; ``get_current_user`` only reads it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine as Database

from app.config import Settings
from app.engine import CounterfactualEngine
from app.jobs import Job, JobManager
from app.web.auth import Caller
from app.web.errors import NotAuthenticatedError, PermissionDeniedError


def get_settings(request: Request) -> Settings:
    """The server's validated settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> CounterfactualEngine:
    """The resident engine (loaded once at start-up)."""
    engine: CounterfactualEngine = request.app.state.engine
    return engine


def get_jobs(request: Request) -> JobManager:
    """The job queue and its worker."""
    jobs: JobManager = request.app.state.jobs
    return jobs


def get_db(request: Request) -> Database:
    """The accounts/audit database engine (``audit.init_db`` at start-up)."""
    db: Database = request.app.state.db
    return db


def get_current_user(request: Request) -> Caller:
    """The signed-in caller (session or API token) that ``AuthMiddleware`` resolved for this request.

    Raises:
        NotAuthenticatedError: no caller (a public path, which must not use this dependency).
    """
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        raise NotAuthenticatedError()
    return caller


def get_admin(caller: Annotated[Caller, Depends(get_current_user)]) -> Caller:
    """The caller, who must have the admin role.

    Raises:
        PermissionDeniedError: a clinician.
    """
    if not caller.is_admin:
        raise PermissionDeniedError("This page is for administrators.")
    return caller


def find_job(jobs: JobManager, job_id: str, caller: Caller) -> Job:
    """The job if the caller may see it: their own, or any for an admin.

    Raises:
        app.jobs.JobNotFoundError: unknown, or another user's (indistinguishable on purpose).
    """
    return jobs.get(job_id, caller.owner, any_owner=caller.is_admin)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[CounterfactualEngine, Depends(get_engine)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
DbDep = Annotated[Database, Depends(get_db)]
CurrentUser = Annotated[Caller, Depends(get_current_user)]
AdminUser = Annotated[Caller, Depends(get_admin)]
