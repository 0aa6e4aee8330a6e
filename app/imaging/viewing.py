"""What a diagnostic viewer needs of a decoded image: its modality values as uint16 with a linear rescale, the
windows it offers (the file's own and relative lung / mediastinum / bone presets), and the inverse of a window
(to bring a display-space image, such as a counterfactual, back to the data's units).

All functions are pure numpy. Values in "data units" are ``DecodedImage.raw``: after (0028,1052)/(0028,1053)
rescale or the (0028,3000) Modality LUT, before any VOI (PNG/JPEG: the stored value or BT.601 luminance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.imaging.voi import Window

__all__ = ["RELATIVE_PRESETS", "Quantized", "ViewerPreset", "file_presets", "inverse_window", "quantize_u16",
           "relative_presets"]

U16_MAX = 65535

RELATIVE_PRESETS: dict[str, tuple[str, float, float]] = {
    "lung": ("Lung", 2.0, 70.0),
    "mediastinum": ("Mediastinum", 35.0, 99.5),
    "bone": ("Bone", 55.0, 99.95),
}
"""Relative presets of a radiograph, which has no Hounsfield scale: ``key -> (label, low, high)``, the percentiles
of the image's values *in display polarity* (0 = darkest as shown) that the window maps to black and white. Lung
spreads the dark half (the lung fields), mediastinum the bright soft tissue, bone the brightest values."""


@dataclass(frozen=True)
class Quantized:
    """Modality values as uint16: ``value = pixels * slope + intercept``.

    Attributes:
        pixels: uint16 ``(H, W)``.
        slope: > 0; 1 when the values are integers spanning at most 65535 (then the mapping is exact).
        intercept: the value of pixel 0.
    """

    pixels: np.ndarray
    slope: float
    intercept: float


@dataclass(frozen=True)
class ViewerPreset:
    """One window the viewer offers.

    Attributes:
        key: ``"lung"``, ``"mediastinum"``, ``"bone"``, ``"file-1"``, ``"file-2"``, ..., ``"full"``.
        label: For the button, e.g. ``"Lung"``, ``"File 1 (LUNG)"``.
        center, width: In data units.
        function: (0028,1056) VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID.
        kind: ``"relative"`` (from this image's histogram) or ``"file"`` (stored in the file).
    """

    key: str
    label: str
    center: float
    width: float
    function: str
    kind: str


def quantize_u16(raw: np.ndarray) -> Quantized:
    """Modality values as uint16 plus a linear rescale, exact for integer data within a 16-bit span.

    Args:
        raw: float ``(H, W)`` modality values; non-finite values become the minimum.

    Returns:
        :class:`Quantized`. Integer values spanning <= 65535: ``slope`` 1, ``intercept`` the minimum, exact.
        Otherwise the range is spread over 0..65535 (error <= slope / 2).
    """
    x = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.min(x[finite]) if finite.any() else 0.0)
    lo, hi = float(x.min()), float(x.max())
    if np.array_equal(x, np.round(x)) and hi - lo <= U16_MAX:
        return Quantized((x - lo).astype(np.uint16), 1.0, lo)
    slope = (hi - lo) / U16_MAX if hi > lo else 1.0
    return Quantized(np.clip(np.rint((x - lo) / slope), 0, U16_MAX).astype(np.uint16), slope, lo)


def relative_presets(raw: np.ndarray, *, inverted: bool) -> list[ViewerPreset]:
    """The lung, mediastinum and bone windows of :data:`RELATIVE_PRESETS` for this image (LINEAR_EXACT).

    Args:
        raw: Modality values, any shape.
        inverted: The display inverts the values (MONOCHROME1 or Presentation LUT Shape INVERSE): the dark end
            of the display is then the high end of the values.

    Returns:
        Three presets in data units, each at least 1 wide.
    """
    values = np.asarray(raw, dtype=np.float32)
    values = values[np.isfinite(values)] if not np.isfinite(values).all() else values.ravel()
    out = []
    for key, (label, low, high) in RELATIVE_PRESETS.items():
        if inverted:
            low, high = 100.0 - high, 100.0 - low
        lo, hi = (float(v) for v in np.percentile(values, [low, high])) if values.size else (0.0, 1.0)
        width = max(hi - lo, 1.0)
        out.append(ViewerPreset(key, label, (lo + hi) / 2, width, "LINEAR_EXACT", "relative"))
    return out


def file_presets(presets: list[Window]) -> list[ViewerPreset]:
    """The file's own windows, (0028,1050)/(0028,1051) pairs then (0028,3010) VOI LUTs; a LUT is offered as the
    linear window over its input range (label marked "≈")."""
    out = []
    for i, w in enumerate(presets, start=1):
        name = w.source.split("(", 1)[1].rstrip(")") if "(" in w.source else ""
        label = f"File {i}" + (f" ({name})" if name else "") + (" ≈" if w.lut is not None else "")
        out.append(ViewerPreset(f"file-{i}", label, float(w.center), float(w.width),
                                "LINEAR_EXACT" if w.lut is not None else w.function, "file"))
    return out


def inverse_window(display: np.ndarray, window: Window, *, inverted: bool) -> np.ndarray:
    """Display values back to data units through ``window``: the inverse of ``voi.apply_window``.

    Values the window clipped (0 and 1) come back as the window's ends, so the result only spans the window. A
    VOI LUT window is inverted as the linear window over its input range.

    Args:
        display: float ``(H, W)`` in [0, 1], as shown (after the polarity inversion).
        window: The window that made ``display``.
        inverted: The polarity inversion was applied (MONOCHROME1 / INVERSE).

    Returns:
        float32 ``(H, W)`` in data units.
    """
    y = np.clip(np.asarray(display, dtype=np.float64), 0.0, 1.0)
    if inverted:
        y = 1.0 - y
    c, w = float(window.center), float(window.width)
    if window.lut is None and window.function == "LINEAR":
        x = (y - 0.5) * max(w - 1.0, 0.0) + c - 0.5
    elif window.lut is None and window.function == "SIGMOID":
        eps = 1e-6
        yc = np.clip(y, eps, 1.0 - eps)
        x = c - w / 4.0 * np.log(1.0 / yc - 1.0)
    else:
        x = c + (y - 0.5) * w
    return x.astype(np.float32)

