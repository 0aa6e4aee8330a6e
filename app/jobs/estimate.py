"""How long runs take: the measured seconds per UNet evaluation and sample, and a run's fixed overhead.

A queued run's start estimate is the rate times the cost of every run ahead of it (in the fair order), plus each
run's measured overhead, plus what the running job has left. Both numbers are exponential averages (weight 0.3 for
the newest run), so that a changed load shows within a few runs. Not thread-safe by design: one worker teaches it,
and a reader that sees the old rate for one request is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["RateEstimator"]


class RateEstimator:
    """Learns from finished runs; estimates run and waiting times in seconds (``None`` before the first lesson).

    Attributes:
        seconds_per_eval: seconds per UNet evaluation and sample (``job_cost``'s unit), or ``None``.
        overhead_s: seconds per run outside denoising (decoding, maps, files), or ``None``.
    """

    def __init__(self) -> None:
        self.seconds_per_eval: float | None = None
        self.overhead_s: float | None = None

    @property
    def measured(self) -> bool:
        """A run has been measured: the estimates are numbers."""
        return self.seconds_per_eval is not None

    def learn(self, denoise_s: float, evaluations: int, samples: int, run_s: float) -> None:
        """Fold one finished run into the averages.

        Args:
            denoise_s: seconds of denoising, as the engine timed them (from the first step's end to the last's).
            evaluations: the UNet evaluations in that time (the run's count minus one), >= 1.
            samples: the run's samples (a batch; at least 1 counts).
            run_s: the run's seconds in the worker; what denoising does not explain is overhead.
        """
        rate = denoise_s / (evaluations * max(1, samples))
        overhead = max(0.0, run_s - denoise_s)
        prev, prev_overhead = self.seconds_per_eval, self.overhead_s
        self.seconds_per_eval = rate if prev is None else 0.7 * prev + 0.3 * rate
        self.overhead_s = overhead if prev_overhead is None else 0.7 * prev_overhead + 0.3 * overhead

    def run_s(self, cost: int) -> float | None:
        """Estimated seconds a run of ``cost`` step-samples holds the worker: cost times the rate, plus the
        overhead; ``None`` before a run has been measured."""
        rate = self.seconds_per_eval
        if rate is None:
            return None
        return cost * rate + (self.overhead_s or 0.0)

    def wait_s(self, ahead: Iterable[int], running_cost: int | None, running_eta_s: float | None) -> float | None:
        """Estimated seconds until a queued run starts.

        Args:
            ahead: the costs of the runs ahead of it, step-samples.
            running_cost: the running job's cost, or ``None`` when the worker is idle.
            running_eta_s: the running job's own estimate of its denoising left (seconds), ``None`` before its
                first step (it then counts whole).

        Returns:
            Seconds, or ``None`` before a run has been measured.
        """
        if self.seconds_per_eval is None:
            return None
        left = sum(self.run_s(c) or 0.0 for c in ahead)
        if running_cost is not None:
            whole = self.run_s(running_cost) or 0.0
            if running_eta_s is not None:  # denoising left, plus the share of the overhead still to come
                left += running_eta_s + (self.overhead_s or 0.0) * 0.5
            else:
                left += whole
        return left
