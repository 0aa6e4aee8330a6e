"""What the routes show of a job, shared by the JSON API and the pages: status, artifact files, exports and the
re-rendered overlay. Pure helpers over :class:`app.jobs.Job` and its run folder; no routing here."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from app import attribution, mapscale, rendering
from app.jobs import Job, JobManager, JobNotReadyError, JobState
from app.rendering import OverlayOptions
from app.runs import exports, read
from app.runs import folder as names
from app.runs.folder import RunFolder, RunFolderError
from app.runs.record import RunRecord

logger = logging.getLogger(__name__)

ARTIFACT = names.FETCHABLE
"""Run-folder files a client may fetch (never ``job.json`` or the upload)."""
EXPORT_LABELS = {"annotated.png": "Annotated PNG", "secondary-capture.dcm": "DICOM SC",
                 "record.json": "JSON record", "bundle.zip": "ZIP bundle"}
MEDIA = {".png": "image/png", ".npy": "application/octet-stream", ".json": "application/json"}


class ArtifactNotFoundError(LookupError):
    """The run has no such file (or export)."""


def api_base(job: Job) -> str:
    """URL prefix of a job in the JSON API."""
    return f"/api/v1/jobs/{job.id}"


def artifact_names(job: Job) -> list[str]:
    """Fetchable files present in a finished job's folder, sorted."""
    if job.state is not JobState.DONE or not job.run_dir.is_dir():
        return []
    return sorted(p.name for p in job.run_dir.iterdir() if p.is_file() and ARTIFACT.match(p.name))


def export_kinds(job: Job) -> list[str]:
    """Exports available for a job: all four for a DICOM input, no Secondary Capture otherwise."""
    if job.state is not JobState.DONE:
        return []
    return [k for k in exports.EXPORT_KINDS if k != "secondary-capture.dcm" or job.source_format == "dicom"]


def job_status(jobs: JobManager, job: Job) -> dict[str, Any]:
    """The JSON description of a job (``GET /api/v1/jobs/{id}``)."""
    base = api_base(job)
    position = jobs.queue_position(job)
    fraction = job.step / job.total if job.total else (1.0 if job.state is JobState.DONE else 0.0)
    req = asdict(job.request)
    return {
        "job_id": job.id,
        "state": job.state.value,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "queue_position": position,
        "queue_eta_s": _round(jobs.queue_eta_s(job)) if position else None,
        "cost": job.cost,
        "estimated_run_s": _round(jobs.estimated_run_s(job)) if not job.state.finished else None,
        "progress": {"step": job.step, "total": job.total, "fraction": round(fraction, 4),
                     "elapsed_s": _round(job.elapsed_s), "eta_s": _round(job.eta_s),
                     "preview_url": f"{base}/preview.png?v={job.version}" if job.has_preview else None},
        "cancel_requested": job.cancel_event.is_set() and not job.state.finished,
        "parameters": {k: req[k] for k in ("prompt", "negative_prompt", "strength", "guidance_scale", "steps",
                                           "seed", "scheduler", "samples", "window", "reference",
                                           "lung_mask", "map_method", "map_polarity", "map_smoothing",
                                           "counterfactual_edit", "classifier_scale")},
        "effective_steps": job.effective_steps,
        "unet_evaluations": job.unet_evaluations,
        "seeds": job.seeds,
        "run_time_s": _round(job.timings_s.get("run")),
        "timings_s": job.timings_s,
        "error": job.error,
        "input": job.input_summary,
        "has_mask": job.has_mask,
        "artifacts": {n: f"{base}/artifacts/{n}" for n in artifact_names(job)},
        "exports": {k: f"{base}/artifacts/{k}" for k in export_kinds(job)},
        "links": {"self": base, "cancel": f"{base}/cancel", "events": f"{base}/events", "page": f"/runs/{job.id}",
                  "overlay": f"{base}/overlay.png",
                  **({"lung_outline": f"{base}/lung-outline.png"} if has_lung_mask(job) else {})},
    }


def has_lung_mask(job: Job) -> bool:
    """The finished run's map was restricted to the lungs (it wrote ``lung_mask.png``)."""
    if job.state is not JobState.DONE:
        return False
    try:
        return RunFolder(job.run_dir).has(names.LUNG_MASK)
    except RunFolderError:
        return False


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


def require_done(job: Job) -> None:
    """Raise :class:`JobNotReadyError` unless the job finished successfully."""
    if job.state is not JobState.DONE:
        raise JobNotReadyError(job.state.value)


def artifact_file(job: Job, name: str) -> tuple[bytes, str]:
    """(bytes, media type) of a run artifact, checked against the record's SHA-256 (:class:`RunFolder`); the name
    is checked against :data:`ARTIFACT` before any path is built.

    Raises:
        ArtifactNotFoundError: not an artifact name, or the run has no such file.
        JobNotReadyError: the run is not done.
        app.runs.folder.ArtifactChangedError: the file was changed after the run (HTTP 409).
    """
    if not ARTIFACT.match(name):
        raise ArtifactNotFoundError(f"A run has no file called {name!r}.")
    require_done(job)
    run = RunFolder(job.run_dir)
    if not (job.run_dir / name).is_file() or (name != names.RECORD and not run.has(name)):
        raise ArtifactNotFoundError(f"This run has no {name}.")
    return run.read(name), MEDIA["." + name.rsplit(".", 1)[1]]


def build_export(job: Job, kind: str, options: OverlayOptions) -> tuple[bytes, str]:
    """One export of a finished job (``exports.build_export``), with the stored upload as the DICOM source.

    Args:
        options: The page's overlay options (:func:`on_run` gives the threshold its meaning on this run); used by
            the image exports and the ZIP, the lung outline by ``annotated.png`` (alone or in the ZIP) only.

    Raises:
        ArtifactNotFoundError: a DICOM export of a PNG/JPEG run. exports.ExportError: see ``build_export``.
    """
    require_done(job)
    if kind not in export_kinds(job):
        raise ArtifactNotFoundError("A DICOM Secondary Capture needs a DICOM input; this run was made from a "
                                    f"{job.source_format.upper() or 'non-DICOM'} file. Export PNG, JSON or ZIP.")
    source = job.upload_path.read_bytes() if job.source_format == "dicom" else None
    overlay = None
    if kind in exports.OVERLAY_KINDS:
        # the threshold's unit follows the run; without a threshold the recorded threshold_mode stays "percentile"
        overlay = on_run(options, read_record(job)) if options.threshold is not None else options
        overlay = replace(overlay, lung_outline=options.lung_outline and kind in exports.LUNG_OUTLINE_KINDS)
    return exports.build_export(job.run_dir, kind, source, overlay=overlay)


def read_record(job: Job) -> RunRecord:
    """A finished run's record (an empty :class:`RunRecord` while unfinished, or when it is missing or
    unreadable)."""
    if job.state is not JobState.DONE:
        return RunRecord()
    try:
        return RunFolder(job.run_dir).record()
    except (OSError, RunFolderError):
        return RunRecord()


def threshold_mode(record: RunRecord) -> str:
    """What the review page's threshold means for this run: ``"normal"`` (x-fold of the model's normal level) on a
    calibrated run, ``"percentile"`` of the map's own |M| otherwise."""
    return rendering.THRESHOLD_NORMAL if record.calibration is not None else "percentile"


def on_run(options: OverlayOptions, record: RunRecord) -> OverlayOptions:
    """``options`` with the threshold in this run's unit (:func:`threshold_mode`): the page's threshold is an
    x-fold of the normal level on a calibrated run, else a percentile of the map's own |M|."""
    return replace(options, threshold_mode=threshold_mode(record))


def map_summary(job: Job, options: OverlayOptions) -> dict[str, Any]:
    """The run's map summary at the page's threshold: on a calibrated run, the area above ``threshold`` × the
    normal level (1× when the slider is at 0), else the record's own summary (above the map's 95th percentile).

    Raises:
        JobNotReadyError: the run is not done.
    """
    require_done(job)
    run = RunFolder(job.run_dir)
    record = run.record()
    calibration = record.calibration
    summary: dict[str, Any] = dict(record.map_summary)
    if calibration is None or options.threshold is None:
        return summary
    _, amap = read_run_map(run)
    scale = summary.get("scale") or {}
    fresh = mapscale.summarize_scaled(amap, calibration, threshold_fold=options.threshold)
    fresh["scale"] = {**fresh["scale"], **scale}
    return fresh


@contextlib.contextmanager
def _folder_errors() -> Iterator[None]:
    """The exports' reader's errors as the run folder's: a changed file stays an ``ArtifactChangedError``
    (HTTP 409, "Run folder changed"); a missing or damaged one becomes a ``RunFolderError`` (409, "Run folder
    damaged") rather than the 422 of a bad request."""
    try:
        yield
    except read.ExportChangedError:
        raise
    except read.ExportError as exc:
        raise RunFolderError(str(exc)) from None


def read_run_map(run: RunFolder) -> tuple[NDArray[np.float32], attribution.AttributionMap]:
    """The original (float32 ``(H, W)`` in [0, 1]) and the attribution map, through the exports' one reader
    (:func:`app.runs.read.read_map`: hash-checked files, finite arrays of the input's shape, the region mask
    decoded and checked by :func:`app.attribution.load_mask_png`).

    Raises:
        app.runs.folder.ArtifactChangedError: a file changed after the run.
        app.runs.folder.RunFolderError: a file is missing or damaged.
    """
    with _folder_errors():
        return read.read_map(run)


def overlay_query(options: OverlayOptions) -> str:
    """The options as the query string (stable order) of the overlay image's URL (``overlay.png``). The lung
    outline is not part of it: the review page draws it as a layer of its own over every image
    (``lung-outline.png``)."""
    parts = [f"opacity={options.opacity:g}", f"mode={options.mode}"]
    if options.threshold is not None:
        parts.append(f"threshold={options.threshold:g}")
    if options.scale is not None:
        parts.append(f"scale={options.scale:g}")
    if options.legend:
        parts.append("legend=true")
    return "&".join(parts)


def export_query(options: OverlayOptions, kind: str) -> str:
    """The query string of an export's link: :func:`overlay_query` for the exports drawn with overlay options,
    plus the lung outline for ``annotated.png`` (alone or in ``bundle.zip``); ``""`` for the others."""
    if kind not in exports.OVERLAY_KINDS:
        return ""
    q = overlay_query(options)
    return q + "&lung_outline=true" if options.lung_outline and kind in exports.LUNG_OUTLINE_KINDS else q


def render_overlay_png(job: Job, options: OverlayOptions) -> bytes:
    """Re-render the overlay from ``input.png`` and ``attribution.npy`` (no diffusion), as an RGB PNG.

    Raises:
        JobNotReadyError: the run is not done. ValueError: an option is out of range, or ``mode="stability"``
        for a single-sample run (message from ``rendering.render_overlay``).
    """
    require_done(job)
    run = RunFolder(job.run_dir)
    original, amap = read_run_map(run)
    record = run.record()
    calibration = record.calibration
    rgb = rendering.render_overlay(original, amap, on_run(options, record),
                                   normal_level=calibration.level if calibration else None,
                                   label=record.label)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_legend_png(job: Job, options: OverlayOptions, *, length: int = 480) -> bytes:
    """The overlay's colour bar for the viewer (horizontal, ``length`` px wide, RGB PNG): the same colours,
    labels and caption as the exports' legend — x-fold of the normal range on a calibrated run, else the map's
    own values, marked "relative (per-image) scale".

    Raises:
        JobNotReadyError: the run is not done. ValueError: an option is out of range.
    """
    require_done(job)
    run = RunFolder(job.run_dir)
    _, amap = read_run_map(run)
    record = run.record()
    calibration = record.calibration
    level = calibration.level if calibration is not None else None
    threshold, mode = rendering.resolve_threshold(on_run(options, record), level)
    values = amap.std if options.mode == "stability" and amap.std is not None else amap.magnitude
    thr = None if threshold is None else attribution.threshold_value(values, threshold=threshold, mode=mode,
                                                                     mask=amap.mask)
    if options.mode == "outline" and thr is None:
        thr = attribution.threshold_value(values, threshold=attribution.DEFAULT_THRESHOLD_PERCENTILE,
                                          mask=amap.mask)
    scale = rendering.display_scale(amap, mode=options.mode, scale=options.scale, normal_level=level)
    unit = level if options.mode != "stability" else None
    rgb = rendering.render_legend(length, scale, options.mode, position="bottom", opacity=options.opacity,
                                  threshold=thr, unit=unit, relative=options.scale is None and unit is None,
                                  label=record.label)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def result_view(job: Job, options: OverlayOptions, manifest: dict[str, Any], model_hash: str) -> dict[str, Any]:
    """What the result page shows beside the images of a finished run ({} otherwise): the map's label, its
    scale (``calibration``: the :class:`app.mapscale.MapCalibration` it was read against, or ``None`` for the
    relative scale, with ``scale_reason``), the legend (a ``data:`` PNG URI), the map summary at the page's
    threshold, the model's limitations (the record's, else the loaded model's when the run was made by it), the
    model frame size and the operator's case label.

    Args:
        manifest, model_hash: The loaded model's manifest and hash (``engine.info``).
    """
    if job.state is not JobState.DONE:
        return {}
    record = read_record(job)
    out: dict[str, Any] = {
        "map_label": record.label,
        "calibration": record.calibration,
        "scale_reason": record.scale_reason,
        "map_region": record.map_region or "whole_image",
        "model_frame": record.model_frame,
        "case_label": job.request.case_label or "",
        "limitations": limitations_shown(record.model_limitations or (
            manifest.get("limitations") if record.model_hash == model_hash else None)),
        "legend_uri": None, "summary": record.map_summary,
    }
    try:
        out["legend_uri"] = "data:image/png;base64," + base64.b64encode(render_legend_png(job, options)).decode()
        out["summary"] = map_summary(job, options)
    except (OSError, ValueError) as e:  # a damaged run folder: the page still shows what it can
        logger.warning("job %s: legend or map summary unavailable (%s)", job.id, type(e).__name__)
    return out


LOCALIZATION_TARGETS = {"pixel_auroc": 0.70, "pointing_game": 0.60}
"""Issue 16's localization targets (lesions-rsna, inside the lungs) a model must meet before its limitations
warning is dropped from the result page."""


def limitations_shown(limitations: Any) -> dict[str, Any] | None:
    """The model's limitations as the result page shows them (``{"text", "source"}``), or ``None``.

    A manifest's ``"limitations"`` is a text, or ``{"text", "source", "localization": {"pixel_auroc_lungs",
    "pixel_auroc_lungs_ci95", "pointing_game_lungs", "baselines": {name: AUROC}}}``. It is shown beside every result
    until the model's measured localization meets the localization targets (issue 16): the lower end of the map's
    pixel-AUROC interval above every baseline and at least :data:`LOCALIZATION_TARGETS` ``pixel_auroc`` (0.70), and
    its pointing game, where measured, at least ``pointing_game`` (0.60). A map that beats its baselines but misses
    a target keeps the warning.
    """
    if not limitations:
        return None
    if isinstance(limitations, str):
        return {"text": limitations, "source": ""}
    if not isinstance(limitations, dict) or not limitations.get("text"):
        return None
    loc = limitations.get("localization") or {}
    ci = loc.get("pixel_auroc_lungs_ci95") or [loc.get("pixel_auroc_lungs")]
    baselines = [float(v) for v in (loc.get("baselines") or {}).values() if isinstance(v, int | float)]
    pointing = loc.get("pointing_game_lungs")
    if (baselines and isinstance(ci[0], int | float) and float(ci[0]) > max(baselines)
            and float(ci[0]) >= LOCALIZATION_TARGETS["pixel_auroc"]
            and (not isinstance(pointing, int | float) or float(pointing) >= LOCALIZATION_TARGETS["pointing_game"])):
        return None
    return {"text": str(limitations["text"]), "source": str(limitations.get("source") or "")}


def render_lung_outline_png(job: Job) -> bytes:
    """The outline of the run's ``lung_mask.png`` on a transparent layer (RGBA PNG, the input's size).

    Raises:
        JobNotReadyError: the run is not done. ArtifactNotFoundError: its map was not restricted to the lungs.
    """
    require_done(job)
    run = RunFolder(job.run_dir)
    if not run.has(names.LUNG_MASK):
        raise ArtifactNotFoundError("This run has no lung mask: its map was not restricted to the lungs.")
    shape = run.read_png_unit(names.INPUT).shape
    with _folder_errors():  # decoded and checked as the exports decode it
        mask = read.read_lung_mask(run, (shape[0], shape[1]))
    rgba = rendering.render_mask_outline_rgba(mask)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
