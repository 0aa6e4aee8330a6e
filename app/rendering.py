"""Rendering of attribution maps: the red overlay over the original, its legend, and the annotated export.

Pure numpy/scipy/Pillow, arrays in and uint8 RGB arrays out, as :mod:`app.attribution` whose maps it draws. The
display options travel as one :class:`OverlayOptions` value, from the web's query string (or the export's caller)
to the pixels. Every export carries the burned-in :data:`BANNER_TEXT`, drawn by the one :func:`render_banner`.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from app.attribution import (
    DEFAULT_THRESHOLD_PERCENTILE,
    AttributionMap,
    changed_region,
    check_choice,
    check_threshold,
    check_unit_image,
    threshold_value,
)
from app.mapscale import DEFAULT_THRESHOLD_FOLD, FULL_SCALE_FOLD

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
    "mask_outline",
    "render_annotated_export",
    "render_banner",
    "render_legend",
    "render_mask_outline_rgba",
    "render_overlay",
    "resolve_threshold",
]

RGBImage = NDArray[np.uint8]
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

OVERLAY_MODES = ("magnitude", "signed", "outline", "stability")
LEGEND_POSITIONS = ("right", "bottom")
THRESHOLD_NORMAL = "normal"
"""``threshold_mode`` of a threshold given as an x-fold of the model's normal level (calibrated runs only)."""
THRESHOLD_MODES = ("percentile", "absolute", THRESHOLD_NORMAL)
DEFAULT_SCALE_PERCENTILE = 99.5
"""Percentile of the map (inside the mask) that maps to full opacity when no fixed scale is given."""
BANNER_TEXT = "AI-generated counterfactual — not for diagnostic use"
OUTLINE_COLOUR = (0, 230, 118)
"""The lung outline's colour (RGB): green, so that it is never mistaken for the map's red, blue or amber."""
MIN_CONTOUR_OPACITY = 0.85
"""Least opacity of the outline mode's contour while the overlay is shown (opacity > 0): a 1-2 px line blended at
the 0.3-0.6 that suits a filled map fades into a bright lung field, and a line hides next to nothing of the image
below it. At opacity 0 (the overlay hidden) nothing is drawn."""

# Overlay hues, RGB in [0, 1]. Blue is lightened because pure blue vanishes over dark lung fields; the
# stability map gets its own hue so uncertainty is never mistaken for attribution.
_RED = (1.0, 0.0, 0.0)
_BLUE = (0.15, 0.45, 1.0)
_AMBER = (1.0, 0.75, 0.0)
_RED_U8 = (255, 0, 0)
_LEGEND_BACKGROUND = (24, 24, 24)
_LEGEND_TEXT = (235, 235, 235)
_EXPORT_BACKGROUND = (16, 16, 16)
_BANNER_BACKGROUND = (255, 196, 0)
_BANNER_TEXT_COLOUR = (0, 0, 0)
_CAPTIONS = {
    "magnitude": "|{map}|",
    "signed": "{map} (red: removed, blue: added)",
    "stability": "per-pixel SD of {map} across samples",
    "outline": "outline: |{map}| ≥ threshold",
}
_FOLD_CAPTION = "x-fold of the normal range"
_RELATIVE_CAPTION = "relative (per-image) scale"
_REFERENCE_NAMES = {"input": "original", "reconstruction": "autoencoder reconstruction"}


def map_label(reference: str | None, map_method: str | None = None) -> str:
    """What the map is the difference of, in words: ``"<reference> − counterfactual"``.

    The one source of the map's name for the viewer, the legend, the exports and the docs. ``reference`` is the
    run's map reference (``"input"`` → the original; ``"reconstruction"`` → the autoencoder's reconstruction of
    it), except for ``map_method="ddim_inversion"``, whose reference is always the DDIM reconstruction from the
    same inverted latent. ``None`` (records from before the reference was recorded) reads as ``"input"``.
    A run's label: :attr:`app.runs.record.RunRecord.label`.
    """
    if map_method == "ddim_inversion":
        return "DDIM reconstruction − counterfactual"
    name = _REFERENCE_NAMES.get(reference or "input")
    if name is None:
        raise ValueError(f"reference must be one of {tuple(_REFERENCE_NAMES)}; got {reference!r}.")
    return f"{name} − counterfactual"


def _check_opacity(opacity: float) -> None:
    if not math.isfinite(opacity) or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1]; got {opacity!r}. Use e.g. 0.6 (60 %).")



def _check_scale(scale: float | None) -> None:
    if scale is not None and (not math.isfinite(scale) or scale <= 0):
        raise ValueError(
            f"scale must be a positive intensity difference (e.g. 0.2) or None for the map's own "
            f"{DEFAULT_SCALE_PERCENTILE}th percentile; got {scale!r}."
        )



# --------------------------------------------------------------------------------------------------------------
# Overlay rendering
# --------------------------------------------------------------------------------------------------------------


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


def render_overlay(
    original: ArrayLike,
    amap: AttributionMap,
    options: OverlayOptions = OverlayOptions(),
    *,
    legend_position: str = "right",
    normal_level: float | None = None,
    label: str = "reference − counterfactual",
) -> RGBImage:
    """Draw the map over the grayscale original.

    Order of operations: (1) pick the displayed values: |M| (``magnitude``, ``signed``, ``outline``) or the
    sample SD (``stability``); (2) scale: the given absolute value, else the values' own
    :data:`DEFAULT_SCALE_PERCENTILE`-th percentile inside the mask — unless the model's calibrated
    ``normal_level`` is given, when |M| is drawn against it (full colour at ``FULL_SCALE_FOLD`` × the level, see
    :mod:`app.mapscale`; the stability map keeps its own percentile); (3) ``alpha = opacity * clip(v / scale,
    0, 1)``, zero outside the mask and, with a threshold, below it; (4) blend ``(1 − alpha) * gray +
    alpha * hue`` — red for magnitude and positive M, blue for negative M, amber for stability; in outline
    mode the contour (1 px below 512 px, else 2 px) of the thresholded region is drawn in red at ``opacity``, but
    at least :data:`MIN_CONTOUR_OPACITY` (a thin line must not fade away; none at opacity 0);
    (5) optionally append a legend.

    Args:
        original: The original image, float ``(H, W)`` in [0, 1].
        amap: The map, same ``(H, W)``.
        options: The display options (:class:`OverlayOptions`; ``lung_outline`` is the caller's to draw).
            ``scale``: a fixed value makes overlays comparable across images. ``threshold``: in stability mode
            it applies to the SD map; in outline mode it is the contour's level (default
            :data:`DEFAULT_THRESHOLD_PERCENTILE`, or on a calibrated run ``DEFAULT_THRESHOLD_FOLD`` × the
            normal level: :func:`resolve_threshold`).
        legend_position: ``"right"`` (output ``(H, W + L, 3)``) or ``"bottom"`` (``(H + L, W, 3)``).
        normal_level: The model's normal level (1×, intensity units; ``MapCalibration.level``) or ``None`` for
            an uncalibrated model: the legend then says "relative (per-image) scale".
        label: What the map is the difference of, for the legend (:func:`map_label`).

    Returns:
        uint8 RGB ``(H, W, 3)``, wider or taller with a legend.

    Raises:
        ValueError: On shape mismatch, non-finite input, a bad opacity/scale/threshold/mode, a ``"normal"``
            threshold without a ``normal_level``, or ``mode="stability"`` for a single-sample map.
    """
    # 1. check inputs
    opacity, scale, mode, legend = options.opacity, options.scale, options.mode, options.legend
    img = check_unit_image("original", original)
    if img.shape != amap.shape:
        raise ValueError(
            f"original has shape {img.shape} but the map is {amap.shape}; render over the image the map was "
            "computed from (native frame)."
        )
    _check_opacity(opacity)
    _check_scale(scale)
    _check_scale(normal_level)
    check_choice("mode", mode, OVERLAY_MODES)
    check_choice("legend_position", legend_position, LEGEND_POSITIONS)
    threshold, threshold_mode = resolve_threshold(options, normal_level)
    if threshold is not None:
        check_threshold(threshold, threshold_mode)
    if mode == "stability" and amap.std is None:
        raise ValueError("mode='stability' needs a map from several samples (S > 1); pass (S, H, W) counterfactuals.")

    # 2. displayed values and their scale
    values = amap.std if mode == "stability" and amap.std is not None else amap.magnitude
    region = amap.region_mask()
    unit = normal_level if mode != "stability" else None
    used_scale = display_scale(amap, mode=mode, scale=scale, normal_level=normal_level)

    # 3. alpha
    if mode == "outline":
        level = DEFAULT_THRESHOLD_PERCENTILE if threshold is None else threshold
        contour_level = threshold_value(values, threshold=level, mode=threshold_mode, mask=amap.mask)
        thr: float | None = contour_level
        changed = changed_region(values, contour_level, amap.mask)
        width = 1 if min(img.shape) < 512 else 2
        contour = changed & ~ndimage.binary_erosion(changed, iterations=width, border_value=0)
        # the contour stays visible at any opacity the reader chose (MIN_CONTOUR_OPACITY), hidden only at 0
        alpha = contour.astype(np.float32) * (max(opacity, MIN_CONTOUR_OPACITY) if opacity > 0 else 0.0)
    else:
        thr = None
        visible = region
        if threshold is not None:
            thr = threshold_value(values, threshold=threshold, mode=threshold_mode, mask=amap.mask)
            visible = changed_region(values, thr, amap.mask)
        ratio = values / used_scale if used_scale > 0 else np.zeros_like(values)
        alpha = (opacity * np.clip(ratio, 0.0, 1.0) * visible).astype(np.float32)

    # 4. blend
    hue = np.empty((*img.shape, 3), dtype=np.float32)
    if mode == "stability":
        hue[:] = _AMBER
    elif mode == "signed":
        hue[:] = np.where((amap.signed >= 0)[..., None], np.asarray(_RED), np.asarray(_BLUE))
    else:
        hue[:] = _RED
    a = alpha[..., None]
    rgb = (1.0 - a) * img[..., None] + a * hue
    out = _to_uint8(rgb)

    # 5. legend
    if legend:
        length = out.shape[0] if legend_position == "right" else out.shape[1]
        bar = render_legend(length, used_scale, mode, position=legend_position, opacity=opacity, threshold=thr,
                            unit=unit, relative=scale is None and unit is None, label=label)
        out = np.concatenate([out, bar], axis=1 if legend_position == "right" else 0)
    return out


# --------------------------------------------------------------------------------------------------------------
# Region outlines (the lung mask drawn over an image)
# --------------------------------------------------------------------------------------------------------------


def _check_mask_shape(mask: ArrayLike) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError(f"mask must be a 2-D (H, W) array; got shape {m.shape}.")
    return m.astype(bool, copy=False)


def mask_outline(mask: ArrayLike, *, width: int | None = None) -> NDArray[np.bool_]:
    """The inner boundary band of a region: pixels inside ``mask`` within ``width`` pixels of its edge.

    Args:
        mask: bool or 0/1 ``(H, W)``. The image border counts as outside, so a region touching it is closed.
        width: band width in pixels (>= 1); ``None`` = ``max(1, round(max(H, W) / 256))``, which stays about
            2 screen pixels wide when the image is fitted into a 512-pixel panel.

    Returns:
        bool ``(H, W)``; empty for an empty mask.
    """
    m = _check_mask_shape(mask)
    w = max(1, round(max(m.shape) / 256)) if width is None else int(width)
    if w < 1:
        raise ValueError(f"width must be at least 1 pixel; got {width!r}.")
    if not m.any():
        return np.zeros_like(m)
    out: NDArray[np.bool_] = m & ~ndimage.binary_erosion(m, iterations=w, border_value=0)
    return out


def draw_mask_outline(rgb: ArrayLike, mask: ArrayLike, *, colour: tuple[int, int, int] = OUTLINE_COLOUR,
                      width: int | None = None) -> RGBImage:
    """Paint the outline of ``mask`` (:func:`mask_outline`) over an RGB image, opaque, in ``colour``.

    Args:
        rgb: uint8 ``(H', W', 3)`` with ``H' >= H`` and ``W' >= W`` (e.g. an overlay with its legend on the
            right): only the top-left ``(H, W)`` part, the image itself, is painted.
        mask: bool ``(H, W)`` in the image's frame.

    Returns:
        A new uint8 RGB array of ``rgb``'s shape.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True)
    m = _check_mask_shape(mask)
    h, w = m.shape
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] < h or out.shape[1] < w:
        raise ValueError(f"rgb must be uint8 (H, W, 3) at least as large as the mask {m.shape}; got {out.shape}.")
    out[:h, :w][mask_outline(m, width=width)] = colour
    return out


def render_mask_outline_rgba(mask: ArrayLike, *, colour: tuple[int, int, int] = OUTLINE_COLOUR,
                             width: int | None = None) -> NDArray[np.uint8]:
    """The outline of ``mask`` on a transparent layer, uint8 RGBA ``(H, W, 4)``, to lay over any image of the
    same frame (the review page's "lung outline" layer): ``colour`` at alpha 255 on the outline, alpha 0 elsewhere.
    """
    edge = mask_outline(mask, width=width)
    out = np.zeros((*edge.shape, 4), dtype=np.uint8)
    out[edge] = (*colour, 255)
    return out


def render_legend(
    height: int,
    scale: float,
    mode: str = "magnitude",
    *,
    position: str = "right",
    opacity: float = 1.0,
    threshold: float | None = None,
    unit: float | None = None,
    relative: bool = False,
    label: str = "reference − counterfactual",
) -> RGBImage:
    """Render a colour bar with numeric labels and a caption, to sit beside an overlay.

    The bar shows the overlay hue blended over mid-gray at ``alpha = opacity * t`` for ``t`` from 0 to 1, i.e.
    the colour a pixel of that value gets over a mid-gray background. Labels are in intensity units of the map
    (``label``), or, given the model's normal level ``unit``, x-fold of it ("1×" = the normal range's 99th
    percentile) with the caption "x-fold of the normal range". Text scales with ``height`` (about 1/40 of it,
    at least 10 px).

    Args:
        height: Length in pixels of the image side the legend is attached to: the image height for
            ``position="right"`` (vertical bar), the image width for ``position="bottom"`` (horizontal bar).
        scale: Value at full colour (intensity units, >= 0).
        mode: ``"magnitude"`` (0 … scale), ``"signed"`` (−scale … +scale), ``"stability"`` (SD 0 … scale) or
            ``"outline"`` (a red swatch labelled with ``threshold``).
        position: ``"right"`` → ``(height, L, 3)``; ``"bottom"`` → ``(L, height, 3)``.
        opacity: The overlay's opacity in [0, 1], so the bar matches the rendered colours.
        threshold: Contour level for ``mode="outline"`` (intensity units).
        unit: The normal level (intensity units) to label the bar in; ``None`` labels intensity units.
        relative: The scale is the map's own percentile: the caption says "relative (per-image) scale".
        label: What the map is the difference of (:func:`map_label`).

    Returns:
        uint8 RGB legend strip.

    Raises:
        ValueError: On a non-positive ``height``, a negative/non-finite scale, or a bad mode/position/opacity.
    """
    # 1. check inputs
    if height < 16:
        raise ValueError(f"legend height must be at least 16 px; got {height!r}.")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"legend scale must be a finite value >= 0; got {scale!r}.")
    check_choice("mode", mode, OVERLAY_MODES)
    check_choice("position", position, LEGEND_POSITIONS)
    _check_opacity(opacity)
    _check_scale(unit)
    vertical = position == "right"

    def fmt(value: float, sign: str = "") -> str:
        return f"{sign}{value / unit:.3g}×" if unit is not None else f"{sign}{value:.3g}"


    # 2. geometry
    font_px = _font_px(height)
    font = _font(font_px)
    pad = max(4, font_px // 2)
    bar_w = max(8, font_px)
    line_h = _line_height(font)
    bar_len = height - 2 * pad - (line_h if vertical else 0)

    # 3. bar pixels (t = 0 at the start of the bar: bottom when vertical, left when horizontal)
    t = np.linspace(0.0, 1.0, max(bar_len, 2), dtype=np.float32)
    if mode == "signed":
        value = 2.0 * t - 1.0
        hue = np.where((value >= 0)[:, None], np.asarray(_RED), np.asarray(_BLUE))
        strength = np.abs(value)
        labels = [fmt(scale, "−"), "0", fmt(scale, "+")]
    elif mode == "outline":
        hue = np.broadcast_to(np.asarray(_RED), (t.size, 3))
        strength = np.zeros_like(t)
        labels = ["", "", "" if threshold is None else f"≥ {fmt(threshold)}"]
    else:
        hue = np.broadcast_to(np.asarray(_AMBER if mode == "stability" else _RED), (t.size, 3))
        strength = t
        labels = ["0", fmt(scale / 2), fmt(scale)]
    a = (opacity * strength)[:, None]
    colours = _to_uint8((1.0 - a) * 0.5 + a * hue)  # (bar_len, 3)
    bar = np.repeat(colours[:, None, :], bar_w, axis=1)  # (along the bar, across it, 3)
    if mode == "outline":  # a square outlined swatch at the t = 1 end, next to the threshold label
        bar[:] = _LEGEND_BACKGROUND
        swatch = bar[-bar_w:]
        edge = max(1, bar_w // 6)
        swatch[:edge], swatch[-edge:], swatch[:, :edge], swatch[:, -edge:] = _RED_U8, _RED_U8, _RED_U8, _RED_U8

    # 4. compose
    label_w = max(_text_width(s, font) for s in [*labels, "0.000"])
    caption = _CAPTIONS[mode].format(map=label)
    if unit is not None:
        caption = f"{caption}, {_FOLD_CAPTION}"
    elif relative:
        caption = f"{caption}, {_RELATIVE_CAPTION}"
    if vertical:
        cap_font = _fit_font(caption, height - 2 * pad, font_px)
        width = pad + bar_w + pad // 2 + label_w + pad + _line_height(cap_font) + pad
        canvas = Image.new("RGB", (width, height), _LEGEND_BACKGROUND)
        y0 = pad + line_h // 2
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar[::-1])), (pad, y0))
        draw = ImageDraw.Draw(canvas)
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            y = y0 + round((1.0 - frac) * (bar_len - 1)) - line_h // 2
            _draw_text(draw, (pad + bar_w + pad // 2, y), text, font, _LEGEND_TEXT)
        rotated = _text_image(caption, cap_font, _LEGEND_TEXT, _LEGEND_BACKGROUND).transpose(Image.Transpose.ROTATE_90)
        canvas.paste(rotated, (width - pad - rotated.width, max(0, (height - rotated.height) // 2)))
    else:
        cap_font = _fit_font(caption, height - 2 * pad, font_px)
        strip_h = pad + bar_w + pad // 2 + line_h + pad // 2 + _line_height(cap_font) + pad
        canvas = Image.new("RGB", (height, strip_h), _LEGEND_BACKGROUND)
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar.transpose(1, 0, 2))), (pad, pad))
        draw = ImageDraw.Draw(canvas)
        y = pad + bar_w + pad // 2
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            x = pad + round(frac * (bar_len - 1)) - round(frac * _text_width(text, font))
            _draw_text(draw, (x, y), text, font, _LEGEND_TEXT)
        cap_x = max(pad, (height - _text_width(caption, cap_font)) // 2)
        _draw_text(draw, (cap_x, y + line_h + pad // 2), caption, cap_font, _LEGEND_TEXT)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_annotated_export(
    original: ArrayLike,
    overlay_rgb: ArrayLike,
    *,
    params: dict[str, str],
    title: str,
    legend: ArrayLike | None = None,
) -> Image.Image:
    """Compose a labelled export: banner, title, original | overlay (+ legend), and a parameter block.

    The banner :data:`BANNER_TEXT` (:func:`render_banner`) is burned in across the full width at the top. Font
    sizes scale with the image (about 1/40 of its longer side, at least 12 px), so text stays legible at 1024 px.

    Args:
        original: The original image, float ``(H, W)`` in [0, 1].
        overlay_rgb: uint8 RGB from :func:`render_overlay`: ``(H, W, 3)``, or with its legend
            ``(H, W + L, 3)`` / ``(H + L, W, 3)``.
        params: Parameter lines shown as ``key: value`` in insertion order (model, seed, steps, guidance, …).
        title: One line shown above the images.
        legend: Optional uint8 RGB legend (from :func:`render_legend` with ``position="right"``) placed to
            the right of an overlay rendered without one.

    Returns:
        An RGB ``PIL.Image`` ready to save as PNG.

    Raises:
        ValueError: If the overlay is not uint8 RGB, does not match the original, or the legend does not fit.
    """
    # 1. check inputs
    img = check_unit_image("original", original)
    h, w = img.shape
    ov = np.asarray(overlay_rgb)
    if ov.dtype != np.uint8 or ov.ndim != 3 or ov.shape[2] != 3:
        raise ValueError(
            f"overlay_rgb must be uint8 (H, W, 3) from render_overlay; got dtype {ov.dtype}, shape {ov.shape}."
        )
    if not ((ov.shape[0] == h and ov.shape[1] >= w) or (ov.shape[1] == w and ov.shape[0] >= h)):
        raise ValueError(
            f"overlay_rgb has shape {ov.shape[:2]} but the original is {(h, w)}; render the overlay over this "
            "original (a legend may only add columns on the right or rows at the bottom)."
        )
    if legend is not None:
        leg = np.asarray(legend)
        if leg.dtype != np.uint8 or leg.ndim != 3 or leg.shape[2] != 3 or leg.shape[0] != ov.shape[0]:
            raise ValueError(
                f"legend must be uint8 (H, L, 3) with H = {ov.shape[0]} (render_legend(H, ...)); got dtype "
                f"{leg.dtype}, shape {leg.shape}."
            )
        ov = np.concatenate([ov, leg], axis=1)

    # 2. fonts and spacing
    font_px = max(12, round(max(h, w) / 40))
    font = _font(font_px)
    small = _font(max(11, round(font_px * 0.8)))
    banner_px = round(font_px * 1.2)
    pad = font_px
    gap = font_px
    panel_h = max(h, ov.shape[0])
    width = pad + w + gap + ov.shape[1] + pad
    inner = width - 2 * pad

    # 3. text blocks, wrapped to the canvas width
    banner = render_banner(width, banner_px, pad_x=pad, pad_y=pad // 2)
    title_lines = _wrap(title, font, inner)
    param_lines = [line for key, value in params.items() for line in _wrap(f"{key}: {value}", small, inner)]
    banner_h = banner.shape[0]
    title_h = len(title_lines) * _line_height(font)
    caption_h = _line_height(small)
    params_h = len(param_lines) * _line_height(small)
    height = banner_h + pad + title_h + pad // 2 + caption_h + panel_h + pad + params_h + pad

    # 4. draw
    canvas = Image.new("RGB", (width, height), _EXPORT_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(banner), (0, 0))
    y = banner_h + pad
    for line in title_lines:
        _draw_text(draw, (pad, y), line, font, _LEGEND_TEXT)
        y += _line_height(font)
    y += pad // 2
    _draw_text(draw, (pad, y), "Original", small, _LEGEND_TEXT)
    _draw_text(draw, (pad + w + gap, y), "Counterfactual attribution overlay", small, _LEGEND_TEXT)
    y += caption_h
    canvas.paste(Image.fromarray(_to_uint8(np.repeat(img[..., None], 3, axis=2))), (pad, y))
    canvas.paste(Image.fromarray(np.ascontiguousarray(ov)), (pad + w + gap, y))
    y += panel_h + pad
    for line in param_lines:
        _draw_text(draw, (pad, y), line, small, _LEGEND_TEXT)
        y += _line_height(small)
    return canvas


# --------------------------------------------------------------------------------------------------------------
# The banner
# --------------------------------------------------------------------------------------------------------------


def render_banner(width: int, font_px: int, *, pad_x: int, pad_y: int, min_font_px: int | None = None,
                  line_height: Literal["font", "ink"] = "font", text: str = BANNER_TEXT) -> RGBImage:
    """The burned-in banner: ``text`` (default :data:`BANNER_TEXT`) in black on amber, centred, across ``width``.

    The one banner renderer of every export (annotated PNG, Secondary Captures). Its text goes through the same
    drawing as every other label here, so the em dash stays an em dash: the font's glyph where it has one (DejaVu
    Sans), else a drawn rule one em wide (Pillow's built-in font) — never a hyphen.

    Args:
        width: Strip width in pixels (>= 1).
        font_px: Font size in pixels.
        pad_x: Least margin left and right (pixels); lines wrap to ``width - 2 * pad_x``.
        pad_y: Margin above the first line and below the last (pixels).
        min_font_px: Shrink the font, down to this size, until ``text`` fits one line (then wrap); ``None``
            keeps ``font_px`` and wraps.
        line_height: ``"font"``: the font's ascent + descent; ``"ink"``: the ink height of ``"Ag—"`` plus a
            fifth of the size (at least 2 px), the compact banner of the Secondary Captures.
        text: The banner's text.

    Returns:
        uint8 RGB ``(B, width, 3)``.
    """
    if width < 1:
        raise ValueError(f"banner width must be at least 1 pixel; got {width!r}.")
    size = font_px
    font = _font(size)
    if min_font_px is not None:
        while size > min_font_px and _text_width(text, font) > width - 2 * pad_x:
            size -= 1
            font = _font(size)
    lines = _wrap(text, font, width - 2 * pad_x)
    if line_height == "ink":
        line_h = int(font.getbbox("Ag—")[3]) + max(2, size // 5)
    else:
        line_h = _line_height(font)
    strip = Image.new("RGB", (width, 2 * pad_y + line_h * len(lines)), _BANNER_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        x = max(pad_x, (width - _text_width(line, font)) // 2)
        _draw_text(draw, (x, pad_y + i * line_h), line, font, _BANNER_TEXT_COLOUR)
    return np.asarray(strip, dtype=np.uint8).copy()


def burn_in_banner(rgb: ArrayLike) -> RGBImage:
    """Stack the banner (:func:`render_banner`) on top of an image: uint8 ``(H, W, 3)`` → ``(B + H, W, 3)``.

    The Secondary Captures' layout: font about 1/40 of the width (10 px minimum), shrunk to fit one line, wrapped
    when even 10 px does not fit; margins ``max(3, W // 160)``.
    """
    image = np.asarray(rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (H, W, 3); got dtype {image.dtype}, shape {image.shape}.")
    width = image.shape[1]
    pad = max(3, width // 160)
    banner = render_banner(width, max(10, round(width / 40)), pad_x=pad, pad_y=pad, min_font_px=10,
                           line_height="ink")
    return np.concatenate([banner, image], axis=0)


# --------------------------------------------------------------------------------------------------------------
# Pixel and text helpers
# --------------------------------------------------------------------------------------------------------------


def _to_uint8(rgb: NDArray[np.floating[Any]]) -> RGBImage:
    out: RGBImage = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _font_px(length: int) -> int:
    return max(10, round(length / 40))


# DejaVu Sans covers the em dash, minus, ≥ and accented letters; Pillow's built-in font (Aileron, Pillow >= 10.1)
# is used when it is absent, and lacks them — see _segments for how those are drawn.
_FONT_CANDIDATES = ("DejaVuSans.ttf",)


@lru_cache(maxsize=32)
def _font(size_px: int) -> _Font:
    for name in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, size_px)
        except OSError:
            continue
    return ImageFont.load_default(size=size_px)


def _fit_font(text: str, max_width: int, size_px: int) -> _Font:
    """The largest font, up to ``size_px`` and down to 8 px, in which ``text`` fits ``max_width``."""
    size = size_px
    while size > 8 and _text_width(text, _font(size)) > max_width:
        size -= 1
    return _font(size)


def _line_height(font: _Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    return int(font.getbbox("Ag|")[3]) + 2


def _em(font: _Font) -> float:
    return float(font.size) if isinstance(font, ImageFont.FreeTypeFont) else float(font.getbbox("M")[2])


@lru_cache(maxsize=4096)
def _has_glyph(font: _Font, char: str) -> bool:
    """Whether ``font`` has ``char``; missing glyphs render as the .notdef box, which is what we compare to."""
    if char.isspace():
        return True
    notdef = font.getmask("\U0010fffd")
    mask = font.getmask(char)
    return bool(mask.size != notdef.size or bytes(mask) != bytes(notdef))


# Dashes drawn as rules when the font lacks them (width in em): the em dash of the banner must never become "-".
_DRAWN_DASHES = {"—": 1.0, "–": 0.5, "−": 0.55}
_ASCII_FALLBACKS = {"≥": ">=", "≤": "<=", "×": "x", "σ": "sd", "µ": "u", "…": "...", "’": "'", "‘": "'"}


def _segments(text: str, font: _Font) -> list[str | float]:
    """Split text into drawable runs (``str``) and drawn dashes (``float`` = width in em)."""
    out: list[str | float] = []
    run: list[str] = []
    for char in text:
        if _has_glyph(font, char):
            run.append(char)
        elif char in _DRAWN_DASHES:
            if run:
                out.append("".join(run))
                run = []
            out.append(_DRAWN_DASHES[char])
        else:
            ascii_ = (
                _ASCII_FALLBACKS.get(char) or unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            )
            run.append(ascii_ or "?")
    if run:
        out.append("".join(run))
    return out


@lru_cache(maxsize=64)
def _dash_rows(font: _Font) -> tuple[int, int]:
    """Top and bottom ink rows of the hyphen, relative to the text origin: where a drawn dash sits."""
    h = _line_height(font) + 4
    scratch = Image.new("L", (max(8, int(_em(font)) * 2), h), 0)
    ImageDraw.Draw(scratch).text((0, 0), "-", font=font, fill=255)
    rows = np.flatnonzero(np.asarray(scratch).max(axis=1) > 96)
    if rows.size == 0:
        middle = h // 2
        return middle, middle + max(1, round(_em(font) / 14))
    return int(rows[0]), int(rows[-1]) + 1


def _text_width(text: str, font: _Font) -> int:
    total = 0.0
    for seg in _segments(text, font):
        total += seg * _em(font) if isinstance(seg, float) else font.getlength(seg)
    return math.ceil(total)


def _draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: _Font, fill: tuple[int, int, int]
) -> None:
    x, y = float(xy[0]), xy[1]
    for seg in _segments(text, font):
        if isinstance(seg, float):
            width = seg * _em(font)
            top, bottom = _dash_rows(font)
            inset = 0.06 * _em(font)
            draw.rectangle((round(x + inset), y + top, round(x + width - inset) - 1, y + bottom - 1), fill=fill)
            x += width
        else:
            draw.text((round(x), y), seg, font=font, fill=fill)
            x += font.getlength(seg)


def _text_image(text: str, font: _Font, fill: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (max(1, _text_width(text, font)), _line_height(font)), background)
    _draw_text(ImageDraw.Draw(img), (0, 0), text, font, fill)
    return img


def _wrap(text: str, font: _Font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line (hashes, paths) are split."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_width(word, font) > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_width(word[:cut], font) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines
