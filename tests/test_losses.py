"""Golden tests for the four ThumbNet losses, plus an independent NumPy
implementation compared on random tensors."""

import math

import numpy as np
import pytest
from conftest import to_numpy

from thumbnet_keras import losses as L


def _value(x):
    return float(to_numpy(x))


# -- moment matching ---------------------------------------------------------
def test_moment_matching_golden_single_channel():
    # x: mean 3, population std sqrt(((3-0)^2+(3-2)^2+(3-4)^2+(3-6)^2)/4) = sqrt(5)
    x = np.array([0.0, 2.0, 4.0, 6.0], "float32").reshape(1, 2, 2, 1)
    # t: mean 2, std 1
    t = np.array([1.0, 3.0, 1.0, 3.0], "float32").reshape(1, 2, 2, 1)
    # In units of the image variance, 5: ((2-3)^2 + (1-sqrt(5))^2) / 5.
    expected = (7 - 2 * math.sqrt(5)) / 5
    assert _value(L.moment_matching_loss(x, t)) == pytest.approx(expected, rel=1e-6)


def test_moment_matching_averages_images_and_channels_in_variance_units():
    # Channel 0 of both images is [0, 2, 0, 2] (std 1), channel 1 [0, 4, 0, 4]
    # (std 2): per-channel unit variances 1 and 4.
    x = np.zeros((2, 2, 2, 2), "float32")
    x[..., 0] = [[0, 2], [0, 2]]
    x[..., 1] = [[0, 4], [0, 4]]
    t = np.zeros((2, 1, 2, 2), "float32")
    t[..., 0] = [0, 2]
    t[..., 1] = [0, 4]
    t[0, ..., 0] += 1.0  # image 0, channel 0: mean off by 1 -> 1 / 1
    t[1, ..., 1] += 2.0  # image 1, channel 1: mean off by 2 -> 4 / 4
    value = _value(L.moment_matching_loss(x, t))
    assert value == pytest.approx((1 + 0 + 0 + 1) / 4, rel=1e-6)
    # Unit-free: the same images on a 10x larger value scale cost the same.
    scaled = _value(L.moment_matching_loss(10 * x, 10 * t))
    assert scaled == pytest.approx(value, rel=1e-5)


def test_moment_matching_is_zero_for_same_statistics():
    x = np.array([0.0, 2.0, 0.0, 2.0], "float32").reshape(1, 2, 2, 1)
    t = np.array([0.0, 2.0], "float32").reshape(1, 1, 2, 1)
    assert _value(L.moment_matching_loss(x, t)) == pytest.approx(0.0, abs=1e-10)


# -- distillation ------------------------------------------------------------
def test_distillation_golden():
    # tau = 2: teacher logits [0, 2 ln 3] / 2 -> softmax [1/4, 3/4]; student [1/2, 1/2].
    z_t = np.array([[0.0, 2 * math.log(3.0)]], "float32")
    z_s = np.array([[0.0, 0.0]], "float32")
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    value = _value(L.distillation_loss(z_t, z_s, temperature=2.0))
    assert value == pytest.approx(4 * kl, rel=1e-5)


def test_distillation_is_zero_when_student_matches_and_shift_invariant():
    z = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]], "float32")
    assert _value(L.distillation_loss(z, z + 7.0, temperature=3.0)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_distillation_averages_over_batch():
    z_t = np.array([[0.0, 2 * math.log(3.0)], [0.0, 0.0]], "float32")
    z_s = np.zeros((2, 2), "float32")
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    value = _value(L.distillation_loss(z_t, z_s, temperature=2.0))
    assert value == pytest.approx(4 * kl / 2, rel=1e-5)


# -- feature mapping ---------------------------------------------------------
def test_feature_mapping_golden_4x4_to_2x2():
    f_t = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    f_s = np.zeros((1, 2, 2, 1), "float32")
    # 2x2 block means: 2.5, 4.5, 10.5, 12.5
    expected = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4
    assert _value(L.feature_mapping_loss(f_t, f_s)) == pytest.approx(expected, rel=1e-6)


def test_adaptive_pool_uses_overlapping_bins_for_3_to_2():
    f = np.array([0.0, 1.0, 2.0], "float32").reshape(1, 3, 1, 1)
    pooled = to_numpy(L.adaptive_average_pool(f, (2, 1)))
    # bins [0, 2) and [1, 3), as torch.nn.AdaptiveAvgPool2d
    np.testing.assert_allclose(pooled.ravel(), [0.5, 1.5])


def test_feature_mapping_same_size_is_plain_mse():
    f_t = np.ones((2, 3, 3, 4), "float32")
    f_s = np.zeros((2, 3, 3, 4), "float32")
    assert _value(L.feature_mapping_loss(f_t, f_s)) == pytest.approx(1.0)


# -- classification ----------------------------------------------------------
def test_classification_golden():
    z = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], "float32")
    y = np.array([1, 0])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert _value(L.classification_loss(y, z)) == pytest.approx(expected, rel=1e-6)


# -- independent implementation on random tensors ----------------------------
def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_against_independent_numpy_implementation(rng):
    x = rng.normal(size=(3, 8, 6, 2)).astype("float32")
    t = rng.normal(size=(3, 4, 3, 2)).astype("float32")
    mm = np.mean(
        ((t.mean((1, 2)) - x.mean((1, 2))) ** 2 + (t.std((1, 2)) - x.std((1, 2))) ** 2)
        / x.var((1, 2)).mean(0)
    )
    assert _value(L.moment_matching_loss(x, t)) == pytest.approx(mm, rel=1e-5)

    z_t = rng.normal(scale=3, size=(5, 7)).astype("float32")
    z_s = rng.normal(scale=3, size=(5, 7)).astype("float32")
    tau = 2.5
    lp_t, lp_s = _np_log_softmax(z_t / tau), _np_log_softmax(z_s / tau)
    kd = tau**2 * np.mean(np.sum(np.exp(lp_t) * (lp_t - lp_s), -1))
    assert _value(L.distillation_loss(z_t, z_s, tau)) == pytest.approx(kd, rel=1e-5)

    f_t = rng.normal(size=(2, 6, 4, 3)).astype("float32")
    f_s = rng.normal(size=(2, 3, 2, 3)).astype("float32")
    pooled = f_t.reshape(2, 3, 2, 2, 2, 3).mean((2, 4))
    fm = np.mean((pooled - f_s) ** 2)
    assert _value(L.feature_mapping_loss(f_t, f_s)) == pytest.approx(fm, rel=1e-5)


def test_feature_mapping_with_alignment_matrices_golden():
    # A 4x1 teacher map [1, 2, 3, 4] and a 2x1 student map [0, 0]: rows of M_h
    # weight teacher cells by overlap, as `alignment.fm_pooling` makes them.
    f_t = np.array([1.0, 2.0, 3.0, 4.0], "float32").reshape(1, 4, 1, 1)
    f_s = np.zeros((1, 2, 1, 1), "float32")
    m_h = np.array([[0.25, 0.5, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5]], "float32")
    m_w = np.ones((1, 1), "float32")
    # pooled = [0.25 + 1 + 0.75, 1.5 + 2] = [2, 3.5]; MSE = (4 + 12.25) / 2.
    value = _value(L.feature_mapping_loss(f_t, f_s, (m_h, m_w)))
    assert value == pytest.approx((4 + 12.25) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        L.feature_mapping_loss(f_t, f_s, (m_h[:, :3], m_w))


def test_classification_label_smoothing_golden():
    # Logits [0, ln 3]: p = [1/4, 3/4]. Label 1, eps = 0.2, K = 2:
    # (1 - eps) * -ln(3/4) + eps * mean(-ln(1/4), -ln(3/4)).
    z = np.array([[0.0, math.log(3.0)]], "float32")
    y = np.array([1])
    plain = -math.log(0.75)
    smooth = 0.8 * plain + 0.2 * 0.5 * (math.log(4.0) - math.log(0.75))
    assert _value(L.classification_loss(y, z)) == pytest.approx(plain, rel=1e-6)
    assert _value(L.classification_loss(y, z, 0.2)) == pytest.approx(smooth, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.classification_loss(y, z, 1.0)
    with pytest.raises(ValueError, match="integer class indices"):
        L.classification_loss(np.array([1.0]), z)
    with pytest.raises(ValueError, match="One-hot"):
        L.classification_loss(np.array([[0, 1]]), z)
    assert _value(L.classification_loss(np.array([[1]]), z)) == pytest.approx(plain)


# -- bad input ---------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="temperature"):
        L.distillation_loss(np.zeros((1, 2)), np.zeros((1, 2)), temperature=0)
    with pytest.raises(ValueError, match="same number of classes"):
        L.distillation_loss(np.zeros((1, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="rank 4"):
        L.moment_matching_loss(np.zeros((2, 2, 1)), np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="same channels"):
        L.moment_matching_loss(np.zeros((1, 2, 2, 3)), np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="1x1 conv"):
        L.feature_mapping_loss(np.zeros((1, 4, 4, 8)), np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="at least as large"):
        L.feature_mapping_loss(np.zeros((1, 2, 2, 4)), np.zeros((1, 4, 4, 4)))
