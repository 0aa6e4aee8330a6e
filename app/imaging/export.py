"""Writers: display images to 8-bit arrays and to PNG bytes (with text chunks); small grayscale PNGs for pages."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["gray_png", "to_png_bytes", "to_uint8"]


def _unit_float(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    return np.clip(arr, 0, 1)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Display values to 8 bits: ``round(clip(img, 0, 1) * 255)``.

    Args:
        img: float ``(H, W)`` or ``(H, W, C)`` in [0, 1] (values outside are clipped), or uint8 (returned as a
            copy).

    Returns:
        uint8, same shape.

    Raises:
        ValueError: Non-finite values, or an integer dtype other than uint8.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.bool_:
        raise ValueError(f"to_uint8 expects float values in [0, 1] or uint8, got {arr.dtype}")
    out: np.ndarray = np.rint(_unit_float(arr) * 255).astype(np.uint8)
    return out


def to_png_bytes(img: np.ndarray, *, bits: int = 8, text: dict[str, str] | None = None) -> bytes:
    """Encode a display image as PNG.

    Args:
        img: float ``(H, W)`` in [0, 1] (grayscale), uint8 ``(H, W)``, or RGB ``(H, W, 3)`` uint8 or float in
            [0, 1]. Float values outside [0, 1] are clipped.
        bits: 8, or 16 for a 16-bit grayscale PNG (``round(img * 65535)``); RGB is always 8-bit.
        text: PNG text chunks (tEXt, or iTXt when a value is not Latin-1), e.g. ``{"Software": "VALD-MD"}``.
            Keys: 1-79 Latin-1 characters. Never put patient data here.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: Bad shape, dtype or ``bits``; non-finite values; an invalid text key.
    """
    arr = np.asarray(img)
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        if bits != 8:
            raise ValueError("RGB PNGs are written with bits=8")
        pil = Image.fromarray(to_uint8(arr))
    elif arr.ndim == 2 and 0 not in arr.shape:
        if bits == 16:
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255
            pil = Image.fromarray(np.rint(_unit_float(arr) * 65535).astype(np.uint16))
        else:
            pil = Image.fromarray(to_uint8(arr))
    else:
        raise ValueError(f"to_png_bytes expects (H, W) or (H, W, 3), got shape {arr.shape}")
    info = PngInfo()
    for key, value in (text or {}).items():
        if not (isinstance(key, str) and 1 <= len(key) <= 79 and key == key.strip() and key.isprintable()):
            raise ValueError(f"PNG text key must be 1-79 printable characters without edge spaces, got {key!r}")
        try:
            key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text key must be Latin-1, got {key!r}") from None
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    # zlib level 3: about 3x faster than Pillow's default 6 for a similar size on radiographs and overlays
    pil.save(buffer, format="PNG", pnginfo=info, compress_level=3)
    return buffer.getvalue()


def gray_png(img: np.ndarray, *, longest_side: int | None = None, upscale: bool = False) -> bytes:
    """Encode a float (H, W) image in [0, 1] as an 8-bit grayscale PNG.

    Args:
        img: float (H, W) in [0, 1].
        longest_side: target longest side in pixels; ``upscale=False`` only ever shrinks (thumbnails),
            ``upscale=True`` enlarges by a whole factor up to it (previews).
    """
    pil = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if longest_side:
        w, h = pil.size
        if upscale:
            f = max(1, longest_side // max(w, h))
            if f > 1:
                pil = pil.resize((w * f, h * f), Image.Resampling.BILINEAR)
        elif max(w, h) > longest_side:
            pil.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()
