"""PNG and JPEG bytes -> :class:`DecodedImage` through Pillow, with decompression bombs refused before decoding;
the server's own PNG files back to float images (:func:`read_png_unit`)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.imaging.errors import CorruptImageError, ImageTooLargeError, ImagingError, UnsupportedImageError
from app.imaging.meta import DecodedImage, ImageMeta
from app.imaging.voi import WindowRequest, apply_window, full_range_window, rgb_to_luminance, select_window

__all__ = ["decode_png_unit", "read_png_unit", "read_raster"]

_PIL_FORMATS = {"png": ("PNG",), "jpeg": ("JPEG", "MPO")}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_raster(data: bytes, source_format: str, *, window: WindowRequest, max_pixels: int) -> DecodedImage:
    """Decode an 8/16-bit grayscale or RGB PNG, or a JPEG, as it would be displayed.

    Order: header only (``Image.open``) -> width x height against ``max_pixels`` -> decode -> JPEG EXIF
    orientation -> gray (RGB/palette to ITU-R BT.601 luminance, alpha dropped) -> the full-range window
    (``value / (2**bits - 1)``) unless ``window`` asks for another.

    Args:
        data: The whole file.
        source_format: ``"png"`` or ``"jpeg"``, from ``sniff_format``; only that Pillow plugin is tried.
        window: See ``decode_image``; PNG/JPEG have no presets, so ``"auto"`` is the full range.
        max_pixels: Cap on width x height, checked before decoding.

    Raises:
        ImageTooLargeError: Over ``max_pixels``, or a decompression bomb.
        CorruptImageError: Truncated or undecodable.
        UnsupportedImageError: A pixel mode that is not grayscale or colour (e.g. floating point).
    """
    name = source_format.upper()
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # 1. header only, then the size cap before any pixel is decoded
            im: Image.Image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS[source_format])
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"This {name} is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); the limit "
                    f"is {max_pixels / 1e6:g} megapixels.")
            # 2. decode; honour the camera/scanner orientation a viewer would apply
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                notes.append("This file has several frames; only the first is shown.")
            if source_format == "jpeg" and im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
                notes.append("Rotated/flipped as its EXIF orientation asks.")
        except ImagingError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(
                f"This {name} declares far more pixels than the server accepts (a decompression bomb?); it was "
                "not decoded.") from None
        except Exception:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise CorruptImageError(f"This {name} file is damaged or truncated and cannot be decoded.") from None
    # 3. gray values in the file's own units
    if im.mode in _SIXTEEN_BIT_MODES:
        raw, bits, photometric = np.asarray(im, dtype=np.float32), 16, "MONOCHROME2"
    elif im.mode in ("1", "L", "LA"):
        raw, bits, photometric = np.asarray(im.convert("L"), dtype=np.float32), 8, "MONOCHROME2"
    elif im.mode in ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(im.convert("RGB"))
        raw, bits, photometric = rgb_to_luminance(rgb), 8, "RGB"
        if np.ptp(rgb.astype(np.int16), axis=2).any():
            notes.append("Colour image converted to grayscale (ITU-R BT.601 luminance).")
    else:
        raise UnsupportedImageError(f"This {name} stores pixels in a form VALD-MD does not read ({im.mode}).")
    if "A" in im.mode or "transparency" in im.info:
        notes.append("Transparency was ignored.")
    raw = np.clip(raw, 0, 2**bits - 1)
    if bits == 16 and window == "auto" and raw.max() < 4096:
        notes.append("This 16-bit image uses at most 12 bits and may look dark; try the percentile window.")
    # 4. window: full range unless asked otherwise
    chosen = select_window(raw, window, [], default=full_range_window(2.0**bits - 1))
    meta = ImageMeta(
        source_format=source_format, modality=None, sop_class_uid=None, photometric_interpretation=photometric,
        rows=raw.shape[0], columns=raw.shape[1], bits_stored=bits, window=chosen, window_presets=[],
        pixel_spacing_mm=None, view_position=None, study_instance_uid=None, series_instance_uid=None,
        sop_instance_uid=None, transfer_syntax_uid=None, warnings=notes,
    )
    return DecodedImage(pixels=apply_window(raw, chosen, photometric), meta=meta, raw=raw)


def decode_png_unit(data: bytes) -> np.ndarray:
    """A PNG written by ``imaging.to_png_bytes`` (8 or 16 bit gray; RGB is averaged) as float32 (H, W) in [0, 1].

    Raises:
        ValueError: not a readable PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable PNG ({exc})") from exc
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    full = 65535.0 if mode.startswith("I") or arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    return (arr.astype(np.float32) / full).clip(0.0, 1.0)


def read_png_unit(path: Path) -> np.ndarray:
    """:func:`decode_png_unit` of a file, unchecked (run files: :meth:`app.runs.folder.RunFolder.read_png_unit`,
    which checks their SHA-256)."""
    return decode_png_unit(Path(path).read_bytes())
