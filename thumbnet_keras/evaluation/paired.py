"""Is one classifier really ahead of another on the same test images?

Two models scored on the same `n` test images differ only on the images one
gets right and the other wrong. With `b` images only model A gets right and
`c` only model B gets right, A's top-1 minus B's is `(b - c) / n`; its
sampling error comes from those `b + c` discordant images alone, not from
the `n` the two agree on. `paired_difference` gives

* the difference and a 95% confidence interval (the Wald interval for paired
  proportions, Agresti, *Categorical Data Analysis*, 3rd ed., sec. 11.1):
  `d ± 1.96 * sqrt((b + c) - (b - c)**2 / n) / n`;
* McNemar's exact test (a two-sided binomial test of `b` against
  `Binomial(b + c, 1/2)`): the chance of a split at least this lopsided if
  the two models were equally good on such images.

This covers what the test sample leaves uncertain, not what training does:
with another seed the gap between two arms changes too (on ELPV its spread
over 3 seeds was 0.5-1.1 points, `docs/results.md`), so "no clear
difference" means the test set cannot tell these two trained models apart,
and "ahead" means it can, for these two models.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["paired_difference", "verdict"]

_Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def _binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of `k` successes in `n` fair coin flips."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    # P(X <= low) in log space, so that n in the tens of thousands is fine.
    log_terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        - n * math.log(2)
        for i in range(low + 1)
    ]
    peak = max(log_terms)
    tail = math.exp(peak) * sum(math.exp(t - peak) for t in log_terms)
    return min(1.0, 2.0 * tail)


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
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
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
    difference = (a_only - b_only) / n
    variance = max(0.0, (a_only + b_only) - (a_only - b_only) ** 2 / n) / n**2
    half = _Z95 * math.sqrt(variance)
    return {
        "difference": difference,
        "ci95": [difference - half, difference + half],
        "p_value": _binomial_two_sided(a_only, a_only + b_only),
        "a_only": a_only,
        "b_only": b_only,
        "examples": n,
    }


def verdict(comparison: dict) -> str:
    """ "ahead", "behind" or "no clear difference": whether the 95% interval
    of A minus B excludes 0."""
    low, high = comparison["ci95"]
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    return "no clear difference"
