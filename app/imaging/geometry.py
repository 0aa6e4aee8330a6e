"""Letterbox: fit a native image into the model's square input without cropping, and map results back exactly.

Conventions: continuous pixel coordinates, pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)`` (x = column,
y = row). The native image is resized to ``content_height x content_width`` (its long side becomes ``size``) and
placed at ``(offset_x, offset_y)`` in a ``size x size`` frame filled with ``pad_value``. Resampling is Pillow
mode ``"F"`` (float32) bilinear, which is area-weighted when shrinking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Letterbox", "content_of", "content_to_native", "letterbox", "unletterbox"]


@dataclass(frozen=True)
class Letterbox:
    """Where a native image sits inside the model frame.

    Attributes:
        native_height: H of the native image (rows), pixels.
        native_width: W of the native image (columns), pixels.
        size: Side of the square model frame, pixels.
        scale: Nominal model pixels per native pixel, ``size / max(H, W)``; the exact per-axis factors after
            rounding are ``content_height / H`` and ``content_width / W`` (used by the coordinate maps).
        offset_x: Left padding in the model frame, pixels.
        offset_y: Top padding in the model frame, pixels.
    """

    native_height: int
    native_width: int
    size: int
    scale: float
    offset_x: int
    offset_y: int

    @classmethod
    def fit(cls, native_height: int, native_width: int, size: int) -> Letterbox:
        """The centred letterbox of an ``H x W`` image in a ``size x size`` frame."""
        if min(native_height, native_width, size) < 1:
            raise ValueError(f"letterbox needs positive sizes, got {native_height}x{native_width} -> {size}")
        long_side = max(native_height, native_width)
        content_h = _content_length(native_height, long_side, size)
        content_w = _content_length(native_width, long_side, size)
        return cls(native_height, native_width, size, size / long_side, (size - content_w) // 2,
                   (size - content_h) // 2)

    @property
    def content_height(self) -> int:
        """Rows of model frame covered by the image (the rest is padding)."""
        return _content_length(self.native_height, max(self.native_height, self.native_width), self.size)

    @property
    def content_width(self) -> int:
        """Columns of model frame covered by the image."""
        return _content_length(self.native_width, max(self.native_height, self.native_width), self.size)

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the image inside the model frame, end-exclusive."""
        return (self.offset_x, self.offset_y, self.offset_x + self.content_width,
                self.offset_y + self.content_height)

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Native continuous coordinates -> model-frame coordinates."""
        return (self.offset_x + x * self.content_width / self.native_width,
                self.offset_y + y * self.content_height / self.native_height)

    def to_native(self, x: float, y: float) -> tuple[float, float]:
        """Model-frame continuous coordinates -> native coordinates (inverse of :meth:`to_model`)."""
        return ((x - self.offset_x) * self.native_width / self.content_width,
                (y - self.offset_y) * self.native_height / self.content_height)


def _content_length(length: int, long_side: int, size: int) -> int:
    """``round(length * size / long_side)`` in integers (half up), at least 1 so extreme aspects survive."""
    return max(1, (2 * length * size + long_side) // (2 * long_side))


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 ``(h, w[, C])`` -> float32 ``(height, width[, C])``, bilinear (area-weighted when shrinking)."""
    if img.shape[:2] == (height, width):
        return img.astype(np.float32, copy=True)
    if img.ndim == 3:
        return np.stack([_resize(img[..., c], height, width) for c in range(img.shape[2])], axis=-1)
    resized = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).reshape(height, width)


def _as_image(img: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ValueError(f"{name} must be a non-empty (H, W) or (H, W, C) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def letterbox(img: np.ndarray, size: int, *, pad_value: float = 0.0) -> tuple[np.ndarray, Letterbox]:
    """Resize so the long side is ``size`` and pad (never crop) to ``size x size``.

    Args:
        img: float ``(H, W)`` (or ``(H, W, C)``), e.g. ``DecodedImage.pixels`` in [0, 1].
        size: Model input side, pixels.
        pad_value: Fill of the padding (0 = black).

    Returns:
        float32 ``(size, size[, C])`` and the :class:`Letterbox` to undo it.

    Raises:
        ValueError: Empty or non-finite image, or ``size < 1``.
    """
    arr = _as_image(img, "img")
    lb = Letterbox.fit(arr.shape[0], arr.shape[1], size)
    out = np.full((size, size, *arr.shape[2:]), pad_value, dtype=np.float32)
    x0, y0, x1, y1 = lb.content_box
    out[y0:y1, x0:x1] = _resize(arr, lb.content_height, lb.content_width)
    return out, lb


def unletterbox(img_model: np.ndarray, lb: Letterbox, *, smoothing_sigma: float = 0.0) -> np.ndarray:
    """Undo :func:`letterbox`: drop the padding and resize back to exactly the native shape
    (:func:`content_of`, then :func:`content_to_native`).

    Args:
        img_model: ``(size, size)`` or ``(size, size, C)`` in the model frame (e.g. a counterfactual or a map).
        lb: The letterbox returned with the model input.
        smoothing_sigma: Gaussian standard deviation in model-frame pixels, >= 0 (0 = none, the default): the
            content box alone is smoothed before the resize (``scipy.ndimage.gaussian_filter``, mode ``"reflect"``
            at the content's edges, channels not mixed), so the padding never bleeds into the image. In the model
            frame a smoothing costs milliseconds where the same smoothing of a large native image costs seconds.

    Returns:
        float32 ``(H, W)`` or ``(H, W, C)`` in the native frame.

    Raises:
        ValueError: ``img_model`` is not ``size x size``, or is non-finite; ``smoothing_sigma`` is negative or not
            finite.
    """
    return content_to_native(content_of(img_model, lb, smoothing_sigma=smoothing_sigma), lb)


def content_of(img_model: np.ndarray, lb: Letterbox, *, smoothing_sigma: float = 0.0) -> np.ndarray:
    """The image part of a model-frame array without the padding, at model resolution, optionally smoothed.

    Args:
        img_model: ``(size, size)`` or ``(size, size, C)`` in the model frame.
        lb: The letterbox returned with the model input.
        smoothing_sigma: as in :func:`unletterbox` (model-frame pixels; the content box alone, channels not mixed).

    Returns:
        float32 ``(content_height, content_width[, C])``.

    Raises:
        ValueError: as :func:`unletterbox`.
    """
    arr = _as_image(img_model, "img_model")
    if arr.shape[:2] != (lb.size, lb.size):
        raise ValueError(f"img_model must be ({lb.size}, {lb.size}[, C]) to match the letterbox, got {arr.shape}")
    if not (np.isfinite(smoothing_sigma) and smoothing_sigma >= 0):
        raise ValueError(f"smoothing_sigma must be a finite number of model pixels >= 0; got {smoothing_sigma!r}")
    x0, y0, x1, y1 = lb.content_box
    content = arr[y0:y1, x0:x1]
    if smoothing_sigma > 0:
        from scipy import ndimage  # scipy (~0.3 s to import) with the first use, not the server's start-up

        sigma = (smoothing_sigma, smoothing_sigma) + (0.0,) * (content.ndim - 2)
        content = ndimage.gaussian_filter(content, sigma=sigma, mode="reflect").astype(np.float32, copy=False)
    return content


def content_to_native(content: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Resize a content-box array (:func:`content_of`, or any statistic of such arrays) to the native frame.

    Bilinear (Pillow ``"F"``), hence linear: the resize of a mean of content arrays is the mean of their resizes
    (to float32 rounding), so a map's mean over samples can be taken at model resolution and resized once.

    Args:
        content: float ``(content_height, content_width[, C])``.
        lb: The letterbox it came from.

    Returns:
        float32 ``(H, W[, C])``.

    Raises:
        ValueError: ``content`` is not the letterbox's content size, or is non-finite.
    """
    arr = _as_image(content, "content")
    if arr.shape[:2] != (lb.content_height, lb.content_width):
        raise ValueError(f"content must be ({lb.content_height}, {lb.content_width}[, C]) to match the letterbox, "
                         f"got {arr.shape}")
    return _resize(arr, lb.native_height, lb.native_width)
