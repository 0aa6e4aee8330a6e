"""Attribution maps: reference − counterfactual, their statistics and their rendering.

VALD-MD (Siddiqui et al., Sci Rep 2025) explains an abnormal chest X-ray by generating a healthy
counterfactual; the attribution map is the pixel-wise difference ``M = reference − counterfactual`` in the
native image frame. ``reference`` is normally the original image; passing the autoencoder's reconstruction of
the input instead cancels the blur that the autoencoder adds to every counterfactual.

Sign convention: ``M > 0`` where the original is brighter than the counterfactual, i.e. where the
counterfactual *removed* density (drawn red); ``M < 0`` where it *added* density (drawn blue in signed mode).

All images are float32 ``(H, W)`` arrays of intensities in [0, 1] (0 = black); map values are in the same
intensity units, so a value of 0.1 means "10 % of the display range". Everything here is pure numpy/scipy/
Pillow: arrays in, arrays (or one ``PIL.Image``) out, no I/O besides decoding PNG bytes handed in.
"""

from __future__ import annotations

import io
import logging
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from scipy import ndimage

__all__ = [
    "BANNER_TEXT",
    "DEFAULT_SCALE_PERCENTILE",
    "DEFAULT_THRESHOLD_PERCENTILE",
    "AttributionMap",
    "MapSettings",
    "MapSummary",
    "changed_region",
    "difference_map",
    "load_mask_png",
    "render_annotated_export",
    "render_legend",
    "render_overlay",
    "summarize",
    "threshold_value",
]

logger = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]
RGBImage = NDArray[np.uint8]
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

THRESHOLD_MODES = ("percentile", "absolute")
OVERLAY_MODES = ("magnitude", "signed", "outline", "stability")
LEGEND_POSITIONS = ("right", "bottom")
DEFAULT_SCALE_PERCENTILE = 99.5
"""Percentile of the map (inside the mask) that maps to full opacity when no fixed scale is given."""
DEFAULT_THRESHOLD_PERCENTILE = 95.0
"""Percentile used where a threshold is needed (summary, outline) and none was given."""
BANNER_TEXT = "AI-generated counterfactual — not for diagnostic use"
MAX_MASK_PIXELS = 8192 * 8192
"""Refuse mask PNGs larger than this (decompression-bomb guard)."""

_RANGE_TOLERANCE = 1e-4
# Overlay hues, RGB in [0, 1]. Blue is lightened because pure blue vanishes over dark lung fields; the
# stability map gets its own hue so uncertainty is never mistaken for attribution.
_RED = (1.0, 0.0, 0.0)
_BLUE = (0.15, 0.45, 1.0)
_AMBER = (1.0, 0.75, 0.0)
_RED_U8 = (255, 0, 0)
_LEGEND_BACKGROUND = (24, 24, 24)
_LEGEND_TEXT = (235, 235, 235)
_EXPORT_BACKGROUND = (16, 16, 16)
_BANNER_BACKGROUND = (255, 196, 0)
_BANNER_TEXT_COLOUR = (0, 0, 0)
_CAPTIONS = {
    "magnitude": "|original − counterfactual|",
    "signed": "original − counterfactual (red: removed, blue: added)",
    "stability": "per-pixel SD of original − counterfactual across samples",
    "outline": "outline: |original − counterfactual| ≥ threshold",
}


# --------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapSettings:
    """User-facing settings for computing and displaying a map.

    Attributes:
        smoothing_sigma: Gaussian smoothing of the difference, standard deviation in pixels (0 = none).
        threshold: ``None`` for no threshold; a percentile in [0, 100] of |M| inside the mask when
            ``threshold_mode == "percentile"``; an absolute |M| in intensity units (>= 0) when ``"absolute"``.
        threshold_mode: ``"percentile"`` or ``"absolute"``.
        signed: Render red/blue signed maps instead of magnitude.

    Raises:
        ValueError: On a negative or non-finite sigma, an unknown mode, or a threshold outside its range.
    """

    smoothing_sigma: float = 0.0
    threshold: float | None = None
    threshold_mode: str = "percentile"
    signed: bool = False

    def __post_init__(self) -> None:
        _check_sigma(self.smoothing_sigma)
        if self.threshold is None:
            _check_threshold_mode(self.threshold_mode)
        else:
            _check_threshold(self.threshold, self.threshold_mode)


@dataclass
class AttributionMap:
    """A difference map in the native image frame.

    Attributes:
        signed: ``reference − counterfactual`` (mean over samples, after smoothing), float32 ``(H, W)``,
            intensity units, roughly in [-1, 1].
        magnitude: ``|signed|``, float32 ``(H, W)``, in [0, 1].
        std: Per-pixel standard deviation of the (smoothed) difference across samples (``ddof=1``),
            float32 ``(H, W)``; ``None`` when ``n_samples == 1``.
        n_samples: Number of counterfactual samples averaged (>= 1).
        mask: Region of interest, bool ``(H, W)``, or ``None`` for the whole frame. The maps themselves are
            *not* zeroed outside it; thresholds, summaries and overlays are restricted to it.
    """

    signed: FloatImage
    magnitude: FloatImage
    std: FloatImage | None
    n_samples: int
    mask: BoolImage | None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the map in pixels."""
        return (int(self.signed.shape[0]), int(self.signed.shape[1]))

    def region_mask(self) -> BoolImage:
        """The mask, or an all-True ``(H, W)`` array when there is none."""
        return self.mask if self.mask is not None else np.ones(self.shape, dtype=bool)


@dataclass(frozen=True)
class MapSummary:
    """Summary figures of a map, restricted to its mask (or the whole frame).

    Attributes:
        n_samples: Number of counterfactual samples averaged.
        threshold_mode: ``"percentile"`` or ``"absolute"``.
        threshold_parameter: The threshold as given (a percentile, or an absolute value).
        threshold_value: The threshold in intensity units of |M|.
        mask_area_px: Pixels inside the mask (``H * W`` without a mask).
        changed_area_px: Pixels inside the mask with ``|M| >= threshold_value`` (and ``|M| > 0``).
        changed_area_fraction: ``changed_area_px / mask_area_px``, in [0, 1].
        mean_abs_in_mask: Mean |M| inside the mask, intensity units.
        max_abs_in_mask: Maximum |M| inside the mask, intensity units.
        centroid_xy: ``(x, y)`` in pixels (column, row; origin top-left) of the |M|-weighted changed region,
            or ``None`` when the region is empty.
        energy_share_in_mask: ``sum(M**2 inside mask) / sum(M**2)`` over the frame, in [0, 1]; ``None`` when
            the map is identically zero.
        mean_std_in_mask: Mean per-pixel sample SD inside the mask, or ``None`` for a single sample.
    """

    n_samples: int
    threshold_mode: str
    threshold_parameter: float
    threshold_value: float
    mask_area_px: int
    changed_area_px: int
    changed_area_fraction: float
    mean_abs_in_mask: float
    max_abs_in_mask: float
    centroid_xy: tuple[float, float] | None
    energy_share_in_mask: float | None
    mean_std_in_mask: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain ``int``/``float``/``None``; the centroid as ``[x, y]``)."""
        return {
            "n_samples": self.n_samples,
            "threshold_mode": self.threshold_mode,
            "threshold_parameter": self.threshold_parameter,
            "threshold_value": self.threshold_value,
            "mask_area_px": self.mask_area_px,
            "changed_area_px": self.changed_area_px,
            "changed_area_fraction": self.changed_area_fraction,
            "mean_abs_in_mask": self.mean_abs_in_mask,
            "max_abs_in_mask": self.max_abs_in_mask,
            "centroid_xy": None if self.centroid_xy is None else [self.centroid_xy[0], self.centroid_xy[1]],
            "energy_share_in_mask": self.energy_share_in_mask,
            "mean_std_in_mask": self.mean_std_in_mask,
        }


# --------------------------------------------------------------------------------------------------------------
# Input checks (errors quote the bad value and say how to fix it)
# --------------------------------------------------------------------------------------------------------------


def _check_unit_image(name: str, value: ArrayLike, ndims: tuple[int, ...] = (2,)) -> FloatImage:
    arr = np.asarray(value)
    if arr.ndim not in ndims:
        wanted = " or ".join({2: "(H, W)", 3: "(S, H, W)"}[n] for n in ndims)
        raise ValueError(
            f"{name} must have shape {wanted}; got shape {arr.shape}. "
            "Pass single-channel images (convert RGB to grayscale first)."
        )
    if arr.size == 0 or min(arr.shape[-2:]) < 1:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass an image with at least one pixel.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}. Convert it with np.asarray(x, np.float32).")
    out = arr.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf); replace them (e.g. np.nan_to_num) first."
        )
    lo, hi = float(out.min()), float(out.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must hold intensities in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]. "
            "Divide 8-bit data by 255 (16-bit by 65535) and clip to [0, 1]."
        )
    return out


def _check_mask(mask: ArrayLike, shape: tuple[int, int]) -> BoolImage:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(
            f"mask has shape {m.shape} but the image is {shape}; resize it to the image "
            "(load_mask_png(data, shape) does this for PNG masks)."
        )
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number) or not np.isin(m, (0, 1)).all():
            raise ValueError(
                f"mask must be boolean or hold only 0/1; got dtype {m.dtype} with values in "
                f"[{np.nanmin(m)!r}, {np.nanmax(m)!r}]. Threshold it first, e.g. mask > 0.5."
            )
        m = m != 0
    if not m.any():
        raise ValueError("mask selects no pixels; pass mask=None for the whole frame or a mask with a region.")
    return m


def _check_sigma(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"smoothing_sigma must be a finite number of pixels >= 0; got {sigma!r}. Use 0 for none.")


def _check_threshold_mode(mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}; got {mode!r}.")


def _check_threshold(threshold: float, mode: str) -> None:
    _check_threshold_mode(mode)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold!r}.")
    if mode == "percentile" and not 0.0 <= threshold <= 100.0:
        raise ValueError(
            f"a percentile threshold must be in [0, 100]; got {threshold!r}. "
            "For an absolute |M| value use threshold_mode='absolute'."
        )
    if mode == "absolute" and threshold < 0:
        raise ValueError(f"an absolute threshold is a magnitude and must be >= 0; got {threshold!r}.")


def _check_opacity(opacity: float) -> None:
    if not math.isfinite(opacity) or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1]; got {opacity!r}. Use e.g. 0.6 (60 %).")


def _check_scale(scale: float | None) -> None:
    if scale is not None and (not math.isfinite(scale) or scale <= 0):
        raise ValueError(
            f"scale must be a positive intensity difference (e.g. 0.2) or None for the map's own "
            f"{DEFAULT_SCALE_PERCENTILE}th percentile; got {scale!r}."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


# --------------------------------------------------------------------------------------------------------------
# Maps and statistics
# --------------------------------------------------------------------------------------------------------------


def difference_map(
    reference: ArrayLike,
    counterfactuals: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    smoothing_sigma: float = 0.0,
) -> AttributionMap:
    """Compute ``M = reference − counterfactual``, averaged over samples, with per-pixel SD.

    Order of operations: (1) per-sample difference ``reference − counterfactual[s]``; (2) Gaussian smoothing
    of each difference (``sigma`` in pixels, reflect at the borders); (3) mean over samples → ``signed``,
    ``|signed|`` → ``magnitude``; (4) SD over samples (``ddof=1``) → ``std`` when ``S > 1``. Smoothing is
    linear, so smoothing-then-averaging equals averaging-then-smoothing. The mask is stored, not applied:
    maps keep full-frame values so that the energy share inside the mask can be reported.

    Args:
        reference: The original image, or the autoencoder's reconstruction of it, float ``(H, W)`` in [0, 1].
        counterfactuals: One counterfactual ``(H, W)`` or ``S`` samples ``(S, H, W)``, float in [0, 1], in the
            same frame as ``reference``.
        mask: Optional region of interest (e.g. lungs), bool or 0/1 ``(H, W)``.
        smoothing_sigma: Gaussian standard deviation in pixels; 0 disables smoothing.

    Returns:
        The :class:`AttributionMap` (float32 maps in intensity units).

    Raises:
        ValueError: On shape mismatch, non-finite values, values outside [0, 1], a bad mask or sigma.
    """
    # 1. check inputs
    ref = _check_unit_image("reference", reference)
    cfs = _check_unit_image("counterfactuals", counterfactuals, ndims=(2, 3))
    if cfs.ndim == 2:
        cfs = cfs[None]
    if cfs.shape[1:] != ref.shape:
        raise ValueError(
            f"counterfactuals have frame {cfs.shape[1:]} but reference is {ref.shape}; map both to the same "
            "native frame (undo the letterbox) before differencing."
        )
    _check_sigma(smoothing_sigma)
    region = None if mask is None else _check_mask(mask, ref.shape)

    # 2. per-sample differences, smoothed (float64 so that identical samples give an SD of exactly zero)
    diffs = ref[None].astype(np.float64) - cfs.astype(np.float64)
    if smoothing_sigma > 0:
        diffs = ndimage.gaussian_filter(diffs, sigma=(0.0, smoothing_sigma, smoothing_sigma), mode="reflect")

    # 3. mean and magnitude
    n_samples = int(diffs.shape[0])
    signed = diffs.mean(axis=0)

    # 4. stability across samples
    std = diffs.std(axis=0, ddof=1).astype(np.float32) if n_samples > 1 else None
    return AttributionMap(
        signed=signed.astype(np.float32),
        magnitude=np.abs(signed).astype(np.float32),
        std=std,
        n_samples=n_samples,
        mask=region,
    )


def threshold_value(
    magnitude: ArrayLike,
    *,
    threshold: float,
    mode: str = "percentile",
    mask: ArrayLike | None = None,
) -> float:
    """Turn a threshold setting into a value in the units of ``magnitude``.

    Args:
        magnitude: Non-negative map ``(H, W)`` (|M| or an SD map), intensity units.
        threshold: A percentile in [0, 100] (``mode="percentile"``) or an absolute value >= 0.
        mode: ``"percentile"`` (of the values inside ``mask``) or ``"absolute"`` (returned unchanged).
        mask: Optional bool or 0/1 ``(H, W)`` region the percentile is taken over.

    Returns:
        The threshold in intensity units.

    Raises:
        ValueError: On a bad mode, an out-of-range threshold, or a mask that does not fit.
    """
    _check_threshold(threshold, mode)
    if mode == "absolute":
        return float(threshold)
    mag = np.asarray(magnitude, dtype=np.float32)
    values = mag[_check_mask(mask, mag.shape)] if mask is not None else mag.ravel()
    return float(np.percentile(values, threshold))


def changed_region(values: ArrayLike, threshold: float, mask: ArrayLike | None = None) -> BoolImage:
    """Pixels counted as changed: ``values >= threshold``, ``values > 0`` and inside ``mask``.

    Unchanged pixels (``values == 0``) never count, so a percentile threshold that falls on zero does not
    flood the frame.

    Args:
        values: Non-negative map ``(H, W)``, intensity units.
        threshold: Threshold in the same units (see :func:`threshold_value`).
        mask: Optional bool or 0/1 ``(H, W)`` region.

    Returns:
        Bool ``(H, W)``.
    """
    v = np.asarray(values, dtype=np.float32)
    region = (v >= threshold) & (v > 0)
    if mask is not None:
        region &= _check_mask(mask, v.shape)
    return region


def summarize(amap: AttributionMap, *, threshold: float | None = None, mode: str = "percentile") -> MapSummary:
    """Summary figures of a map inside its mask.

    Args:
        amap: The map.
        threshold: Percentile in [0, 100] or absolute |M| (see ``mode``); ``None`` uses the
            :data:`DEFAULT_THRESHOLD_PERCENTILE` (so the changed area is then ~5 % by construction; pass an
            absolute threshold to compare areas between images).
        mode: ``"percentile"`` or ``"absolute"``.

    Returns:
        A :class:`MapSummary`.

    Raises:
        ValueError: On a bad threshold or mode.
    """
    if threshold is None:
        threshold, mode = DEFAULT_THRESHOLD_PERCENTILE, "percentile"
    region = amap.region_mask()
    mag = amap.magnitude
    thr = threshold_value(mag, threshold=threshold, mode=mode, mask=amap.mask)
    changed = changed_region(mag, thr, amap.mask)

    inside = mag[region].astype(np.float64)
    weights = np.where(changed, mag, 0.0).astype(np.float64)
    total_weight = float(weights.sum())
    centroid: tuple[float, float] | None = None
    if total_weight > 0:
        ys, xs = np.indices(mag.shape)
        centroid = (float((weights * xs).sum() / total_weight), float((weights * ys).sum() / total_weight))
    energy = np.square(mag.astype(np.float64))
    total_energy = float(energy.sum())
    return MapSummary(
        n_samples=amap.n_samples,
        threshold_mode=mode,
        threshold_parameter=float(threshold),
        threshold_value=thr,
        mask_area_px=int(region.sum()),
        changed_area_px=int(changed.sum()),
        changed_area_fraction=float(changed.sum() / region.sum()),
        mean_abs_in_mask=float(inside.mean()),
        max_abs_in_mask=float(inside.max()),
        centroid_xy=centroid,
        energy_share_in_mask=float(energy[region].sum() / total_energy) if total_energy > 0 else None,
        mean_std_in_mask=None if amap.std is None else float(amap.std[region].astype(np.float64).mean()),
    )


def load_mask_png(data: bytes, shape: tuple[int, int]) -> BoolImage:
    """Decode a mask image (e.g. a user-supplied lung mask PNG) into a bool mask of ``shape``.

    Order of operations: decode with Pillow; colour → luminance, multiplied by alpha when present (so a
    transparent background counts as outside); normalise by the bit depth's full scale (255 or 65535) — except
    label images whose maximum is 1, which are taken as 0/1; threshold ``> 0.5``; resize nearest-neighbour
    to ``shape``.

    Args:
        data: The encoded image bytes (PNG; any format Pillow reads is accepted).
        shape: Target ``(H, W)`` in pixels, the native frame of the image the mask belongs to.

    Returns:
        Bool ``(H, W)``.

    Raises:
        ValueError: If the bytes are not an image, the image is too large, or the mask is empty.
    """
    h, w = (int(shape[0]), int(shape[1]))
    if h < 1 or w < 1:
        raise ValueError(f"shape must be a positive (H, W); got {shape!r}.")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"mask is not a readable image ({len(data)} bytes): {exc}. Upload a PNG mask.") from exc
    if img.width * img.height > MAX_MASK_PIXELS:
        raise ValueError(
            f"mask image is {img.width}x{img.height} pixels; masks must be at most {MAX_MASK_PIXELS} pixels."
        )
    try:
        img.load()
    except OSError as exc:
        raise ValueError(f"mask image could not be decoded: {exc}. Re-save it as PNG.") from exc

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.float64)
        full_scale = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
    elif img.mode == "1":
        values, full_scale = np.asarray(img, dtype=np.float64), 1.0
    else:
        alpha = np.asarray(img.getchannel("A"), dtype=np.float64) / 255.0 if "A" in img.getbands() else None
        decoded: Image.Image = img
        if img.mode == "P" and "transparency" in img.info:
            decoded = img.convert("RGBA")
            alpha = np.asarray(decoded.getchannel("A"), dtype=np.float64) / 255.0
        values = np.asarray(decoded.convert("L"), dtype=np.float64)
        if alpha is not None:
            values = values * alpha
        full_scale = 255.0
    if values.max() == 1.0:  # a 0/1 label image
        full_scale = 1.0
    binary = values / full_scale > 0.5
    if not binary.any():
        raise ValueError(
            f"mask is empty: no pixel is above half of full scale ({full_scale:g}); masks must mark the region "
            "in white (or 1) on black (0)."
        )
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    out = np.asarray(resized) > 127
    if not out.any():
        raise ValueError(
            f"mask region vanished when resized to {shape}; draw a larger region or pass the full-size mask."
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Overlay rendering
# --------------------------------------------------------------------------------------------------------------


def render_overlay(
    original: ArrayLike,
    amap: AttributionMap,
    *,
    opacity: float = 0.6,
    scale: float | None = None,
    threshold: float | None = None,
    threshold_mode: str = "percentile",
    mode: str = "magnitude",
    legend: bool = False,
    legend_position: str = "right",
) -> RGBImage:
    """Draw the map over the grayscale original.

    Order of operations: (1) pick the displayed values: |M| (``magnitude``, ``signed``, ``outline``) or the
    sample SD (``stability``); (2) scale: the given absolute value, else the values' own
    :data:`DEFAULT_SCALE_PERCENTILE`-th percentile inside the mask; (3) ``alpha = opacity * clip(v / scale,
    0, 1)``, zero outside the mask and, with a threshold, below it; (4) blend ``(1 − alpha) * gray +
    alpha * hue`` — red for magnitude and positive M, blue for negative M, amber for stability; in outline
    mode the contour (1 px below 512 px, else 2 px) of the thresholded region is drawn in red at ``opacity``;
    (5) optionally append a legend.

    Args:
        original: The original image, float ``(H, W)`` in [0, 1].
        amap: The map, same ``(H, W)``.
        opacity: Maximum overlay opacity in [0, 1].
        scale: Value (intensity units) drawn at full opacity; a fixed value makes overlays comparable across
            images. ``None`` uses the map's own high percentile.
        threshold: Hide values below this (percentile in [0, 100] or absolute, per ``threshold_mode``); in
            outline mode, the level of the contour (default :data:`DEFAULT_THRESHOLD_PERCENTILE`). In
            stability mode it applies to the SD map.
        threshold_mode: ``"percentile"`` or ``"absolute"``.
        mode: ``"magnitude"``, ``"signed"``, ``"outline"`` or ``"stability"``.
        legend: Append a colour bar with numeric labels.
        legend_position: ``"right"`` (output ``(H, W + L, 3)``) or ``"bottom"`` (``(H + L, W, 3)``).

    Returns:
        uint8 RGB ``(H, W, 3)``, wider or taller with a legend.

    Raises:
        ValueError: On shape mismatch, non-finite input, a bad opacity/scale/threshold/mode, or
            ``mode="stability"`` for a single-sample map.
    """
    # 1. check inputs
    img = _check_unit_image("original", original)
    if img.shape != amap.shape:
        raise ValueError(
            f"original has shape {img.shape} but the map is {amap.shape}; render over the image the map was "
            "computed from (native frame)."
        )
    _check_opacity(opacity)
    _check_scale(scale)
    _check_choice("mode", mode, OVERLAY_MODES)
    _check_choice("legend_position", legend_position, LEGEND_POSITIONS)
    if threshold is not None:
        _check_threshold(threshold, threshold_mode)
    if mode == "stability" and amap.std is None:
        raise ValueError("mode='stability' needs a map from several samples (S > 1); pass (S, H, W) counterfactuals.")

    # 2. displayed values and their scale
    values = amap.std if mode == "stability" and amap.std is not None else amap.magnitude
    region = amap.region_mask()
    used_scale = scale if scale is not None else float(np.percentile(values[region], DEFAULT_SCALE_PERCENTILE))

    # 3. alpha
    if mode == "outline":
        level = DEFAULT_THRESHOLD_PERCENTILE if threshold is None else threshold
        contour_level = threshold_value(values, threshold=level, mode=threshold_mode, mask=amap.mask)
        thr: float | None = contour_level
        changed = changed_region(values, contour_level, amap.mask)
        width = 1 if min(img.shape) < 512 else 2
        contour = changed & ~ndimage.binary_erosion(changed, iterations=width, border_value=0)
        alpha = contour.astype(np.float32) * opacity
    else:
        thr = None
        visible = region
        if threshold is not None:
            thr = threshold_value(values, threshold=threshold, mode=threshold_mode, mask=amap.mask)
            visible = changed_region(values, thr, amap.mask)
        ratio = values / used_scale if used_scale > 0 else np.zeros_like(values)
        alpha = (opacity * np.clip(ratio, 0.0, 1.0) * visible).astype(np.float32)

    # 4. blend
    hue = np.empty((*img.shape, 3), dtype=np.float32)
    if mode == "stability":
        hue[:] = _AMBER
    elif mode == "signed":
        hue[:] = np.where((amap.signed >= 0)[..., None], np.asarray(_RED), np.asarray(_BLUE))
    else:
        hue[:] = _RED
    a = alpha[..., None]
    rgb = (1.0 - a) * img[..., None] + a * hue
    out = _to_uint8(rgb)

    # 5. legend
    if legend:
        length = out.shape[0] if legend_position == "right" else out.shape[1]
        bar = render_legend(length, used_scale, mode, position=legend_position, opacity=opacity, threshold=thr)
        out = np.concatenate([out, bar], axis=1 if legend_position == "right" else 0)
    return out


def render_legend(
    height: int,
    scale: float,
    mode: str = "magnitude",
    *,
    position: str = "right",
    opacity: float = 1.0,
    threshold: float | None = None,
) -> RGBImage:
    """Render a colour bar with numeric labels and a caption, to sit beside an overlay.

    The bar shows the overlay hue blended over mid-gray at ``alpha = opacity * t`` for ``t`` from 0 to 1, i.e.
    the colour a pixel of that value gets over a mid-gray background. Labels are in intensity units of
    ``original − counterfactual``. Text scales with ``height`` (about 1/40 of it, at least 10 px).

    Args:
        height: Length in pixels of the image side the legend is attached to: the image height for
            ``position="right"`` (vertical bar), the image width for ``position="bottom"`` (horizontal bar).
        scale: Value at full colour (intensity units, >= 0).
        mode: ``"magnitude"`` (0 … scale), ``"signed"`` (−scale … +scale), ``"stability"`` (SD 0 … scale) or
            ``"outline"`` (a red swatch labelled with ``threshold``).
        position: ``"right"`` → ``(height, L, 3)``; ``"bottom"`` → ``(L, height, 3)``.
        opacity: The overlay's opacity in [0, 1], so the bar matches the rendered colours.
        threshold: Contour level for ``mode="outline"`` (intensity units).

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
    _check_choice("mode", mode, OVERLAY_MODES)
    _check_choice("position", position, LEGEND_POSITIONS)
    _check_opacity(opacity)
    vertical = position == "right"

    # 2. geometry
    font_px = _font_px(height)
    font = _font(font_px)
    pad = max(4, font_px // 2)
    bar_w = max(8, font_px)
    line_h = _line_height(font)
    bar_len = height - 2 * pad - (line_h if vertical else 0)

    # 3. bar pixels (t = 0 at the start of the bar: bottom when vertical, left when horizontal)
    t = np.linspace(0.0, 1.0, max(bar_len, 2), dtype=np.float32)
    if mode == "signed":
        value = 2.0 * t - 1.0
        hue = np.where((value >= 0)[:, None], np.asarray(_RED), np.asarray(_BLUE))
        strength = np.abs(value)
        labels = [f"{-scale:.3g}", "0", f"+{scale:.3g}"]
    elif mode == "outline":
        hue = np.broadcast_to(np.asarray(_RED), (t.size, 3))
        strength = np.zeros_like(t)
        labels = ["", "", "" if threshold is None else f"≥ {threshold:.3g}"]
    else:
        hue = np.broadcast_to(np.asarray(_AMBER if mode == "stability" else _RED), (t.size, 3))
        strength = t
        labels = ["0", f"{scale / 2:.3g}", f"{scale:.3g}"]
    a = (opacity * strength)[:, None]
    colours = _to_uint8((1.0 - a) * 0.5 + a * hue)  # (bar_len, 3)
    bar = np.repeat(colours[:, None, :], bar_w, axis=1)  # (along the bar, across it, 3)
    if mode == "outline":  # a square outlined swatch at the t = 1 end, next to the threshold label
        bar[:] = _LEGEND_BACKGROUND
        swatch = bar[-bar_w:]
        edge = max(1, bar_w // 6)
        swatch[:edge], swatch[-edge:], swatch[:, :edge], swatch[:, -edge:] = _RED_U8, _RED_U8, _RED_U8, _RED_U8

    # 4. compose
    label_w = max(_text_width(s, font) for s in [*labels, "0.000"])
    caption = _CAPTIONS[mode]
    if vertical:
        cap_font = _fit_font(caption, height - 2 * pad, font_px)
        width = pad + bar_w + pad // 2 + label_w + pad + _line_height(cap_font) + pad
        canvas = Image.new("RGB", (width, height), _LEGEND_BACKGROUND)
        y0 = pad + line_h // 2
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar[::-1])), (pad, y0))
        draw = ImageDraw.Draw(canvas)
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            y = y0 + round((1.0 - frac) * (bar_len - 1)) - line_h // 2
            _draw_text(draw, (pad + bar_w + pad // 2, y), text, font, _LEGEND_TEXT)
        rotated = _text_image(caption, cap_font, _LEGEND_TEXT, _LEGEND_BACKGROUND).transpose(Image.Transpose.ROTATE_90)
        canvas.paste(rotated, (width - pad - rotated.width, max(0, (height - rotated.height) // 2)))
    else:
        cap_font = _fit_font(caption, height - 2 * pad, font_px)
        strip_h = pad + bar_w + pad // 2 + line_h + pad // 2 + _line_height(cap_font) + pad
        canvas = Image.new("RGB", (height, strip_h), _LEGEND_BACKGROUND)
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar.transpose(1, 0, 2))), (pad, pad))
        draw = ImageDraw.Draw(canvas)
        y = pad + bar_w + pad // 2
        for frac, text in zip((0.0, 0.5, 1.0), labels, strict=True):
            x = pad + round(frac * (bar_len - 1)) - round(frac * _text_width(text, font))
            _draw_text(draw, (x, y), text, font, _LEGEND_TEXT)
        cap_x = max(pad, (height - _text_width(caption, cap_font)) // 2)
        _draw_text(draw, (cap_x, y + line_h + pad // 2), caption, cap_font, _LEGEND_TEXT)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_annotated_export(
    original: ArrayLike,
    overlay_rgb: ArrayLike,
    *,
    params: dict[str, str],
    title: str,
    legend: ArrayLike | None = None,
) -> Image.Image:
    """Compose a labelled export: banner, title, original | overlay (+ legend), and a parameter block.

    The banner :data:`BANNER_TEXT` is burned in across the full width at the top. Font sizes scale with the
    image (about 1/40 of its longer side, at least 12 px), so text stays legible at 1024 px.

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
    img = _check_unit_image("original", original)
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
    font = _font(font_px)
    small = _font(max(11, round(font_px * 0.8)))
    banner_font = _font(round(font_px * 1.2))
    pad = font_px
    gap = font_px
    panel_h = max(h, ov.shape[0])
    width = pad + w + gap + ov.shape[1] + pad
    inner = width - 2 * pad

    # 3. text blocks, wrapped to the canvas width
    banner_lines = _wrap(BANNER_TEXT, banner_font, inner)
    title_lines = _wrap(title, font, inner)
    param_lines = [line for key, value in params.items() for line in _wrap(f"{key}: {value}", small, inner)]
    banner_h = pad // 2 + len(banner_lines) * _line_height(banner_font) + pad // 2
    title_h = len(title_lines) * _line_height(font)
    caption_h = _line_height(small)
    params_h = len(param_lines) * _line_height(small)
    height = banner_h + pad + title_h + pad // 2 + caption_h + panel_h + pad + params_h + pad

    # 4. draw
    canvas = Image.new("RGB", (width, height), _EXPORT_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width - 1, banner_h - 1), fill=_BANNER_BACKGROUND)
    y = pad // 2
    for line in banner_lines:
        _draw_text(draw, ((width - _text_width(line, banner_font)) // 2, y), line, banner_font, _BANNER_TEXT_COLOUR)
        y += _line_height(banner_font)
    y = banner_h + pad
    for line in title_lines:
        _draw_text(draw, (pad, y), line, font, _LEGEND_TEXT)
        y += _line_height(font)
    y += pad // 2
    _draw_text(draw, (pad, y), "Original", small, _LEGEND_TEXT)
    _draw_text(draw, (pad + w + gap, y), "Counterfactual attribution overlay", small, _LEGEND_TEXT)
    y += caption_h
    canvas.paste(Image.fromarray(_to_uint8(np.repeat(img[..., None], 3, axis=2))), (pad, y))
    canvas.paste(Image.fromarray(np.ascontiguousarray(ov)), (pad + w + gap, y))
    y += panel_h + pad
    for line in param_lines:
        _draw_text(draw, (pad, y), line, small, _LEGEND_TEXT)
        y += _line_height(small)
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Pixel and text helpers
# --------------------------------------------------------------------------------------------------------------


def _to_uint8(rgb: NDArray[np.floating[Any]]) -> RGBImage:
    out: RGBImage = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _font_px(length: int) -> int:
    return max(10, round(length / 40))


# DejaVu Sans covers the em dash, minus, ≥ and accented letters; Pillow's built-in font (Aileron, Pillow >= 10.1)
# is used when it is absent, and lacks them — see _segments for how those are drawn.
_FONT_CANDIDATES = ("DejaVuSans.ttf",)


@lru_cache(maxsize=32)
def _font(size_px: int) -> _Font:
    for name in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, size_px)
        except OSError:
            continue
    return ImageFont.load_default(size=size_px)


def _fit_font(text: str, max_width: int, size_px: int) -> _Font:
    """The largest font, up to ``size_px`` and down to 8 px, in which ``text`` fits ``max_width``."""
    size = size_px
    while size > 8 and _text_width(text, _font(size)) > max_width:
        size -= 1
    return _font(size)


def _line_height(font: _Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    return int(font.getbbox("Ag|")[3]) + 2


def _em(font: _Font) -> float:
    return float(font.size) if isinstance(font, ImageFont.FreeTypeFont) else float(font.getbbox("M")[2])


@lru_cache(maxsize=4096)
def _has_glyph(font: _Font, char: str) -> bool:
    """Whether ``font`` has ``char``; missing glyphs render as the .notdef box, which is what we compare to."""
    if char.isspace():
        return True
    notdef = font.getmask("\U0010fffd")
    mask = font.getmask(char)
    return bool(mask.size != notdef.size or bytes(mask) != bytes(notdef))


# Dashes drawn as rules when the font lacks them (width in em): the em dash of the banner must never become "-".
_DRAWN_DASHES = {"—": 1.0, "–": 0.5, "−": 0.55}
_ASCII_FALLBACKS = {"≥": ">=", "≤": "<=", "×": "x", "σ": "sd", "µ": "u", "…": "...", "’": "'", "‘": "'"}


def _segments(text: str, font: _Font) -> list[str | float]:
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
def _dash_rows(font: _Font) -> tuple[int, int]:
    """Top and bottom ink rows of the hyphen, relative to the text origin: where a drawn dash sits."""
    h = _line_height(font) + 4
    scratch = Image.new("L", (max(8, int(_em(font)) * 2), h), 0)
    ImageDraw.Draw(scratch).text((0, 0), "-", font=font, fill=255)
    rows = np.flatnonzero(np.asarray(scratch).max(axis=1) > 96)
    if rows.size == 0:
        middle = h // 2
        return middle, middle + max(1, round(_em(font) / 14))
    return int(rows[0]), int(rows[-1]) + 1


def _text_width(text: str, font: _Font) -> int:
    total = 0.0
    for seg in _segments(text, font):
        total += seg * _em(font) if isinstance(seg, float) else font.getlength(seg)
    return math.ceil(total)


def _draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: _Font, fill: tuple[int, int, int]
) -> None:
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


def _text_image(text: str, font: _Font, fill: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (max(1, _text_width(text, font)), _line_height(font)), background)
    _draw_text(ImageDraw.Draw(img), (0, 0), text, font, fill)
    return img


def _wrap(text: str, font: _Font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line (hashes, paths) are split."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_width(word, font) > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_width(word[:cut], font) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines
