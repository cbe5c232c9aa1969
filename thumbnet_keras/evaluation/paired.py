"""Is one classifier really ahead of another on the same test images?

Two models scored on the same `n` test images differ only on the images one
gets right and the other wrong. With `b` images only model A gets right and
`c` only model B gets right, A's top-1 minus B's is `(b - c) / n`; its
sampling error comes from those `b + c` discordant images alone, not from
the `n` the two agree on. `paired_difference` gives

* McNemar's exact test (a two-sided binomial test of `b` against
  `Binomial(b + c, 1/2)`, the smaller tail doubled): the chance of a split
  at least this lopsided if the two models were equally good on such images;
* the difference with an exact 95% interval, conditional on the number of
  disagreements `m = b + c`: the Clopper-Pearson interval `[p_lo, p_hi]` for
  the share of them A wins, mapped to the difference as
  `(m / n) * (2 * p - 1)`. It excludes 0 exactly when McNemar's p < 0.05,
  so the interval and the test never disagree (the Wald interval
  `d ± 1.96 * sqrt((b + c) - (b - c)**2 / n) / n` does, at small counts:
  2 against 8 disagreements of 30 images gives it (-39.4, -0.6) points
  while p = 0.11). When the two agree on every image (`m = 0`) the interval
  is the point 0: the test set holds no evidence either way.

This covers what the test sample leaves uncertain, not what training does:
with another seed the gap between two arms changes too (on ELPV its spread
over 3 seeds was 0.5-1.1 points, `docs/results.md`), so "no clear
difference" means the test set cannot tell these two trained models apart,
and "ahead" means it can, for these two models.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["clopper_pearson", "paired_difference", "verdict"]


def _log_binomial_pmf(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(log C(n, i), i) for i = 0..n, for the tails below."""
    i = np.arange(n + 1)
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    return lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1), i


def _tail(log_comb, i, n: int, p: float, k: int, upper: bool) -> float:
    """P(X >= k) (`upper`) or P(X <= k) for X ~ Binomial(n, p), 0 < p < 1."""
    terms = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    terms = terms[k:] if upper else terms[: k + 1]
    if terms.size == 0:
        return 0.0
    peak = terms.max()
    return float(math.exp(peak) * np.exp(terms - peak).sum())


def _binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of `k` successes in `n` fair coin flips (the
    smaller tail doubled)."""
    if n == 0:
        return 1.0
    log_comb, i = _log_binomial_pmf(n)
    low = min(k, n - k)
    return min(1.0, 2.0 * _tail(log_comb, i, n, 0.5, low, upper=False))


def _solve(f, target: float, rising: bool) -> float:
    """The p in (0, 1) where `f(p)`, increasing in p when `rising` (else
    decreasing), crosses `target` (bisection). The direction is given, not
    probed: near 0 or 1 a tail is 1.0 or 0.0 in floating point at both ends
    of a probe (P(X >= 1 | 50, 1/2) rounds to 1), and a probed direction sent
    the search the wrong way, into p = 1 and `log1p(-1)`."""
    lo, hi = 0.0, 1.0
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):  # the floats between lo and hi are exhausted
            return mid
        if (f(mid) < target) == rising:
            lo = mid
        else:
            hi = mid


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial proportion, `k`
    successes of `n` > 0: the lowest p with P(X >= k | p) >= (1 - level)/2
    and the highest with P(X <= k | p) >= (1 - level)/2."""
    tail = (1.0 - level) / 2
    log_comb, i = _log_binomial_pmf(n)
    low = (
        0.0
        if k == 0
        else _solve(lambda p: _tail(log_comb, i, n, p, k, True), tail, True)
    )
    high = (
        1.0
        if k == n
        else _solve(lambda p: _tail(log_comb, i, n, p, k, False), tail, False)
    )
    return low, high


def _correct(name: str, values) -> np.ndarray:
    """`values` as per-image booleans; predicted classes or scores (any value
    but 0 and 1) are refused: cast to bool they read as "right" wherever
    the class is not 0, and the interval would look plausible."""
    array = np.asarray(values)
    if array.dtype != bool:
        if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"{name} must hold one boolean per image (whether the model's "
                "top-1 is right, e.g. `predicted == labels`), or 0/1; received "
                f"values such as {np.unique(array)[:5].tolist()}."
            )
    return array.astype(bool).reshape(-1)


def paired_difference(correct_a, correct_b) -> dict:
    """Top-1 of model A minus model B on the same images, with its uncertainty.

    Args:
        correct_a, correct_b: per-image booleans (whether each model's top-1
            is right), same length and image order.

    Returns:
        `{"difference": float, "ci95": [low, high], "p_value": float,
        "a_only": b, "b_only": c, "examples": n}`; the difference and bounds
        are fractions (0.013 = 1.3 points).

    Example:

    >>> a = [True] * 10 + [False] * 2 + [True] * 88
    >>> b = [False] * 10 + [True] * 2 + [True] * 88
    >>> r = paired_difference(a, b)
    >>> round(r["difference"], 2), r["a_only"], r["b_only"]
    (0.08, 10, 2)
    """
    a, b = _correct("correct_a", correct_a), _correct("correct_b", correct_b)
    if a.shape != b.shape:
        raise ValueError(
            f"Both models must be scored on the same images; received {a.size} "
            f"and {b.size} results."
        )
    n = int(a.size)
    if n == 0:
        raise ValueError("No images to compare.")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    disagreements = a_only + b_only
    difference = (a_only - b_only) / n
    if disagreements:
        shares = clopper_pearson(a_only, disagreements)
        ci95 = [disagreements / n * (2 * share - 1) for share in shares]
    else:
        ci95 = [0.0, 0.0]
    return {
        "difference": difference,
        "ci95": ci95,
        "p_value": _binomial_two_sided(a_only, a_only + b_only),
        "a_only": a_only,
        "b_only": b_only,
        "examples": n,
    }


def verdict(comparison: dict) -> str:
    """ "ahead", "behind" or "no clear difference": whether the 95% interval
    of A minus B excludes 0 (the same as McNemar's p < 0.05); "no
    disagreement" when the two are right on exactly the same images."""
    if comparison.get("a_only") == 0 and comparison.get("b_only") == 0:
        return "no disagreement"
    low, high = comparison["ci95"]
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    return "no clear difference"
