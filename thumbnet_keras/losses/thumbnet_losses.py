"""The four ThumbNet loss terms, written with `keras.ops` only.

Notation: `x` the full-size image batch `(B, H, W, C)`, `t` the thumbnail batch
`(B, h, w, C)`, `z` logits `(B, K)`, `f` feature maps `(B, h', w', D)`.

* `moment_matching_loss(x, t)` (MM): for each image and channel, the mean and
  the population standard deviation over spatial positions; the loss is the
  batch mean of sum_c [(mu_c(t) - mu_c(x))^2 + (sigma_c(t) - sigma_c(x))^2].
* `distillation_loss(z_t, z_s, temperature)` (KD, Hinton et al. 2015):
  tau^2 times the batch mean of KL(softmax(z_t / tau) || softmax(z_s / tau)).
* `feature_mapping_loss(f_t, f_s)` (FM): the teacher map average-pooled to the
  student map's spatial size (adaptive pooling, PyTorch's bin rule, so 7x7 ->
  4x4 works), then the mean squared difference over every element.
* `classification_loss(y, z)` (CL): sparse categorical cross-entropy on
  logits, batch mean.

Why not `keras.distillation.LogitsDistillation`: it computes KL on softmax
*probabilities* clipped to [1e-7, 1], which departs from the definition when
the student puts less than 1e-7 on a class the teacher likes; here KD uses
`log_softmax` and is exact. `FeatureDistillation` requires equal shapes, and
the teacher's map is larger than the student's, so FM pools first.
"""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = [
    "moment_matching_loss",
    "distillation_loss",
    "feature_mapping_loss",
    "classification_loss",
    "adaptive_average_pool",
]

# Variances below this are treated as this, so the gradient of sqrt stays
# finite on flat (constant) channels. sqrt(1e-12) = 1e-6, far below any
# difference the loss cares about.
_VARIANCE_FLOOR = 1e-12


def _check_rank(name, tensor, rank):
    if len(tensor.shape) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank}, received shape {tuple(tensor.shape)}."
        )


def _spatial_moments(images):
    images = ops.cast(images, "float32")
    mean = ops.mean(images, axis=(1, 2))
    var = ops.mean(ops.square(images - mean[:, None, None, :]), axis=(1, 2))
    return mean, ops.sqrt(ops.maximum(var, _VARIANCE_FLOOR))


def moment_matching_loss(x, t):
    """MM loss: the thumbnail keeps each channel's mean and standard deviation.

    Args:
        x: original images, `(B, H, W, C)`.
        t: thumbnails, `(B, h, w, C)`.

    Returns:
        A scalar: batch mean of sum over channels of the squared differences
        of per-channel spatial means and (population) standard deviations.
    """
    _check_rank("x", x, 4)
    _check_rank("t", t, 4)
    if x.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"Images and thumbnails must have the same channels, received "
            f"x {tuple(x.shape)} and t {tuple(t.shape)}."
        )
    mu_x, sigma_x = _spatial_moments(x)
    mu_t, sigma_t = _spatial_moments(t)
    per_image = ops.sum(ops.square(mu_t - mu_x) + ops.square(sigma_t - sigma_x), -1)
    return ops.mean(per_image)


def distillation_loss(z_teacher, z_student, temperature=4.0):
    """KD loss (Hinton et al. 2015): tau^2 * mean_b KL(p_T^tau || p_S^tau).

    Args:
        z_teacher: teacher logits, `(B, K)`.
        z_student: student logits, `(B, K)`.
        temperature: softening temperature tau > 0.

    Returns:
        A scalar.
    """
    _check_rank("z_teacher", z_teacher, 2)
    _check_rank("z_student", z_student, 2)
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, received {temperature}.")
    if z_teacher.shape[-1] != z_student.shape[-1]:
        raise ValueError(
            f"Teacher and student logits must have the same number of classes, "
            f"received {tuple(z_teacher.shape)} and {tuple(z_student.shape)}."
        )
    log_p_t = ops.log_softmax(ops.cast(z_teacher, "float32") / temperature, axis=-1)
    log_p_s = ops.log_softmax(ops.cast(z_student, "float32") / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return (temperature**2) * ops.mean(kl)


def _pooling_matrix(in_size, out_size):
    """(out, in) matrix averaging PyTorch-style adaptive bins."""
    matrix = np.zeros((out_size, in_size), dtype="float32")
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_average_pool(features, output_size):
    """Average-pools `(B, H, W, D)` to `(B, h, w, D)` with adaptive bins.

    Bin i along an axis of length H covers [floor(i*H/h), ceil((i+1)*H/h)),
    as in `torch.nn.AdaptiveAvgPool2d`; when h divides H this is plain
    average pooling with window and stride H/h.
    """
    _check_rank("features", features, 4)
    in_h, in_w = features.shape[1], features.shape[2]
    out_h, out_w = output_size
    if out_h > in_h or out_w > in_w:
        raise ValueError(
            f"Cannot average-pool a {in_h}x{in_w} map up to {out_h}x{out_w}: the "
            "teacher's feature map must be at least as large as the student's."
        )
    if (in_h, in_w) == (out_h, out_w):
        return features
    pool_h = ops.convert_to_tensor(_pooling_matrix(in_h, out_h))
    pool_w = ops.convert_to_tensor(_pooling_matrix(in_w, out_w))
    features = ops.cast(features, "float32")
    return ops.einsum("ih,jw,bhwd->bijd", pool_h, pool_w, features)


def feature_mapping_loss(f_teacher, f_student):
    """FM loss: MSE between the student map and the teacher map pooled to it.

    Args:
        f_teacher: teacher features, `(B, H', W', D)`.
        f_student: student features, `(B, h', w', D)` with h' <= H', w' <= W'.
            Adapt channels first (the trainer owns a 1x1 adapter for that).

    Returns:
        A scalar: the mean over every element of the squared difference.
    """
    _check_rank("f_teacher", f_teacher, 4)
    _check_rank("f_student", f_student, 4)
    if f_teacher.shape[-1] != f_student.shape[-1]:
        raise ValueError(
            f"Teacher and student feature maps must have the same channels, "
            f"received {tuple(f_teacher.shape)} and {tuple(f_student.shape)}; "
            "map the student's channels with a 1x1 conv first."
        )
    pooled = ops.cast(adaptive_average_pool(f_teacher, f_student.shape[1:3]), "float32")
    return ops.mean(ops.square(pooled - ops.cast(f_student, "float32")))


def classification_loss(y_true, z_student):
    """CL loss: sparse categorical cross-entropy on logits, batch mean."""
    _check_rank("z_student", z_student, 2)
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    per_example = ops.sparse_categorical_crossentropy(
        y_true, ops.cast(z_student, "float32"), from_logits=True
    )
    return ops.mean(per_example)
