"""Work from the PACS: search, open into a run, store results back (``app.pacs``), and the admin connection test.

=======  =================================  ====================================================================
GET      /pacs                              search form (server, accession number, patient ID, date range) and
                                            the caller's runs opened from a PACS, each with its store-back form
GET      /pacs/search                       QIDO-RS study search (CR/DX); fragment = the study table
GET      /pacs/series                       a study's series and instances with server-rendered thumbnails
GET      /pacs/thumbnail                    one instance's thumbnail (WADO-RS ``/rendered``, else decoded here)
POST     /pacs/open                         WADO-RS retrieve, then the upload path (``JobManager.submit``: the same
                                            decoding, checks and de-identification); redirect to the run
POST     /pacs/runs/{id}/store              STOW-RS the run's derived objects; ``mode`` must be chosen
GET      /admin/pacs                        admins: the configured servers (never their credentials)
POST     /admin/pacs/{name}/test            admins: connection test (QIDO-RS ``/studies?limit=1``)
=======  =================================  ====================================================================

Every PACS request is blocking I/O run in a worker thread under a limiter of its own (:data:`PACS_THREADS`): the
event loop never waits on the PACS, and a hung PACS never holds the thread pool other requests use. Each query,
retrieval, store and connection test is one audit event (``pacs_query``, ``pacs_retrieve``, ``pacs_store``,
``pacs_test``) with the server's name, the Study Instance UID as an HMAC (never plain), the outcome and the user;
server-rendered thumbnails belong to the listing's event, a thumbnail decoded here from the retrieved instance is a
``pacs_retrieve`` of its own. The access log never carries query strings (:mod:`app.web.accesslog`). The run
keeps its study context in ``pacs-source.json`` in its folder (0600, like the stored upload, which keeps the same
UIDs: de-identification retains UIDs).

Store-back modes (``app.pacs.derived.StoreMode``), chosen explicitly on each store, no default:
``original-study`` — a derived series in the source's study, with the patient and study modules of the source as
the PACS itself holds them (fetched again at store time, so VALD-MD keeps no patient data) and references to the
source image; only to the server the image came from. ``deidentified`` — a new study, ``ANONYMOUS``, no reference.
"""

from __future__ import annotations

import json
import time
from datetime import date
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from app import audit, filemodes, imaging
from app.config import PacsServer
from app.imaging import gray_png
from app.jobs import Job, JobState
from app.pacs.client import PacsClient, PacsError, StoreResult
from app.pacs.derived import StoreMode, build_derived
from app.web.api import submit_job
from app.web.auth import Caller
from app.web.deps import AdminUser, CurrentUser, DbDep, EngineDep, JobsDep, SettingsDep, find_job
from app.web.errors import NotAuthenticatedError, PermissionDeniedError
from app.web.forms import ReviewFormParams
from app.web.templating import is_htmx, render

router = APIRouter()

PACS_SOURCE = "pacs-source.json"
"""The run-folder file that keeps a PACS-opened run's study context (server name and the three UIDs)."""
UID = r"^[0-9]{1,10}(\.[0-9]{1,20}){1,31}$"
THUMBNAIL_PX = 128


# -- helpers ---------------------------------------------------------------------------------------------------


def servers(request: Request) -> dict[str, PacsServer]:
    return {s.name: s for s in request.app.state.settings.pacs_servers}


def pacs_client(request: Request, name: str) -> PacsClient:
    """The cached client of a configured server (``app.state.pacs_clients``; tests may put their own there).

    Raises:
        ValueError: no server of that name.
    """
    cache: dict[str, PacsClient] = request.app.state.__dict__.setdefault("pacs_clients", {})
    if name not in cache:
        server = servers(request).get(name)
        if server is None:
            raise ValueError(f"No PACS server is called {name!r}; choose one of: "
                             f"{', '.join(servers(request)) or 'none is configured'}.")
        cache[name] = PacsClient(server)
    return cache[name]


def uid_hash(request: Request, uid: str) -> str:
    """The UID as the audit trail keeps it: HMAC under the server's UID key (``audit.hmac_uid``; the key is loaded
    at start-up, before any request)."""
    return audit.hmac_uid(request.app.state.uid_secret, uid)


def audit_pacs(request: Request, db: Any, caller: Caller, action: audit.AuditAction, server: str, *,
               ok: bool, study_uid: str | None = None, job_id: str | None = None, **detail: Any) -> None:
    """One PACS audit event (blocking: call from a thread)."""
    if db is None:
        return
    info: dict[str, Any] = {"server": server, **detail}
    if study_uid:
        info["study"] = uid_hash(request, study_uid)
    audit.append_event(db, action, user=caller.user, object_type="run" if job_id else "pacs",
                       object_id=job_id, outcome=audit.Outcome.SUCCESS if ok else audit.Outcome.MINOR_FAILURE,
                       detail=info)


PACS_THREADS = 4
"""PACS calls run at most this many at a time, in threads of their own limiter: a hung PACS (each call waits up to
its server's timeout) can hold these, never the shared thread pool that sign-in and every other request use."""


def _pacs_limiter(request: Request) -> anyio.CapacityLimiter:
    limiter = getattr(request.app.state, "pacs_limiter", None)
    if limiter is None:  # created on the event loop, once per app
        limiter = request.app.state.pacs_limiter = anyio.CapacityLimiter(PACS_THREADS)
    return limiter


async def in_pacs_thread(request: Request, fn: Any) -> Any:
    """``fn()`` (blocking PACS I/O) in a worker thread under the PACS limiter."""
    return await anyio.to_thread.run_sync(fn, limiter=_pacs_limiter(request))


async def _audited(request: Request, db: Any, caller: Caller, action: audit.AuditAction, server: str,
                   fn: Any, *, study_uid: str | None = None, **detail: Any) -> Any:
    """Run ``fn`` in a thread; audit success or failure (then re-raise for the error handler)."""
    t0 = time.monotonic()
    try:
        result = await in_pacs_thread(request, fn)
    except (PacsError, ValueError) as e:
        await run_in_threadpool(audit_pacs, request, db, caller, action, server, ok=False, study_uid=study_uid,
                                error=type(e).__name__, **detail)
        raise
    info: dict[str, Any] = {**detail, "seconds": round(time.monotonic() - t0, 3)}
    if isinstance(result, list):
        info["matches"] = len(result)
    await run_in_threadpool(audit_pacs, request, db, caller, action, server, ok=True, study_uid=study_uid, **info)
    return result


def read_source(job: Job) -> dict[str, str] | None:
    """A run's PACS study context, or ``None`` when it was not opened from a PACS."""
    path = job.run_dir / PACS_SOURCE
    if not path.is_file():
        return None
    data: dict[str, str] = json.loads(path.read_text())
    return data


def pacs_runs(jobs: Any, caller: Caller, limit: int = 20) -> list[tuple[Job, dict[str, str]]]:
    out = []
    for job in jobs.list_jobs(caller.owner, 200):
        source = read_source(job)
        if source is not None:
            out.append((job, source))
    return out[:limit]


def _optional_date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a date; use YYYY-MM-DD.") from None


# -- pages -----------------------------------------------------------------------------------------------------


def store_modes(request: Request, caller: Caller) -> list[str]:
    """The store-back modes ``caller`` may choose: ``original-study`` (the source's study, its patient data) only
    for the roles of ``VALD_MD_PACS_ORIGINAL_STUDY_ROLES`` (admins by default); ``deidentified`` for everyone."""
    allowed = request.app.state.settings.pacs_original_study_roles.split(",")
    return [m.value for m in StoreMode if m is not StoreMode.ORIGINAL_STUDY or caller.user.role in allowed]


def _page_context(request: Request, jobs: Any, caller: Caller, **extra: Any) -> dict[str, Any]:
    return {"servers": list(servers(request)), "runs": pacs_runs(jobs, caller), "modes": store_modes(request, caller),
            "query": {}, "studies": None, **extra}


@router.get("/pacs", response_class=HTMLResponse)
def pacs_page(request: Request, jobs: JobsDep, user: CurrentUser) -> HTMLResponse:
    """The PACS page: search form, results area, the caller's PACS runs."""
    return render(request, "pacs.html", _page_context(request, jobs, user))


@router.get("/pacs/search", response_class=HTMLResponse)
async def pacs_search(request: Request, jobs: JobsDep, user: CurrentUser, db: DbDep,
                      server: Annotated[str, Query(max_length=32)],
                      accession: Annotated[str, Query(max_length=16, pattern=r"^[\w\-. *?]*$")] = "",
                      patient_id: Annotated[str, Query(max_length=64, pattern=r"^[\w\-. *?^]*$")] = "",
                      date_from: Annotated[str, Query(max_length=10)] = "",
                      date_to: Annotated[str, Query(max_length=10)] = "") -> HTMLResponse:
    """QIDO-RS study search (CR/DX). Audited ``pacs_query`` (no search terms in the trail: they identify)."""
    client = pacs_client(request, server)
    d_from, d_to = _optional_date(date_from), _optional_date(date_to)
    studies = await _audited(request, db, user, audit.AuditAction.PACS_QUERY, server, lambda: client.search_studies(
        accession_number=accession.strip(), patient_id=patient_id.strip(), date_from=d_from, date_to=d_to),
        what="studies")
    query = {"server": server, "accession": accession, "patient_id": patient_id, "date_from": date_from,
             "date_to": date_to}
    if is_htmx(request):
        return render(request, "_pacs_studies.html", {"studies": studies, "server": server})
    return render(request, "pacs.html", _page_context(request, jobs, user, query=query, studies=studies,
                                                      server=server))


@router.get("/pacs/series", response_class=HTMLResponse)
async def pacs_series(request: Request, user: CurrentUser, db: DbDep, server: Annotated[str, Query(max_length=32)],
                      study: Annotated[str, Query(max_length=64, pattern=UID)]) -> HTMLResponse:
    """A study's series and their instances. Audited ``pacs_query`` with the study's HMAC."""
    client = pacs_client(request, server)

    def listing() -> list[tuple[Any, list[Any]]]:
        return [(s, client.list_instances(study, s.series_uid)) for s in client.list_series(study)]

    series = await _audited(request, db, user, audit.AuditAction.PACS_QUERY, server, listing, study_uid=study,
                            what="series")
    return render(request, "_pacs_series.html", {"series": series, "server": server, "study": study,
                                                 "thumbnail_px": THUMBNAIL_PX})


@router.get("/pacs/thumbnail")
async def pacs_thumbnail(request: Request, user: CurrentUser, db: DbDep, server: Annotated[str, Query(max_length=32)],
                         study: Annotated[str, Query(max_length=64, pattern=UID)],
                         series: Annotated[str, Query(max_length=64, pattern=UID)],
                         sop: Annotated[str, Query(max_length=64, pattern=UID)]) -> Response:
    """A server-rendered PNG thumbnail (part of the listing's audit event), or, when the server cannot render
    (WADO-RS ``/rendered`` refused), the instance retrieved and decoded here (same checks as opening it; a
    retrieval of the whole image, audited as ``pacs_retrieve``); 404 when neither works."""
    client = pacs_client(request, server)
    png = await in_pacs_thread(request, lambda: client.thumbnail(study, series, sop, THUMBNAIL_PX))
    if png is None:
        def decoded() -> bytes | None:  # the size and modality checks run before the download
            try:
                return gray_png(imaging.decode_image(client.retrieve(study, series, sop)).pixels,
                                longest_side=THUMBNAIL_PX)
            except imaging.ImagingError:
                return None

        try:
            png = await _audited(request, db, user, audit.AuditAction.PACS_RETRIEVE, server, decoded,
                                 study_uid=study, purpose="thumbnail")
        except (PacsError, ValueError):
            png = None
    if png is None:
        return Response(status_code=404)
    return Response(png, media_type="image/png")


@router.post("/pacs/open")
async def pacs_open(request: Request, engine: EngineDep, jobs: JobsDep, user: CurrentUser, db: DbDep,
                    server: Annotated[str, Form(max_length=32)],
                    study: Annotated[str, Form(max_length=64, pattern=UID)],
                    series: Annotated[str, Form(max_length=64, pattern=UID)],
                    sop: Annotated[str, Form(max_length=64, pattern=UID)]) -> Response:
    """Retrieve one instance and queue a run on it with the model's default parameters, through the upload path
    (``submit_job``): the same decoding, checks, de-identification and ``upload`` event. Audited ``pacs_retrieve``.
    Nothing is stored when the retrieval or the checks fail."""
    if user.user is None:
        raise NotAuthenticatedError()
    client = pacs_client(request, server)
    data = await _audited(request, db, user, audit.AuditAction.PACS_RETRIEVE, server,
                          lambda: client.retrieve(study, series, sop), study_uid=study)
    job = await submit_job(jobs, user.user, data, ReviewFormParams.model_validate({}).to_request(engine.info), None)
    context = {"server": server, "study_uid": study, "series_uid": series, "sop_uid": sop}
    await run_in_threadpool(filemodes.write_private, job.run_dir / PACS_SOURCE, json.dumps(context).encode())
    target = f"/runs/{job.id}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


@router.post("/pacs/runs/{job_id}/store", response_class=HTMLResponse)
async def pacs_store(request: Request, job_id: str, jobs: JobsDep, user: CurrentUser, db: DbDep,
                     mode: Annotated[StoreMode, Form()]) -> HTMLResponse:
    """STOW-RS the run's derived objects in the chosen ``mode`` (no default) to the server it came from. Audited
    ``pacs_store`` with the counts. A partial failure is reported with what was stored; storing again completes
    it (the same UIDs: replaced, not duplicated)."""
    job = find_job(jobs, job_id, user)
    if mode.value not in store_modes(request, user):
        raise PermissionDeniedError("Storing into the original study (with its patient data) is reserved to the "
                                    "roles an administrator allowed (VALD_MD_PACS_ORIGINAL_STUDY_ROLES); store the "
                                    "de-identified kind, or ask an administrator.")
    source = read_source(job)
    if source is None:
        raise ValueError("This run was not opened from a PACS; export its DICOM Secondary Capture instead.")
    if job.state is not JobState.DONE:
        raise ValueError(f"The run is {job.state.value}; results can be stored once it has finished.")
    server = source["server"]
    client = pacs_client(request, server)

    def store() -> StoreResult:
        if mode is StoreMode.ORIGINAL_STUDY:  # the identified header, as the PACS holds it, never a mix
            header = client.metadata(source["study_uid"], source["series_uid"], source["sop_uid"])
            if str(header.get("SOPInstanceUID", "")) != source["sop_uid"]:
                raise PacsError(f"PACS '{server}' returned another instance's header; nothing was stored.")
        else:  # nothing identifying is copied; the stored (de-identified) upload is enough
            import pydicom  # with the first store, not the server's start-up

            header = pydicom.dcmread(job.upload_path, stop_before_pixels=True)
        objects = build_derived(job.run_dir, header, mode, job.id)
        return client.store(objects, str(objects[0].StudyInstanceUID))

    result: StoreResult = await _audited(request, db, user, audit.AuditAction.PACS_STORE, server, store,
                                         study_uid=source["study_uid"], mode=mode.value, job=job.id)
    return render(request, "_pacs_stored.html", {"result": result, "server": server, "mode": mode.value})


# -- admin -----------------------------------------------------------------------------------------------------


@router.get("/admin/pacs", response_class=HTMLResponse)
def admin_pacs(request: Request, admin: AdminUser, settings: SettingsDep) -> HTMLResponse:
    """The configured servers (URL, auth kind, TLS check, timeout; never a credential) and a test button each."""
    return render(request, "admin_pacs.html", {"servers": settings.pacs_servers})


@router.post("/admin/pacs/{name}/test", response_class=HTMLResponse)
async def admin_pacs_test(request: Request, name: str, admin: AdminUser, db: DbDep) -> HTMLResponse:
    """Connection test: one QIDO-RS request; the outcome (and round-trip time) in the page. Audited ``pacs_test``."""
    client = pacs_client(request, name)
    try:
        seconds = await _audited(request, db, admin, audit.AuditAction.PACS_TEST, name, client.check)
    except PacsError as e:
        return render(request, "_pacs_test.html", {"name": name, "ok": False, "message": str(e)})
    return render(request, "_pacs_test.html", {"name": name, "ok": True,
                                               "message": f"Connected: answered in {seconds * 1000:.0f} ms."})
