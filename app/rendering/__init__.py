"""Rendering of attribution maps: the red overlay over the original, its legend, and the annotated export.

Pure numpy/scipy/Pillow, arrays in and uint8 RGB arrays out, as :mod:`app.attribution` whose maps it draws. The
display options travel as one :class:`OverlayOptions` value, from the web's query string (or the export's caller)
to the pixels. Every export carries the burned-in :data:`BANNER_TEXT`, drawn by the one :func:`render_banner`.

One concern per module, imports flowing one way (``palette`` and ``fonts`` at the bottom):

* :mod:`app.rendering.options`: :class:`OverlayOptions`, modes, thresholds, the full-colour scale, :func:`map_label`;
* :mod:`app.rendering.overlay`: :func:`render_overlay`, the map over the original;
* :mod:`app.rendering.legend`: :func:`render_legend`, the colour bar;
* :mod:`app.rendering.outline`: the lung outline (:func:`mask_outline` and its drawings);
* :mod:`app.rendering.export`: the banner and the annotated export;
* :mod:`app.rendering.palette` and :mod:`app.rendering.fonts`: the colours, and text drawn with Pillow.
"""

from __future__ import annotations

from typing import Any

from app.rendering.export import BANNER_TEXT, burn_in_banner, render_annotated_export, render_banner
from app.rendering.legend import render_legend
from app.rendering.options import (
    DEFAULT_SCALE_PERCENTILE,
    LEGEND_POSITIONS,
    MIN_CONTOUR_OPACITY,
    OVERLAY_MODES,
    THRESHOLD_MODES,
    THRESHOLD_NORMAL,
    OverlayOptions,
    display_scale,
    map_label,
    resolve_threshold,
)
from app.rendering.outline import draw_mask_outline, mask_outline, render_mask_outline_rgba
from app.rendering.overlay import render_overlay
from app.rendering.palette import OUTLINE_COLOUR

__all__ = [
    "BANNER_TEXT",
    "DEFAULT_SCALE_PERCENTILE",
    "LEGEND_POSITIONS",
    "MIN_CONTOUR_OPACITY",
    "OUTLINE_COLOUR",
    "OVERLAY_MODES",
    "THRESHOLD_MODES",
    "THRESHOLD_NORMAL",
    "OverlayOptions",
    "burn_in_banner",
    "display_scale",
    "draw_mask_outline",
    "map_label",
    "map_label_of_record",
    "mask_outline",
    "render_annotated_export",
    "render_banner",
    "render_legend",
    "render_mask_outline_rgba",
    "render_overlay",
    "resolve_threshold",
]


# compatibility: the label of a run moved to ``app.runs.record.RunRecord.label`` (issue 17); this reads the record's
# dict as before, for callers that hold ``record.json`` as a dict.
def map_label_of_record(record: dict[str, Any]) -> str:
    """:func:`map_label` of a run's ``record.json`` dict (``request.reference``; ``map_method``, else
    ``request.map_method``; ``request.map_polarity``), as ``RunRecord.label`` reads it."""
    request = record.get("request") or {}
    return map_label(request.get("reference"), record.get("map_method") or request.get("map_method"),
                     request.get("map_polarity"))
