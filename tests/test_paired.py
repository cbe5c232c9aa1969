"""Paired comparison of two classifiers on the same test images: golden
values computed by hand."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from thumbnet_keras.evaluation.accuracy import evaluate_classifier
from thumbnet_keras.evaluation.paired import (
    clopper_pearson,
    paired_difference,
    verdict,
)


def _pair(a_only: int, b_only: int, both: int, neither: int = 0):
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


def _tail(k, n, p, upper):
    """P(X >= k) or P(X <= k), X ~ Binomial(n, p), summed directly."""
    ks = range(k, n + 1) if upper else range(0, k + 1)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in ks)


def test_golden_interval_and_mcnemar():
    # b = 10, c = 2 of n = 100: d = 0.08. McNemar: P(X <= 2 | 12, 1/2) =
    # (1 + 12 + 66) / 4096, doubled. The interval: the Clopper-Pearson bounds
    # of 10 of 12 (each leaves 2.5% in its tail), mapped by (12/100)(2p - 1).
    r = paired_difference(*_pair(10, 2, 88))
    assert (r["a_only"], r["b_only"], r["examples"]) == (10, 2, 100)
    assert r["difference"] == pytest.approx(0.08)
    assert r["p_value"] == pytest.approx(2 * 79 / 4096)
    low, high = clopper_pearson(10, 12)
    assert _tail(10, 12, low, upper=True) == pytest.approx(0.025, abs=1e-9)
    assert _tail(10, 12, high, upper=False) == pytest.approx(0.025, abs=1e-9)
    assert r["ci95"] == pytest.approx([0.12 * (2 * low - 1), 0.12 * (2 * high - 1)])
    assert r["ci95"] == pytest.approx([0.0038069, 0.1149930], abs=1e-6)
    assert verdict(r) == "ahead"
    # Swapping the models mirrors everything.
    s = paired_difference(*reversed(_pair(10, 2, 88)))
    assert s["difference"] == pytest.approx(-0.08)
    assert s["ci95"] == pytest.approx([-0.1149930, -0.0038069], abs=1e-6)
    assert s["p_value"] == r["p_value"] and verdict(s) == "behind"


def test_one_sided_disagreements_closed_form():
    # A wins all m disagreements: p_hi = 1, p_lo = 0.025 ** (1 / m).
    for m, expected in ((6, "ahead"), (5, "no clear difference")):
        r = paired_difference(*_pair(m, 0, 100 - m))
        low = 0.025 ** (1 / m)
        assert r["ci95"] == pytest.approx([m / 100 * (2 * low - 1), m / 100])
        assert r["p_value"] == pytest.approx(2 / 2**m)  # 0.031 and 0.0625
        assert verdict(r) == expected


def test_one_win_of_many_disagreements_closed_form():
    # k = 1: P(X >= 1 | p) = 1 - (1 - p)**m, so p_lo = 1 - 0.975 ** (1 / m);
    # k = m - 1: P(X <= m - 1 | p) = 1 - p**m, so p_hi = 0.975 ** (1 / m).
    # At p = 1/2 both tails are 1.0 in floating point once m >= 49 or so,
    # where the search used to probe its direction, walk to p = 1 and fail
    # ("math domain error"); a study run crashed at ThumbNet vs its teacher,
    # 205 wins of 652 disagreements.
    for m in (2, 10, 49, 50, 64, 97, 500, 4000):
        low, _ = clopper_pearson(1, m)
        assert low == pytest.approx(1 - 0.975 ** (1 / m), rel=1e-9), m
        _, high = clopper_pearson(m - 1, m)
        assert high == pytest.approx(0.975 ** (1 / m), rel=1e-12), m
    # The study's pair: each bound leaves 2.5% in its tail (summed directly).
    low, high = clopper_pearson(205, 652)
    assert _tail(205, 652, low, upper=True) == pytest.approx(0.025, abs=1e-9)
    assert _tail(205, 652, high, upper=False) == pytest.approx(0.025, abs=1e-9)
    # The same through the paired comparison: ThumbNet wins 1 of 60.
    r = paired_difference(*_pair(1, 59, 9940))
    assert r["difference"] == pytest.approx(-0.0058)
    low, high = clopper_pearson(1, 60)
    assert r["ci95"] == pytest.approx([0.006 * (2 * low - 1), 0.006 * (2 * high - 1)])
    assert _tail(1, 60, high, upper=False) == pytest.approx(0.025, abs=1e-9)
    assert verdict(r) == "behind"


def test_small_counts_interval_agrees_with_the_exact_test():
    # 2 against 8 of 30 images: the Wald interval (-39.4, -0.6) said
    # "behind" while McNemar's exact p is 0.109.
    r = paired_difference(*_pair(2, 8, 20))
    assert r["p_value"] == pytest.approx(2 * 56 / 1024)  # P(X <= 2 | 10) doubled
    assert r["ci95"][0] < 0 < r["ci95"][1] and verdict(r) == "no clear difference"
    # Everywhere: the interval excludes 0 exactly when p < 0.05.
    for b in range(16):
        for c in range(16):
            r = paired_difference(*_pair(b, c, 40 - b - c))
            excludes = r["ci95"][0] > 0 or r["ci95"][1] < 0
            assert excludes == (r["p_value"] < 0.05), (b, c, r)


def test_agreeing_models_and_balanced_disagreement():
    # The images both get right (or wrong) carry no information on the gap.
    same = paired_difference(*_pair(0, 0, 60, 40))
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert same["p_value"] == 1.0 and verdict(same) == "no disagreement"
    # 5 vs 5 of 50: d = 0, symmetric interval; p = 1.
    even = paired_difference(*_pair(5, 5, 40))
    assert even["ci95"][0] == pytest.approx(-even["ci95"][1])
    assert even["p_value"] == 1.0 and verdict(even) == "no clear difference"
    # One test image in each direction: P(X <= 0 | 1, 1/2) = 1/2, two-sided 1.
    assert paired_difference([True, False], [False, True])["p_value"] == 1.0


def test_large_test_sets_stay_finite():
    # ImageNet-sized: 50,000 images, 2,600 vs 2,400 discordant.
    r = paired_difference(*_pair(2600, 2400, 40000, 5000))
    assert r["difference"] == pytest.approx(0.004)
    assert 0.0 < r["p_value"] < 0.01  # z = 200 / sqrt(5000) = 2.83
    assert 0.0 < r["ci95"][0] < 0.004 < r["ci95"][1] < 0.008
    assert verdict(r) == "ahead"


def test_refuses_unpaired_results():
    with pytest.raises(ValueError, match="same images.*3 and 2"):
        paired_difference([True, True, False], [True, False])
    with pytest.raises(ValueError, match="No images"):
        paired_difference([], [])


def test_evaluate_classifier_returns_per_image_hits_in_order():
    # Logits = the inputs (an identity model): rows 0 and 2 right, 1 wrong.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    x = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], "float32")
    y = np.array([1, 2, 2, 0])
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    r = evaluate_classifier(model, batches, ks=(1, 2), return_correct=True)
    assert r["top1"] == 0.5 and r["examples"] == 4
    np.testing.assert_array_equal(r["correct"], [True, False, True, False])
    # Without the option, nothing that is not JSON is returned.
    assert "correct" not in evaluate_classifier(model, batches, ks=(2,))


def test_predicted_classes_are_refused_not_cast():
    """A researcher's trial (2026-12-01): `paired_difference(pred_a, pred_b)`
    (classes, not right/wrong) cast every class but 0 to True and returned a
    plausible interval."""
    with pytest.raises(ValueError, match="one boolean per image"):
        paired_difference([3, 1, 2, 0], [3, 1, 0, 0])
    with pytest.raises(ValueError, match="correct_b must hold"):
        paired_difference([True, False], [0.9, 0.1])
    as_ints = paired_difference([1, 0, 1, 1], np.array([0, 0, 1, 1], "int8"))
    as_bools = paired_difference([True, False, True, True], [False, False, True, True])
    assert as_ints == as_bools and as_ints["a_only"] == 1
