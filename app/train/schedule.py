"""Learning-rate schedules of the training commands: multipliers of the base rate, for ``torch``'s ``LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine_to_floor(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier of step i: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``.

    Used by ``vae``, ``vae-decoder``, ``unet`` and ``lesion-finetune``.

    Args:
        warmup: warm-up steps (>= 1); step i < warmup gets (i + 1) / warmup.
        total: step at which the multiplier reaches ``floor`` (it stays there after).
        floor: final multiplier in [0, 1].

    Returns:
        step (0-based) -> multiplier in [floor, 1] after the warm-up.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def warmup_cosine_to_zero(steps: int) -> Callable[[int], float]:
    """LR multiplier of step i: linear warm-up over the first 5 % of ``steps``, times a cosine from 1 to 0.

    Used by ``lungs`` and ``lesions``.

    Args:
        steps: total steps (>= 1); the multiplier is 0 at i = steps.

    Returns:
        step (0-based) -> multiplier in [0, 1].
    """
    warmup = max(1, steps // 20)
    return lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))
