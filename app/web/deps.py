"""Dependencies of the routes, as ``Annotated`` aliases: ``SettingsDep``, ``EngineDep``, ``JobsDep``, ``DbDep``,
``CurrentUser``, ``AdminUser`` and ``OverlayQuery`` (the overlay's display options from the query string).

The resources live on ``app.state`` (created once in the lifespan, or injected by tests); routes reach them only
through these aliases, so a test or a later feature swaps one function, not every route. The caller itself is
established by :class:`app.web.auth.AuthMiddleware` before any route runs; ``get_current_user`` only reads it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Query, Request
from sqlalchemy import Engine as Database

from app.config import Settings
from app.engine import CounterfactualEngine
from app.jobs import Job, JobManager
from app.rendering import OverlayOptions
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


def overlay_options(
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="maximum overlay opacity")] = 0.6,
    threshold: Annotated[float | None, Query(ge=0.0, le=100.0, description=(
        "hide |M| below this: x-fold of the model's normal level on a calibrated run (record map_summary.scale.kind "
        "'calibrated'), else a percentile of the map's own |M|"))] = None,
    mode: Annotated[Literal["magnitude", "signed", "outline", "stability"], Query()] = "magnitude",
    scale: Annotated[float | None, Query(gt=0.0, le=1.0, description="|M| at full opacity; default: 2x the normal "
                                                                    "level when calibrated, else the 99.5th pct "
                                                                    "(overlay.png only)")] = None,
    legend: Annotated[bool, Query(description="append the colour bar (overlay.png only)")] = False,
    lung_outline: Annotated[bool, Query(description="annotated.png (alone or in bundle.zip): draw the lung "
                                                    "mask's outline")] = False,
    lungs: Annotated[bool, Query(include_in_schema=False, description="the review page's name for "
                                                                      "lung_outline")] = False,
) -> OverlayOptions:
    """The overlay's display options from the query string, for every route that draws or exports the overlay
    (``overlay.png``, the exports, the review page's overlay panel). The threshold's unit is the run's
    (``app.web.views.on_run``)."""
    return OverlayOptions(opacity=opacity, threshold=threshold, mode=mode, scale=scale, legend=legend,
                          lung_outline=lung_outline or lungs)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[CounterfactualEngine, Depends(get_engine)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
DbDep = Annotated[Database, Depends(get_db)]
CurrentUser = Annotated[Caller, Depends(get_current_user)]
AdminUser = Annotated[Caller, Depends(get_admin)]
OverlayQuery = Annotated[OverlayOptions, Depends(overlay_options)]
