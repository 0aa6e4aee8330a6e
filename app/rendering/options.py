"""What an overlay shows: the one :class:`OverlayOptions` value, its modes and thresholds, the scale drawn at full
colour, and the map's name in words (:func:`map_label`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.attribution import MAP_POLARITIES, AttributionMap, check_choice
from app.mapscale import DEFAULT_THRESHOLD_FOLD, FULL_SCALE_FOLD

__all__ = [
    "DEFAULT_SCALE_PERCENTILE", "LEGEND_POSITIONS", "MIN_CONTOUR_OPACITY", "OVERLAY_MODES", "THRESHOLD_MODES",
    "THRESHOLD_NORMAL", "OverlayOptions", "check_opacity", "check_scale", "display_scale", "map_label",
    "resolve_threshold",
]

OVERLAY_MODES = ("magnitude", "signed", "outline", "stability")
LEGEND_POSITIONS = ("right", "bottom")
THRESHOLD_NORMAL = "normal"
"""``threshold_mode`` of a threshold given as an x-fold of the model's normal level (calibrated runs only)."""
THRESHOLD_MODES = ("percentile", "absolute", THRESHOLD_NORMAL)
DEFAULT_SCALE_PERCENTILE = 99.5
"""Percentile of the map (inside the mask) that maps to full opacity when no fixed scale is given."""
MIN_CONTOUR_OPACITY = 0.85
"""Least opacity of the outline mode's contour while the overlay is shown (opacity > 0): a 1-2 px line blended at
the 0.3-0.6 that suits a filled map fades into a bright lung field, and a line hides next to nothing of the image
below it. At opacity 0 (the overlay hidden) nothing is drawn."""

_REFERENCE_NAMES = {"input": "original", "reconstruction": "autoencoder reconstruction"}


def map_label(reference: str | None, map_method: str | None = None, polarity: str | None = None) -> str:
    """What the map is the difference of, in words: ``"<reference> − counterfactual"``.

    The one source of the map's name for the viewer, the legend, the exports and the docs. ``reference`` is the
    run's map reference (``"input"`` → the original; ``"reconstruction"`` → the autoencoder's reconstruction of
    it), except for ``map_method="ddim_inversion"``, whose reference is always the DDIM reconstruction from the
    same inverted latent. ``None`` (records from before the reference was recorded) reads as ``"input"``.
    ``polarity`` ``"removed"`` (only the positive part kept) names that:
    ``"max(<reference> − counterfactual, 0): density removed"``; ``"both"`` and ``None`` (records from before
    the polarity was recorded) leave the name as it is. A run's label: :attr:`app.runs.record.RunRecord.label`.
    """
    if map_method == "ddim_inversion":
        label = "DDIM reconstruction − counterfactual"
    else:
        name = _REFERENCE_NAMES.get(reference or "input")
        if name is None:
            raise ValueError(f"reference must be one of {tuple(_REFERENCE_NAMES)}; got {reference!r}.")
        label = f"{name} − counterfactual"
    if polarity is None:
        return label
    check_choice("polarity", polarity, MAP_POLARITIES)
    return f"max({label}, 0): density removed" if polarity == "removed" else label


def check_opacity(opacity: float) -> None:
    """Refuse an opacity outside [0, 1] (or not finite), saying what to give instead."""
    if not math.isfinite(opacity) or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1]; got {opacity!r}. Use e.g. 0.6 (60 %).")


def check_scale(scale: float | None) -> None:
    """Refuse a full-colour scale that is not a positive finite intensity difference (``None`` passes)."""
    if scale is not None and (not math.isfinite(scale) or scale <= 0):
        raise ValueError(
            f"scale must be a positive intensity difference (e.g. 0.2) or None for the map's own "
            f"{DEFAULT_SCALE_PERCENTILE}th percentile; got {scale!r}."
        )


@dataclass(frozen=True)
class OverlayOptions:
    """The display options of one overlay, from the web's query string (or an export's caller) to the pixels.

    Attributes:
        opacity: Maximum overlay opacity in [0, 1].
        threshold: Hide values below this; ``None`` shows every value. Its unit is ``threshold_mode``'s; in
            outline mode, the level of the contour.
        threshold_mode: ``"percentile"`` (in [0, 100], of the displayed values inside the mask), ``"absolute"``
            (intensity units) or ``"normal"`` (an x-fold of the model's normal level; calibrated runs only).
        mode: ``"magnitude"``, ``"signed"``, ``"outline"`` or ``"stability"`` (several samples only).
        scale: Value (intensity units) drawn at full opacity, or ``None`` for the run's scale (calibrated: 2x the
            normal level; else the map's own 99.5th percentile). The exports always use the run's scale.
        legend: Append the colour bar (the exports always do).
        lung_outline: Draw the lung mask's outline in green; :func:`render_overlay` has no mask and leaves it to
            its caller (the annotated export draws it with :func:`draw_mask_outline`).
    """

    opacity: float = 0.6
    threshold: float | None = None
    threshold_mode: str = "percentile"
    mode: str = "magnitude"
    scale: float | None = None
    legend: bool = False
    lung_outline: bool = False


def resolve_threshold(options: OverlayOptions, normal_level: float | None) -> tuple[float | None, str]:
    """``(threshold, threshold_mode)`` in the units :func:`app.attribution.threshold_value` takes
    (``"percentile"`` or ``"absolute"``).

    A ``"normal"`` threshold becomes ``threshold`` × ``normal_level`` (absolute; no threshold stays none); on a
    calibrated run (``normal_level`` given) the outline without a threshold is drawn at
    ``DEFAULT_THRESHOLD_FOLD`` × the level; anything else is returned as given.

    Raises:
        ValueError: ``"normal"`` without a ``normal_level`` (an uncalibrated run), or an unknown mode.
    """
    check_choice("threshold_mode", options.threshold_mode, THRESHOLD_MODES)
    threshold, mode = options.threshold, options.threshold_mode
    if mode == THRESHOLD_NORMAL:
        if normal_level is None:
            raise ValueError("threshold_mode 'normal' needs a run read against a calibrated model (map_summary."
                             "scale.kind 'calibrated'); give a percentile or an absolute threshold instead.")
        threshold, mode = (None, "percentile") if threshold is None else (threshold * normal_level, "absolute")
    if normal_level is not None and options.mode == "outline" and threshold is None:
        threshold, mode = DEFAULT_THRESHOLD_FOLD * normal_level, "absolute"
    return threshold, mode


def display_scale(amap: AttributionMap, *, mode: str = "magnitude", scale: float | None = None,
                  normal_level: float | None = None) -> float:
    """The value drawn at full colour (intensity units), as :func:`render_overlay` picks it: ``scale`` when
    given; else ``FULL_SCALE_FOLD`` × the calibrated ``normal_level`` (not for the stability map); else the
    displayed values' own :data:`DEFAULT_SCALE_PERCENTILE`-th percentile inside the mask."""
    if scale is not None:
        return scale
    if normal_level is not None and mode != "stability":
        return FULL_SCALE_FOLD * normal_level
    values = amap.std if mode == "stability" and amap.std is not None else amap.magnitude
    return float(np.percentile(values[amap.region_mask()], DEFAULT_SCALE_PERCENTILE))
