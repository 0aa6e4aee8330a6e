"""Exports of one finished review run folder (see :mod:`app.runs.folder` for what the folder holds).

=========================  ================================================================================
``annotated.png``          burned-in banner, original | overlay with legend, the run's parameters; the same
                           parameters in PNG text chunks (``vald_md:*``, ``Disclaimer``). No patient data.
``secondary-capture.dcm``  DICOM Secondary Capture of the overlay (RGB, banner and legend burned in): by default
                           de-identified in a study of its own; on request a derived series in the source's
                           study, referencing the source image. DICOM inputs only (:mod:`app.runs.dicom_sc`).
``record.json``            the run's ``record.json``, byte for byte.
``bundle.zip``             every artifact plus ``annotated.png`` (and the ``.dcm`` when a source is given),
                           in a fixed order with fixed timestamps, so identical runs give identical archives.
=========================  ================================================================================

The overlay is re-rendered from the run's files (:mod:`app.runs.read`), so display options can differ from
``overlay.png``. Every artifact is read through :class:`app.runs.folder.RunFolder`, which checks it against
``record.json``'s SHA-256 first: a run folder edited after the run is refused (:class:`ExportChangedError`)
rather than exported under the record's name.

Patient data: the annotated PNG and the record carry none; the Secondary Capture is de-identified unless asked
otherwise (:mod:`app.runs.dicom_sc`).

Nothing here writes files except :func:`save_export`, which writes atomically (:func:`app.fileio.write_atomic`,
fsynced).
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Collection
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from app import __version__, rendering
from app.fileio import sha256_bytes, write_atomic
from app.rendering import OverlayOptions
from app.runs import folder as names
from app.runs.dicom_sc import (
    ANONYMOUS,
    DEIDENTIFICATION_METHOD,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    export_secondary_capture,
)
from app.runs.read import (
    DEFAULT_OVERLAY,
    DISCLAIMER,
    MODEL_HASH_PREFIX,
    THRESHOLD_NORMAL,
    ExportChangedError,
    ExportError,
    open_run,
    read_artifact,
    read_lung_mask,
    read_map,
    region_text,
    render_overlay,
    run_facts,
)
from app.runs.record import COUNTERFACTUAL_EDITS, MAP_METHODS, MAP_POLARITIES, RunRecord

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "ANONYMOUS",
    "DEIDENTIFICATION_METHOD",
    "DISCLAIMER",
    "EXPORT_KINDS",
    "LUNG_OUTLINE_KINDS",
    "MEDIA_TYPES",
    "MODEL_HASH_PREFIX",
    "OVERLAY_KINDS",
    "SERIES_DESCRIPTION",
    "SERIES_NUMBER",
    "THRESHOLD_NORMAL",
    "ExportChangedError",
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

EXPORT_KINDS = ("annotated.png", "secondary-capture.dcm", "record.json", "bundle.zip")
MEDIA_TYPES = {
    "annotated.png": "image/png",
    "secondary-capture.dcm": "application/dicom",
    "record.json": "application/json",
    "bundle.zip": "application/zip",
}
OVERLAY_KINDS = ("annotated.png", "secondary-capture.dcm", "bundle.zip")
"""The exports drawn with overlay options (:class:`app.rendering.OverlayOptions`)."""
LUNG_OUTLINE_KINDS = ("annotated.png", "bundle.zip")
"""The exports whose ``annotated.png`` can draw the lung outline (``OverlayOptions.lung_outline``)."""
_WITH_PATIENT_DATA = ("secondary-capture.dcm", "bundle.zip")
# Bundle order: the run's files as app.runs.folder lists them, then the exports made here.
_BUNDLE_HEAD = (names.INPUT,)
_BUNDLE_TAIL = (names.RECONSTRUCTION, names.OVERLAY, "annotated.png", names.ATTRIBUTION, names.ATTRIBUTION_STD,
                names.MASK, names.LUNG_MASK, names.RECORD, "secondary-capture.dcm")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a ZIP entry can carry
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------------
# Parameters shown
# --------------------------------------------------------------------------------------------------------------


def _display_params(facts: dict[str, str], overlay: dict[str, str], region: str) -> dict[str, str]:
    """Human-readable parameter lines for the burned-in block, in reading order.

    ``region`` is :func:`app.runs.read.region_text`'s."""
    model, smoothing = facts["model_hash"], facts.get("map_smoothing", "0")
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
        # a smoothed map says so; the exports of unsmoothed maps stay as they were
        **({"Map smoothing": f"Gaussian, sigma {smoothing} px in the model's frame"}
           if smoothing not in ("0", "n/a") else {}),
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


def export_annotated_png(run_dir: Path, overlay: OverlayOptions = DEFAULT_OVERLAY) -> bytes:
    """An annotated PNG of the run: banner, original | overlay with legend, and the run's parameters.

    The banner :data:`DISCLAIMER` is burned in across the top (by
    :func:`app.rendering.render_annotated_export`). The same facts are written as PNG text chunks (tEXt, or
    iTXt where the value is not Latin-1): ``vald_md:prompt``, ``vald_md:negative_prompt``, ``vald_md:strength``,
    ``vald_md:guidance_scale``, ``vald_md:steps``, ``vald_md:effective_steps``, ``vald_md:seed`` (all sample
    seeds, comma-separated), ``vald_md:scheduler``, ``vald_md:samples``, ``vald_md:reference``,
    ``vald_md:map_label`` (:func:`app.rendering.map_label`), ``vald_md:map_scale`` (calibrated or relative),
    ``vald_md:smoothing_sigma``, ``vald_md:map_smoothing`` (Gaussian sigma in model-frame pixels, 0 = none),
    ``vald_md:map_region`` (``lungs``, ``user_mask`` or ``whole_image``), ``vald_md:counterfactual`` (``first
    sample``, or ``edited where the map is above normal``: the record's ``counterfactual_edit``),
    ``vald_md:map_method``, ``vald_md:map_polarity``, ``vald_md:counterfactual_edit`` (``map_region`` or
    ``redraw``, as requested), ``vald_md:lung_mask`` (``true``/``false``: the map restricted to the lungs when a
    segmenter is loaded), ``vald_md:classifier_scale`` (classifier-guided runs; else ``n/a``),
    ``vald_md:model_hash`` (full SHA-256), ``vald_md:created_at``,
    ``vald_md:overlay`` (JSON of the display options), ``vald_md:record_sha256`` (of ``record.json``), plus
    ``Disclaimer`` and ``Software``. Neither the pixels nor the chunks hold patient data or the folder's path.
    The output is deterministic: the same run and options give the same bytes.

    Args:
        run_dir: A finished run folder (see :mod:`app.runs.folder`).
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
    run = open_run(run_dir)
    record = run.record()
    original, amap = read_map(run)

    # 2. overlay and the composed image
    pixels = render_overlay(original, amap, record, overlay)
    if overlay.lung_outline:
        pixels = rendering.draw_mask_outline(pixels, read_lung_mask(run, original.shape))
    facts = run_facts(record)
    overlay_facts = _overlay_facts(overlay)
    image = rendering.render_annotated_export(
        original, pixels, params=_display_params(facts, overlay_facts, region_text(record)),
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
    info.add_text("vald_md:record_sha256", sha256_bytes(run.record_bytes()))

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
        ``None``), "scheduler", "samples", "map_method", "map_polarity", "map_smoothing" (sigma, model-frame px),
        "counterfactual_edit", "lung_mask" (bool), "classifier_scale", "map_region" (``lungs``, ``user_mask`` or
        ``whole_image``: a drawn mask itself is not in the file), "model_hash", "created_at", "record_sha256",
        "overlay"}`` for an annotated export, else ``None``. Values the chunks do not hold (``n/a``, or exports
        made before a key existed) are ``None`` (``""`` for the negative prompt); a value outside the choices the
        form offers is ``None`` too, so a crafted file cannot put one into the form.
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

    def choice(key: str, allowed: Collection[str]) -> str | None:
        value = chunks.get(key)
        return value if value in allowed else None

    negative = chunks.get("negative_prompt", "")
    lung_mask = chunks.get("lung_mask")
    return {"prompt": chunks["prompt"], "negative_prompt": "" if negative == "n/a" else negative,
            "strength": number("strength", float), "guidance_scale": number("guidance_scale", float),
            "steps": number("steps", int), "seed": int(seed_text) if seed_text.isdigit() else None,
            "scheduler": chunks.get("scheduler"), "samples": number("samples", int),
            "map_method": choice("map_method", MAP_METHODS), "map_polarity": choice("map_polarity", MAP_POLARITIES),
            "map_smoothing": number("map_smoothing", float),
            "counterfactual_edit": choice("counterfactual_edit", COUNTERFACTUAL_EDITS),
            "lung_mask": {"true": True, "false": False}.get(lung_mask or ""),
            "classifier_scale": number("classifier_scale", float),
            "map_region": choice("map_region", ("lungs", "user_mask", "whole_image")),
            "model_hash": chunks.get("model_hash"), "created_at": chunks.get("created_at"),
            "record_sha256": chunks.get("record_sha256"), "overlay": overlay if isinstance(overlay, dict) else {}}


# --------------------------------------------------------------------------------------------------------------
# 2. DICOM Secondary Capture
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# 3. JSON record and 4. bundle
# --------------------------------------------------------------------------------------------------------------


def export_record_json(run_dir: Path) -> bytes:
    """The run's ``record.json``, byte for byte (after checking it parses).

    Raises:
        ExportError: The folder or its record is missing or not valid JSON.
    """
    return open_run(run_dir).record_bytes()


def _zip_time(record: RunRecord) -> tuple[int, int, int, int, int, int]:
    """The run's creation time (UTC) for every entry, so identical runs give identical archives."""
    try:
        t = datetime.fromisoformat(str(record.created_at))
    except ValueError:
        return _ZIP_EPOCH
    return (t.year, t.month, t.day, t.hour, t.minute, t.second) if t.year >= 1980 else _ZIP_EPOCH


def _bundle_order(files: set[str]) -> list[str]:
    """``files`` that belong in a bundle, in bundle order (counterfactuals by sample index)."""
    cfs = sorted((n for n in files if names.counterfactual_index(n) is not None), key=names.counterfactual_order)
    return [n for n in _BUNDLE_HEAD if n in files] + cfs + [n for n in _BUNDLE_TAIL if n in files]


def export_bundle(run_dir: Path, source_dicom: bytes | Dataset | None = None, *,
                  overlay: OverlayOptions = DEFAULT_OVERLAY, include_patient_data: bool = False) -> bytes:
    """A ZIP of the run: its artifacts, a freshly rendered ``annotated.png`` and, given a DICOM source,
    ``secondary-capture.dcm``.

    Entries, in this order when present: ``input.png``, ``counterfactual.png``, ``counterfactual-<i>.png``
    (by ``i``), ``reconstruction.png``, ``overlay.png``, ``annotated.png``, ``attribution.npy``,
    ``attribution_std.npy``, ``mask.png``, ``record.json``, ``secondary-capture.dcm``. PNGs are stored, the
    rest deflated; every entry is stamped with the run's ``created_at`` (UTC, even seconds); the archive comment
    is :data:`DISCLAIMER`. Artifacts are checked against ``record["artifacts_sha256"]``. Without a DICOM source the
    archive is deterministic; with one, the Secondary Capture's new UIDs and creation time differ on every call.

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
    run = open_run(run_dir)
    record = run.record()
    entries: dict[str, bytes] = {}
    written = {*run.names(), names.RECORD} - {"annotated.png", "secondary-capture.dcm"}
    for name in _bundle_order(written):  # exports are made afresh below, never taken from the folder
        entries[name] = read_artifact(run, name)
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
    overlay = overlay or DEFAULT_OVERLAY
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
    """Make one export and write it atomically (:func:`app.fileio.write_atomic`: owner-only, fsynced).

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
    return write_atomic(path, content, fsync=True)
