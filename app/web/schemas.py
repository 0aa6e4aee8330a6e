"""Response bodies of the JSON API as pydantic models: what ``/api/openapi.json`` documents for each endpoint.

The routes build their JSON from :func:`app.web.views.job_status` and return it as is; these models describe it
for clients and the interactive docs (``/api/docs``), they are not used to filter responses. ``tests/test_web.py``
checks that a real response has every documented field.
"""

from __future__ import annotations

from typing import Any

from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer",
    description="An API token `vmd_...` from `vald-md users token NAME` (or a signed-in browser session).")
"""Declares ``Authorization: Bearer`` in the OpenAPI document (the Authorize button of ``/api/docs``). Checking
the token is :class:`app.web.auth.AuthMiddleware`'s job, before any route runs; this dependency only documents it."""


class Progress(BaseModel):
    """Progress of a run: denoising step ``step`` of ``total`` (the samples are denoised together)."""

    step: int = Field(description="denoising steps done, 0..total")
    total: int = Field(description="denoising steps to run: the effective steps, int(steps x strength); 0 before "
                                   "the first step")
    fraction: float = Field(description="step / total, 0..1")
    elapsed_s: float | None = Field(description="seconds since the run started")
    eta_s: float | None = Field(description="estimated seconds to the end of the run")
    preview_url: str | None = Field(description="the latest denoising preview PNG, or null before the first step")


class Links(BaseModel):
    """URLs of the job's resources."""

    self_: str = Field(alias="self", description="this status")
    cancel: str
    events: str = Field(description="server-sent events, one status per change")
    page: str = Field(description="the run's review page")
    overlay: str = Field(description="overlay PNG re-rendered with display options")
    lung_outline: str | None = Field(None, description="the lung outline layer (only when the map was restricted)")


class JobStatus(BaseModel):
    """``GET /api/v1/jobs/{id}``: a job's state, progress, parameters, seeds, timings and files."""

    job_id: str = Field(description="32 hex digits")
    state: str = Field(description="queued | running | done | failed | cancelled")
    created_at: str = Field(description="ISO 8601, UTC")
    started_at: str | None = Field(description="ISO 8601, UTC")
    finished_at: str | None = Field(description="ISO 8601, UTC")
    queue_position: int | None = Field(description="1 = next to run; null when not waiting")
    queue_eta_s: float | None = Field(description="estimated seconds until the run starts")
    cost: int = Field(description="queue cost in step-samples: (effective steps + 1) x samples")
    estimated_run_s: float | None = Field(description="estimated run time while unfinished, seconds")
    progress: Progress
    cancel_requested: bool
    parameters: dict[str, Any] = Field(description="prompt, negative_prompt, strength, guidance_scale, steps, seed, "
                                                   "scheduler, samples, window, reference, lung_mask, map_method, "
                                                   "map_polarity, map_smoothing, counterfactual_edit, "
                                                   "classifier_scale")
    effective_steps: int = Field(description="int(steps x strength): the denoising steps each sample runs")
    unet_evaluations: int
    seeds: list[int]
    run_time_s: float | None = Field(description="wall time of the run from start to finish (queue wait "
                                                 "excluded), seconds; null while unfinished")
    timings_s: dict[str, float] = Field(description="per-stage seconds of the model's own work (the engine's)")
    error: str | None
    input: dict[str, Any] | None = Field(description="non-identifying facts of the input image")
    has_mask: bool
    artifacts: dict[str, str] = Field(description="run files by name -> URL")
    exports: dict[str, str] = Field(description="exports by kind -> URL")
    links: Links


class JobList(BaseModel):
    """``GET /api/v1/jobs``: the user's jobs, newest first."""

    jobs: list[JobStatus]


class SubmittedJob(BaseModel):
    """``POST /api/v1/counterfactuals`` (202): the queued job and where to follow it."""

    job_id: str = Field(description="32 hex digits")
    state: str = Field(description="queued (or running when the queue was empty)")
    queue_position: int | None
    queue_eta_s: float | None
    cost: int = Field(description="queue cost in step-samples")
    estimated_run_s: float | None
    effective_steps: int = Field(description="int(steps x strength)")
    status_url: str
    events_url: str


class ModelLimits(BaseModel):
    """This server's limits (``VALD_MD_*`` settings)."""

    max_steps: int
    max_samples: int
    max_upload_mb: int
    queue_size: int
    max_jobs_per_user: int
    queue_cost_budget: int


class ModelDescription(BaseModel):
    """``GET /api/v1/model``: the resident model and what this server can run."""

    name: str
    model_hash: str = Field(description="SHA-256 over the model's files")
    text_encoder_type: str
    image_size: int
    image_channels: int
    parameters_millions: dict[str, float] | float
    presets: dict[str, dict[str, Any]] = Field(description="named parameter sets: prompt, strength, "
                                                           "guidance_scale, steps")
    class_prompts: dict[str, str]
    map_methods: list[str]
    default_map_method: str
    limits: ModelLimits
