"""Values of interest: windows, VOI LUTs and the grayscale display pipeline after the modality LUT.

Order of operations (PS3.3 C.11, PS3.4 N.2.1.1), applied by :func:`apply_window`:

1. VOI: (0028,3010) VOI LUT Sequence item, or (0028,1050) Window Center / (0028,1051) Window Width with
   (0028,1056) VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID), mapping modality values to [0, 1];
2. polarity: invert exactly once when (0028,0004) Photometric Interpretation is MONOCHROME1 or
   (2050,0020) Presentation LUT Shape is INVERSE (in DX both are set together and mean the same inversion).

All functions are pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TypeAlias, cast

import numpy as np

from app.imaging.errors import CorruptImageError, InvalidWindowError

__all__ = [
    "BT601_WEIGHTS",
    "VOI_LUT_FUNCTIONS",
    "VoiLut",
    "Window",
    "WindowRequest",
    "apply_window",
    "check_window_request",
    "full_range_window",
    "inverts",
    "percentile_window",
    "rgb_to_luminance",
    "select_window",
]

VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
"""(0028,1056) VOI LUT Function enumerated values (PS3.3 C.11.2.1.3)."""

PERCENTILE_LOW, PERCENTILE_HIGH = 0.5, 99.5
"""Default automatic window when the file has none: these percentiles of the modality values map to 0 and 1."""


@dataclass(frozen=True)
class VoiLut:
    """One item of (0028,3010) VOI LUT Sequence.

    Attributes:
        first_mapped: (0028,3002) LUT Descriptor value 2: the modality value mapped to the first entry.
        bits: (0028,3002) LUT Descriptor value 3: bits per entry (8 or 10-16).
        data: (0028,3006) LUT Data, one unsigned output value per entry.
    """

    first_mapped: int
    bits: int
    data: tuple[int, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.data or not 1 <= self.bits <= 16:
            raise InvalidWindowError("The VOI LUT is empty or has an invalid LUT Descriptor (0028,3002).")

    @property
    def output_max(self) -> int:
        """The value that displays as white: ``2**bits - 1``, or the largest entry if that is larger."""
        return max((1 << self.bits) - 1, max(self.data))


@dataclass(frozen=True)
class Window:
    """A window (or VOI LUT) that maps modality values to display values in [0, 1].

    Attributes:
        center: (0028,1050) Window Center, in modality units (after rescale / modality LUT).
        width: (0028,1051) Window Width, same units; >= 1 for LINEAR, > 0 otherwise.
        source: Where it came from: ``"file preset 1 (LUNG)"``, ``"VOI LUT 1"``, ``"percentile 0.5-99.5"``,
            ``"min-max"``, ``"full range"`` or ``"user"``. File presets are numbered from 1 here; the
            ``window=`` argument of ``decode_image`` indexes ``ImageMeta.window_presets`` from 0.
        function: (0028,1056) VOI LUT Function: LINEAR (default), LINEAR_EXACT or SIGMOID.
        lut: The VOI LUT when the window is a (0028,3010) VOI LUT Sequence item; it then takes precedence and
            ``center``/``width`` only describe the LUT's input range.
    """

    center: float
    width: float
    source: str
    function: str = "LINEAR"
    lut: VoiLut | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.function not in VOI_LUT_FUNCTIONS:
            raise InvalidWindowError(f"VOI LUT Function must be one of {', '.join(VOI_LUT_FUNCTIONS)}.")
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise InvalidWindowError("Window centre and width must be finite numbers.")
        minimum_ok = self.width >= 1 if self.function == "LINEAR" else self.width > 0
        if not minimum_ok:
            bound = "at least 1" if self.function == "LINEAR" else "greater than 0"
            raise InvalidWindowError(f"Window width must be {bound} (got {self.width:g}).")

    @property
    def description(self) -> str:
        """One line for the user, e.g. ``"file preset 1 (LUNG): centre 550, width 1024"``."""
        if self.lut is not None:
            return f"{self.source}: lookup table of {len(self.lut.data)} entries from value {self.lut.first_mapped}"
        text = f"{self.source}: centre {self.center:.6g}, width {self.width:.6g}"
        return text if self.function == "LINEAR" else f"{text} ({self.function})"


_NAMED = ("auto", "percentile")

WindowRequest: TypeAlias = int | str | tuple[float, float] | Window | None
"""``"auto"``, ``"percentile"``, a preset index (0-based), ``(center, width)``, a :class:`Window`, or ``None``
(min-max of the image)."""


def check_window_request(request: object) -> None:
    """Reject a malformed ``window=`` argument before any decoding.

    Raises:
        InvalidWindowError: Not one of the forms listed in :data:`WindowRequest`.
    """
    if request is None or isinstance(request, Window) or (isinstance(request, str) and request in _NAMED):
        return
    if isinstance(request, Integral) and not isinstance(request, bool):
        if request < 0:
            raise InvalidWindowError(f"Window preset index must be 0 or more (got {request}).")
        return
    if isinstance(request, (tuple, list)) and len(request) == 2:
        center, width = request
        if all(isinstance(v, Real) and not isinstance(v, bool) for v in (center, width)):
            Window(float(center), float(width), "user")  # validates
            return
    raise InvalidWindowError(
        f"Unknown window {request!r}: use 'auto', 'percentile', a preset number (0, 1, ...) or (centre, width)."
    )


def percentile_window(raw: np.ndarray, low: float = PERCENTILE_LOW, high: float = PERCENTILE_HIGH) -> Window:
    """The LINEAR_EXACT window that maps the ``low``-th and ``high``-th percentiles of ``raw`` to 0 and 1.

    Args:
        raw: Modality values, any shape; non-finite values are ignored.
        low: Lower percentile in [0, 100); ``0`` with ``high=100`` gives the min-max window.
        high: Upper percentile in (low, 100].

    Returns:
        A window with ``source`` ``"percentile {low}-{high}"`` (``"min-max"`` for 0-100). A constant image gets
        width 1 placed so that it displays black.

    Raises:
        CorruptImageError: ``raw`` has no finite value.
    """
    values = raw if np.isfinite(raw).all() else raw[np.isfinite(raw)]
    if values.size == 0:
        raise CorruptImageError("The image contains no valid pixel values.")
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    source = "min-max" if (low, high) == (0, 100) else f"percentile {low:g}-{high:g}"
    if not hi > lo:
        return Window(lo + 0.5, 1.0, source, "LINEAR_EXACT")
    return Window((lo + hi) / 2, hi - lo, source, "LINEAR_EXACT")


def full_range_window(max_value: float) -> Window:
    """The LINEAR_EXACT window that maps ``[0, max_value]`` onto ``[0, 1]`` unchanged (PNG/JPEG, colour)."""
    return Window(max_value / 2, max_value, "full range", "LINEAR_EXACT")


def select_window(
    raw: np.ndarray, request: WindowRequest, presets: list[Window], *, default: Window | None = None
) -> Window:
    """Resolve a ``window=`` request against the file's presets.

    Args:
        raw: Modality values ``(H, W)``, used by the percentile and min-max windows.
        request: See :data:`WindowRequest`. ``"auto"`` is ``presets[0]``, else ``default``, else the
            percentile window.
        presets: The file's presets: Window Center/Width pairs first, then VOI LUT Sequence items.
        default: The ``"auto"`` window when there is no preset (PNG: the full range).

    Raises:
        InvalidWindowError: A preset index the file does not have, or a malformed request.
    """
    check_window_request(request)
    if isinstance(request, Window):
        return request
    if request == "auto":
        if presets:
            return presets[0]
        return default if default is not None else percentile_window(raw)
    if request == "percentile":
        return percentile_window(raw)
    if request is None:
        return percentile_window(raw, 0, 100)
    if isinstance(request, Integral):
        request = int(request)
        if request >= len(presets):
            have = f"has {len(presets)} window preset(s)" if presets else "has no window presets"
            raise InvalidWindowError(f"This image {have}; preset {request} does not exist (presets count from 0).")
        return presets[request]
    center, width = cast(tuple[float, float], request)  # validated above
    return Window(float(center), float(width), "user")


def _voi(raw: np.ndarray, window: Window) -> np.ndarray:
    """Step 1: modality values -> [0, 1] float32 by the VOI LUT or window function (PS3.3 C.11.2.1)."""
    x = np.asarray(raw, dtype=np.float32)
    if window.lut is not None:
        lut = np.asarray(window.lut.data, dtype=np.float32) / np.float32(window.lut.output_max)
        index = np.clip(np.rint(x) - window.lut.first_mapped, 0, len(lut) - 1)
        mapped: np.ndarray = lut[np.nan_to_num(index).astype(np.intp)]
        return mapped
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function == "LINEAR":
        # C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clamped; w == 1 is a step at c - 0.5
        if w == 1:
            return (x > c - np.float32(0.5)).astype(np.float32)
        y = (x - (c - np.float32(0.5))) / (w - np.float32(1)) + np.float32(0.5)
    elif window.function == "LINEAR_EXACT":
        y = (x - c) / w + np.float32(0.5)  # C.11.2.1.3.2
    else:
        with np.errstate(over="ignore"):
            y = np.float32(1) / (np.float32(1) + np.exp(np.float32(-4) * (x - c) / w))  # C.11.2.1.3.1 SIGMOID
    np.nan_to_num(y, copy=False, nan=0.0)  # only float pixel data can hold NaN; show it black, never pass it on
    return np.clip(y, 0, 1, out=y)


def inverts(photometric_interpretation: str | None, presentation_lut_shape: str | None = None) -> bool:
    """Whether display needs the single polarity inversion (MONOCHROME1 or Presentation LUT Shape INVERSE)."""
    return photometric_interpretation == "MONOCHROME1" or presentation_lut_shape == "INVERSE"


def apply_window(
    raw: np.ndarray, window: Window, photometric: str | None, *, presentation_lut_shape: str | None = None
) -> np.ndarray:
    """Re-window modality values without re-decoding: VOI, then polarity, then [0, 1].

    Args:
        raw: float32 ``(H, W)`` modality values (``DecodedImage.raw``: after (0028,1052)/(0028,1053) rescale or
            the (0028,3000) Modality LUT, before any VOI).
        window: The window or VOI LUT to apply (``ImageMeta.window_presets[i]``, ``percentile_window(raw)``, or
            ``Window(c, w, "user")``).
        photometric: (0028,0004) Photometric Interpretation; MONOCHROME1 is inverted after the VOI.
        presentation_lut_shape: (2050,0020) Presentation LUT Shape; INVERSE inverts, but never a second time.

    Returns:
        float32 ``(H, W)`` in [0, 1], 0 = black, as the radiologist sees it.
    """
    y = _voi(raw, window)
    if inverts(photometric, presentation_lut_shape):
        y = np.float32(1) - y
    return y.astype(np.float32, copy=False)


BT601_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 luma weights for R, G, B."""


def rgb_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """Colour to gray: ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601), in the input's units.

    Args:
        rgb: ``(H, W, 3)`` any numeric dtype, R, G, B order.

    Returns:
        float32 ``(H, W)``.
    """
    return np.asarray(rgb, dtype=np.float32) @ BT601_WEIGHTS
