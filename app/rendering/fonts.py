"""Fonts and text for the rendered strips: label sizes, measuring, drawing and wrapping text with Pillow.

The preferred font is DejaVu Sans; where it is missing, Pillow's built-in font is used, and the characters it lacks
are drawn anyway: dashes as rules one em (—), half an em (–) or 0.55 em (−) wide, others as ASCII (``≥`` → ``>=``),
so that the banner's em dash never becomes a hyphen.
"""

from __future__ import annotations

import math
import unicodedata
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Font", "draw_text", "fit_font", "font_px_for", "load_font", "text_image", "text_line_height",
           "text_width", "wrap_text"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def font_px_for(length: int) -> int:
    """The label size (pixels) for a strip along an image side of ``length`` pixels: 1/40 of it, at least 10."""
    return max(10, round(length / 40))


# DejaVu Sans covers the em dash, minus, ≥ and accented letters; Pillow's built-in font (Aileron, Pillow >= 10.1)
# is used when it is absent, and lacks them — see _segments for how those are drawn.
_FONT_CANDIDATES = ("DejaVuSans.ttf",)


@lru_cache(maxsize=32)
def load_font(size_px: int) -> Font:
    """DejaVu Sans at ``size_px`` pixels, or Pillow's built-in font where it is not installed (cached)."""
    for name in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, size_px)
        except OSError:
            continue
    return ImageFont.load_default(size=size_px)


def fit_font(text: str, max_width: int, size_px: int) -> Font:
    """The largest font, up to ``size_px`` and down to 8 px, in which ``text`` fits ``max_width``."""
    size = size_px
    while size > 8 and text_width(text, load_font(size)) > max_width:
        size -= 1
    return load_font(size)


def text_line_height(font: Font) -> int:
    """One line's height in pixels: ascent + descent (TrueType), else the ink height of ``"Ag|"`` + 2."""
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    return int(font.getbbox("Ag|")[3]) + 2


def _em(font: Font) -> float:
    return float(font.size) if isinstance(font, ImageFont.FreeTypeFont) else float(font.getbbox("M")[2])


@lru_cache(maxsize=4096)
def _has_glyph(font: Font, char: str) -> bool:
    """Whether ``font`` has ``char``; missing glyphs render as the .notdef box, which is what we compare to."""
    if char.isspace():
        return True
    notdef = font.getmask("\U0010fffd")
    mask = font.getmask(char)
    return bool(mask.size != notdef.size or bytes(mask) != bytes(notdef))


# Dashes drawn as rules when the font lacks them (width in em): the em dash of the banner must never become "-".
_DRAWN_DASHES = {"—": 1.0, "–": 0.5, "−": 0.55}
_ASCII_FALLBACKS = {"≥": ">=", "≤": "<=", "×": "x", "σ": "sd", "µ": "u", "…": "...", "’": "'", "‘": "'"}


def _segments(text: str, font: Font) -> list[str | float]:
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
def _dash_rows(font: Font) -> tuple[int, int]:
    """Top and bottom ink rows of the hyphen, relative to the text origin: where a drawn dash sits."""
    h = text_line_height(font) + 4
    scratch = Image.new("L", (max(8, int(_em(font)) * 2), h), 0)
    ImageDraw.Draw(scratch).text((0, 0), "-", font=font, fill=255)
    rows = np.flatnonzero(np.asarray(scratch).max(axis=1) > 96)
    if rows.size == 0:
        middle = h // 2
        return middle, middle + max(1, round(_em(font) / 14))
    return int(rows[0]), int(rows[-1]) + 1


def text_width(text: str, font: Font) -> int:
    """Width in pixels of ``text`` as :func:`draw_text` draws it (drawn dashes and ASCII fallbacks included)."""
    total = 0.0
    for seg in _segments(text, font):
        total += seg * _em(font) if isinstance(seg, float) else font.getlength(seg)
    return math.ceil(total)


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: Font, fill: tuple[int, int, int]
) -> None:
    """Draw ``text`` at ``xy`` (top left, pixels); dashes the font lacks are drawn as rules, never as hyphens."""
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


def text_image(text: str, font: Font, fill: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    """One line of ``text`` on its own RGB image, exactly as wide as :func:`text_width` and one line high."""
    img = Image.new("RGB", (max(1, text_width(text, font)), text_line_height(font)), background)
    draw_text(ImageDraw.Draw(img), (0, 0), text, font, fill)
    return img


def wrap_text(text: str, font: Font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line (hashes, paths) are split."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if text_width(candidate, font) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while text_width(word, font) > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and text_width(word[:cut], font) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines
