"""Region outlines: the lung mask's inner boundary drawn over an image, or on a transparent layer of its own."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app.rendering.palette import OUTLINE_COLOUR, RGBImage

__all__ = ["draw_mask_outline", "mask_outline", "render_mask_outline_rgba"]


def _check_mask_shape(mask: ArrayLike) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError(f"mask must be a 2-D (H, W) array; got shape {m.shape}.")
    return m.astype(bool, copy=False)


def mask_outline(mask: ArrayLike, *, width: int | None = None) -> NDArray[np.bool_]:
    """The inner boundary band of a region: pixels inside ``mask`` within ``width`` pixels of its edge.

    Args:
        mask: bool or 0/1 ``(H, W)``. The image border counts as outside, so a region touching it is closed.
        width: band width in pixels (>= 1); ``None`` = ``max(1, round(max(H, W) / 256))``, which stays about
            2 screen pixels wide when the image is fitted into a 512-pixel panel.

    Returns:
        bool ``(H, W)``; empty for an empty mask.
    """
    m = _check_mask_shape(mask)
    w = max(1, round(max(m.shape) / 256)) if width is None else int(width)
    if w < 1:
        raise ValueError(f"width must be at least 1 pixel; got {width!r}.")
    if not m.any():
        return np.zeros_like(m)
    from scipy import ndimage  # scipy (~0.3 s to import) with the first use, not the server's start-up

    out: NDArray[np.bool_] = m & ~ndimage.binary_erosion(m, iterations=w, border_value=0)
    return out


def draw_mask_outline(rgb: ArrayLike, mask: ArrayLike, *, colour: tuple[int, int, int] = OUTLINE_COLOUR,
                      width: int | None = None) -> RGBImage:
    """Paint the outline of ``mask`` (:func:`mask_outline`) over an RGB image, opaque, in ``colour``.

    Args:
        rgb: uint8 ``(H', W', 3)`` with ``H' >= H`` and ``W' >= W`` (e.g. an overlay with its legend on the
            right): only the top-left ``(H, W)`` part, the image itself, is painted.
        mask: bool ``(H, W)`` in the image's frame.

    Returns:
        A new uint8 RGB array of ``rgb``'s shape.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True)
    m = _check_mask_shape(mask)
    h, w = m.shape
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] < h or out.shape[1] < w:
        raise ValueError(f"rgb must be uint8 (H, W, 3) at least as large as the mask {m.shape}; got {out.shape}.")
    out[:h, :w][mask_outline(m, width=width)] = colour
    return out


def render_mask_outline_rgba(mask: ArrayLike, *, colour: tuple[int, int, int] = OUTLINE_COLOUR,
                             width: int | None = None) -> NDArray[np.uint8]:
    """The outline of ``mask`` on a transparent layer, uint8 RGBA ``(H, W, 4)``, to lay over any image of the
    same frame (the review page's "lung outline" layer): ``colour`` at alpha 255 on the outline, alpha 0 elsewhere.
    """
    edge = mask_outline(mask, width=width)
    out = np.zeros((*edge.shape, 4), dtype=np.uint8)
    out[edge] = (*colour, 255)
    return out
