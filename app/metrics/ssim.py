"""SSIM and MS-SSIM: Wang et al. 2004 (SSIM) and 2003 (MS-SSIM), batched in torch and for one numpy pair.

11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03, "valid" filtering (no padding), population (not sample)
covariance; MS-SSIM over 5 scales with the weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` and 2x2
average-pool down-sampling. Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` and ``pytorch_msssim.ms_ssim`` (checked in ``tests/test_metrics.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = ["MS_SSIM_WEIGHTS", "SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "SSIM_WIN_SIZE", "ms_ssim", "ms_ssim_batch",
           "ssim", "ssim_batch"]

SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = SSIM_WIN_SIZE // 2
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float, min_side: int, what: str) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"{what}: expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise ValueError(f"{what}: expected floating-point inputs, got {x.dtype} and {y.dtype}; convert first "
                         "(e.g. uint8 -> float with data_range=255)")
    if not data_range > 0:
        raise ValueError(f"{what}: data_range must be > 0, got {data_range!r}")
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"{what}: images of {x.shape[-2]}x{x.shape[-1]} px are too small; the shorter side must be "
                         f">= {min_side} px (11-tap window" + (", 4 down-samplings)" if min_side > 11 else ")"))
    for name, t in (("a", x), ("b", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: input {name} contains NaN or infinity")
        span = float(t.detach().max() - t.detach().min())
        if span > data_range * (1 + 1e-6):
            raise ValueError(f"{what}: input {name} spans {span:.6g}, more than data_range={data_range}; pass the "
                             "dynamic range of the images (1.0 for [0, 1] floats, 255 for 8-bit)")


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per (N, C) over the valid-filtered maps."""
    c = x.shape[1]
    g = _gaussian_window(x.dtype, x.device)
    wh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov_xy = filt(x * y) - mu_x * mu_y
    cs_map = (2 * cov_xy + c2) / (var_x + var_y + c2)
    lum_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum_map * cs_map).mean(dim=(-2, -1)), cs_map.mean(dim=(-2, -1))


def ssim_batch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image of a batch; differentiable.

    Args:
        x: (N, C, H, W) floating tensor; H and W >= 11.
        y: tensor of the same shape, dtype and device as ``x``.
        data_range: dynamic range of the pixel values (1.0 for [0, 1], 255 for 8-bit); sets C1 = (0.01 L)^2 and
            C2 = (0.03 L)^2.

    Returns:
        (N,) tensor in ``x``'s dtype, values in [-1, 1]: the mean of the SSIM map over the valid region (borders
        of 5 px dropped) and over channels.

    Raises:
        ValueError: shapes differ, inputs are not float, an image is smaller than 11 px, contains NaN, or spans
            more than ``data_range``.
    """
    _check_pair(x, y, data_range, SSIM_WIN_SIZE, "ssim")
    return _ssim_and_cs(x, y, data_range)[0].mean(dim=1)


def ms_ssim_batch(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, weights: Sequence[float] = MS_SSIM_WEIGHTS
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) per image of a batch; differentiable.

    At each of ``len(weights)`` scales the mean contrast-structure term is taken; at the coarsest the full SSIM
    (luminance included). Between scales each image is average-pooled 2x2 with stride 2; an odd last row/column
    is averaged with itself alone (``ceil_mode``), as the reference MATLAB code's symmetric 2x2 filter does, so
    even-sized images (512, 256, ...) are never padded. Per-scale values below 0 are clamped to 0 before the
    fractional powers (as TF and ``pytorch_msssim`` do).

    Args:
        x: (N, C, H, W) floating tensor. With the default 5 scales the shorter side must be > 160 px (the 5th
            scale must still hold the 11-tap window).
        y: tensor of the same shape, dtype and device as ``x``.
        data_range: dynamic range of the pixel values (1.0 for [0, 1], 255 for 8-bit).
        weights: per-scale exponents, finest first; default the paper's 5 weights (sum 0.9999).

    Returns:
        (N,) tensor in ``x``'s dtype, values in [0, 1], averaged over channels.

    Raises:
        ValueError: as :func:`ssim_batch`, with the minimum side ``10 * 2**(len(weights) - 1) + 1`` px.
    """
    levels = len(weights)
    if levels < 1:
        raise ValueError("ms_ssim: weights must hold at least one scale")
    _check_pair(x, y, data_range, (SSIM_WIN_SIZE - 1) * 2 ** (levels - 1) + 1, "ms_ssim")
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    values = []
    for level in range(levels):
        ssim_val, cs = _ssim_and_cs(x, y, data_range)
        if level < levels - 1:
            values.append(torch.relu(cs))
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
            y = F.avg_pool2d(y, kernel_size=2, stride=2, ceil_mode=True)
        else:
            values.append(torch.relu(ssim_val))
    stacked = torch.stack(values, dim=0)  # (levels, N, C)
    return torch.prod(stacked ** w.view(-1, 1, 1), dim=0).mean(dim=1)


def _as_image_pair(a: npt.ArrayLike, b: npt.ArrayLike, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.ndim != 2 or a_arr.shape != b_arr.shape:
        raise ValueError(f"{what}: expected two (H, W) arrays of one shape, got {a_arr.shape} and {b_arr.shape}")
    if a_arr.dtype == np.bool_ or b_arr.dtype == np.bool_:
        raise ValueError(f"{what}: got a bool array; pass image intensities")
    ta = torch.from_numpy(a_arr.astype(np.float64))[None, None]
    tb = torch.from_numpy(b_arr.astype(np.float64))[None, None]
    return ta, tb


def ssim(a: npt.ArrayLike, b: npt.ArrayLike, data_range: float = 1.0) -> float:
    """SSIM of two grayscale images (Wang et al. 2004), computed in float64.

    Gaussian window 11 taps, sigma 1.5; K1 0.01, K2 0.03; population covariance; mean over the valid region.

    Args:
        a: (H, W) image, H and W >= 11, e.g. float in [0, 1].
        b: (H, W) image of the same shape.
        data_range: dynamic range of the pixel values (1.0 for [0, 1] floats, 255 for 8-bit).

    Returns:
        SSIM in [-1, 1]; 1 for identical images.

    Raises:
        ValueError: see :func:`ssim_batch`.
    """
    ta, tb = _as_image_pair(a, b, "ssim")
    return float(ssim_batch(ta, tb, data_range)[0])


def ms_ssim(a: npt.ArrayLike, b: npt.ArrayLike, data_range: float = 1.0) -> float:
    """MS-SSIM of two grayscale images (Wang et al. 2003; 5 scales), computed in float64.

    Args:
        a: (H, W) image whose shorter side is > 160 px, e.g. float in [0, 1].
        b: (H, W) image of the same shape.
        data_range: dynamic range of the pixel values (1.0 for [0, 1] floats, 255 for 8-bit).

    Returns:
        MS-SSIM in [0, 1]; 1 for identical images.

    Raises:
        ValueError: the shorter side is <= 160 px, or see :func:`ms_ssim_batch`.
    """
    ta, tb = _as_image_pair(a, b, "ms_ssim")
    return float(ms_ssim_batch(ta, tb, data_range)[0])
