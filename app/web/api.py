"""The JSON API (``/api/v1``): the same jobs as the pages, for scripts and integrations.

=======  ==========================================  =====================================================
POST     /api/v1/counterfactuals                     multipart: file, prompt, ..., lung_mask, map_method -> 202
GET      /api/v1/jobs                                the user's jobs, newest first
GET      /api/v1/jobs/{id}                           status, progress, parameters, effective steps, timings
POST     /api/v1/jobs/{id}/cancel                    cancel (queued: at once; running: within one step)
GET      /api/v1/jobs/{id}/events                    server-sent events, one JSON status per change
GET      /api/v1/jobs/{id}/preview.png               latest denoising preview (small PNG)
GET      /api/v1/jobs/{id}/thumbnail.png             small PNG of the input, for history lists
GET      /api/v1/jobs/{id}/overlay.png               overlay re-rendered with ?opacity=&threshold=&mode=&scale=
GET      /api/v1/jobs/{id}/lung-outline.png          the lung mask's outline on a transparent layer (RGBA)
GET      /api/v1/jobs/{id}/artifacts/{name}          run files (input.png, ...) and exports (bundle.zip, ...)
GET      /api/v1/model                               the loaded model: name, hash, presets, class prompts
=======  ==========================================  =====================================================

Every route needs ``Authorization: Bearer vmd_...`` (``vald-md users token NAME``) or a browser session; a
user sees their own jobs only (an admin may open anyone's by id). File and export fetches are audited. Results are
patient-derived: every response carries ``Cache-Control: no-store`` (``app.web.app.SecurityHeadersMiddleware``).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app import audit
from app.config import Settings
from app.jobs import Job, JobManager
from app.runs import exports
from app.runs.folder import RECORD
from app.runs.review import ReviewRequest
from app.web.auditing import audit_export, audit_view, part_of_page
from app.web.deps import CurrentUser, DbDep, EngineDep, JobsDep, OverlayQuery, SettingsDep, find_job
from app.web.errors import UploadTooLargeError
from app.web.forms import GenerationParams, map_method_options
from app.web.schemas import JobList, JobStatus, ModelDescription, SubmittedJob, bearer_scheme
from app.web.streams import job_changes
from app.web.views import (
    artifact_file,
    build_export,
    job_status,
    render_lung_outline_png,
    render_overlay_png,
)

# the bearer dependency only documents the scheme (Authorize in /api/docs): AuthMiddleware has checked it already
router = APIRouter(prefix="/api/v1", tags=["api"], dependencies=[Security(bearer_scheme)])

JobId = Annotated[str, "32 hex digits"]


def openapi_with_server_limits(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that states this server's ``max_steps`` / ``max_samples`` for ``steps`` / ``samples``: the form
    model carries the engine's absolute ranges (1..1000, 1..16), which the server's settings narrow; a client that
    read the schema would otherwise be refused values the documentation allows."""
    limits = {"steps": settings.max_steps, "samples": settings.max_samples}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for component in schema.get("components", {}).get("schemas", {}).values():
                for name, top in limits.items():
                    prop = component.get("properties", {}).get(name)
                    if prop is None:
                        continue
                    for variant in (prop, *prop.get("anyOf", [])):
                        if "maximum" in variant:
                            variant["maximum"] = top
                    if "description" in prop:
                        prop["description"] = re.sub(r"1\.\.\d+", f"1..{top}", prop["description"])
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


async def read_upload(upload: UploadFile | None, limit_bytes: int, limit_mb: int) -> bytes | None:
    """The bytes of an uploaded file, ``None`` when the field was left empty.

    Raises:
        UploadTooLargeError: more than ``limit_bytes``.
    """
    if upload is None:
        return None
    data = await upload.read(limit_bytes + 1)
    await upload.close()
    if len(data) > limit_bytes:
        raise UploadTooLargeError(limit_mb)
    if not data and not upload.filename:
        return None
    return data


async def submit_job(jobs: JobManager, user: audit.User, data: bytes, req: ReviewRequest,
                     mask_png: bytes | None, *, rerun_of: str | None = None) -> Job:
    """Decode, validate, record and queue in a worker thread (decoding a large DICOM takes a moment)."""
    return await run_in_threadpool(jobs.submit, user, data, req, mask_png=mask_png, rerun_of=rerun_of)


@router.post("/counterfactuals", status_code=202, summary="Submit an image for counterfactual review",
             response_model=None, responses={202: {"model": SubmittedJob, "description": "queued"}})
async def create_counterfactual(
    params: Annotated[GenerationParams, Form()],
    file: Annotated[UploadFile, File(description="DICOM (with or without extension), PNG or JPEG")],
    jobs: JobsDep, engine: EngineDep, user: CurrentUser, settings: SettingsDep,
    mask: Annotated[UploadFile | None, File(description="optional region mask (PNG, white = inside)")] = None,
) -> JSONResponse:
    """Queue a review run. The upload is decoded now: unreadable files are refused (415/422) and no job is made.

    Returns 202 with ``job_id`` and the status URL; poll ``GET /api/v1/jobs/{id}`` or follow its ``events``.
    """
    limit = settings.max_upload_bytes
    data = await read_upload(file, limit, settings.max_upload_mb)
    if not data:
        raise ValueError("file: the uploaded file is empty; choose a DICOM, PNG or JPEG image")
    params.check_server_limits(settings.max_steps, settings.max_samples)
    mask_png = await read_upload(mask, limit, settings.max_upload_mb)
    job = await submit_job(jobs, user.user, data, params.to_request(engine.info), mask_png)
    status = job_status(jobs, job)
    return JSONResponse({"job_id": job.id, "state": status["state"], "queue_position": status["queue_position"],
                         "queue_eta_s": status["queue_eta_s"], "cost": job.cost,
                         "estimated_run_s": status["estimated_run_s"], "effective_steps": job.effective_steps,
                         "status_url": status["links"]["self"], "events_url": status["links"]["events"]},
                        status_code=202, headers={"Location": status["links"]["self"]})


@router.get("/jobs", summary="The user's jobs, newest first", response_model=None,
            responses={200: {"model": JobList, "description": "newest first"}})
def list_jobs(jobs: JobsDep, user: CurrentUser, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    """Status of the user's most recent jobs."""
    return {"jobs": [job_status(jobs, j) for j in jobs.list_jobs(user.owner, limit)]}


@router.get("/jobs/{job_id}", summary="Job status", response_model=None,
            responses={200: {"model": JobStatus, "description": "the job"}})
def get_job(job_id: JobId, jobs: JobsDep, user: CurrentUser) -> JSONResponse:
    """State, queue position, progress (step k of N, ETA, preview URL), parameters, effective steps, timings."""
    return JSONResponse(job_status(jobs, find_job(jobs, job_id, user)))


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job", response_model=None,
             responses={200: {"model": JobStatus, "description": "cancelled (or already finished)"},
                        202: {"model": JobStatus, "description": "cancel requested; stops within one step"}})
def cancel_job(job_id: JobId, jobs: JobsDep, user: CurrentUser) -> JSONResponse:
    """A queued job is cancelled at once; a running one stops within one denoising step (202 until it has)."""
    job = jobs.cancel(job_id, user.owner, any_owner=user.is_admin, actor=user.user)
    return JSONResponse(job_status(jobs, job), status_code=200 if job.state.finished else 202)


@router.get("/jobs/{job_id}/events", summary="Progress as server-sent events")
async def job_events(job_id: JobId, request: Request, jobs: JobsDep, user: CurrentUser,
                     settings: SettingsDep) -> EventSourceResponse:
    """One ``status`` event (the JSON of ``GET /jobs/{id}``) per change; the stream ends when the job does."""
    job = find_job(jobs, job_id, user)

    async def events() -> AsyncIterator[dict[str, str]]:
        async for j in job_changes(request, jobs, job, settings.sse_interval_s):
            yield {"event": "status", "data": json.dumps(job_status(jobs, j))}

    return EventSourceResponse(events())


@router.get("/jobs/{job_id}/preview.png", summary="Latest denoising preview")
def job_preview(job_id: JobId, jobs: JobsDep, user: CurrentUser) -> Response:
    """The engine's latent preview of the current step, upscaled (204 before the first step)."""
    job = find_job(jobs, job_id, user)
    png = jobs.preview_png(job)
    if png is None:
        return Response(status_code=204)
    return Response(png, media_type="image/png")


@router.get("/jobs/{job_id}/thumbnail.png", summary="Small image of the input")
def job_thumbnail(job_id: JobId, jobs: JobsDep, user: CurrentUser) -> Response:
    """A thumbnail of the decoded input (204 until the run has written it)."""
    job = find_job(jobs, job_id, user)
    png = jobs.thumbnail_png(job)
    if png is None:
        return Response(status_code=204)
    return Response(png, media_type="image/png")


@router.get("/jobs/{job_id}/overlay.png", summary="Re-render the overlay without re-running diffusion")
def job_overlay(job_id: JobId, jobs: JobsDep, user: CurrentUser, overlay: OverlayQuery) -> Response:
    """The overlay drawn from ``attribution.npy`` over ``input.png`` with these display options (the lung outline
    is a layer of its own: ``lung-outline.png``)."""
    job = find_job(jobs, job_id, user)
    return Response(render_overlay_png(job, overlay), media_type="image/png")


@router.get("/jobs/{job_id}/lung-outline.png", summary="The lung outline as a transparent layer")
def job_lung_outline(job_id: JobId, jobs: JobsDep, user: CurrentUser) -> Response:
    """The outline of the run's ``lung_mask.png`` (green, opaque) on a transparent RGBA layer of the input's size,
    to lay over any of the run's images; 404 when the map was not restricted to the lungs."""
    job = find_job(jobs, job_id, user)
    return Response(render_lung_outline_png(job), media_type="image/png")


@router.get("/jobs/{job_id}/artifacts/{name}", summary="A run file or an export")
def job_artifact(
    job_id: JobId, name: str, request: Request, jobs: JobsDep, user: CurrentUser, db: DbDep, overlay: OverlayQuery,
    download: Annotated[bool, Query(description="ask the browser to save the file")] = False,
) -> Response:
    """``input.png``, ``counterfactual.png`` (``-<i>`` for more samples), ``overlay.png``, ``reconstruction.png``,
    ``mask.png`` / ``lung_mask.png`` (the map's region, when restricted), ``attribution.npy``,
    ``attribution_std.npy``, ``record.json``, or an export: ``annotated.png``, ``secondary-capture.dcm`` (DICOM
    inputs), ``bundle.zip``. Image exports and the ZIP (for the images in it) take the overlay options
    (``lung_outline``: ``annotated.png``, alone or in the ZIP).
    Exports (``record.json`` included) are audited as ``export`` with their SHA-256, other files as ``view``
    (except the images a result page shows, which its own ``view`` covers: ``auditing.part_of_page``)."""
    job = find_job(jobs, job_id, user)
    stem = f"vald-md-{job.id[:8]}"
    if name in exports.EXPORT_KINDS and name != RECORD:
        content, media_type = build_export(job, name, overlay)
        audit_export(db, user, job, name, content)
        return Response(content, media_type=media_type,
                        headers={"Content-Disposition": f'attachment; filename="{stem}-{name}"'})
    content, media_type = artifact_file(job, name)  # checked against the record's SHA-256 (409 when changed)
    if name == RECORD:
        audit_export(db, user, job, name, content)
    elif not part_of_page(request, user, download=download):  # the result page's own images: its one view
        audit_view(db, user, job, name)
    disposition = "attachment" if download or not name.endswith(".png") else "inline"
    return Response(content, media_type=media_type,
                    headers={"Content-Disposition": f'{disposition}; filename="{stem}-{name}"'})


@router.get("/model", summary="The loaded model", response_model=None,
            responses={200: {"model": ModelDescription, "description": "the resident model"}})
def model_info(engine: EngineDep, settings: SettingsDep, jobs: JobsDep) -> dict[str, Any]:
    """Name, content hash, text encoder, image size, presets and class prompts of the resident model, and the
    map methods this server can run (``classifier_guided`` needs the lesion classifier and the lung segmenter)."""
    info = engine.info
    methods = map_method_options(jobs)
    return {"name": info.name, "model_hash": info.model_hash, "text_encoder_type": info.text_encoder_type,
            "image_size": info.image_size, "image_channels": info.image_channels,
            "parameters_millions": info.parameters_m, "presets": info.presets, "class_prompts": info.class_prompts,
            "map_methods": [m for m, _, available in methods if available],
            "default_map_method": str(info.manifest.get("map_method", "sdedit")),
            "limits": {"max_steps": settings.max_steps, "max_samples": settings.max_samples,
                       "max_upload_mb": settings.max_upload_mb, "queue_size": settings.queue_size,
                       "max_jobs_per_user": settings.max_jobs_per_user,
                       "queue_cost_budget": settings.queue_cost_budget}}
