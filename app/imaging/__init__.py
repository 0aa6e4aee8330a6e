"""Bytes in -> a float32 image in [0, 1] as a radiologist would see it, plus metadata; letterboxing; PNG writers.

numpy, pydicom and Pillow only (no torch, no web). The format is detected from the content, never the file name.

Typical use::

    decoded = decode_image(data)                 # DICOM (CR/DX/SC), PNG or JPEG
    decoded.pixels                               # float32 (H, W) in [0, 1], 0 = black
    decoded.meta.window.description              # which window was used
    lung = decoded.rewindow(1)                   # another file preset, without decoding again
    model_in, lb = letterbox(decoded.pixels, 512)
    native = unletterbox(model_out, lb)          # exactly (H, W) again

Module layout: ``errors`` (exception types), ``voi`` (windows, VOI LUT, polarity), ``meta`` (result types),
``dicom`` / ``raster`` (readers; ``read_png_unit`` for the server's own PNGs), ``geometry`` (letterbox),
``export`` (writers; ``gray_png`` for thumbnails and previews).
"""

from __future__ import annotations

from typing import Any

from app.imaging.errors import (
    CorruptImageError,
    ImageTooLargeError,
    ImagingError,
    InvalidWindowError,
    UnsupportedImageError,
)
from app.imaging.export import gray_png, to_png_bytes, to_uint8
from app.imaging.geometry import Letterbox, content_of, content_to_native, letterbox, unletterbox
from app.imaging.meta import DecodedImage, ImageMeta
from app.imaging.raster import decode_png_unit, read_png_unit, read_raster
from app.imaging.redact import redact_pydicom_logs
from app.imaging.voi import (
    VoiLut,
    Window,
    WindowRequest,
    apply_window,
    check_window_request,
    percentile_window,
    rgb_to_luminance,
)

__all__ = [
    "CorruptImageError",
    "DecodedImage",
    "ImageMeta",
    "ImageTooLargeError",
    "ImagingError",
    "InvalidWindowError",
    "Letterbox",
    "UnsupportedImageError",
    "VoiLut",
    "Window",
    "WindowRequest",
    "apply_window",
    "content_of",
    "content_to_native",
    "decode_image",
    "decode_png_unit",
    "gray_png",
    "letterbox",
    "percentile_window",
    "read_png_unit",
    "rgb_to_luminance",
    "sniff_format",
    "to_png_bytes",
    "to_uint8",
    "unletterbox",
]

# pydicom (~0.2-0.3 s to import) loads with the first DICOM read, not with this package, which the server imports at
# start-up; pydicom's log filter is on before that
redact_pydicom_logs()

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_FRAMES = 1000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_OTHER_FORMATS = {  # magic bytes -> a name for the refusal message
    b"GIF8": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP", b"%PDF": "PDF", b"PK\x03\x04": "ZIP",
    b"RIFF": "RIFF (WebP?)", b"\x1f\x8b": "gzip", b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
}


def sniff_format(data: bytes) -> str:
    """Identify the format from the bytes themselves.

    DICOM: ``DICM`` at offset 128 (PS3.10 7.1, after the preamble); PNG: the 8-byte signature; JPEG: SOI
    ``FF D8 FF``.

    Args:
        data: The file's bytes.

    Returns:
        ``"dicom"``, ``"png"`` or ``"jpeg"``.

    Raises:
        UnsupportedImageError: Anything else, including a DICOM data set without the preamble and prefix.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if not data:
        raise UnsupportedImageError("The file is empty.")
    for magic, name in _OTHER_FORMATS.items():
        if data.startswith(magic):
            raise UnsupportedImageError(f"This is a {name} file; VALD-MD reads DICOM, PNG or JPEG.")
    if len(data) >= 8 and data[0:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        # (0002,xxxx) or (0008,xxxx) little endian: a bare data set, as some tools write
        raise UnsupportedImageError(
            "This looks like a DICOM data set without the DICOM file header (128-byte preamble and 'DICM'); "
            "export it from the PACS as a DICOM file (Part 10) and try again.")
    raise UnsupportedImageError("This file is not a DICOM, PNG or JPEG image (checked by content, not by name).")


def decode_image(
    data: bytes,
    *,
    window: WindowRequest = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> DecodedImage:
    """Decode DICOM, PNG or JPEG bytes into a display-ready float32 image and its metadata.

    DICOM: see :mod:`app.imaging.dicom` for the checks (SOP class, modality, transfer syntax, size caps before
    decoding) and the pipeline (modality LUT -> VOI -> MONOCHROME1 inverted once -> [0, 1]). PNG/JPEG: 8/16-bit
    gray or RGB (BT.601 luminance), full range.

    Args:
        data: The uploaded file's bytes (the name is irrelevant: content decides).
        window: ``"auto"`` (the file's first preset: Window Center/Width, else VOI LUT; else the 0.5-99.5
            percentile window; PNG/JPEG: full range), a preset index into ``meta.window_presets`` (0-based),
            ``"percentile"``, ``(center, width)`` in modality units, a :class:`Window`, or ``None`` (min-max).
        max_pixels: Cap on Rows x Columns x Number of Frames (DICOM) or width x height (PNG/JPEG).
        max_frames: Cap on (0028,0008) Number of Frames.

    Returns:
        ``DecodedImage`` with ``pixels`` float32 ``(H, W)`` in [0, 1], ``raw`` modality values, ``meta``.

    Raises:
        UnsupportedImageError: Not DICOM/PNG/JPEG, or a DICOM that is not a radiograph for presentation.
        ImageTooLargeError: Over a cap or a decompression bomb (nothing decoded).
        CorruptImageError: Truncated or malformed.
        InvalidWindowError: A malformed ``window`` or a preset the file does not have.
        ValueError: ``max_pixels`` / ``max_frames`` not positive integers (a programming error).
        TypeError: ``data`` is not bytes-like (a programming error).
    """
    # 1. check inputs
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    for name, value in (("max_pixels", max_pixels), ("max_frames", max_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_window_request(window)
    data = bytes(data)
    # 2. dispatch on content
    source_format = sniff_format(data)
    if source_format == "dicom":
        from app.imaging.dicom import read_dicom

        return read_dicom(data, window=window, max_pixels=max_pixels, max_frames=max_frames)
    return read_raster(data, source_format, window=window, max_pixels=max_pixels)


def __getattr__(name: str) -> Any:
    """``read_dicom``, imported on first use (pydicom with it)."""
    if name == "read_dicom":
        from app.imaging.dicom import read_dicom

        return read_dicom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
