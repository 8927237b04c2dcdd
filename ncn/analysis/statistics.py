"""Statistics of results over seeds: means with 95 % Student-t intervals, paired or Welch differences.

Every comparison the reports make (a variant against its baseline, one route against another)
goes through these functions, so an interval means the same thing in every table. Pure
functions of numbers; scipy is imported on first use.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than 2 values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean of per-seed `values` with its two-sided 95 % Student-t interval (df = n−1).

    Returns (mean, low, high); NaN bounds for a single value, a zero-width interval when all are equal.
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    return mean, *summary_interval(mean, statistics.stdev(values), len(values))


def summary_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    """The two-sided 95 % Student-t interval of a mean from its summary: n values with sample std `std`.

    Returns (low, high) = mean ∓ t(0.975, n−1)·std/√n; NaN bounds for n < 2.
    """
    from scipy.stats import t  # scipy comes with mlflow

    if n < 2:
        return math.nan, math.nan
    half = t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def delta_interval(variant: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, float, str]:
    """Δ = mean(variant) − mean(baseline) with a two-sided 95 % Student-t interval.

    variant, baseline: final val loss by seed. When both ran the same >= 2 seeds (same data
    order and init seed), the interval is the paired one on per-seed differences (df = n−1);
    otherwise Welch's (Welch–Satterthwaite df); NaN bounds when a side has one run.
    Returns (Δ, low, high, "paired" | "welch" | "n/a").
    """
    from scipy.stats import t  # scipy comes with mlflow

    delta = statistics.fmean(variant.values()) - statistics.fmean(baseline.values())
    if set(variant) == set(baseline) and len(variant) > 1:
        diffs = [variant[s] - baseline[s] for s in sorted(variant)]
        half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return delta, delta - half, delta + half, "paired"
    if len(variant) > 1 and len(baseline) > 1:
        a, b = (
            statistics.variance(variant.values()) / len(variant),
            statistics.variance(baseline.values()) / len(baseline),
        )
        if a + b == 0:
            return delta, delta, delta, "welch"
        df = (a + b) ** 2 / (a**2 / (len(variant) - 1) + b**2 / (len(baseline) - 1))
        half = t.ppf(0.975, df) * math.sqrt(a + b)
        return delta, delta - half, delta + half, "welch"
    return delta, math.nan, math.nan, "n/a"
