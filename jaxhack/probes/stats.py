"""Small exact statistics for the probe analysis (numpy + scipy).

Every function takes a 1-d array of finite numbers (NaN is refused: callers drop undefined values
first and report how many they dropped). Where a statistic is undefined for the sample size
(std and confidence interval need n >= 2; Welch's test needs n >= 2 in both samples and a nonzero
standard error) the result is NaN, and `format_number` prints NaN as "n/a": no number is invented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats

CONFIDENCE_LEVEL = 0.95


def as_finite_array(values) -> np.ndarray:
    """1-d float64 array of `values`; raises ValueError if any value is NaN or infinite."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"statistics need finite values, got {array[~np.isfinite(array)][:5].tolist()}")
    return array


def mean(values) -> float:
    """Arithmetic mean; NaN when there are no values."""
    array = as_finite_array(values)
    if array.size == 0:
        return math.nan
    return float(array.mean())


def std(values) -> float:
    """Sample standard deviation (ddof=1); NaN when n < 2."""
    array = as_finite_array(values)
    if array.size < 2:
        return math.nan
    return float(array.std(ddof=1))


def ci95_mean(values) -> tuple[float, float]:
    """95% confidence interval of the mean, t-based: mean -/+ t_{0.975, n-1} * std / sqrt(n).

    (NaN, NaN) when n < 2 (no spread estimate, so no interval).
    """
    array = as_finite_array(values)
    n = array.size
    if n < 2:
        return (math.nan, math.nan)
    center = float(array.mean())
    t_quantile = float(scipy.stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2, df=n - 1))
    half_width = t_quantile * float(array.std(ddof=1)) / math.sqrt(n)
    return (center - half_width, center + half_width)


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b): statistic, degrees of freedom, p."""

    t: float
    dof: float
    p_two_sided: float


def welch_t_test(a, b) -> WelchResult:
    """Welch's t-test (two-sided) of H0: mean(a) == mean(b).

    t = (mean_a - mean_b) / sqrt(var_a/n_a + var_b/n_b), variances with ddof=1;
    dof by Welch-Satterthwaite: (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1));
    p = 2 * sf(|t|, dof) of Student's t.
    All NaN when either sample has n < 2 or both variances are zero (standard error 0: undefined).
    """
    sample_a = as_finite_array(a)
    sample_b = as_finite_array(b)
    n_a, n_b = sample_a.size, sample_b.size
    if n_a < 2 or n_b < 2:
        return WelchResult(math.nan, math.nan, math.nan)
    var_over_n_a = float(sample_a.var(ddof=1)) / n_a
    var_over_n_b = float(sample_b.var(ddof=1)) / n_b
    squared_standard_error = var_over_n_a + var_over_n_b
    if squared_standard_error == 0.0:
        return WelchResult(math.nan, math.nan, math.nan)
    t = (float(sample_a.mean()) - float(sample_b.mean())) / math.sqrt(squared_standard_error)
    dof = squared_standard_error**2 / (var_over_n_a**2 / (n_a - 1) + var_over_n_b**2 / (n_b - 1))
    p_two_sided = float(2.0 * scipy.stats.t.sf(abs(t), df=dof))
    return WelchResult(t, float(dof), p_two_sided)


@dataclass(frozen=True)
class Summary:
    """Count, mean, sample std and 95% CI of the mean of one sample (NaN where undefined)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values) -> Summary:
    """`Summary` of a sample of finite values."""
    array = as_finite_array(values)
    ci_low, ci_high = ci95_mean(array)
    return Summary(n=int(array.size), mean=mean(array), std=std(array), ci_low=ci_low, ci_high=ci_high)


def format_number(value, digits: int = 3) -> str:
    """Fixed-point text of a number; "n/a" for None or NaN, "inf"/"-inf" for infinities."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def format_p_value(p) -> str:
    """p-value text: "n/a" for NaN, scientific below 1e-3, else 4 decimals."""
    if p is None or math.isnan(float(p)):
        return "n/a"
    p = float(p)
    if p < 1e-3:
        return f"{p:.2e}"
    return f"{p:.4f}"
