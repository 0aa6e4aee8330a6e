"""Statistics over per-image values: the project's one AUROC (rank based, ties 1/2) and a percentile bootstrap.

Pure numpy; the localization metrics, the evaluation's oracle and its probe use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["auroc", "auroc_ci", "bootstrap_ci"]

FloatArray = npt.NDArray[np.float64]


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


def auroc_ci(positives: npt.ArrayLike, negatives: npt.ArrayLike, *, n_boot: int = 1000, alpha: float = 0.05,
             seed: int = 0) -> tuple[float, float, float]:
    """:func:`auroc` of a score, ``positives`` against ``negatives``, with a stratified percentile bootstrap
    interval (each class resampled with replacement at its own size, ``numpy.random.default_rng(seed)``).

    Args:
        positives, negatives: 1-D finite scores of each class (at least one each).
        n_boot: number of resamples (>= 1). alpha: 1 - confidence level, in (0, 1).

    Returns:
        ``(estimate, lo, hi)``.

    Raises:
        ValueError: a class empty, not 1-D or not finite; ``n_boot`` < 1; ``alpha`` outside (0, 1).
    """
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    for name, v in (("positives", pos), ("negatives", neg)):
        if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
            raise ValueError(f"auroc_ci: {name} must be a non-empty 1-D finite array, got shape {v.shape}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"auroc_ci: need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot!r}, alpha={alpha!r}")
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    rng = np.random.default_rng(seed)
    boots = [auroc(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))], labels) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return auroc(np.r_[pos, neg], labels), float(lo), float(hi)
