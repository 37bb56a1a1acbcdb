"""The evaluation statistics: 95% intervals of a success rate over episodes (Wilson) and of a mean over seeds (t).

The evaluate stage records a run's Wilson interval; the report uses it for a task with one seed and the t interval
over seeds otherwise.
"""

from __future__ import annotations

import math

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile

# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); beyond 30, the value at 30 (conservative).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}  # fmt: skip


def seed_interval(values: np.ndarray, low: float, high: float) -> tuple[float, float, float]:
    """Mean (%) and 95% interval over seeds (Student t), clipped to [0, 100]; one seed: the interval given
    (``low``, ``high``: its Wilson interval over episodes, or NaN for none)."""
    n = len(values)
    mean = float(np.mean(values))
    if n == 1:
        return mean, low, high
    half = T95.get(n - 1, T95[30]) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(100.0, mean + half)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for the default ``z``).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0 or ``trials`` successes,
    which matters for success rates near 0% or 100% over a few dozen episodes.
    """
    if trials <= 0:
        raise ValueError(f"need at least one trial for an interval, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1.0 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high
