"""The review pages (Jinja2 + HTMX). Every route that HTMX calls returns a fragment for an ``HX-Request`` and
the full page otherwise, from the same ``_partial.html`` sources.

=======  ==========================  ===========================================================================
GET      /                           review page: upload, parameters, results area, history
POST     /inspect                    decode an upload: the non-identifying facts banner and its window presets (and,
                                     for an annotated PNG export, the parameters it carries, to copy into the form)
POST     /runs                       queue a run from the form; fragment = the run's progress panel
GET      /runs/{id}                  a run: progress or results (and its parameters restored into the form)
GET      /runs/{id}/events           server-sent events: ``progress`` fragments, then ``finished`` (results)
GET      /runs/{id}/progress         polling fallback: the run fragment, polling itself every second
POST     /runs/{id}/cancel           cancel (204 for HTMX; the stream reports the outcome)
GET      /runs/{id}/overlay          the overlay <img> for new display options (re-rendered, no diffusion)
GET      /runs/{id}/form             the form filled with a run's parameters and seed
POST     /runs/{id}/delete           delete one of the user's finished runs and its files (audited ``run_delete``)
GET      /history                    the history panel, narrowed by ?q= (case label or prompt) and ?state=
=======  ==========================  ===========================================================================

Every page needs a signed-in session (``app.web.auth``); a user sees their own runs, an admin anyone's by id.
The result page of a finished run is audited as ``view`` (once per opening: its images are part of it); a file
decoded on ``/inspect`` is part of the upload the run's submission audits (``app.web.auditing``).
Login, logout and the admin pages live in ``app.web.accounts`` and ``app.web.admin``.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app import imaging
from app.engine import SCHEDULERS, CounterfactualEngine
from app.imaging import gray_png
from app.jobs import MASK_UPLOAD, Job, JobManager, JobNotFoundError, JobState
from app.rendering import OverlayOptions
from app.runs import exports
from app.runs.folder import INPUT
from app.runs.review import MAX_MAP_SMOOTHING
from app.web.api import read_upload, submit_job
from app.web.auditing import audit_view
from app.web.auth import Caller
from app.web.deps import CurrentUser, DbDep, EngineDep, JobsDep, OverlayQuery, SettingsDep, find_job
from app.web.forms import (
    PARAMETER_HELP,
    FormValues,
    ReviewFormParams,
    counterfactual_edit_options,
    map_method_options,
    map_polarity_options,
    parameter_presets,
    prompt_presets,
)
from app.web.streams import job_changes
from app.web.templating import HISTORY_STATE_CHOICES, is_htmx, render
from app.web.views import (
    EXPORT_LABELS,
    api_base,
    export_kinds,
    export_query,
    has_lung_mask,
    job_status,
    overlay_query,
    read_record,
    result_view,
)

router = APIRouter(tags=["pages"], include_in_schema=False)

HISTORY_LIMIT = 24
INSPECT_THUMBNAIL_PX = 256


# ----------------------------------------------------------------------------------------------------------------
# context builders
# ----------------------------------------------------------------------------------------------------------------
def run_context(jobs: JobManager, job: Job | None, *, poll: bool = False,
                overlay: OverlayOptions | None = None) -> dict[str, Any]:
    """Everything ``_run.html`` needs for one job (or the empty results area when ``job`` is None)."""
    if job is None:
        return {"job": None}
    overlay = overlay or OverlayOptions()
    info = jobs.engine.info
    return {**result_view(job, overlay, info.manifest, info.model_hash),
            "job": job, "status": job_status(jobs, job), "poll": poll, "api": api_base(job),
            "active": _active(jobs, job.owner, job),
            "position": jobs.queue_position(job), "queue_eta": jobs.queue_eta_s(job),
            "overlay": overlay, "overlay_query": overlay_query(overlay),
            "exports": [(k, EXPORT_LABELS[k], export_query(overlay, k)) for k in export_kinds(job)],
            "record": read_record(job), "has_lungs": has_lung_mask(job),
            "preview_url": f"{api_base(job)}/preview.png?v={job.version}" if job.has_preview else None}


def _active(jobs: JobManager, user: str, current: Job | None = None) -> Job | None:
    """What the form's Cancel button cancels: the run on screen while it is unfinished, else the user's most
    recent unfinished run."""
    if current is not None and not current.state.finished:
        return current
    return next((j for j in jobs.list_jobs(user) if not j.state.finished), None)


def form_for_job(job: Job) -> FormValues:
    """The form restored from a run: its parameters, its first seed fixed, its image reused."""
    seed = job.seeds[0] if job.seeds else job.request.seed
    thumb = f"{api_base(job)}/thumbnail.png" if (job.run_dir / INPUT).is_file() else None
    return FormValues.from_request(job.request, seed=seed, reuse_input=job.id, facts=job.input_summary,
                                   thumbnail_url=thumb)


def form_context(engine: CounterfactualEngine, settings: Any, jobs: JobManager, user: str,
                 form: FormValues, current: Job | None = None) -> dict[str, Any]:
    """Everything ``_form.html`` needs (``current``: the run on screen, if any)."""
    last = next((j for j in jobs.list_jobs(user) if j.seeds), None)
    return {"form": form, "info": engine.info, "prompt_presets": prompt_presets(engine.info),
            "parameter_presets": parameter_presets(engine.info), "parameter_help": PARAMETER_HELP,
            "schedulers": SCHEDULERS, "max_steps": settings.max_steps, "max_samples": settings.max_samples,
            "max_upload_mb": settings.max_upload_mb, "active": _active(jobs, user, current),
            "map_methods": map_method_options(jobs), "map_polarities": map_polarity_options(),
            "max_map_smoothing": MAX_MAP_SMOOTHING, "counterfactual_edits": counterfactual_edit_options(),
            "last_seed": last.seeds[0] if last else None}


def page_context(engine: CounterfactualEngine, settings: Any, jobs: JobManager, caller: Caller, *,
                 job: Job | None = None) -> dict[str, Any]:
    """The whole review page."""
    form = form_for_job(job) if job is not None else FormValues.defaults(engine.info)
    user = caller.owner
    return {**form_context(engine, settings, jobs, user, form, job), **run_context(jobs, job),
            "history": jobs.list_jobs(user, HISTORY_LIMIT), "current_id": job.id if job else None}


def _render_fragment(request: Request, name: str, context: dict[str, Any]) -> str:
    template = request.app.state.templates.get_template(name)
    html: str = template.render({"request": request, "caller": getattr(request.state, "caller", None), **context})
    return html


# ----------------------------------------------------------------------------------------------------------------
# pages
# ----------------------------------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def review_page(request: Request, engine: EngineDep, settings: SettingsDep, jobs: JobsDep,
                user: CurrentUser) -> HTMLResponse:
    """The review page with the model's healthy preset in the form."""
    return render(request, "review.html", page_context(engine, settings, jobs, user))


def stored_upload(job: Job) -> bytes:
    """The stored upload of a run (reused as the input of a new run or of a preview).

    Raises:
        JobNotFoundError: the run was deleted while being read (404, not a 500).
    """
    try:
        return job.upload_path.read_bytes()
    except FileNotFoundError:
        raise JobNotFoundError(job.id) from None


@router.post("/inspect", response_class=HTMLResponse)
async def inspect_upload(request: Request, settings: SettingsDep, jobs: JobsDep, user: CurrentUser,
                         file: Annotated[UploadFile | None, File()] = None,
                         window: Annotated[str, Form(max_length=20,
                                                     pattern=r"^(auto|percentile|[0-9]{1,3})$")] = "auto",
                         reuse_input: Annotated[str | None, Form(pattern=r"^[0-9a-f]{32}$")] = None) -> HTMLResponse:
    """Decode an upload (nothing is stored) and show its non-identifying facts, window presets and a thumbnail.
    Without a file, ``reuse_input`` names the run whose stored image to show (window changes on a restored run)."""
    data = await read_upload(file, settings.max_upload_bytes, settings.max_upload_mb)
    reused = None
    if not data and reuse_input:
        reused = reuse_input
        data = stored_upload(find_job(jobs, reuse_input, user))
    if not data:
        raise imaging.UnsupportedImageError("The file is empty. Choose a DICOM, PNG or JPEG image.")
    # an annotated export (A1111's "PNG info"): offer the parameters of the run that made it
    png_parameters = exports.read_png_parameters(data) if reused is None else None
    win: int | str = int(window) if window.isascii() and window.isdigit() else window
    # not audited: this preview is a step of the upload, whose one `upload` event the run's submission writes
    decoded = await run_in_threadpool(imaging.decode_image, data, window=win)
    png = await run_in_threadpool(gray_png, decoded.pixels, longest_side=INSPECT_THUMBNAIL_PX)
    form = FormValues.defaults(request.app.state.engine.info)
    form.facts, form.window, form.reuse_input = decoded.meta.public_summary(), str(win), reused
    form.thumbnail_url = "data:image/png;base64," + base64.b64encode(png).decode()
    return render(request, "_file_facts.html", {"form": form, "png_parameters": png_parameters,
                                                "info": request.app.state.engine.info})


@router.post("/runs")
async def create_run(request: Request, params: Annotated[ReviewFormParams, Form()], engine: EngineDep,
                     settings: SettingsDep, jobs: JobsDep, user: CurrentUser,
                     file: Annotated[UploadFile | None, File()] = None,
                     mask: Annotated[UploadFile | None, File()] = None) -> Response:
    """Queue a run from the review form. Without a new file, ``reuse_input`` names the run whose image (and
    mask) to use again."""
    params.check_server_limits(settings.max_steps, settings.max_samples)
    limit, limit_mb = settings.max_upload_bytes, settings.max_upload_mb
    data = await read_upload(file, limit, limit_mb)
    mask_png = await read_upload(mask, limit, limit_mb)
    if not data and params.reuse_input:
        source = find_job(jobs, params.reuse_input, user)
        data = stored_upload(source)
        try:
            if mask_png is None and (source.run_dir / MASK_UPLOAD).is_file():
                mask_png = (source.run_dir / MASK_UPLOAD).read_bytes()
        except FileNotFoundError:  # the run was deleted meanwhile
            raise JobNotFoundError(params.reuse_input) from None
    if not data:
        raise ValueError("Choose an image first: drop a DICOM, PNG or JPEG file onto the upload area.")
    job = await submit_job(jobs, user.user, data, params.to_request(engine.info), mask_png)
    if not is_htmx(request):
        return RedirectResponse(f"/runs/{job.id}", status_code=303)
    context = {**run_context(jobs, job), "oob": True, "history": jobs.list_jobs(user.owner, HISTORY_LIMIT),
               "current_id": job.id}
    return render(request, "_run.html", context, headers={"HX-Push-Url": f"/runs/{job.id}"})


@router.get("/runs/{job_id}")
def run_page(request: Request, job_id: str, engine: EngineDep, settings: SettingsDep, jobs: JobsDep,
             user: CurrentUser, db: DbDep) -> HTMLResponse:
    """A run: the full page, or (HTMX) the run fragment plus the form restored out of band. Viewing a finished
    run's results is audited."""
    job = find_job(jobs, job_id, user)
    if job.state is JobState.DONE:
        audit_view(db, user, job, "result")
    if is_htmx(request):
        context = {**form_context(engine, settings, jobs, user.owner, form_for_job(job), job),
                   **run_context(jobs, job), "oob_form": True, "history": jobs.list_jobs(user.owner, HISTORY_LIMIT),
                   "current_id": job.id}
        return render(request, "_run.html", context)
    return render(request, "review.html", page_context(engine, settings, jobs, user, job=job))


@router.get("/runs/{job_id}/progress", response_class=HTMLResponse)
def run_progress(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser) -> HTMLResponse:
    """Polling fallback for browsers without server-sent events: the run fragment, which polls again while the
    run is unfinished and carries the results once it is done."""
    job = find_job(jobs, job_id, user)
    context = {**run_context(jobs, job, poll=True), "history": jobs.list_jobs(user.owner, HISTORY_LIMIT),
               "current_id": job.id, "oob": job.state.finished, "oob_state": True}
    return render(request, "_run.html", context)


@router.get("/runs/{job_id}/events")
async def run_events(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser,
                     settings: SettingsDep) -> EventSourceResponse:
    """``progress`` events carry the progress fragment; the last event, ``finished``, carries the run fragment
    (results, or the failure/cancellation notice). Closing the tab ends the stream, not the run."""
    job = find_job(jobs, job_id, user)

    async def events() -> AsyncIterator[dict[str, str]]:
        async for j in job_changes(request, jobs, job, settings.sse_interval_s):
            if j.state.finished:
                context = {**run_context(jobs, j), "oob": True, "current_id": j.id,
                           "history": jobs.list_jobs(user.owner, HISTORY_LIMIT)}
                yield {"event": "finished", "data": _render_fragment(request, "_run.html", context)}
            else:
                # oob_state: the history panel's badge follows (queued -> running)
                yield {"event": "progress", "data": _render_fragment(request, "_progress.html",
                                                                     {**run_context(jobs, j), "oob_state": True})}

    return EventSourceResponse(events())


@router.post("/runs/{job_id}/cancel")
def cancel_run(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser) -> Response:
    """Cancel a run. HTMX gets 204: the progress stream (or the poll) shows the outcome."""
    jobs.cancel(job_id, user.owner, any_owner=user.is_admin, actor=user.user)
    if is_htmx(request):
        return Response(status_code=204)
    return RedirectResponse(f"/runs/{job_id}", status_code=303)


@router.get("/runs/{job_id}/overlay", response_class=HTMLResponse)
def run_overlay(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser,
                overlay: OverlayQuery) -> HTMLResponse:
    """The overlay image element for new display options, and (out of band) the legend, the map summary at the
    new threshold and the export links that follow them.
    The PNG itself is rendered when the browser fetches the new URL. The lung outline is a layer of its own,
    shown and hidden in the browser (``lungs``); here it only changes the annotated export's link. Threshold 0 means
    none."""
    job = find_job(jobs, job_id, user)
    if overlay.mode == "stability" and job.request.samples < 2:
        raise ValueError("mode: the stability map needs a run with more than one sample")
    options = replace(overlay, threshold=overlay.threshold or None,
                      lung_outline=overlay.lung_outline and has_lung_mask(job))
    return render(request, "_overlay_image.html", {**run_context(jobs, job, overlay=options), "overlay_swap": True})


@router.get("/runs/{job_id}/form", response_class=HTMLResponse)
def run_form(request: Request, job_id: str, engine: EngineDep, settings: SettingsDep, jobs: JobsDep,
             user: CurrentUser) -> HTMLResponse:
    """The review form filled with this run's parameters and seed (the image is reused unless replaced)."""
    job = find_job(jobs, job_id, user)
    return render(request, "_form.html", form_context(engine, settings, jobs, user.owner, form_for_job(job)))


def filter_history(jobs: list[Job], q: str = "", state: str = "") -> list[Job]:
    """``jobs`` whose case label or prompt contains ``q`` (case-insensitive) and whose state is ``state`` (either
    empty: any), in their order."""
    q = q.strip().casefold()
    return [j for j in jobs if (not state or j.state.value == state)
            and (not q or q in j.request.prompt.casefold() or q in j.request.case_label.casefold())]


@router.get("/history", response_class=HTMLResponse)
def history(request: Request, jobs: JobsDep, user: CurrentUser,
            current: Annotated[str | None, Query(max_length=32)] = None,
            q: Annotated[str, Query(max_length=100, description="case label or prompt contains")] = "",
            state: Annotated[str, Query(pattern=f"^({'|'.join(HISTORY_STATE_CHOICES)})?$")] = "") -> HTMLResponse:
    """The history panel (the user's recent runs with thumbnails), narrowed by ``q`` and ``state``."""
    found = filter_history(jobs.list_jobs(user.owner), q, state)[:HISTORY_LIMIT]
    return render(request, "_history.html", {"history": found, "current_id": current, "history_q": q,
                                             "history_state": state})


@router.post("/runs/{job_id}/delete")
def delete_run(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser,
               q: Annotated[str, Form(max_length=100)] = "",
               state: Annotated[str, Form(pattern=f"^({'|'.join(HISTORY_STATE_CHOICES)})?$")] = "",
               current: Annotated[str | None, Form(max_length=32)] = None) -> Response:
    """Delete one of the user's finished runs and its files (``JobManager.delete``; audited as ``run_delete``).
    HTMX gets the refreshed history panel, still narrowed by the panel's search (``q``, ``state``, the highlighted
    ``current`` run: the filter form's fields travel with the button), and a redirect to ``/`` when the page was
    showing that run."""
    jobs.delete(job_id, user.owner, actor=user.user)
    if not is_htmx(request):
        return RedirectResponse("/", status_code=303)
    headers: dict[str, str] = {}
    if request.headers.get("HX-Current-URL", "").split("?")[0].rstrip("/").endswith(f"/runs/{job_id}"):
        headers["HX-Redirect"] = "/"
    found = filter_history(jobs.list_jobs(user.owner), q, state)[:HISTORY_LIMIT]
    return render(request, "_history.html", {"history": found, "current_id": current, "history_q": q,
                                             "history_state": state}, headers=headers)
