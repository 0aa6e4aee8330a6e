"""The legend: the colour bar beside (or below) an overlay, with its numeric labels and caption."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from app.attribution import check_choice
from app.rendering.fonts import (
    draw_text,
    fit_font,
    font_px_for,
    load_font,
    text_image,
    text_line_height,
    text_width,
)
from app.rendering.options import LEGEND_POSITIONS, OVERLAY_MODES, check_opacity, check_scale
from app.rendering.palette import AMBER, BLUE, LEGEND_BACKGROUND, LEGEND_TEXT, RED, RED_U8, RGBImage, to_uint8

__all__ = ["render_legend"]

_CAPTIONS = {
    "magnitude": "|{map}|",
    "signed": "{map} (red: removed, blue: added)",
    "stability": "per-pixel SD of {map} across samples",
    "outline": "outline: |{map}| ≥ threshold",
}
_FOLD_CAPTION = "x-fold of the normal range"
_RELATIVE_CAPTION = "relative (per-image) scale"


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
    check_opacity(opacity)
    check_scale(unit)
    vertical = position == "right"

    def fmt(value: float, sign: str = "") -> str:
        return f"{sign}{value / unit:.3g}×" if unit is not None else f"{sign}{value:.3g}"


    # 2. geometry
    font_px = font_px_for(height)
    font = load_font(font_px)
    pad = max(4, font_px // 2)
    bar_w = max(8, font_px)
    line_h = text_line_height(font)
    bar_len = height - 2 * pad - (line_h if vertical else 0)

    # 3. bar pixels (t = 0 at the start of the bar: bottom when vertical, left when horizontal)
    t = np.linspace(0.0, 1.0, max(bar_len, 2), dtype=np.float32)
    if mode == "signed":
        value = 2.0 * t - 1.0
        hue = np.where((value >= 0)[:, None], np.asarray(RED), np.asarray(BLUE))
        strength = np.abs(value)
        labels = [fmt(scale, "−"), "0", fmt(scale, "+")]
    elif mode == "outline":
        hue = np.broadcast_to(np.asarray(RED), (t.size, 3))
        strength = np.zeros_like(t)
        labels = ["", "", "" if threshold is None else f"≥ {fmt(threshold)}"]
    else:
        hue = np.broadcast_to(np.asarray(AMBER if mode == "stability" else RED), (t.size, 3))
        strength = t
        labels = ["0", fmt(scale / 2), fmt(scale)]
    a = (opacity * strength)[:, None]
    colours = to_uint8((1.0 - a) * 0.5 + a * hue)  # (bar_len, 3)
    bar = np.repeat(colours[:, None, :], bar_w, axis=1)  # (along the bar, across it, 3)
    if mode == "outline":  # a square outlined swatch at the t = 1 end, next to the threshold label
        bar[:] = LEGEND_BACKGROUND
        swatch = bar[-bar_w:]
        edge = max(1, bar_w // 6)
        swatch[:edge], swatch[-edge:], swatch[:, :edge], swatch[:, -edge:] = RED_U8, RED_U8, RED_U8, RED_U8

    # 4. compose
    label_w = max(text_width(s, font) for s in [*labels, "0.000"])
    caption = _CAPTIONS[mode].format(map=label)
    if unit is not None:
        caption = f"{caption}, {_FOLD_CAPTION}"
    elif relative:
        caption = f"{caption}, {_RELATIVE_CAPTION}"
    if vertical:
        cap_font = fit_font(caption, height - 2 * pad, font_px)
        width = pad + bar_w + pad // 2 + label_w + pad + text_line_height(cap_font) + pad
        canvas = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
        y0 = pad + line_h // 2
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar[::-1])), (pad, y0))
        draw = ImageDraw.Draw(canvas)
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            y = y0 + round((1.0 - frac) * (bar_len - 1)) - line_h // 2
            draw_text(draw, (pad + bar_w + pad // 2, y), text, font, LEGEND_TEXT)
        rotated = text_image(caption, cap_font, LEGEND_TEXT, LEGEND_BACKGROUND).transpose(Image.Transpose.ROTATE_90)
        canvas.paste(rotated, (width - pad - rotated.width, max(0, (height - rotated.height) // 2)))
    else:
        cap_font = fit_font(caption, height - 2 * pad, font_px)
        strip_h = pad + bar_w + pad // 2 + line_h + pad // 2 + text_line_height(cap_font) + pad
        canvas = Image.new("RGB", (height, strip_h), LEGEND_BACKGROUND)
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar.transpose(1, 0, 2))), (pad, pad))
        draw = ImageDraw.Draw(canvas)
        y = pad + bar_w + pad // 2
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            x = pad + round(frac * (bar_len - 1)) - round(frac * text_width(text, font))
            draw_text(draw, (x, y), text, font, LEGEND_TEXT)
        cap_x = max(pad, (height - text_width(caption, cap_font)) // 2)
        draw_text(draw, (cap_x, y + line_h + pad // 2), caption, cap_font, LEGEND_TEXT)
    return np.asarray(canvas, dtype=np.uint8).copy()
