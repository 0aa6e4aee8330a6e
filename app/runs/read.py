"""What every export of a run shows, rebuilt from its folder through the hash-checked reader: the original and the
attribution map (:func:`read_map`), the overlay with its legend (:func:`render_overlay`) and the run's facts in
words (:func:`run_facts`). Shared by :mod:`app.runs.exports` and :mod:`app.runs.dicom_sc`; writes nothing.

The overlay is re-rendered from ``input.png`` (16-bit) and ``attribution.npy`` (plus ``attribution_std.npy`` and
the region mask: ``mask.png``, else ``lung_mask.png``, when the run wrote one), so display options (opacity,
threshold, mode, the lung outline) can differ from ``overlay.png``; nothing is ever drawn outside the region.
Every file is read through :class:`app.runs.folder.RunFolder`: a run folder edited after the run is refused
(:class:`ExportChangedError`) rather than exported under the record's name.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from app import attribution, rendering
from app.rendering import OverlayOptions
from app.runs import folder as names
from app.runs.folder import ArtifactChangedError, RunFolder, RunFolderError
from app.runs.record import RunRecord

__all__ = [
    "DEFAULT_OVERLAY",
    "DISCLAIMER",
    "MODEL_HASH_PREFIX",
    "THRESHOLD_NORMAL",
    "ExportChangedError",
    "ExportError",
    "open_run",
    "read_artifact",
    "read_lung_mask",
    "read_map",
    "region_text",
    "render_overlay",
    "run_facts",
]

FloatImage = NDArray[np.float32]
RGBImage = NDArray[np.uint8]

DISCLAIMER = rendering.BANNER_TEXT
"""Burned into the annotated PNG and the Secondary Capture; also the PNG ``Disclaimer`` chunk, (0020,4000) Image
Comments, (0008,2111) Derivation Description and the ZIP archive comment."""
MODEL_HASH_PREFIX = 12
"""Hex characters of the model's SHA-256 shown in burned-in text (the full hash is in the metadata)."""
THRESHOLD_NORMAL = rendering.THRESHOLD_NORMAL
"""``threshold_mode`` of a threshold given as an x-fold of the model's normal level (calibrated runs only)."""
DEFAULT_OVERLAY = OverlayOptions()


class ExportError(ValueError):
    """An export cannot be made from this run folder or source; the message is for the clinician."""


class ExportChangedError(ExportError, ArtifactChangedError):
    """A run file differs from the SHA-256 in ``record.json``: an export error that is also the run folder's
    :class:`~app.runs.folder.ArtifactChangedError` (HTTP 409)."""


# --------------------------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------------------------


def open_run(run_dir: Path) -> RunFolder:
    """The run folder, with its record read (so that a missing or damaged record is refused first).

    Raises:
        ExportError: the folder or its record is missing, or the record is not a run record.
    """
    run = RunFolder(Path(run_dir))
    try:
        run.record()
    except RunFolderError as exc:
        raise ExportError(str(exc)) from None
    return run


def read_artifact(run: RunFolder, name: str) -> bytes:
    """One file's bytes, checked (:meth:`RunFolder.read`), with the folder's errors as export errors.

    Raises:
        ExportChangedError: changed (or added) after the run. ExportError: missing.
    """
    try:
        return run.read(name)
    except ArtifactChangedError as exc:
        raise ExportChangedError(str(exc)) from None
    except RunFolderError as exc:
        raise ExportError(str(exc)) from None


def _decode_input_png(data: bytes, name: str = names.INPUT) -> FloatImage:
    """``input.png`` (16-bit grayscale, or 8-bit) as float32 ``(H, W)`` in [0, 1]."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise ExportError(f"{name} is not a readable PNG ({exc}); the run folder is damaged.") from exc
    if mode.startswith("I;16") or mode == "I":
        full_scale = 65535.0
    elif mode == "L":
        full_scale = 255.0
    else:
        raise ExportError(f"{name} has Pillow mode {mode!r}; expected 16-bit grayscale ('I;16') as runs write it.")
    out: FloatImage = np.clip(pixels.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)
    return out


def _decode_npy(data: bytes, name: str, shape: tuple[int, ...]) -> FloatImage:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ExportError(f"{name} is not a readable .npy array ({exc}); the run folder is damaged.") from exc
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise ExportError(
            f"{name} holds a {arr.dtype} array of shape {arr.shape}; expected finite floats of shape {shape} "
            "(the size of input.png)."
        )
    out: FloatImage = arr.astype(np.float32, copy=False)
    return out


def read_map(run: RunFolder) -> tuple[FloatImage, attribution.AttributionMap]:
    """The original (float32 ``(H, W)`` in [0, 1]) and the attribution map, rebuilt from the run's files.

    Raises:
        ExportChangedError: a file changed after the run. ExportError: a file is missing or unreadable.
    """
    record = run.record()
    original = _decode_input_png(read_artifact(run, names.INPUT))
    signed = _decode_npy(read_artifact(run, names.ATTRIBUTION), names.ATTRIBUTION, original.shape)
    std = None
    if run.has(names.ATTRIBUTION_STD):
        std = _decode_npy(read_artifact(run, names.ATTRIBUTION_STD), names.ATTRIBUTION_STD, original.shape)
    mask = None
    for name in names.REGION_MASKS:  # a user mask wins; the run writes at most one of them
        if run.has(name):
            try:
                mask = attribution.load_mask_png(read_artifact(run, name), original.shape)
            except ExportError:
                raise
            except ValueError as exc:
                raise ExportError(f"{name} in run folder {run.path.name} cannot be used: {exc}") from exc
            break
    amap = attribution.AttributionMap(signed=signed, magnitude=np.abs(signed), std=std,
                                      n_samples=max(record.n_samples, 2 if std is not None else 1), mask=mask)
    return original, amap


def read_lung_mask(run: RunFolder, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """``lung_mask.png`` as bool ``(H, W)``; ExportError when the run has none (its map was not restricted)."""
    if not run.has(names.LUNG_MASK):
        raise ExportError("This run has no lung mask (its map was not restricted to the lungs), so there is no "
                          "lung outline to draw; export without it.")
    try:
        return attribution.load_mask_png(read_artifact(run, names.LUNG_MASK), shape)
    except ExportError:
        raise
    except ValueError as exc:
        raise ExportError(f"{names.LUNG_MASK} in run folder {run.path.name} cannot be used: {exc}") from exc


def render_overlay(original: FloatImage, amap: attribution.AttributionMap, record: RunRecord,
                   overlay: OverlayOptions) -> RGBImage:
    """The overlay with its legend on the right, ``(H, W + L, 3)`` uint8, on the run's scale (calibrated: x-fold
    of the normal range; else relative; ``overlay.scale`` is not used) and labelled with its map reference; bad
    options become ExportError. The lung outline is the caller's to draw."""
    calibration = record.calibration
    try:
        return rendering.render_overlay(original, amap, replace(overlay, scale=None, legend=True),
                                        normal_level=calibration.level if calibration is not None else None,
                                        label=record.label)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------------------
# Parameters shown and embedded
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _seeds(record: RunRecord) -> str:
    seeds = record.seeds
    if isinstance(seeds, list) and seeds:
        return ", ".join(str(s) for s in seeds)
    return _fmt(record.parameters.seed)


def run_facts(record: RunRecord) -> dict[str, str]:
    """Machine-readable run facts: ``{key: text}`` for PNG text chunks (keys without the ``vald_md:`` prefix)."""
    params = record.parameters
    request = record.request
    return {
        "prompt": _fmt(params.prompt),
        "negative_prompt": _fmt(params.negative_prompt),
        "strength": _fmt(params.strength),
        "guidance_scale": _fmt(params.guidance_scale),
        "steps": _fmt(params.steps),
        "effective_steps": _fmt(record.effective_steps),
        "seed": _seeds(record),
        "scheduler": _fmt(params.scheduler),
        "samples": _fmt(params.samples),
        "reference": _fmt(request.get("reference")),
        "map_label": record.label,
        "map_scale": _scale_text(record),
        "smoothing_sigma": _fmt(request.get("smoothing_sigma")),
        "map_smoothing": _fmt(record.map_smoothing),
        "map_region": record.region,
        "counterfactual": "edited where the map is above normal" if record.edited else "first sample",
        # the form's settings behind the map, so that "Use these parameters" on an annotated PNG sets them again
        "map_method": _fmt(record.method),
        "map_polarity": record.polarity,
        "counterfactual_edit": _fmt(request.get("counterfactual_edit")),
        "lung_mask": _fmt(request.get("lung_mask")).lower(),
        "classifier_scale": _fmt(record.classifier_scale),
        "model_hash": _fmt(record.model_hash),
        "created_at": _fmt(record.created_at),
    }


def _scale_text(record: RunRecord) -> str:
    """The map's scale in words: calibrated (what 1× is) or relative (per-image)."""
    calibration = record.calibration
    if calibration is None:
        return "relative (per-image) scale"
    return f"x-fold of the normal range: {calibration.describe()}"


def region_text(record: RunRecord) -> str:
    """The map's region in words, e.g. ``lungs (tiny-lungs 9bf444a80d3d, 38 % of the image)``."""
    region = record.region
    if region == "lungs":
        lung = record.lung_mask
        fraction = lung.get("lung_fraction")
        share = f", {100 * float(fraction):.0f} % of the image" if isinstance(fraction, int | float) else ""
        return f"lungs ({lung.get('name', 'segmenter')} {str(lung.get('sha256', ''))[:MODEL_HASH_PREFIX]}{share})"
    return {"user_mask": "uploaded region mask", "whole_image": "whole image"}.get(region, region)
