"""The diagnostic viewer's data: a run's pixels in the data's own units, for window/level in the browser.

=======  ==============================================  ===============================================================
GET      /api/v1/jobs/{id}/viewing                       JSON: size, rescale, polarity, the run's window, presets
                                                         (lung / mediastinum / bone relative, the file's own), spacing,
                                                         the input's SHA-256 (is another run of the same image?)
GET      /api/v1/jobs/{id}/pixels/{image}.npy            ``input`` or ``counterfactual``: uint16 ``(rows, columns)`` in
                                                         NumPy's ``.npy`` format; data value = pixel * slope + intercept
=======  ==============================================  ===============================================================

``input`` is the stored upload decoded again (modality values after rescale / Modality LUT, before any VOI), so a
16-bit radiograph keeps its 16 bits; ``counterfactual`` is ``counterfactual.png`` brought back to the same units
through the inverse of the run's window (it only spans that window). Both share one rescale, so one lookup table
windows both. Same access rules as the run's files: the owner (or an admin) only, a finished run only,
``Cache-Control: no-store`` (``app.web.app.SecurityHeadersMiddleware`` sets it on every response but static files);
fetching the input's pixels is audited as ``view`` like ``input.png``.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import imaging
from app.imaging import viewing
from app.imaging.voi import inverts
from app.jobs import Job
from app.runs.folder import COUNTERFACTUAL, RunFolder
from app.web.auditing import audit_view, part_of_page
from app.web.deps import CurrentUser, DbDep, JobsDep, find_job
from app.web.views import ArtifactNotFoundError, api_base, require_done

router = APIRouter(prefix="/api/v1", tags=["api"])
DETECTOR_SPACING_NOTE = "Pixel spacing is the detector's"
"""How ``app.imaging.dicom`` says the spacing is (0018,1164) Imager Pixel Spacing rather than (0028,0030)."""
PRESET_KEYS = 4
"""Keys 1-4 choose the first four presets."""


@dataclass(frozen=True)
class RunPixels:
    """A finished run's images in data units (see the module docstring) and what the viewer says about them."""

    input: np.ndarray
    counterfactual: np.ndarray | None
    facts: dict[str, Any]


_CACHE: OrderedDict[str, RunPixels] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4  # a reader pages through a few runs; each entry is 2 x rows x columns x 2 bytes


def run_pixels(job: Job) -> RunPixels:
    """Decode the run's stored upload once (kept for the next few requests) and build its viewing data.

    Raises:
        JobNotReadyError: the run is not done.
    """
    require_done(job)
    with _CACHE_LOCK:
        hit = _CACHE.get(job.id)
        if hit is not None:
            _CACHE.move_to_end(job.id)
            return hit
    built = _build(job)
    with _CACHE_LOCK:
        _CACHE[job.id] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def _build(job: Job) -> RunPixels:
    # 1. the input, decoded as the run decoded it (its window is the run's window)
    decoded = imaging.decode_image(job.upload_path.read_bytes(), window=job.request.window)
    meta = decoded.meta
    raw = decoded.raw if decoded.raw is not None else decoded.pixels
    inverted = inverts(meta.photometric_interpretation, meta.presentation_lut_shape)
    q = viewing.quantize_u16(raw)
    # 2. the counterfactual, back through the run's window into the same units and rescale
    cf = None
    run = RunFolder(job.run_dir)
    if meta.window is not None and run.has(COUNTERFACTUAL):  # checked against the record's SHA-256 (409 if changed)
        values = viewing.inverse_window(run.read_png_unit(COUNTERFACTUAL), meta.window, inverted=inverted)
        cf = np.clip(np.rint((values - q.intercept) / q.slope), 0, viewing.U16_MAX).astype(np.uint16)
    # 3. presets: relative lung / mediastinum / bone, the file's own windows, else the full range
    presets = viewing.relative_presets(raw, inverted=inverted) + viewing.file_presets(meta.window_presets)
    if not meta.window_presets:
        lo, hi = float(raw.min()), float(raw.max())
        presets.append(viewing.ViewerPreset("full", "Full range", (lo + hi) / 2, max(hi - lo, 1.0), "LINEAR_EXACT",
                                            "relative"))
    win = meta.window
    run_window = {"center": float(win.center), "width": float(win.width),
                  "function": "LINEAR_EXACT" if win.lut is not None else win.function,
                  "label": win.description} if win is not None else None
    if meta.source_format == "dicom":
        units = "modality value"  # after the rescale / Modality LUT, before any window
    else:
        units = f"{meta.bits_stored or 8}-bit pixel value" if meta.photometric_interpretation != "RGB" else "luminance"
    spacing = list(meta.pixel_spacing_mm) if meta.pixel_spacing_mm else None
    detector = any(w.startswith(DETECTOR_SPACING_NOTE) for w in meta.warnings)
    base = api_base(job)
    facts = {
        "rows": int(q.pixels.shape[0]), "columns": int(q.pixels.shape[1]), "dtype": "uint16",
        "rescale": {"slope": q.slope, "intercept": q.intercept}, "units": units,
        "source_format": meta.source_format, "photometric_interpretation": meta.photometric_interpretation,
        "inverted": inverted, "window": run_window,
        "presets": [asdict(p) for p in presets], "preset_keys": PRESET_KEYS,
        "pixel_spacing_mm": spacing,
        "input_sha256": run.record().input_sha256,
        "spacing_source": None if spacing is None else ("ImagerPixelSpacing" if detector else "PixelSpacing"),
        "pixels": {"input": f"{base}/pixels/input.npy",
                   **({"counterfactual": f"{base}/pixels/counterfactual.npy"} if cf is not None else {})},
    }
    return RunPixels(input=q.pixels, counterfactual=cf, facts=facts)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in NumPy's ``.npy`` format (little-endian, C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")), allow_pickle=False)
    return buf.getvalue()


@router.get("/jobs/{job_id}/viewing", summary="What the viewer needs to window a run's pixels")
def job_viewing(job_id: str, jobs: JobsDep, user: CurrentUser, db: DbDep, beside: bool = False) -> JSONResponse:
    """Size, dtype and rescale of the pixel arrays (``value = pixel * slope + intercept``), the data's units, the
    display polarity (``inverted``: MONOCHROME1 or Presentation LUT Shape INVERSE), the run's window, the presets
    (relative lung / mediastinum / bone, the file's own windows, or the full range) and the pixel spacing with its
    source (``PixelSpacing``, or ``ImagerPixelSpacing``: at the detector).

    ``beside=true``: the viewer is about to show this run beside another run's page (run-vs-run compare); that is a
    view of this run, audited here as one ``view`` event (its pixels and overlay follow as part of it)."""
    job = find_job(jobs, job_id, user)
    facts = run_pixels(job).facts
    if beside:
        audit_view(db, user, job, "beside another run")
    return JSONResponse(facts)


@router.get("/jobs/{job_id}/pixels/{image}.npy", summary="A run's pixels in the data's units (uint16 .npy)")
def job_pixels(job_id: str, image: Literal["input", "counterfactual"], request: Request, jobs: JobsDep,
               user: CurrentUser, db: DbDep) -> Response:
    """uint16 ``(rows, columns)`` in ``.npy`` format; the value in data units is ``pixel * slope + intercept`` with
    the ``rescale`` of ``GET /jobs/{id}/viewing``. 404 for a run without a counterfactual."""
    job = find_job(jobs, job_id, user)
    data = run_pixels(job)
    array = data.input if image == "input" else data.counterfactual
    if array is None:
        raise ArtifactNotFoundError("This run has no counterfactual.")
    if image == "input" and not part_of_page(request, user):  # the result page's own fetch: its one view
        audit_view(db, user, job, "pixels/input.npy")
    return Response(npy_bytes(array), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'inline; filename="vald-md-{job.id[:8]}-{image}.npy"'})
