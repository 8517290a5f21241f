"""Statistics for evaluation results: bootstrap confidence intervals of a mean, paired tests between runs.

Cases are the unit: a volume is one observation however many voxels it has, so intervals reflect how much the
mean would move with another sample of cases from the same population.
"""
from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (NaNs left out); (nan, nan) with no values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    if values.size == 1:
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def paired_wilcoxon(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-case values (pairs with a NaN left out);
    1.0 when every difference is zero, NaN with fewer than two pairs."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        return math.nan
    if np.all(a == b):
        return 1.0
    return float(wilcoxon(a, b).pvalue)


def behind_the_rest(group, rest) -> float:
    """One-sided Mann-Whitney U p-value that a group's per-case values are lower than the rest's; NaN when
    either side has no values."""
    from scipy.stats import mannwhitneyu

    group, rest = np.asarray(group, dtype=float), np.asarray(rest, dtype=float)
    group, rest = group[~np.isnan(group)], rest[~np.isnan(rest)]
    if group.size == 0 or rest.size == 0:
        return math.nan
    return float(mannwhitneyu(group, rest, alternative="less").pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing several hypotheses at once: the i-th smallest of m is
    multiplied by m - i + 1 and kept at least as large as the adjusted ones before it (capped at 1); NaN stays
    NaN and is not counted among the tests."""
    values = np.asarray(p_values, dtype=float)
    order = [i for i in np.argsort(values) if not math.isnan(values[i])]
    adjusted, running = values.copy(), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * values[i]))
        adjusted[i] = running
    return adjusted.tolist()
