"""Evaluation metrics for VALD-MD: image similarity (SSIM, MS-SSIM), FID, and localization of attribution maps.

Pure functions on numpy arrays (and torch tensors for the batched SSIM variants); no web, no diffusers. One module
per concern: :mod:`app.metrics.ssim`, :mod:`app.metrics.fid`, :mod:`app.metrics.localization` and
:mod:`app.metrics.stats` (AUROC, bootstrap; numpy only, as is ``localization``), re-exported here.

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

from app.metrics.fid import (
    FID_FEATURE_DIM,
    FID_HELPER_PACKAGE,
    FID_HELPER_SHA256,
    FID_HELPER_WEIGHTS,
    FID_INPUT_SIZE,
    FIDFeatureExtractor,
    default_fid_weights,
    fid_from_features,
    frechet_distance,
)
from app.metrics.localization import (
    boxes_to_mask,
    energy_share,
    pixel_auprc,
    pixel_auroc,
    pointing_game,
    topk_iou_dice,
)
from app.metrics.ssim import (
    MS_SSIM_WEIGHTS,
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMA,
    SSIM_WIN_SIZE,
    ms_ssim,
    ms_ssim_batch,
    ssim,
    ssim_batch,
)
from app.metrics.stats import (
    auroc,
    auroc_ci,
    bootstrap_ci,
)

__all__ = [
    "FID_FEATURE_DIM",
    "FID_HELPER_PACKAGE",
    "FID_HELPER_SHA256",
    "FID_HELPER_WEIGHTS",
    "FID_INPUT_SIZE",
    "MS_SSIM_WEIGHTS",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WIN_SIZE",
    "FIDFeatureExtractor",
    "auroc",
    "auroc_ci",
    "bootstrap_ci",
    "boxes_to_mask",
    "default_fid_weights",
    "energy_share",
    "fid_from_features",
    "frechet_distance",
    "ms_ssim",
    "ms_ssim_batch",
    "pixel_auprc",
    "pixel_auroc",
    "pointing_game",
    "ssim",
    "ssim_batch",
    "topk_iou_dice",
]
