"""The colours every renderer draws with, and the one float-to-uint8 conversion of their pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AMBER", "BANNER_BACKGROUND", "BANNER_TEXT_COLOUR", "BLUE", "EXPORT_BACKGROUND", "LEGEND_BACKGROUND",
    "LEGEND_TEXT", "OUTLINE_COLOUR", "RED", "RED_U8", "RGBImage", "to_uint8",
]

RGBImage = NDArray[np.uint8]
OUTLINE_COLOUR = (0, 230, 118)
"""The lung outline's colour (RGB): green, so that it is never mistaken for the map's red, blue or amber."""

# Overlay hues, RGB in [0, 1]. Blue is lightened because pure blue vanishes over dark lung fields; the
# stability map gets its own hue so uncertainty is never mistaken for attribution.
RED = (1.0, 0.0, 0.0)
BLUE = (0.15, 0.45, 1.0)
AMBER = (1.0, 0.75, 0.0)
RED_U8 = (255, 0, 0)
LEGEND_BACKGROUND = (24, 24, 24)
LEGEND_TEXT = (235, 235, 235)
EXPORT_BACKGROUND = (16, 16, 16)
BANNER_BACKGROUND = (255, 196, 0)
BANNER_TEXT_COLOUR = (0, 0, 0)


def to_uint8(rgb: NDArray[np.floating[Any]]) -> RGBImage:
    """Float RGB in [0, 1] (values outside are clipped) → uint8 RGB of the same shape, rounded to nearest."""
    out: RGBImage = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out
