"""Exports of one finished review run folder (see :mod:`app.artifacts` for what the folder holds).

=========================  ================================================================================
``annotated.png``          burned-in banner, original | overlay with legend, the run's parameters; the same
                           parameters in PNG text chunks (``vald_md:*``, ``Disclaimer``). No patient data.
``secondary-capture.dcm``  DICOM Secondary Capture of the overlay (RGB, banner and legend burned in): by default
                           de-identified in a study of its own; on request a derived series in the source's
                           study, referencing the source image. DICOM inputs only.
``record.json``            the run's ``record.json``, byte for byte.
``bundle.zip``             every artifact plus ``annotated.png`` (and the ``.dcm`` when a source is given),
                           in a fixed order with fixed timestamps, so identical runs give identical archives.
=========================  ================================================================================

The overlay is re-rendered from ``input.png`` (16-bit) and ``attribution.npy`` (plus ``attribution_std.npy`` and
the region mask: ``mask.png``, else ``lung_mask.png``, when present), so display options (opacity, threshold,
mode, the lung outline) can differ from ``overlay.png``; nothing is ever drawn outside the region.
Every artifact read is checked against ``record["artifacts_sha256"]`` first: a run folder edited after the run
is refused rather than exported under the record's name.

Patient data: the annotated PNG and the record carry none. The Secondary Capture, by default, is de-identified:
a new Study Instance UID, Series Instance UID and SOP Instance UID, Patient Name and Patient ID ``"ANONYMOUS"``,
no birth date, sex, accession number, study date/time, study ID or referring physician, and no reference to
the source image (no Source Image or Referenced Image Sequence, whose SOP Instance UID would link back), with
(0012,0062) Patient Identity Removed ``YES``. So a PACS that receives it files it as a study of its own, never as
a second "patient" inside the source's study. Its pixels are the rendered overlay over the source's pixels: text
burned into the source radiograph is not scrubbed. ``include_patient_data=True`` makes the other kind, a
*derived series in the original study*: the source's Study Instance UID, its patient and study modules, and the
Source/Referenced Image Sequences, for storing back to the PACS the image came from.

Nothing here writes files except :func:`save_export`, which writes atomically.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import PersonName

from app import __version__, attribution, mapscale, rendering
from app.rendering import OverlayOptions

__all__ = [
    "ANONYMOUS",
    "DEIDENTIFICATION_METHOD",
    "DISCLAIMER",
    "EXPORT_KINDS",
    "LUNG_OUTLINE_KINDS",
    "MEDIA_TYPES",
    "OVERLAY_KINDS",
    "SERIES_DESCRIPTION",
    "THRESHOLD_NORMAL",
    "ExportError",
    "OverlayOptions",
    "build_export",
    "export_annotated_png",
    "export_bundle",
    "export_record_json",
    "export_secondary_capture",
    "read_png_parameters",
    "save_export",
]

logger = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]
RGBImage = NDArray[np.uint8]

EXPORT_KINDS = ("annotated.png", "secondary-capture.dcm", "record.json", "bundle.zip")
MEDIA_TYPES = {
    "annotated.png": "image/png",
    "secondary-capture.dcm": "application/dicom",
    "record.json": "application/json",
    "bundle.zip": "application/zip",
}
DISCLAIMER = rendering.BANNER_TEXT
"""Burned into the annotated PNG and the Secondary Capture; also the PNG ``Disclaimer`` chunk, (0020,4000) Image
Comments, (0008,2111) Derivation Description and the ZIP archive comment."""
SERIES_DESCRIPTION = "VALD-MD counterfactual overlay (AI, not for diagnostic use)"
"""(0008,103E) Series Description. LO holds at most 64 characters, so the full disclaimer goes into
(0020,4000) Image Comments and (0008,2111) Derivation Description instead."""
ANONYMOUS = "ANONYMOUS"
"""(0010,0010) Patient Name and (0010,0020) Patient ID of a Secondary Capture made without patient data."""
DEIDENTIFICATION_METHOD = "VALD-MD SC export: new UIDs, no identifiers copied"
"""(0012,0063) De-identification Method of a default (de-identified) Secondary Capture; LO, at most 64 characters."""
SERIES_NUMBER = 9001
"""(0020,0011) Series Number of the Secondary Capture: high, so it sorts after the acquired series."""
MODEL_HASH_PREFIX = 12
"""Hex characters of the model's SHA-256 shown in burned-in text (the full hash is in the metadata)."""

OVERLAY_KINDS = ("annotated.png", "secondary-capture.dcm", "bundle.zip")
"""The exports drawn with overlay options (:class:`app.rendering.OverlayOptions`)."""
LUNG_OUTLINE_KINDS = ("annotated.png", "bundle.zip")
"""The exports whose ``annotated.png`` can draw the lung outline (``OverlayOptions.lung_outline``)."""
_WITH_PATIENT_DATA = ("secondary-capture.dcm", "bundle.zip")
# Bundle order: the artifacts as app.artifacts lists them, then the exports made here.
_BUNDLE_HEAD = ("input.png",)
_BUNDLE_TAIL = ("reconstruction.png", "overlay.png", "annotated.png", "attribution.npy", "attribution_std.npy",
                "mask.png", "lung_mask.png", "record.json", "secondary-capture.dcm")
REGION_MASKS = ("mask.png", "lung_mask.png")
"""The run files that restrict a map, in order of precedence (the user's mask, then the lungs)."""
_COUNTERFACTUAL = re.compile(r"^counterfactual(?:-(\d+))?\.png$")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a ZIP entry can carry
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Patient (C.7.1.1) and study-level (C.7.2.1, C.7.2.2) attributes copied only with include_patient_data=True.
_PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientBreedDescription",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
_STUDY_KEYWORDS = (
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "ReferringPhysicianName", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight",
)


class ExportError(ValueError):
    """An export cannot be made from this run folder or source; the message is for the clinician."""


# --------------------------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_record(run_dir: Path) -> tuple[dict[str, Any], bytes]:
    """``record.json`` parsed, and its bytes."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist; pass the folder a review run wrote.")
    path = run_dir / "record.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"run folder {run_dir} has no record.json; the run did not finish. Run it again.") from None
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"record.json in {run_dir} is not valid JSON ({exc}); the run folder is damaged.") from exc
    if not isinstance(record, dict):
        raise ExportError(f"record.json in {run_dir} holds a {type(record).__name__}, not a run record.")
    return record, data


def _read_artifact(run_dir: Path, name: str, record: dict[str, Any]) -> bytes:
    """The bytes of one artifact, checked against the SHA-256 the record lists for it (when it lists one)."""
    try:
        data = (Path(run_dir) / name).read_bytes()
    except FileNotFoundError:
        raise ExportError(f"run folder {run_dir} has no {name}; the run did not finish. Run it again.") from None
    expected = (record.get("artifacts_sha256") or {}).get(name)
    if expected is not None and _sha256(data) != expected:
        raise ExportError(
            f"{name} in {run_dir} does not match the SHA-256 in record.json; the folder was changed after the "
            "run, so it is not exported. Run the review again."
        )
    return data


def _decode_input_png(data: bytes, name: str = "input.png") -> FloatImage:
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


def _read_map(run_dir: Path, record: dict[str, Any]) -> tuple[FloatImage, attribution.AttributionMap]:
    """The original (float32 ``(H, W)`` in [0, 1]) and the attribution map, rebuilt from the run's files."""
    run_dir = Path(run_dir)
    original = _decode_input_png(_read_artifact(run_dir, "input.png", record))
    signed = _decode_npy(_read_artifact(run_dir, "attribution.npy", record), "attribution.npy", original.shape)
    std = None
    if (run_dir / "attribution_std.npy").exists():
        std = _decode_npy(_read_artifact(run_dir, "attribution_std.npy", record), "attribution_std.npy",
                          original.shape)
    mask = None
    for name in REGION_MASKS:  # a user mask wins; the run writes at most one of them
        if (run_dir / name).exists():
            try:
                mask = attribution.load_mask_png(_read_artifact(run_dir, name, record), original.shape)
            except ValueError as exc:
                raise ExportError(f"{name} in {run_dir} cannot be used: {exc}") from exc
            break
    summary = record.get("map_summary") or {}
    n_samples = int(summary.get("n_samples") or (record.get("parameters") or {}).get("samples") or 1)
    amap = attribution.AttributionMap(signed=signed, magnitude=np.abs(signed), std=std,
                                      n_samples=max(n_samples, 2 if std is not None else 1), mask=mask)
    return original, amap


def _read_lung_mask(run_dir: Path, record: dict[str, Any], shape: tuple[int, int]) -> NDArray[np.bool_]:
    """``lung_mask.png`` as bool ``(H, W)``; ExportError when the run has none (its map was not restricted)."""
    if not (Path(run_dir) / "lung_mask.png").exists():
        raise ExportError("This run has no lung mask (its map was not restricted to the lungs), so there is no "
                          "lung outline to draw; export without it.")
    try:
        return attribution.load_mask_png(_read_artifact(Path(run_dir), "lung_mask.png", record), shape)
    except ValueError as exc:
        raise ExportError(f"lung_mask.png in {run_dir} cannot be used: {exc}") from exc


THRESHOLD_NORMAL = rendering.THRESHOLD_NORMAL
"""``threshold_mode`` of a threshold given as an x-fold of the model's normal level (calibrated runs only)."""
_DEFAULT_OVERLAY = OverlayOptions()


def _render_overlay(original: FloatImage, amap: attribution.AttributionMap, record: dict[str, Any],
                    overlay: OverlayOptions) -> RGBImage:
    """The overlay with its legend on the right, ``(H, W + L, 3)`` uint8, on the run's scale (calibrated: x-fold
    of the normal range; else relative; ``overlay.scale`` is not used) and labelled with its map reference; bad
    options become ExportError. The lung outline is the caller's to draw."""
    calibration = mapscale.scale_from_record(record)
    try:
        return rendering.render_overlay(original, amap, replace(overlay, scale=None, legend=True),
                                        normal_level=calibration.level if calibration is not None else None,
                                        label=rendering.map_label_of_record(record))
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


def _seeds(record: dict[str, Any]) -> str:
    seeds = record.get("seeds")
    if isinstance(seeds, list) and seeds:
        return ", ".join(str(s) for s in seeds)
    return _fmt((record.get("parameters") or {}).get("seed"))


def _run_facts(record: dict[str, Any]) -> dict[str, str]:
    """Machine-readable run facts: ``{key: text}`` for PNG text chunks (keys without the ``vald_md:`` prefix)."""
    params = record.get("parameters") or {}
    request = record.get("request") or {}
    facts = {
        "prompt": _fmt(params.get("prompt")),
        "negative_prompt": _fmt(params.get("negative_prompt")),
        "strength": _fmt(params.get("strength")),
        "guidance_scale": _fmt(params.get("guidance_scale")),
        "steps": _fmt(params.get("steps")),
        "effective_steps": _fmt(record.get("effective_steps")),
        "seed": _seeds(record),
        "scheduler": _fmt(params.get("scheduler")),
        "samples": _fmt(params.get("samples")),
        "reference": _fmt(request.get("reference")),
        "map_label": rendering.map_label_of_record(record),
        "map_scale": _scale_text(record),
        "smoothing_sigma": _fmt(request.get("smoothing_sigma")),
        "map_region": _map_region(record),
        "model_hash": _fmt(record.get("model_hash")),
        "created_at": _fmt(record.get("created_at")),
    }
    return facts


def _scale_text(record: dict[str, Any]) -> str:
    """The map's scale in words: calibrated (what 1× is) or relative (per-image)."""
    calibration = mapscale.scale_from_record(record)
    if calibration is None:
        return "relative (per-image) scale"
    return f"x-fold of the normal range: {calibration.describe()}"


def _map_region(record: dict[str, Any]) -> str:
    """``lungs``, ``user_mask`` or ``whole_image``; records written before lung masks say only ``request.mask``."""
    region = record.get("map_region")
    if isinstance(region, str):
        return region
    return "user_mask" if (record.get("request") or {}).get("mask") else "whole_image"


def _region_text(record: dict[str, Any]) -> str:
    region = _map_region(record)
    if region == "lungs":
        lung = record.get("lung_mask") or {}
        fraction = lung.get("lung_fraction")
        share = f", {100 * float(fraction):.0f} % of the image" if isinstance(fraction, int | float) else ""
        return f"lungs ({lung.get('name', 'segmenter')} {str(lung.get('sha256', ''))[:MODEL_HASH_PREFIX]}{share})"
    return {"user_mask": "uploaded region mask", "whole_image": "whole image"}.get(region, region)


def _display_params(facts: dict[str, str], overlay: dict[str, str], region: str) -> dict[str, str]:
    """Human-readable parameter lines for the burned-in block, in reading order (``region``: :func:`_region_text`)."""
    model = facts["model_hash"]
    shown = {
        "Prompt": facts["prompt"],
        "Negative prompt": facts["negative_prompt"] or "(none)",
        "Strength": facts["strength"],
        "Guidance scale": facts["guidance_scale"],
        "Steps": f"{facts['steps']} requested, {facts['effective_steps']} effective",
        "Seed": facts["seed"],
        "Scheduler": facts["scheduler"],
        "Samples": facts["samples"],
        "Map": facts["map_label"],
        "Map scale": facts["map_scale"],
        "Map region": region,
        "Model (SHA-256)": model[:MODEL_HASH_PREFIX] if model != "n/a" else model,
        "Overlay": ", ".join(f"{k} {v}" for k, v in overlay.items()),
        "Created (UTC)": facts["created_at"],
    }
    return shown


def _overlay_facts(overlay: OverlayOptions) -> dict[str, str]:
    threshold, threshold_mode = overlay.threshold, overlay.threshold_mode
    thr = "none" if threshold is None else (f"{threshold:g} %ile" if threshold_mode == "percentile"
                                            else f"{threshold:g}× normal" if threshold_mode == THRESHOLD_NORMAL
                                            else f"{threshold:g}")
    facts = {"mode": overlay.mode, "opacity": f"{overlay.opacity:g}", "threshold": thr}
    if overlay.lung_outline:
        facts["lung outline"] = "green"
    return facts


# --------------------------------------------------------------------------------------------------------------
# 1. Annotated PNG
# --------------------------------------------------------------------------------------------------------------


def export_annotated_png(run_dir: Path, overlay: OverlayOptions = _DEFAULT_OVERLAY) -> bytes:
    """An annotated PNG of the run: banner, original | overlay with legend, and the run's parameters.

    The banner :data:`DISCLAIMER` is burned in across the top (by
    :func:`app.rendering.render_annotated_export`). The same facts are written as PNG text chunks (tEXt, or
    iTXt where the value is not Latin-1): ``vald_md:prompt``, ``vald_md:negative_prompt``, ``vald_md:strength``,
    ``vald_md:guidance_scale``, ``vald_md:steps``, ``vald_md:effective_steps``, ``vald_md:seed`` (all sample
    seeds, comma-separated), ``vald_md:scheduler``, ``vald_md:samples``, ``vald_md:reference``,
    ``vald_md:map_label`` (:func:`app.rendering.map_label`), ``vald_md:map_scale`` (calibrated or relative),
    ``vald_md:smoothing_sigma``, ``vald_md:map_region`` (``lungs``, ``user_mask`` or ``whole_image``),
    ``vald_md:model_hash`` (full SHA-256), ``vald_md:created_at``,
    ``vald_md:overlay`` (JSON of the display options), ``vald_md:record_sha256`` (of ``record.json``), plus
    ``Disclaimer`` and ``Software``. Neither the pixels nor the chunks hold patient data or the folder's path.
    The output is deterministic: the same run and options give the same bytes.

    Args:
        run_dir: A finished run folder (see :mod:`app.artifacts`).
        overlay: The display options (:class:`app.rendering.OverlayOptions`): ``opacity``; ``threshold`` hides
            |M| below a percentile in [0, 100] (``threshold_mode="percentile"``), an absolute intensity
            difference (``"absolute"``) or, for a run read against a calibrated model, an x-fold of its normal
            level (``"normal"``, :data:`THRESHOLD_NORMAL`); ``mode`` (``"stability"``: several samples only);
            ``lung_outline`` draws the outline of ``lung_mask.png`` in green over the overlay (the map is
            restricted to it anyway), refused for a run without one. The legend is always drawn, on the run's
            scale (``scale`` and ``legend`` are not used).

    Returns:
        PNG bytes (8-bit RGB).

    Raises:
        ExportError: The folder is incomplete, damaged or changed since the run, or an option is out of range.
    """
    # 1. read the run
    record, record_bytes = _read_record(run_dir)
    original, amap = _read_map(run_dir, record)

    # 2. overlay and the composed image
    pixels = _render_overlay(original, amap, record, overlay)
    if overlay.lung_outline:
        pixels = rendering.draw_mask_outline(pixels, _read_lung_mask(run_dir, record, original.shape))
    facts = _run_facts(record)
    overlay_facts = _overlay_facts(overlay)
    image = rendering.render_annotated_export(
        original, pixels, params=_display_params(facts, overlay_facts, _region_text(record)),
        title=f"VALD-MD counterfactual attribution ({facts['map_label']})")

    # 3. text chunks
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"VALD-MD {__version__}")
    info.add_text("Disclaimer", DISCLAIMER)  # add_text writes iTXt when the value is not Latin-1 (the em dash)
    for key, value in facts.items():
        info.add_text(f"vald_md:{key}", value)
    shown: dict[str, Any] = {"mode": overlay.mode, "opacity": overlay.opacity, "threshold": overlay.threshold,
                             "threshold_mode": overlay.threshold_mode}
    if overlay.lung_outline:
        shown["lung_outline"] = True
    info.add_text("vald_md:overlay", json.dumps(shown))
    info.add_text("vald_md:record_sha256", _sha256(record_bytes))

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(data: bytes) -> dict[str, Any] | None:
    """The generation parameters an annotated PNG (:func:`export_annotated_png`) carries in its text chunks, typed,
    so that a run can be set up again from the file alone (A1111's "PNG info").

    Args:
        data: A file's bytes; anything but a VALD-MD annotated PNG gives ``None``.

    Returns:
        ``{"prompt", "negative_prompt", "strength", "guidance_scale", "steps", "seed" (the first sample's, or
        ``None``), "scheduler", "samples", "model_hash", "created_at", "record_sha256", "overlay"}`` for an
        annotated export, else ``None``. Values the chunks do not hold (``n/a``) are ``None`` (``""`` for the
        negative prompt).
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # text chunks after the image data are read with it
            text = {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    chunks = {k.removeprefix("vald_md:"): v for k, v in text.items() if k.startswith("vald_md:")}
    if "prompt" not in chunks or "strength" not in chunks:
        return None

    def number(key: str, kind: type) -> Any:
        try:
            return kind(chunks[key])
        except (KeyError, ValueError):
            return None

    seed_text = chunks.get("seed", "").split(",")[0].strip()
    try:
        overlay = json.loads(chunks.get("overlay", "{}"))
    except ValueError:
        overlay = {}
    negative = chunks.get("negative_prompt", "")
    return {"prompt": chunks["prompt"], "negative_prompt": "" if negative == "n/a" else negative,
            "strength": number("strength", float), "guidance_scale": number("guidance_scale", float),
            "steps": number("steps", int), "seed": int(seed_text) if seed_text.isdigit() else None,
            "scheduler": chunks.get("scheduler"), "samples": number("samples", int),
            "model_hash": chunks.get("model_hash"), "created_at": chunks.get("created_at"),
            "record_sha256": chunks.get("record_sha256"), "overlay": overlay if isinstance(overlay, dict) else {}}


# --------------------------------------------------------------------------------------------------------------
# 2. DICOM Secondary Capture
# --------------------------------------------------------------------------------------------------------------


def _sniff(data: bytes) -> str:
    """A clinician's name for the format of non-DICOM bytes."""
    if data.startswith(_PNG_SIGNATURE):
        return "a PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "a JPEG"
    if not data:
        return "empty"
    return "not a DICOM file"


def _read_source(source: bytes | Dataset, record: dict[str, Any]) -> Dataset:
    """The source's header (no pixels), checked to be this run's DICOM image input."""
    if isinstance(source, Dataset):
        ds = source
    else:
        data = bytes(source)
        expected = (record.get("input") or {}).get("sha256")
        same_file = expected is None or _sha256(data) == expected
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except InvalidDicomError:
            what = _sniff(data)
            if same_file and what in ("a PNG", "a JPEG"):
                raise ExportError(
                    f"A DICOM Secondary Capture needs a DICOM input; this run's input was {what}. "
                    "Export the annotated PNG or the bundle instead."
                ) from None
            raise ExportError(
                f"A DICOM Secondary Capture needs the run's source DICOM file; the file supplied is {what} "
                "(a DICOM Part 10 file starts with a 128-byte preamble and 'DICM')."
            ) from None
        if not same_file:
            raise ExportError(
                "The DICOM file supplied is not this run's input (its SHA-256 differs from record.json); "
                "supply the file the review was run on."
            )
    missing = [kw for kw in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID", "Rows", "Columns")
               if not ds.get(kw)]
    if missing:
        raise ExportError(
            f"The source DICOM lacks {', '.join(missing)}; a Secondary Capture must reference an image in a "
            "study. Supply the original radiograph."
        )
    return ds


def _copy_element(target: Dataset, source: Dataset, keyword: str) -> None:
    """Copy one attribute; text is copied decoded so it is re-encoded in the target's character set."""
    if keyword not in source:
        return
    elem = source[keyword]
    value = elem.value
    if isinstance(value, PersonName):
        value = str(value)
    elif isinstance(value, list | tuple | pydicom.multival.MultiValue) and value and isinstance(value[0], PersonName):
        value = [str(v) for v in value]
    else:
        value = copy.deepcopy(value)
    target[elem.tag] = DataElement(elem.tag, elem.VR, value)


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def export_secondary_capture(run_dir: Path, source_dicom: bytes | Dataset, *,
                             overlay: OverlayOptions = _DEFAULT_OVERLAY, include_patient_data: bool = False) -> bytes:
    """A DICOM Secondary Capture Image of the run's overlay: de-identified in a new study, or (opt-in) a derived
    series in the source's study.

    Order of operations: (1) read the source header (``dcmread`` without ``force``, pixels skipped) and check
    that it is this run's input (SHA-256 against ``record["input"]["sha256"]`` when bytes are given); (2)
    render the overlay with legend and burn :data:`DISCLAIMER` in as a banner above it
    (:func:`app.rendering.burn_in_banner`); (3) build an
    ``highdicom.sc.SCImage`` (RGB, 8 bit, Explicit VR Little Endian) with new (0020,000E) Series and (0008,0018)
    SOP Instance UIDs and a new (0020,000D) Study Instance UID — the source's with ``include_patient_data``;
    (4) set (0008,0008) Image Type
    ``DERIVED\\SECONDARY\\OTHER``, (0028,0301) Burned In Annotation ``YES``, (0008,103E) Series Description
    :data:`SERIES_DESCRIPTION`, (0020,4000) Image Comments and (0008,2111) Derivation Description (the
    disclaimer and the run's parameters), and, with ``include_patient_data`` only, (0008,2112) Source Image
    Sequence and (0008,1140) Referenced Image Sequence naming the source's SOP Class/Instance UIDs; copy
    (0020,0020) Patient Orientation, the lossy
    compression flags (0028,2110)/(0028,2114) and, when ``input.png`` has the source's Rows × Columns,
    (0028,0030) Pixel Spacing; (5) patient and study identifiers — see below.

    Args:
        run_dir: A finished run folder whose input was ``source_dicom``.
        source_dicom: The original DICOM Part 10 bytes the run was made from, or its pydicom ``Dataset``
            (then the SHA-256 check is skipped).
        include_patient_data: ``False`` (default): de-identified in a new study — new Study Instance UID,
            Patient Name and Patient ID :data:`ANONYMOUS`; birth date, sex, accession number, study date/time,
            study ID and referring physician empty; no reference to the source image; (0012,0062) Patient
            Identity Removed ``YES`` and (0012,0063) De-identification Method. ``True``: a derived series in the
            original study — the source's Study Instance UID, the Source/Referenced Image Sequences, and the
            Patient module and the study-level identifiers (accession, dates, study ID/description, referring
            physician, age, size, weight) copied from the source, as a PACS expects for an object filed into
            the study.
        overlay: The display options, as for :func:`export_annotated_png`; ``lung_outline`` is refused (the
            outline is drawn on the annotated PNG only).

    Returns:
        The DICOM Part 10 bytes (SOP Class 1.2.840.10008.5.1.4.1.1.7, new UIDs on every call).

    Raises:
        ExportError: The source is not DICOM, not an image, or not this run's input; the run folder is
            incomplete or changed; an overlay option is out of range, or ``lung_outline`` is asked for.
    """
    # 1. read the run and the source header
    if overlay.lung_outline:
        raise ExportError("The lung outline is drawn on the annotated PNG only; export the Secondary Capture "
                          "without it.")
    record, _ = _read_record(run_dir)
    source = _read_source(source_dicom, record)
    original, amap = _read_map(run_dir, record)

    # 2. pixels: banner over overlay | legend
    pixels = np.ascontiguousarray(rendering.burn_in_banner(_render_overlay(original, amap, record, overlay)))

    # 3. the Secondary Capture itself
    same_frame = original.shape == (int(source.Rows), int(source.Columns))
    spacing = source.get("PixelSpacing") if same_frame else None
    facts = _run_facts(record)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID) if include_patient_data else hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="VALD-MD",
        manufacturer_model_name="VALD-MD counterfactual review",
        software_versions=__version__,
        series_description=SERIES_DESCRIPTION,
        patient_id=ANONYMOUS,
        patient_name=None,  # set below: highdicom warns about one-component names, which DICOM allows
        patient_birth_date=None,
        patient_sex=None,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None,
        # highdicom insists on an orientation for patient coordinates; the source's (or none) replaces it below
        patient_orientation=("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        specific_character_set="ISO_IR 192",  # UTF-8: prompts and copied names may be any script
    )

    # 4. derivation, references and flags
    sc.PatientName = ANONYMOUS
    sc.ConversionType = "WSD"  # rendered by a workstation, not digitised
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"{DISCLAIMER}. Overlay ({overlay.mode}) of {facts['map_label']}; red: density the "
                        "counterfactual removed.")
    derivation = (
        f"Attribution overlay ({facts['map_label']}) rendered by VALD-MD {__version__}. {DISCLAIMER}. "
        + "; ".join(f"{k}={v}" for k, v in facts.items())
    )
    sc.DerivationDescription = derivation[:1024]  # ST: at most 1024 characters
    if include_patient_data:  # a derived series in the source's study points at its source image
        sc.SourceImageSequence = [_source_reference(source)]
        sc.ReferencedImageSequence = [_source_reference(source)]
    else:
        sc.PatientIdentityRemoved = "YES"
        sc.DeidentificationMethod = DEIDENTIFICATION_METHOD
    del sc.PatientOrientation
    if source.get("PatientOrientation"):
        _copy_element(sc, source, "PatientOrientation")
    else:
        sc.add_new("PatientOrientation", "CS", "")  # Type 2: present, empty when the source does not say
    if source.get("LossyImageCompression") == "01":  # once lossy, every derived image says so (C.7.6.1.1.5)
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio"):
            _copy_element(sc, source, keyword)

    # 5. patient and study identifiers
    if include_patient_data:
        for keyword in _PATIENT_KEYWORDS + _STUDY_KEYWORDS:
            _copy_element(sc, source, keyword)
        logger.info("secondary capture includes the source's patient module (include_patient_data=True)")

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sc, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# 3. JSON record and 4. bundle
# --------------------------------------------------------------------------------------------------------------


def export_record_json(run_dir: Path) -> bytes:
    """The run's ``record.json``, byte for byte (after checking it parses).

    Raises:
        ExportError: The folder or its record is missing or not valid JSON.
    """
    _, data = _read_record(run_dir)
    return data


def _zip_time(record: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """The run's creation time (UTC) for every entry, so identical runs give identical archives."""
    try:
        t = datetime.fromisoformat(str(record.get("created_at")))
    except ValueError:
        return _ZIP_EPOCH
    return (t.year, t.month, t.day, t.hour, t.minute, t.second) if t.year >= 1980 else _ZIP_EPOCH


def _bundle_order(names: set[str]) -> list[str]:
    """``names`` that belong in a bundle, in bundle order (counterfactuals by sample index)."""
    cfs = sorted((n for n in names if _COUNTERFACTUAL.match(n)),
                 key=lambda n: int(_COUNTERFACTUAL.match(n).group(1) or 0))  # type: ignore[union-attr]
    return [n for n in _BUNDLE_HEAD if n in names] + cfs + [n for n in _BUNDLE_TAIL if n in names]


def export_bundle(run_dir: Path, source_dicom: bytes | Dataset | None = None, *,
                  overlay: OverlayOptions = _DEFAULT_OVERLAY, include_patient_data: bool = False) -> bytes:
    """A ZIP of the run: its artifacts, a freshly rendered ``annotated.png`` and, given a DICOM source,
    ``secondary-capture.dcm``.

    Entries, in this order when present: ``input.png``, ``counterfactual.png``, ``counterfactual-<i>.png``
    (by ``i``), ``reconstruction.png``, ``overlay.png``, ``annotated.png``, ``attribution.npy``,
    ``attribution_std.npy``, ``mask.png``, ``record.json``, ``secondary-capture.dcm``. PNGs are stored, the
    rest deflated; every entry is stamped with the run's ``created_at`` (UTC, even seconds); the archive comment is :data:`DISCLAIMER`. Artifacts
    are checked against ``record["artifacts_sha256"]``. Without a DICOM source the archive is deterministic;
    with one, the Secondary Capture's new UIDs and creation time differ on every call.

    Args:
        run_dir: A finished run folder.
        source_dicom: The run's source DICOM (bytes or Dataset), or ``None`` to leave the ``.dcm`` out.
        include_patient_data: Passed to :func:`export_secondary_capture`.
        overlay: The display options of ``annotated.png`` and ``secondary-capture.dcm`` in the archive, as for
            :func:`export_annotated_png` (the review page passes the ones on screen, so the archive's image is
            the one the reader saw); ``lung_outline`` applies to ``annotated.png`` only.

    Returns:
        ZIP bytes.

    Raises:
        ExportError: As for the individual exports.
    """
    # 1. collect the entries
    record, record_bytes = _read_record(run_dir)
    entries: dict[str, bytes] = {}
    on_disk = {p.name for p in Path(run_dir).iterdir() if p.is_file()} - {"annotated.png", "secondary-capture.dcm"}
    for name in _bundle_order(on_disk):  # exports are made afresh below, never taken from the folder
        entries[name] = record_bytes if name == "record.json" else _read_artifact(run_dir, name, record)
    entries["annotated.png"] = export_annotated_png(run_dir, overlay)
    if source_dicom is not None:
        entries["secondary-capture.dcm"] = export_secondary_capture(
            run_dir, source_dicom, overlay=replace(overlay, lung_outline=False),
            include_patient_data=include_patient_data)

    # 2. write them in a fixed order with fixed metadata
    stamp = _zip_time(record)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in _bundle_order(set(entries)):
            info = zipfile.ZipInfo(name, date_time=stamp)
            # PNGs are deflate-compressed already; deflating them again costs time and saves nothing
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr means the same on every platform
            info.external_attr = 0o100644 << 16
            zf.writestr(info, entries[name], compresslevel=6)
        zf.comment = DISCLAIMER.encode()
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# One entry point for the web and the CLI
# --------------------------------------------------------------------------------------------------------------


def build_export(run_dir: Path, kind: str, source_dicom: bytes | Dataset | None = None, *,
                 overlay: OverlayOptions | None = None, include_patient_data: bool = False) -> tuple[bytes, str]:
    """Make one export of a run folder in memory; writes nothing.

    Args:
        run_dir: A finished run folder.
        kind: One of :data:`EXPORT_KINDS`.
        source_dicom: The run's source DICOM; required for ``"secondary-capture.dcm"``, optional for
            ``"bundle.zip"``, ignored otherwise.
        overlay: The display options (``annotated.png``, ``secondary-capture.dcm``, ``bundle.zip``; ``None``:
            the defaults); ``lung_outline`` for ``annotated.png`` and ``bundle.zip`` only.
        include_patient_data: ``secondary-capture.dcm`` and ``bundle.zip`` only.

    Returns:
        ``(content, media type)``, e.g. ``(b"\\x89PNG...", "image/png")``.

    Raises:
        ExportError: An unknown kind or option, a missing DICOM source, or any error of the export itself.
    """
    if kind not in EXPORT_KINDS:
        raise ExportError(f"unknown export kind {kind!r}; choose one of {', '.join(EXPORT_KINDS)}.")
    unknown = [name for name, given, kinds in (("overlay", overlay is not None, OVERLAY_KINDS),
                                               ("lung_outline", overlay is not None and overlay.lung_outline,
                                                LUNG_OUTLINE_KINDS),
                                               ("include_patient_data", include_patient_data, _WITH_PATIENT_DATA))
               if given and kind not in kinds]
    if unknown:
        raise ExportError(f"option(s) {', '.join(unknown)} do not apply to {kind}; overlay options apply to "
                          f"{', '.join(OVERLAY_KINDS)}, lung_outline to {', '.join(LUNG_OUTLINE_KINDS)}, "
                          f"include_patient_data to {', '.join(_WITH_PATIENT_DATA)}.")
    run_dir = Path(run_dir)
    overlay = overlay or _DEFAULT_OVERLAY
    if kind == "annotated.png":
        content = export_annotated_png(run_dir, overlay)
    elif kind == "secondary-capture.dcm":
        if source_dicom is None:
            raise ExportError(
                "A DICOM Secondary Capture needs the run's source DICOM file, and none was supplied; runs made "
                "from a PNG or JPEG can only be exported as PNG, JSON or ZIP."
            )
        content = export_secondary_capture(run_dir, source_dicom, overlay=overlay,
                                           include_patient_data=include_patient_data)
    elif kind == "record.json":
        content = export_record_json(run_dir)
    else:
        content = export_bundle(run_dir, source_dicom, overlay=overlay, include_patient_data=include_patient_data)
    return content, MEDIA_TYPES[kind]


def save_export(run_dir: Path, kind: str, dest: Path | None = None, source_dicom: bytes | Dataset | None = None,
                *, overlay: OverlayOptions | None = None, include_patient_data: bool = False) -> Path:
    """Make one export and write it atomically (temporary file in the same folder, fsync, rename).

    Args:
        run_dir: A finished run folder.
        kind: One of :data:`EXPORT_KINDS`.
        dest: The file to write; default ``run_dir / "exports" / kind``.
        source_dicom, overlay, include_patient_data: As for :func:`build_export`.

    Returns:
        The path written.

    Raises:
        ExportError: As for :func:`build_export`. OSError: The destination cannot be written.
    """
    content, _ = build_export(run_dir, kind, source_dicom, overlay=overlay, include_patient_data=include_patient_data)
    path = Path(dest) if dest is not None else Path(run_dir) / "exports" / kind
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
