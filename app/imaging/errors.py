"""Errors raised while reading an image. Messages are written for a clinician and never quote patient data."""

from __future__ import annotations

__all__ = [
    "CorruptImageError",
    "ImageTooLargeError",
    "ImagingError",
    "InvalidWindowError",
    "UnsupportedImageError",
]


class ImagingError(ValueError):
    """Base class: the uploaded bytes cannot be shown as a chest radiograph.

    The message (``str(error)``) is safe to show to the user: it names the problem and, where possible, what to
    do, and it never contains patient data or identifiers read from the file.
    """


class UnsupportedImageError(ImagingError):
    """A readable file that VALD-MD does not accept: not DICOM/PNG/JPEG, a non-radiograph SOP class or
    modality (CT, MR, ...), DX "for processing", or a transfer syntax with no permitted decoder."""


class ImageTooLargeError(ImagingError):
    """Rows x Columns (x Number of Frames) exceeds the configured cap, checked before any pixel is decoded;
    also decompression bombs (huge declared dimensions in a tiny file)."""


class CorruptImageError(ImagingError):
    """The file claims a supported format but is truncated, malformed or cannot be decoded."""


class InvalidWindowError(ImagingError):
    """The requested window cannot be applied: unknown preset index for this file, or a bad centre/width."""
