"""The labelled exports: the burned-in banner (:func:`render_banner`, :func:`burn_in_banner`) and the annotated
export (:func:`render_annotated_export`: banner, title, original | overlay, parameters)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw

from app.attribution import check_unit_image
from app.rendering.fonts import draw_text, load_font, text_line_height, text_width, wrap_text
from app.rendering.palette import (
    BANNER_BACKGROUND,
    BANNER_TEXT_COLOUR,
    EXPORT_BACKGROUND,
    LEGEND_TEXT,
    RGBImage,
    to_uint8,
)

__all__ = ["BANNER_TEXT", "burn_in_banner", "render_annotated_export", "render_banner"]

BANNER_TEXT = "AI-generated counterfactual — not for diagnostic use"
"""The banner burned into every export (annotated PNG, Secondary Captures)."""


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
    font = load_font(font_px)
    small = load_font(max(11, round(font_px * 0.8)))
    banner_px = round(font_px * 1.2)
    pad = font_px
    gap = font_px
    panel_h = max(h, ov.shape[0])
    width = pad + w + gap + ov.shape[1] + pad
    inner = width - 2 * pad

    # 3. text blocks, wrapped to the canvas width
    banner = render_banner(width, banner_px, pad_x=pad, pad_y=pad // 2)
    title_lines = wrap_text(title, font, inner)
    param_lines = [line for key, value in params.items() for line in wrap_text(f"{key}: {value}", small, inner)]
    banner_h = banner.shape[0]
    title_h = len(title_lines) * text_line_height(font)
    caption_h = text_line_height(small)
    params_h = len(param_lines) * text_line_height(small)
    height = banner_h + pad + title_h + pad // 2 + caption_h + panel_h + pad + params_h + pad

    # 4. draw
    canvas = Image.new("RGB", (width, height), EXPORT_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(banner), (0, 0))
    y = banner_h + pad
    for line in title_lines:
        draw_text(draw, (pad, y), line, font, LEGEND_TEXT)
        y += text_line_height(font)
    y += pad // 2
    draw_text(draw, (pad, y), "Original", small, LEGEND_TEXT)
    draw_text(draw, (pad + w + gap, y), "Counterfactual attribution overlay", small, LEGEND_TEXT)
    y += caption_h
    canvas.paste(Image.fromarray(to_uint8(np.repeat(img[..., None], 3, axis=2))), (pad, y))
    canvas.paste(Image.fromarray(np.ascontiguousarray(ov)), (pad + w + gap, y))
    y += panel_h + pad
    for line in param_lines:
        draw_text(draw, (pad, y), line, small, LEGEND_TEXT)
        y += text_line_height(small)
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
    font = load_font(size)
    if min_font_px is not None:
        while size > min_font_px and text_width(text, font) > width - 2 * pad_x:
            size -= 1
            font = load_font(size)
    lines = wrap_text(text, font, width - 2 * pad_x)
    line_h = int(font.getbbox("Ag—")[3]) + max(2, size // 5) if line_height == "ink" else text_line_height(font)
    strip = Image.new("RGB", (width, 2 * pad_y + line_h * len(lines)), BANNER_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        x = max(pad_x, (width - text_width(line, font)) // 2)
        draw_text(draw, (x, pad_y + i * line_h), line, font, BANNER_TEXT_COLOUR)
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
