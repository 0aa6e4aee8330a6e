"""What a decoded image is: display pixels, re-windowable modality values, and non-pixel facts about it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.imaging.errors import InvalidWindowError
from app.imaging.voi import Window, WindowRequest, apply_window, full_range_window, select_window

__all__ = ["DecodedImage", "ImageMeta"]


@dataclass(kw_only=True)
class ImageMeta:
    """Facts about the decoded image. Identifiers are kept for export only: never log or display them.

    Attributes:
        source_format: ``"dicom"``, ``"png"`` or ``"jpeg"`` (detected from content, not the file name).
        modality: (0008,0060) Modality, e.g. ``"CR"``, ``"DX"``, ``"OT"``; ``None`` for PNG/JPEG.
        sop_class_uid: (0008,0016) SOP Class UID; ``None`` for PNG/JPEG.
        photometric_interpretation: (0028,0004) as stored (``"MONOCHROME1"``, ``"RGB"``, ...); PNG/JPEG report
            ``"MONOCHROME2"`` or ``"RGB"``.
        rows: (0028,0010) Rows = image height in pixels.
        columns: (0028,0011) Columns = image width in pixels.
        bits_stored: (0028,0101) Bits Stored; 8 or 16 for PNG (bit depth), 8 for JPEG.
        window: The window used for ``DecodedImage.pixels`` (see ``Window.description``).
        window_presets: The file's (0028,1050)/(0028,1051) pairs, then its (0028,3010) VOI LUTs.
        pixel_spacing_mm: (row spacing, column spacing) in mm: (0028,0030) Pixel Spacing, else (0018,1164)
            Imager Pixel Spacing (detector plane; a warning says so); ``None`` when absent or zero.
        view_position: (0018,5101) View Position, e.g. ``"PA"``, ``"AP"``, ``"LL"``.
        study_instance_uid: (0020,000D), for export only.
        series_instance_uid: (0020,000E), for export only.
        sop_instance_uid: (0008,0018), for export only.
        transfer_syntax_uid: (0002,0010) Transfer Syntax UID.
        warnings: Plain-language notes for the user (never patient data).
        presentation_lut_shape: (2050,0020) Presentation LUT Shape (``"IDENTITY"``/``"INVERSE"``) if present.
        number_of_frames: (0028,0008) Number of Frames; only frame 1 is decoded.
    """

    source_format: str
    modality: str | None
    sop_class_uid: str | None
    photometric_interpretation: str | None
    rows: int
    columns: int
    bits_stored: int | None
    window: Window | None
    window_presets: list[Window]
    pixel_spacing_mm: tuple[float, float] | None
    view_position: str | None
    study_instance_uid: str | None = field(repr=False)
    series_instance_uid: str | None = field(repr=False)
    sop_instance_uid: str | None = field(repr=False)
    transfer_syntax_uid: str | None
    warnings: list[str] = field(default_factory=list)
    presentation_lut_shape: str | None = None
    number_of_frames: int = 1

    def public_summary(self) -> dict[str, Any]:
        """Non-identifying facts for records and the UI: no UIDs, dates or names.

        Returns:
            JSON-ready dict: source_format, modality, view_position, rows, columns, bits_stored,
            photometric_interpretation, number_of_frames, window (its description), window_presets
            (descriptions), pixel_spacing_mm, warnings.
        """
        return {
            "source_format": self.source_format,
            "modality": self.modality,
            "view_position": self.view_position,
            "rows": self.rows,
            "columns": self.columns,
            "bits_stored": self.bits_stored,
            "photometric_interpretation": self.photometric_interpretation,
            "number_of_frames": self.number_of_frames,
            "window": self.window.description if self.window else None,
            "window_presets": [w.description for w in self.window_presets],
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "warnings": list(self.warnings),
        }


@dataclass
class DecodedImage:
    """The result of ``decode_image``.

    Attributes:
        pixels: float32 ``(H, W)`` in [0, 1], display-ready (windowed, MONOCHROME1 already inverted).
        meta: Facts about the image.
        raw: float32 ``(H, W)`` modality values (after rescale / modality LUT, before VOI; luminance for
            colour and PNG/JPEG), for re-windowing with :func:`apply_window` or :meth:`rewindow`.
    """

    pixels: np.ndarray
    meta: ImageMeta
    raw: np.ndarray | None = field(default=None, repr=False)

    def rewindow(self, window: WindowRequest) -> DecodedImage:
        """A copy displayed with another window, without re-decoding.

        Args:
            window: A preset index (0-based), ``"auto"``, ``"percentile"``, ``(center, width)``, a Window, or
                ``None`` (min-max).

        Raises:
            InvalidWindowError: No raw values kept, or a preset the image does not have.
        """
        if self.raw is None:
            raise InvalidWindowError("This image cannot be re-windowed.")
        chosen = select_window(self.raw, window, self.meta.window_presets, default=_auto_default(self.meta))
        pixels = apply_window(self.raw, chosen, self.meta.photometric_interpretation,
                              presentation_lut_shape=self.meta.presentation_lut_shape)
        meta = replace(self.meta, window=chosen, warnings=list(self.meta.warnings))
        return DecodedImage(pixels=pixels, meta=meta, raw=self.raw)


def _auto_default(meta: ImageMeta) -> Window | None:
    """The ``"auto"`` window without presets: the full range for PNG/JPEG and colour DICOM, else None
    (grayscale DICOM then gets the percentile window)."""
    grayscale_dicom = meta.source_format == "dicom" and meta.photometric_interpretation in ("MONOCHROME1",
                                                                                            "MONOCHROME2")
    if grayscale_dicom or meta.bits_stored is None:
        return None
    return full_range_window(2.0**meta.bits_stored - 1)
