"""What the routes show of a job, shared by the JSON API and the pages: status, artifact files, exports and the
re-rendered overlay. Pure helpers over :class:`app.jobs.Job` and its run folder; no routing here."""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app import attribution, exports, rendering
from app.jobs import Job, JobManager, JobNotReadyError, JobState, read_png_unit

ARTIFACT = re.compile(r"^(input|overlay|reconstruction|mask|lung_mask|counterfactual(-\d{1,2})?)\.png$|"
                      r"^attribution(_std)?\.npy$|^record\.json$")
"""Run-folder files a client may fetch (never ``job.json`` or the upload)."""
EXPORT_LABELS = {"annotated.png": "Annotated PNG", "secondary-capture.dcm": "DICOM SC",
                 "record.json": "JSON record", "bundle.zip": "ZIP bundle"}
MEDIA = {".png": "image/png", ".npy": "application/octet-stream", ".json": "application/json"}
OVERLAY_MODES = ("magnitude", "signed", "outline", "stability")


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
        "progress": {"step": job.step, "total": job.total, "fraction": round(fraction, 4),
                     "elapsed_s": _round(job.elapsed_s), "eta_s": _round(job.eta_s),
                     "preview_url": f"{base}/preview.png?v={job.version}" if job.has_preview else None},
        "cancel_requested": job.cancel_event.is_set() and not job.state.finished,
        "parameters": {k: req[k] for k in ("prompt", "negative_prompt", "strength", "guidance_scale", "steps",
                                           "seed", "scheduler", "samples", "window", "reference",
                                           "lung_mask", "map_method", "classifier_scale")},
        "effective_steps": job.effective_steps,
        "unet_evaluations": job.unet_evaluations,
        "seeds": job.seeds,
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
    """The finished run's map was restricted to the lungs (its folder holds ``lung_mask.png``)."""
    return job.state is JobState.DONE and (job.run_dir / "lung_mask.png").is_file()


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


def require_done(job: Job) -> None:
    """Raise :class:`JobNotReadyError` unless the job finished successfully."""
    if job.state is not JobState.DONE:
        raise JobNotReadyError(job.state.value)


def artifact_file(job: Job, name: str) -> tuple[Path, str]:
    """(path, media type) of a run artifact; the name is checked against :data:`ARTIFACT` before any path is built.

    Raises:
        ArtifactNotFoundError: not an artifact name, or the run has no such file.
        JobNotReadyError: the run is not done.
    """
    if not ARTIFACT.match(name):
        raise ArtifactNotFoundError(f"A run has no file called {name!r}.")
    require_done(job)
    path = job.run_dir / name
    if not path.is_file():
        raise ArtifactNotFoundError(f"This run has no {name}.")
    return path, MEDIA[path.suffix]


def build_export(job: Job, kind: str, options: dict[str, Any]) -> tuple[bytes, str]:
    """One export of a finished job (``exports.build_export``), with the stored upload as the DICOM source.

    Raises:
        ArtifactNotFoundError: a DICOM export of a PNG/JPEG run. exports.ExportError: see ``build_export``.
    """
    require_done(job)
    if kind not in export_kinds(job):
        raise ArtifactNotFoundError("A DICOM Secondary Capture needs a DICOM input; this run was made from a "
                                    f"{job.source_format.upper() or 'non-DICOM'} file. Export PNG, JSON or ZIP.")
    source = job.upload_path.read_bytes() if job.source_format == "dicom" else None
    return exports.build_export(job.run_dir, kind, source, **options)


@dataclass(frozen=True)
class OverlayOptions:
    """Display options of a re-rendered overlay (see ``rendering.render_overlay``).

    Attributes:
        opacity: [0, 1]. threshold: percentile in [0, 100] of |M| below which nothing is drawn; ``None`` = none.
        mode: magnitude | signed | outline | stability. scale: |M| drawn at full opacity (intensity units) or
        ``None`` for the map's own 99.5th percentile. legend: append the colour bar.
        lungs: show the lung outline. The review page draws it as a layer of its own over every image
        (``lung-outline.png``), so it is not part of :meth:`query`; image exports draw it in
        (:meth:`export_query`, :meth:`export_options`).
    """

    opacity: float = 0.6
    threshold: float | None = None
    mode: str = "magnitude"
    scale: float | None = None
    legend: bool = False
    lungs: bool = False

    def query(self) -> str:
        """The options as a query string (stable order) for image URLs."""
        parts = [f"opacity={self.opacity:g}", f"mode={self.mode}"]
        if self.threshold is not None:
            parts.append(f"threshold={self.threshold:g}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.legend:
            parts.append("legend=true")
        return "&".join(parts)

    def export_query(self, kind: str) -> str:
        """The query string of an image export's link: :meth:`query`, plus the lung outline for ``annotated.png``."""
        q = self.query()
        return q + "&lung_outline=true" if self.lungs and kind == "annotated.png" else q

    def export_options(self, kind: str = "annotated.png") -> dict[str, Any]:
        """The options ``exports.build_export`` accepts for the image export ``kind``."""
        options: dict[str, Any] = {"opacity": self.opacity, "threshold": self.threshold, "mode": self.mode}
        if self.lungs and kind == "annotated.png":
            options["lung_outline"] = True
        return options


def render_overlay_png(job: Job, options: OverlayOptions) -> bytes:
    """Re-render the overlay from ``input.png`` and ``attribution.npy`` (no diffusion), as an RGB PNG.

    Raises:
        JobNotReadyError: the run is not done. ValueError: an option is out of range, or ``mode="stability"``
        for a single-sample run (message from ``rendering.render_overlay``).
    """
    require_done(job)
    run = job.run_dir
    original = read_png_unit(run / "input.png")
    signed = np.load(run / "attribution.npy", allow_pickle=False).astype(np.float32)
    std_path = run / "attribution_std.npy"
    std = np.load(std_path, allow_pickle=False).astype(np.float32) if std_path.is_file() else None
    region = next((run / n for n in exports.REGION_MASKS if (run / n).is_file()), None)
    mask = read_png_unit(region) > 0.5 if region is not None else None
    amap = attribution.AttributionMap(signed=signed, magnitude=np.abs(signed), std=std,
                                      n_samples=max(job.request.samples, 2 if std is not None else 1), mask=mask)
    rgb = rendering.render_overlay(original, amap, opacity=options.opacity, scale=options.scale,
                                     threshold=options.threshold, threshold_mode="percentile", mode=options.mode,
                                     legend=options.legend)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_lung_outline_png(job: Job) -> bytes:
    """The outline of the run's ``lung_mask.png`` on a transparent layer (RGBA PNG, the input's size).

    Raises:
        JobNotReadyError: the run is not done. ArtifactNotFoundError: its map was not restricted to the lungs.
    """
    require_done(job)
    path = job.run_dir / "lung_mask.png"
    if not path.is_file():
        raise ArtifactNotFoundError("This run has no lung mask: its map was not restricted to the lungs.")
    rgba = rendering.render_mask_outline_rgba(read_png_unit(path) > 0.5)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
