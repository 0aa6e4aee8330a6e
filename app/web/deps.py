"""Dependencies of the routes, as ``Annotated`` aliases: ``SettingsDep``, ``EngineDep``, ``JobsDep``, ``CurrentUser``.

The resources live on ``app.state`` (created once in the lifespan, or injected by tests); routes reach them only
through these aliases, so a test or a later feature swaps one function, not every route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine import CounterfactualEngine
from app.jobs import JobManager

LOCAL_USER = "local"
"""The single user of a server without accounts."""


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


def get_current_user(request: Request) -> str:
    """The id of the user making the request. Every job is owned by, and filtered by, this id.

    Until accounts and sessions exist this is the fixed local user; replacing this one function (e.g. with a
    session lookup that raises 401) is all that authentication needs to change here.
    """
    return LOCAL_USER


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[CounterfactualEngine, Depends(get_engine)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
CurrentUser = Annotated[str, Depends(get_current_user)]
