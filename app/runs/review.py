"""One review run end to end, written to a folder: decode -> counterfactual -> attribution -> files.

Used by ``vald-md counterfactual`` and by the web app's job worker, so both write the same artifacts (their names:
:mod:`app.runs.folder`, which also reads them back with hash checks; the record: :class:`app.runs.record.RunRecord`,
which :func:`run_review` returns):

=====================  ===============================================================================
``input.png``          the decoded, windowed image exactly as the model saw it, native size (16-bit PNG)
``counterfactual.png`` the counterfactual shown, native size: with ``counterfactual_edit`` ``map_region`` one more
                       sample edited only where the map is above the calibrated normal level
                       (:func:`edited_counterfactual`; the first sample is then ``counterfactual-0.png``), else
                       the first sample (``counterfactual-<i>.png`` for more: the model's content box, not
                       resized; the record's ``sample_files`` says so)
``overlay.png``        the attribution overlay (red = what the model removed), native size, on the model's
                       calibrated scale (:mod:`app.mapscale`) when it has one, else the map's own percentile
``attribution.npy``    signed float32 (H, W) map, reference - counterfactual (mean over samples); with map
                       polarity ``removed`` its positive part (clipped at 0)
``attribution_std.npy`` per-pixel standard deviation over samples (only when samples > 1; with map smoothing the
                       model frame's SD resized, an upper bound of the native differences' SD)
``reconstruction.png`` the autoencoder's reconstruction of the input (the alternative map reference)
``mask.png``           the user's region mask, native size (only when one was given)
``lung_mask.png``      the lung segmenter's mask, 0/255, native size (only when the map was restricted to it)
``record.json``        every parameter, seeds, effective steps, model hash, library versions, timings, hashes
=====================  ===============================================================================

The map's method (``ReviewRequest.map_method``; ``None`` = the model manifest's ``"map_method"``, else
``"sdedit"``), recorded under ``"map_method"``:

=====================  ===============================================================================
``sdedit``             the paper's map: an SDEdit counterfactual (``engine.generate``), map = reference -
                       counterfactual
``classifier_guided``  a classifier-guided SDEdit counterfactual (:func:`app.mapmethods.classifier_guided`,
                       DDIM, one sample): the lesion classifier steers the denoising away from disease inside
                       the lungs (the segmenter's mask of the letterboxed model-frame image); the same map,
                       overlay and files. The request's scheduler is not used (``parameters.scheduler``
                       says ``ddim``) and a negative prompt is refused. The record adds ``"classifier"`` (name,
                       SHA-256, metrics), ``classifier_scale``, ``logit_input``, ``logit_counterfactual`` and
                       ``classifier_lung_fraction`` (the model-frame lung mask the classifier saw)
``ddim_inversion``     DDIM inversion instead of SDEdit noise (:func:`app.mapmethods.ddim_inversion`, one
                       sample, deterministic): the counterfactual and ``reconstruction.png`` are denoised from
                       the same inverted latent, under the prompt and under the empty prompt, so the map
                       (always against that reconstruction: ``reference`` ``input`` is refused) shows only what
                       the prompt changed. The request's scheduler is not used (``parameters`` say ``ddim``) and
                       the result does not depend on the seed (recorded, 0 when none was given); a negative
                       prompt is refused
=====================  ===============================================================================

The map's polarity (``ReviewRequest.map_polarity``; ``None`` = the manifest's ``"map_polarity"``, else ``"both"``;
the entry points take a preset's own ``"map_polarity"`` first, :meth:`GenerationRequest.from_preset`), recorded
under ``request.map_polarity`` (records from before it lack the key: ``both``): ``both`` keeps
the signed map (magnitude = its absolute value); ``removed`` keeps only its positive part after the mean over
samples and the smoothing (density the healthy counterfactual removed, e.g. an opacity), and that is what the
overlay, the summary, the exports and ``attribution.npy`` show (:func:`app.attribution.difference_map`). The
per-sample SD map is the same for both.

The map's smoothing (``ReviewRequest.map_smoothing``, sigma in pixels of the model's square frame, 0..16;
``None`` = the preset's ``"map_smoothing"`` when it names one, else the manifest's, else 0 = off), recorded under
``request.map_smoothing`` (records from before it lack the key: 0): above 0 the reference and each counterfactual
are taken in the model frame (``CounterfactualResult.input_model`` / ``reconstruction_model`` and
``counterfactuals_model``), Gaussian smoothed inside the letterbox's content box (the padding does not bleed in)
and differenced there; the mean and the SD over samples are brought back to the native frame once each
(:func:`attribution_map`), so the mean, the polarity and the SD map all see smoothed differences. The model
cannot place detail finer than its latent grid (8 model pixels), and in the model frame the smoothing costs
milliseconds where the same smoothing of a large native map costs seconds. ``smoothing_sigma`` (native pixels,
applied to the difference) is separate and stays as it was (with it above 0 the per-sample differences are taken
in the native frame). At 0 the map is exactly the unsmoothed one.

The map's region: a user-supplied mask wins; else, with ``lung_mask`` on (the default) and a segmenter loaded,
the lung fields (:mod:`app.lungs`); else the whole frame. ``record.json`` says which under ``"map_region"``
(``"user_mask"``, ``"lungs"``, ``"whole_image"``) and, under ``"lung_mask"``, either the segmenter's provenance
(name, SHA-256, input size, threshold, held-out Dice) with the mask's ``lung_fraction``, or ``"applied": false``
and the reason. As with a user mask, ``attribution.npy`` keeps full-frame values; the overlay, thresholds and
``map_summary`` are restricted to the region (``attribution.AttributionMap``).

The map's scale: with a calibrated model (manifest ``"map_scale"``, :mod:`app.mapscale`) and the calibration's
map method and reference, ``map_summary`` reads the map against the normals' level (``scale.kind``
``"calibrated"``: the area above 1× the normal level, ``rms_vs_normal``, ``max_fold``); otherwise against the
map's own percentiles (``"relative"``, with the reason). ``map_label`` names the difference
(:func:`app.rendering.map_label`: the original, the autoencoder reconstruction or the DDIM reconstruction,
minus the counterfactual).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np

from app import attribution, imaging, mapscale, rendering
from app.engine import CounterfactualEngine, CounterfactualResult, GenerationCancelled, ProgressCallback
from app.fileio import sha256_bytes, write_atomic
from app.generation import GenerationRequest, Scheduler, draw_seed
from app.lungs import LungSegmenter, mask_png_bytes
from app.runs import folder
from app.runs.record import COUNTERFACTUAL_EDITS as COUNTERFACTUAL_EDITS  # re-exported: the form's choices
from app.runs.record import MAP_METHODS as MAP_METHODS
from app.runs.record import MAP_POLARITIES as MAP_POLARITIES
from app.runs.record import RECORD_VERSION, RunRecord

logger = logging.getLogger("vald_md.artifacts")

REFERENCES = ("input", "reconstruction")
ONE_SAMPLE_METHODS = ("classifier_guided", "ddim_inversion")
"""Methods that make one deterministic-path counterfactual (DDIM): one sample, no negative prompt."""
EDIT_DILATION_PX = 8
"""Model-frame pixels (one latent cell) the map's above-normal region grows by before it bounds the edit."""
EDIT_FEATHER_SIGMA = 4.0
"""Gaussian sigma, model-frame pixels, that softens the edit region's border (the latent grid averages it too)."""
MAX_CLASSIFIER_SCALE = 5.0
MAX_MAP_SMOOTHING = 16.0
"""The largest map smoothing a run may ask for: sigma in model-frame pixels (two latent cells)."""
MAX_CASE_LABEL = 64
"""Characters of the operator's optional case label (shown on the result, stored in job.json only: never in
record.json, which is exported)."""
DISCLAIMER = "AI-generated counterfactual — not for diagnostic use"
FILE_WRITERS = 2
"""Threads that encode and write a run's files side by side (zlib releases the GIL; docs/PERFORMANCE.md)."""


@dataclass(frozen=True)
class ReviewRequest(GenerationRequest):
    """One review run: the generation (:class:`app.generation.GenerationRequest`, whose fields come first) plus the
    attribution map's options. Frozen: built and checked once at the entry point, then passed down unchanged
    (:func:`resolve_request` returns a new one with the model's recommendations filled in)."""

    window: int | str | None = "auto"
    reference: str | None = None  # None: the model's recommendation (manifest "map_reference"), else "input"
    smoothing_sigma: float = 0.0
    lung_mask: bool = True  # restrict the map to the lungs when a segmenter is loaded (a user mask still wins)
    map_method: str | None = None  # None: the model's recommendation (manifest "map_method"), else "sdedit"
    map_polarity: str | None = None  # None: the model's (manifest "map_polarity"), else "both"; or "removed"
    map_smoothing: float | None = None  # sigma, model-frame px, 0..16 (0 = off); None: the model's, else 0
    counterfactual_edit: str | None = None  # None: the model's ("counterfactual_edit"), else "redraw"
    classifier_scale: float = 0.3  # classifier_guided only: step against the disease gradient, 0..5
    case_label: str = ""  # the operator's own label for the case (never from DICOM tags, never logged or audited)

    @classmethod
    def from_preset(cls, preset: Any, *, preset_name: str = "healthy", **given: Any) -> Self:
        """:meth:`GenerationRequest.from_preset`, except that a one-sample map method
        (:data:`ONE_SAMPLE_METHODS`) given without ``samples`` makes one sample, and without
        ``counterfactual_edit`` shows its own counterfactual (``"redraw"``), whatever the preset's."""
        if given.get("map_method") in ONE_SAMPLE_METHODS:
            if given.get("samples") is None:
                given = {**given, "samples": 1}
            if given.get("counterfactual_edit") is None:
                given = {**given, "counterfactual_edit": "redraw"}
        return super().from_preset(preset, preset_name=preset_name, **given)

    def check(self) -> None:
        """Refuse out-of-range generation fields (:meth:`GenerationRequest.check`) and map options (reference map,
        smoothing, map method, map polarity, map smoothing, case label, classifier scale).

        Raises:
            ValueError: a field is out of range; the message names it and what is allowed.
        """
        super().check()
        if self.reference is not None and self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r} must be one of {', '.join(REFERENCES)}")
        if not 0.0 <= self.smoothing_sigma <= 50.0:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} must be within [0, 50] pixels")
        if self.map_method is not None and self.map_method not in MAP_METHODS:
            raise ValueError(f"map_method={self.map_method!r} is not a map method; choose one of "
                             f"{', '.join(MAP_METHODS)}")
        if self.map_polarity is not None and self.map_polarity not in MAP_POLARITIES:
            raise ValueError(f"map_polarity={self.map_polarity!r} is not a map polarity; choose 'removed' (only "
                             f"the density the counterfactual removed) or 'both' (the signed difference)")
        if self.map_smoothing is not None and not 0.0 <= self.map_smoothing <= MAX_MAP_SMOOTHING:
            raise ValueError(f"map_smoothing={self.map_smoothing} must be within [0, {MAX_MAP_SMOOTHING:g}] pixels "
                             f"of the model's frame (0 = no smoothing)")
        if self.counterfactual_edit is not None and self.counterfactual_edit not in COUNTERFACTUAL_EDITS:
            raise ValueError(f"counterfactual_edit={self.counterfactual_edit!r}: choose 'map_region' (the "
                             f"counterfactual changes only where the map is above normal) or 'redraw' (the whole "
                             f"image redrawn, the first sample)")
        if len(self.case_label) > MAX_CASE_LABEL or not self.case_label.isprintable():
            raise ValueError(f"case_label must be at most {MAX_CASE_LABEL} printable characters (no line breaks); "
                             f"got {len(self.case_label)} characters")
        if not 0.0 <= self.classifier_scale <= MAX_CLASSIFIER_SCALE:
            raise ValueError(f"classifier_scale={self.classifier_scale} must be within [0, {MAX_CLASSIFIER_SCALE:g}]")
        if self.map_method in ONE_SAMPLE_METHODS:
            label = MAP_METHODS[self.map_method]
            if self.samples != 1:
                raise ValueError(f"samples={self.samples}: the {label} map makes one counterfactual; set samples "
                                 f"to 1 (or use the SDEdit map for a stability map)")
            if self.negative_prompt:
                raise ValueError(f"negative_prompt: the {label} map uses no negative prompt; leave it empty")
            if self.counterfactual_edit == "map_region":
                raise ValueError(f"counterfactual_edit='map_region': the {label} map shows its own counterfactual; "
                                 f"choose 'redraw' (or the SDEdit difference map)")
        if self.map_method == "ddim_inversion" and self.reference == "input":
            raise ValueError("reference='input': the DDIM inversion map is always taken against its own "
                             "reconstruction; choose reference 'reconstruction'")


def with_model_defaults(req: ReviewRequest, info: Any) -> ReviewRequest:
    """``req`` with its unset map options (``None``) filled in from the model's manifest, unchecked: the map method
    (``"map_method"``, else ``"sdedit"``), the reference (``"reconstruction"`` for DDIM inversion, else
    ``"map_reference"``, else ``"input"``), the polarity (``"map_polarity"``, else ``"both"``) and the smoothing
    (``"map_smoothing"``, else 0.0) and the counterfactual shown (``"counterfactual_edit"``, else ``"redraw"``;
    always ``"redraw"`` for a one-sample map method); a preset's own come first, filled in by
    :meth:`ReviewRequest.from_preset`. The one place these fallbacks live (:func:`resolve_request`, the review
    form's defaults)."""
    manifest = getattr(info, "manifest", {})
    method = req.map_method if req.map_method is not None else str(manifest.get("map_method", "sdedit"))
    reference = req.reference if req.reference is not None else (
        "reconstruction" if method == "ddim_inversion" else str(manifest.get("map_reference", "input")))
    polarity = req.map_polarity if req.map_polarity is not None else str(manifest.get("map_polarity", "both"))
    smoothing = float(req.map_smoothing if req.map_smoothing is not None else manifest.get("map_smoothing", 0.0))
    edit = req.counterfactual_edit if req.counterfactual_edit is not None else (
        "redraw" if method in ONE_SAMPLE_METHODS else str(manifest.get("counterfactual_edit", "redraw")))
    return replace(req, map_method=method, reference=reference, map_polarity=polarity, map_smoothing=smoothing,
                   counterfactual_edit=edit)


def resolve_request(req: ReviewRequest, info: Any, *, classifier: Any = None,
                    segmenter: LungSegmenter | None = None) -> ReviewRequest:
    """``req`` with the model's recommendations filled in where unset, checked, and able to run here.

    ``map_method`` ``None`` becomes the manifest's ``"map_method"`` (else ``"sdedit"``); ``reference`` ``None``
    becomes ``"reconstruction"`` for DDIM inversion, else the manifest's ``"map_reference"`` (else ``"input"``);
    ``map_polarity`` ``None`` becomes the manifest's ``"map_polarity"`` (else ``"both"``); ``map_smoothing``
    ``None`` the manifest's ``"map_smoothing"`` (else 0.0); ``counterfactual_edit`` ``None`` the manifest's
    ``"counterfactual_edit"`` (else, and for a one-sample method, ``"redraw"``). A resolved request comes back equal.

    Raises:
        ValueError: a field is out of range, an unknown method, or ``classifier_guided`` without a lesion
            classifier or lung segmenter loaded, or with more than one sample (messages for the clinician).
    """
    req = with_model_defaults(req, info)
    req.check()
    if req.map_method == "classifier_guided":
        if classifier is None:
            raise ValueError("map_method: the classifier-guided map is not available on this server (no lesion "
                             "classifier is loaded); choose the SDEdit difference map")
        if segmenter is None:
            raise ValueError("map_method: the classifier-guided map needs the lung segmenter, which is not loaded "
                             "on this server; choose the SDEdit difference map")
    return req


def sample_files(lb: imaging.Letterbox, *, edited: bool = False) -> dict[str, Any]:
    """The record's ``sample_files``: the size and frame of a run's counterfactual files (runs of more than one
    sample, or with an edited counterfactual). ``counterfactual.png`` is at the input's native size;
    ``counterfactual-<i>.png`` (samples 1 and up, and sample 0 when ``edited``: ``counterfactual.png`` then holds
    the edit, :func:`edited_counterfactual`) is the model frame's content box, as the model made it, not resized
    (:func:`app.imaging.content_of`; bring it to the native frame with :func:`app.imaging.content_to_native`): a
    native-size copy would add no detail and cost ~0.23 s of PNG encoding and ~3.7 MB per sample for a 2-Mpx DICOM
    (docs/PERFORMANCE.md)."""
    model = {"frame": "model_content", "shape": [lb.content_height, lb.content_width],
             "content_box": list(lb.content_box), "model_size": lb.size}
    first = {"file": folder.EDITED_FIRST_SAMPLE, **model} if edited else {
        "file": folder.COUNTERFACTUAL, "frame": "native", "shape": [lb.native_height, lb.native_width]}
    return {"first": first, "others": model}


def edit_region(amap: attribution.AttributionMap, level: float, lb: imaging.Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """Where an edited counterfactual may differ from the input: the map at or above ``level`` inside its region.

    Args:
        amap: the run's map (native frame, restricted to its region: the lungs by default).
        level: the calibrated normal level (1x, :class:`app.mapscale.MapCalibration`), intensity units (> 0).
        lb: the run's letterbox.

    Returns:
        ``(above, region)``: bool (H, W), the native pixels at or above ``level`` (:func:`app.attribution.
        changed_region`); float32 (size, size) in [0, 1], that region in the model's frame, grown by
        :data:`EDIT_DILATION_PX` and feathered by :data:`EDIT_FEATHER_SIGMA` (the engine's ``edit_region``).
    """
    from scipy import ndimage

    above = attribution.changed_region(amap.magnitude, level, amap.mask)
    model = imaging.letterbox(above.astype(np.float32), lb.size)[0] > 0  # a flagged area below a model pixel counts
    if model.any():
        model = ndimage.binary_dilation(model, structure=np.ones((3, 3), bool), iterations=EDIT_DILATION_PX)
    region = np.clip(ndimage.gaussian_filter(model.astype(np.float32), EDIT_FEATHER_SIGMA), 0.0, 1.0)
    return above, region.astype(np.float32)


def edited_counterfactual(engine: CounterfactualEngine, pixels: np.ndarray, req: ReviewRequest,
                          result: CounterfactualResult, amap: attribution.AttributionMap, level: float, *,
                          cancel: threading.Event | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The counterfactual edited only where the map is above normal: one more sample (the run's first seed, the
    same request) whose latents keep the input outside :func:`edit_region` at every step (the engine's
    ``edit_region``; DiffEdit's masked edit, Couairon et al., ICLR 2023), so the image shown is this patient's
    radiograph with only the flagged density changed, not a whole new chest (the samples stay the map's).

    Returns:
        ``(counterfactual, record)``: float32 (H, W) in [0, 1], native frame; and the record's
        ``"counterfactual_edit"``: the mode, ``applied``, the threshold and its basis, the dilation and feather
        (model-frame pixels), the native share of the image above the threshold, the seed, the UNet evaluations,
        where and in which precision the edit ran (``compute``: its batch of one sample with guidance may run the
        UNet in float32 where the samples' larger batch ran it in bf16, :data:`app.engine.UNET_AUTOCAST_MIN_BATCH`)
        and the wall time.

    Raises:
        engine.GenerationCancelled: cancelled.
    """
    import time

    t = time.perf_counter()
    above, region = edit_region(amap, level, result.letterbox)
    seed = result.seeds[0]
    edit = engine.generate_request(pixels, replace(req, samples=1, seed=seed), cancel=cancel, edit_region=region,
                                   reconstruction=result)
    record = {"mode": "map_region", "applied": True, "threshold": level,
              "threshold_basis": "the model's calibrated normal level (1x) of the map, inside the map's region",
              "dilation_px": EDIT_DILATION_PX, "feather_sigma_px": EDIT_FEATHER_SIGMA, "frame": "model",
              "region_fraction": round(float(above.mean()), 6), "seed": seed,
              "unet_evaluations": edit.unet_evaluations, "first_sample_file": folder.EDITED_FIRST_SAMPLE,
              "compute": edit.compute, "seconds": round(time.perf_counter() - t, 4)}
    return edit.counterfactual(0), record


def _write(path: Path, data: bytes) -> str:
    """Write a run file atomically (:func:`app.fileio.write_atomic`; its mode is the umask's, as the CLI has always
    written them: the web app narrows the run folder to the owner when the run ends) and return its SHA-256."""
    write_atomic(path, data, mode=None)
    return sha256_bytes(data)


def _write_made(path: Path, make: Callable[[], bytes]) -> str:
    """:func:`_write` of ``make()``, the bytes made on the calling (writer) thread."""
    return _write(path, make())


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def lung_region(segmenter: LungSegmenter | None, pixels: np.ndarray, *, requested: bool,
                user_mask: bool) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The lung mask that restricts a map, and what the record says about it.

    Args:
        segmenter: the loaded segmenter, or ``None`` when the server or command has none.
        pixels: the decoded image, float32 (H, W) in [0, 1], native frame.
        requested: ``ReviewRequest.lung_mask``. user_mask: a user-supplied mask was given (it wins).

    Returns:
        ``(mask, record)``: a bool (H, W) mask and ``{"applied": True, **segmenter.info.record(),
        "lung_fraction": f}`` (``f`` = lung pixels / all pixels, in (0, 1]); or ``(None, {"applied": False,
        "reason": ...})`` when switched off, overridden by a user mask, without a segmenter, or when the
        segmenter finds no lung (a restriction to nothing would hide the whole map). Never raises for a
        segmentation failure: the run goes on unrestricted and the record says why.
    """
    if not requested:
        return None, {"applied": False, "reason": "switched off (lung_mask=false)"}
    if user_mask:
        return None, {"applied": False, "reason": "a user-supplied region mask was used instead"}
    if segmenter is None:
        return None, {"applied": False, "reason": "no lung segmenter is loaded (model_weights/lungs-unet is "
                                                  "missing or VALD_MD_LUNG_SEGMENTER names no segmenter folder)"}
    try:
        lungs = segmenter.segment(pixels)
    except (ValueError, RuntimeError) as e:  # e.g. an image too small to segment: run unrestricted, say why
        logger.warning("lung segmentation failed (%s); the map is not restricted", type(e).__name__)
        return None, {"applied": False, "reason": f"lung segmentation failed: {e}"}
    if lungs.shape != pixels.shape:
        raise ValueError(f"the segmenter returned a mask of shape {lungs.shape} for an image of {pixels.shape}")
    if not lungs.any():
        return None, {"applied": False, "reason": "the segmenter found no lung field in this image",
                      **segmenter.info.record()}
    return lungs, {"applied": True, **segmenter.info.record(), "lung_fraction": round(float(lungs.mean()), 6)}


def _model_frame_result(engine: CounterfactualEngine, pixels: np.ndarray, req: ReviewRequest, run: Any, *,
                        seed: int, cancel: threading.Event | None,
                        passes: int = 1) -> tuple[CounterfactualResult, Any]:
    """Run a DDIM map method on the letterboxed model-frame image and wrap its output as a
    :class:`CounterfactualResult` (the reconstruction unletterboxed; the counterfactual in the model frame, brought to
    the native frame on demand).

    ``run(img_model) -> result`` with ``result.counterfactuals`` (1, S, S) and ``result.reconstruction`` (S, S);
    the method's own result is returned beside, for its record fields. ``passes``: UNet passes over the effective
    steps (DDIM inversion: 2, the inversion and the denoising), for the record's ``unet_evaluations``.
    """
    import time

    from diffusers import DDIMScheduler

    from app.engine import effective_steps

    engine.check_inputs(pixels, request=replace(req, samples=1))
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("cancelled before start")
    t0 = time.perf_counter()
    img_model, lb = imaging.letterbox(pixels.astype(np.float32), engine.info.image_size)
    t1 = time.perf_counter()
    with engine.autocast():  # the autoencoder's precision, as in engine.generate (recorded under "compute")
        out = run(img_model)
    t2 = time.perf_counter()
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("cancelled by the user")
    recon = imaging.unletterbox(out.reconstruction, lb).astype(np.float32)
    n_eff = effective_steps(req.steps, req.strength)
    sched = DDIMScheduler.from_config(engine._base_scheduler_config)
    sched.set_timesteps(req.steps)
    timings = {"preprocess": t1 - t0, "denoising": t2 - t1, "postprocess": time.perf_counter() - t2,
               "total": time.perf_counter() - t0}
    # the model-frame methods make one DDIM counterfactual without a negative prompt, whatever the request says
    params = replace(req, negative_prompt="", scheduler=Scheduler.DDIM, samples=1).parameters(seed)
    result = CounterfactualResult(
        counterfactuals_model=np.asarray(out.counterfactuals, dtype=np.float32), input_model=img_model,
        reconstruction=recon, letterbox=lb, effective_steps=n_eff,
        start_timestep=int(sched.timesteps[req.steps - n_eff]), unet_evaluations=passes * n_eff, seeds=[seed],
        timings_s=timings, model_hash=engine.info.model_hash, parameters=params,
        compute=engine.compute_record(), reconstruction_model=np.asarray(out.reconstruction, dtype=np.float32))
    return result, out


def _classifier_guided_result(engine: CounterfactualEngine, pixels: np.ndarray, req: ReviewRequest, *,
                              classifier: Any, segmenter: LungSegmenter,
                              cancel: threading.Event | None) -> tuple[CounterfactualResult, dict[str, Any]]:
    """The classifier-guided counterfactual of ``pixels`` (native frame) and the record's extra fields: segments
    the lungs of the model-frame image for the classifier and runs :func:`app.mapmethods.classifier_guided`."""
    from app import mapmethods

    seed = req.seed if req.seed is not None else draw_seed()
    seen: dict[str, np.ndarray] = {}

    def run(img_model: np.ndarray) -> Any:
        try:
            lungs_model = segmenter.segment(img_model)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"The lung segmentation failed ({e}), so the classifier-guided map cannot be made; "
                             f"choose the SDEdit difference map") from None
        if not lungs_model.any():
            raise ValueError("The lung segmenter found no lung field in this image, so the classifier-guided map "
                             "cannot be made; choose the SDEdit difference map")
        seen["lungs"] = lungs_model
        return mapmethods.classifier_guided(
            engine, classifier, img_model, lungs_model, prompt=req.prompt, strength=req.strength, steps=req.steps,
            guidance_scale=req.guidance_scale, classifier_scale=req.classifier_scale, seed=seed)

    result, guided = _model_frame_result(engine, pixels, req, run, seed=seed, cancel=cancel)
    result.parameters["classifier_scale"] = req.classifier_scale
    extra = {"classifier": classifier.info, "classifier_scale": req.classifier_scale,
             "logit_input": round(guided.logit_input, 6), "logit_counterfactual": round(guided.logit_counterfactual, 6),
             "classifier_lung_fraction": round(float(seen["lungs"].mean()), 6)}
    return result, extra


def make_counterfactual(engine: CounterfactualEngine, pixels: np.ndarray, req: ReviewRequest, *,
                        classifier: Any = None, segmenter: LungSegmenter | None = None,
                        progress: ProgressCallback | None = None,
                        cancel: threading.Event | None = None) -> tuple[CounterfactualResult, dict[str, Any]]:
    """Dispatch on ``req.map_method`` (resolved): the counterfactual(s) in the native frame and the record's
    method fields (``{"map_method": ...}`` plus, for ``classifier_guided``, the classifier's provenance and
    logits)."""
    if req.map_method == "ddim_inversion":
        from app import mapmethods

        result, _ = _model_frame_result(
            engine, pixels, req, lambda img_model: mapmethods.ddim_inversion(
                engine, img_model, prompt=req.prompt, strength=req.strength, steps=req.steps,
                guidance_scale=req.guidance_scale), seed=req.seed if req.seed is not None else 0, cancel=cancel,
            passes=2)
        if progress is not None:
            progress(result.effective_steps, result.effective_steps, result.timings_s["total"], None)
        return result, {"map_method": "ddim_inversion"}
    if req.map_method == "classifier_guided":
        assert classifier is not None and segmenter is not None  # resolve_request checked
        result, extra = _classifier_guided_result(engine, pixels, req, classifier=classifier, segmenter=segmenter,
                                                  cancel=cancel)
        if progress is not None:
            progress(result.effective_steps, result.effective_steps, result.timings_s["total"], None)
        return result, {"map_method": "classifier_guided", **extra}
    result = engine.generate_request(pixels, req, progress=progress, cancel=cancel)
    return result, {"map_method": "sdedit"}


def _reference_model(result: CounterfactualResult, reference: str) -> np.ndarray:
    """The map's reference in the model frame: the letterboxed input, or the model-frame reconstruction (a result
    without one, from another maker, letterboxes the native reconstruction again)."""
    if reference == "input":
        return result.input_model
    if result.reconstruction_model is not None:
        return result.reconstruction_model
    return imaging.letterbox(result.reconstruction, result.letterbox.size)[0]


def map_inputs(result: CounterfactualResult, pixels: np.ndarray, *, reference: str,
               map_smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The reference and the counterfactuals a map is the difference of, in the native frame.

    Args:
        result: the counterfactual(s) of ``pixels``.
        pixels: the decoded image, float32 (H, W) in [0, 1], native frame.
        reference: ``"input"`` (``pixels``) or ``"reconstruction"`` (the autoencoder's reconstruction).
        map_smoothing: Gaussian sigma in model-frame pixels (>= 0; 0 = none): above 0 both are taken in the model
            frame, smoothed inside the letterbox's content box and unletterboxed (:func:`app.imaging.unletterbox`).

    Returns:
        ``(reference, counterfactuals)``: float32 (H, W) and (S, H, W); at 0 exactly ``pixels`` (or
        ``result.reconstruction``) and ``result.counterfactuals``.
    """
    if map_smoothing <= 0:
        return (pixels if reference == "input" else result.reconstruction), result.counterfactuals
    smoothed = partial(imaging.unletterbox, lb=result.letterbox, smoothing_sigma=map_smoothing)
    return (smoothed(_reference_model(result, reference)),
            np.stack([smoothed(cf) for cf in result.counterfactuals_model]))


def _native_map(req: ReviewRequest) -> bool:
    """Whether :func:`attribution_map` takes the per-sample differences in the native frame (no map smoothing, or a
    native ``smoothing_sigma``) rather than in the model frame."""
    return float(req.map_smoothing or 0.0) <= 0 or req.smoothing_sigma > 0


def attribution_map(result: CounterfactualResult, pixels: np.ndarray, req: ReviewRequest, *,
                    region: np.ndarray | None) -> attribution.AttributionMap:
    """The run's map in the native frame (``req`` resolved), restricted to ``region`` (bool (H, W) or ``None``).

    With ``map_smoothing`` above 0 and no native ``smoothing_sigma`` (the default presets), the per-sample
    differences, their mean and their SD are taken in the model frame's content box (reference and
    counterfactuals smoothed there, :func:`app.imaging.content_of`) and only the mean and the SD are resized to the
    native frame (:func:`app.imaging.content_to_native`), then the polarity is applied. The resize is linear, so the
    mean equals that of the per-sample native differences (:func:`map_inputs` then
    :func:`app.attribution.difference_map`) to float32 rounding; the SD is the resized model-frame SD, which
    bounds the SD of the resized differences from above (the SD of a weighted mean is at most the weighted mean of
    the SDs; the two agree where neighbouring model pixels vary together over the samples). This costs one native
    resize per statistic instead of one per sample, and no (S, H, W) native arrays: a 2-Mpx DICOM's map with 8
    samples took 1.8 s the old way (docs/PERFORMANCE.md). Otherwise the native path: :func:`map_inputs`, then
    :func:`app.attribution.difference_map`.
    """
    map_smoothing = float(req.map_smoothing or 0.0)
    polarity = str(req.map_polarity)
    if _native_map(req):
        reference, counterfactuals = map_inputs(result, pixels, reference=str(req.reference),
                                                map_smoothing=map_smoothing)
        return attribution.difference_map(reference, counterfactuals, mask=region,
                                          smoothing_sigma=req.smoothing_sigma, polarity=polarity)
    lb = result.letterbox
    stack = np.concatenate([_reference_model(result, str(req.reference))[None], result.counterfactuals_model])
    content = imaging.content_of(np.moveaxis(stack, 0, -1), lb, smoothing_sigma=map_smoothing)  # (h, w, 1 + S)
    mean, std, n_samples = attribution.sample_statistics(content[..., 0], np.moveaxis(content[..., 1:], -1, 0))
    return attribution.map_from_statistics(
        imaging.content_to_native(mean, lb), None if std is None else np.maximum(imaging.content_to_native(std, lb), 0),
        n_samples=n_samples, mask=region, polarity=polarity)


def run_review(engine: CounterfactualEngine, data: bytes, req: ReviewRequest, out: Path, *,
               mask: np.ndarray | None = None, progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None,
               decoded: imaging.DecodedImage | None = None,
               segmenter: LungSegmenter | None = None, classifier: Any = None,
               record_extra: dict[str, Any] | None = None) -> RunRecord:
    """Decode ``data``, make the counterfactual(s), write every artifact into ``out``; return the record (as
    :meth:`RunRecord.from_json` reads the ``record.json`` written: equal to what any later reader sees).

    Args:
        data: the uploaded file's bytes (DICOM, PNG or JPEG). decoded: pass when already decoded (skips decode).
        mask: optional bool (H, W) user region mask in the native frame; restricts the map (wins over the lungs).
        segmenter: the lung segmenter; with ``req.lung_mask`` and no user mask, the map is restricted to the
            lungs it finds in the decoded pixels and ``lung_mask.png`` is written (see :func:`lung_region`).
            ``classifier_guided`` also needs it (the classifier sees the lungs of the model-frame image).
        classifier: the lesion classifier (``app.lesions.LesionClassifier``); needed by ``classifier_guided``.
        record_extra: keys added at the end of the record (a Ray Serve replica adds ``"serving"``: backend,
            replica, node, attempt); ``None``, as in-process runs pass, adds nothing.

    Raises:
        imaging.ImagingError: the file cannot be read as a chest radiograph (message for the clinician).
        ValueError: a parameter is out of range, or the map method cannot run here (see
            :func:`resolve_request`). engine.GenerationCancelled: cancelled.
    """
    req = resolve_request(req, engine.info, classifier=classifier, segmenter=segmenter)
    out.mkdir(parents=True, exist_ok=True)
    img = decoded or imaging.decode_image(data, window=req.window)
    pixels = img.pixels
    if mask is not None and mask.shape != pixels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {pixels.shape}")
    result, method_record = make_counterfactual(engine, pixels, req, classifier=classifier, segmenter=segmenter,
                                                progress=progress, cancel=cancel)
    # the files: the PNG encoders (zlib) release the GIL, so the images are encoded and written in a small pool
    # while this thread segments the lungs and makes the map, the overlay and the summary (docs/PERFORMANCE.md);
    # the hashes keep the order the files were submitted in (an edited counterfactual.png after the other images).
    # The lungs are segmented only now: the first progress event does not wait for them (a segmenter that fails
    # with an unexpected error now fails the run after its diffusion, not before)
    calibration, scale_reason = mapscale.calibration_for_run(
        mapscale.MapCalibration.from_manifest(engine.info.manifest), map_method=str(req.map_method),
        reference=str(req.reference), smoothing_sigma=req.smoothing_sigma, samples=req.samples,
        polarity=str(req.map_polarity), map_smoothing=float(req.map_smoothing or 0.0))
    # the counterfactual shown: edited to the map's above-normal region (which needs the map's calibrated level),
    # else the first sample
    edit_record: dict[str, Any] = {"mode": req.counterfactual_edit, "applied": False}
    edit = req.counterfactual_edit == "map_region"
    if edit and calibration is None:
        edit = False
        edit_record["reason"] = (f"the map has no calibrated normal level for this setting ({scale_reason}); the "
                                 f"first sample is shown")
    # the first sample at native size (all of them, kept, when the map will need them there anyway)
    files: list[tuple[str, Callable[[], bytes]]] = [(folder.INPUT, partial(imaging.to_png_bytes, pixels, bits=16))]
    if not edit:
        first = result.counterfactuals[0] if _native_map(req) else result.counterfactual(0)
        files.append((folder.COUNTERFACTUAL, partial(imaging.to_png_bytes, first, bits=16)))
    for i in range(0 if edit else 1, len(result.counterfactuals_model)):  # as the model made them (not resized)
        files.append((folder.counterfactual_name(i) if i else folder.EDITED_FIRST_SAMPLE, partial(
            imaging.to_png_bytes, imaging.content_of(result.counterfactuals_model[i], result.letterbox), bits=16)))
    files.append((folder.RECONSTRUCTION, partial(imaging.to_png_bytes, result.reconstruction, bits=16)))
    with ThreadPoolExecutor(max_workers=FILE_WRITERS, thread_name_prefix="vald-md-files") as pool:
        futures = [pool.submit(_write_made, out / name, make) for name, make in files]
        try:
            lungs, lung_record = lung_region(segmenter, pixels, requested=req.lung_mask, user_mask=mask is not None)
            region = mask if mask is not None else lungs
            amap = attribution_map(result, pixels, req, region=region)
            if edit:
                assert calibration is not None
                edited, edit_record = edited_counterfactual(engine, pixels, req, result, amap, calibration.level,
                                                            cancel=cancel)
                files.append((folder.COUNTERFACTUAL, partial(imaging.to_png_bytes, edited, bits=16)))
                futures.append(pool.submit(_write_made, out / folder.COUNTERFACTUAL, files[-1][1]))
            label = rendering.map_label(req.reference, req.map_method, req.map_polarity)
            overlay = rendering.render_overlay(pixels, amap, normal_level=calibration.level if calibration else None,
                                               label=label)
            later: list[tuple[str, Callable[[], bytes]]] = [(folder.OVERLAY, partial(imaging.to_png_bytes, overlay)),
                                                            (folder.ATTRIBUTION, partial(_npy_bytes, amap.signed))]
            if amap.std is not None:
                later.append((folder.ATTRIBUTION_STD, partial(_npy_bytes, amap.std)))
            if mask is not None:
                later.append((folder.MASK, partial(imaging.to_png_bytes, mask.astype(np.float32))))
            if lungs is not None:
                later.append((folder.LUNG_MASK, partial(mask_png_bytes, lungs)))
            futures += [pool.submit(_write_made, out / name, make) for name, make in later]
            files += later
            summary = mapscale.summarize_scaled(amap, calibration, parameters=result.parameters, reason=scale_reason)
            hashes = {name: fut.result() for (name, _), fut in zip(files, futures, strict=True)}
        except BaseException:  # a run that failed leaves no files (and has no record.json)
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True)
            for name, _ in files:
                (out / name).unlink(missing_ok=True)
            raise
    record = {
        "vald_md_record": RECORD_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "input": {"sha256": sha256_bytes(data),
                  "pixels_sha256": sha256_bytes(np.ascontiguousarray(pixels).tobytes()),
                  **img.meta.public_summary()},
        **result.record(),
        "request": {"window": req.window, "reference": req.reference, "smoothing_sigma": req.smoothing_sigma,
                    "mask": mask is not None, "lung_mask": req.lung_mask, "map_method": req.map_method,
                    "map_polarity": req.map_polarity, "map_smoothing": req.map_smoothing,
                    "counterfactual_edit": req.counterfactual_edit},
        **method_record,
        "map_label": label,
        "map_region": "user_mask" if mask is not None else "lungs" if lungs is not None else "whole_image",
        "lung_mask": lung_record,
        "map_summary": summary,
        "counterfactual_edit": edit_record,
        **({"sample_files": sample_files(result.letterbox, edited=edit)}
           if len(result.counterfactuals_model) > 1 or edit else {}),
        "model_limitations": engine.info.manifest.get("limitations"),
        "artifacts_sha256": hashes,
        "disclaimer": DISCLAIMER,
        **(record_extra or {}),
    }
    record_bytes = json.dumps(record, indent=2, default=str).encode()
    _write(out / folder.RECORD, record_bytes)
    return RunRecord.from_json(record_bytes)
