"""The four ThumbNet loss terms, written with `keras.ops` only.

Notation: `x` the full-size image batch `(B, H, W, C)`, `t` the thumbnail batch
`(B, h, w, C)`, `z` logits `(B, K)`, `f` feature maps `(B, h', w', D)`.

* `moment_matching_loss(x, t)` (MM): for each image and channel, the mean and
  the population standard deviation over spatial positions. The squared
  differences between thumbnail and image, summed over the two moments, are
  divided by the batch's mean per-channel image variance and averaged over
  images and channels. The loss is therefore unit-free: a thumbnail whose
  mean (or contrast) is off by one typical image standard deviation costs 1,
  whatever the value range, so `mm_weight` means the same on [0, 1] pixels
  and on ImageNet-normalized ones. (An unscaled version was 0.0005-0.005 next
  to a CL loss near 0.4 on [0, 1] images, so its weight did nothing.)
* `distillation_loss(z_t, z_s, temperature)` (KD, Hinton et al. 2015):
  tau^2 times the batch mean of KL(softmax(z_t / tau) || softmax(z_s / tau)).
* `feature_mapping_loss(f_t, f_s, pooling)` (FM): the teacher map pooled onto
  the student map's cells, then the mean squared difference over every
  element. `pooling` is a pair of averaging matrices `(M_h, M_w)` from
  `thumbnet_keras.models.alignment` that make each student cell meet the
  teacher features of the same image region (the trainer computes them from
  both networks' padding and strides); without it, adaptive average pooling
  (PyTorch's bin rule, 7x7 -> 4x4 works), which ignores where cells sit.
* `classification_loss(y, z, label_smoothing)` (CL): categorical
  cross-entropy on logits against labels smoothed by `label_smoothing`
  (Szegedy et al. 2016), batch mean.

Why not `keras.distillation.LogitsDistillation`: it computes KL on softmax
*probabilities* clipped to [1e-7, 1], which departs from the definition when
the student puts less than 1e-7 on a class the teacher likes; here KD uses
`log_softmax` and is exact. `FeatureDistillation` requires equal shapes, and
the teacher's map is larger than the student's, so FM pools first.
"""

from __future__ import annotations

import numpy as np
from keras import backend, ops

__all__ = [
    "moment_matching_loss",
    "distillation_loss",
    "feature_mapping_loss",
    "classification_loss",
    "adaptive_average_pool",
    "align_pool",
]

# Variances below this are treated as this, so the gradient of sqrt stays
# finite on flat (constant) channels. sqrt(1e-12) = 1e-6, far below any
# difference the loss cares about.
_VARIANCE_FLOOR = 1e-12
_MM_SCALE_FLOOR = 1e-6


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


def moment_matching_loss(x, t, scale=None):
    """MM loss: the thumbnail keeps each channel's mean and standard deviation.

    Args:
        x: original images, `(B, H, W, C)`.
        t: thumbnails, `(B, h, w, C)`.
        scale: `v_c` given, `(C,)` (e.g. averaged over the replicas of a
            distributed batch, as `ThumbNetTrainer` does); None: this batch's.

    Returns:
        A scalar: mean over images b and channels c of
        `[(mu_t - mu_x)^2 + (sigma_t - sigma_x)^2] / v_c`, with spatial means
        `mu`, population standard deviations `sigma`, and `v_c` the batch
        mean of `sigma_x^2` for channel c (floored at 1e-6): unit-free.
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
    # Floored so a batch that is flat in a channel (blank frames) cannot blow
    # the loss up: 1e-6 is a standard deviation of 1e-3 value units.
    if scale is None:
        scale = ops.mean(ops.square(sigma_x), axis=0)
    scale = ops.maximum(ops.cast(scale, "float32"), _MM_SCALE_FLOOR)
    squared = ops.square(mu_t - mu_x) + ops.square(sigma_t - sigma_x)
    return ops.mean(squared / ops.stop_gradient(scale)[None, :])


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


def align_pool(features, pooling):
    """Pools `(B, H, W, D)` to `(B, h, w, D)` with averaging matrices
    `pooling = (M_h (h, H), M_w (w, W))`."""
    _check_rank("features", features, 4)
    m_h, m_w = (np.asarray(m, dtype="float32") for m in pooling)
    if m_h.shape[1] != features.shape[1] or m_w.shape[1] != features.shape[2]:
        raise ValueError(
            f"Pooling matrices {m_h.shape} x {m_w.shape} do not fit a feature map "
            f"of shape {tuple(features.shape)}."
        )
    features = ops.cast(features, "float32")
    return ops.einsum(
        "ih,jw,bhwd->bijd",
        ops.convert_to_tensor(m_h),
        ops.convert_to_tensor(m_w),
        features,
    )


def feature_mapping_loss(f_teacher, f_student, pooling=None):
    """FM loss: MSE between the student map and the teacher map pooled to it.

    Args:
        f_teacher: teacher features, `(B, H', W', D)`.
        f_student: student features, `(B, h', w', D)` with h' <= H', w' <= W'.
            Adapt channels first (the trainer owns a 1x1 adapter for that).
        pooling: optional `(M_h, M_w)` averaging matrices of shapes `(h', H')`
            and `(w', W')` (`thumbnet_keras.models.alignment.fm_pooling`), so
            that each student cell meets the teacher cells of the same image
            region. None: adaptive average pooling.

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
    if pooling is None:
        pooled = adaptive_average_pool(f_teacher, f_student.shape[1:3])
    else:
        pooled = align_pool(f_teacher, pooling)
        if tuple(pooled.shape[1:3]) != tuple(f_student.shape[1:3]):
            raise ValueError(
                f"`pooling` maps the teacher map to {tuple(pooled.shape[1:3])}, "
                f"but the student map is {tuple(f_student.shape[1:3])}."
            )
    pooled = ops.cast(pooled, "float32")
    return ops.mean(ops.square(pooled - ops.cast(f_student, "float32")))


def _check_labels(y_true) -> None:
    """Class indices only: a float label would be truncated (2.5 -> 2) and a
    one-hot row read as B*K labels, both silently (a practitioner's trial,
    2026-11-30). Static dtype and shape, so checked once per trace."""
    dtype = backend.standardize_dtype(getattr(y_true, "dtype", "int32"))
    try:
        shape = tuple(getattr(y_true, "shape", ()))
    except (TypeError, ValueError):  # unknown rank (tf.py_function labels)
        shape = None
    # The shape first: one-hot rows (float from to_categorical) need argmax,
    # not a cast.
    if shape is not None and (
        len(shape) == 2 and shape[-1] not in (None, 1) or len(shape) > 2
    ):
        raise ValueError(
            f"Labels must be class indices of shape (batch,) or (batch, 1); "
            f"received {dtype} labels of shape {shape}. One-hot labels? Pass "
            "`argmax(y, axis=-1)`."
        )
    if "float" in dtype:
        raise ValueError(
            f"Labels must be integer class indices; received {dtype} labels, which "
            "would be truncated (2.5 -> 2). Pass them as integers, e.g. "
            "`y.astype('int32')`, after checking they are whole numbers."
        )


def check_fit_labels(x, y=None, num_classes: int | None = None) -> None:
    """`fit(x, y)`'s labels checked before any step is traced (the check in
    `classification_loss` would raise mid-trace, and Keras does not recover
    from that: the next `fit` on the same model fails creating variables).
    Reads arrays and tensors (`y`) or a `tf.data.Dataset`'s element spec;
    other inputs (generators, `PyDataset`) are checked when traced. Given
    `num_classes`, labels held in memory are also `check_label_range`d."""
    labels = y
    if y is None:
        spec = getattr(x, "element_spec", None)
        if not isinstance(spec, (tuple, list)) or len(spec) < 2:
            return
        y = spec[1]
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    if hasattr(y, "dtype") and hasattr(y, "shape"):
        _check_labels(y)
    if num_classes:
        check_label_range(labels, num_classes)


def check_label_range(y, num_classes: int) -> None:
    """Labels held in memory (a NumPy array or list, an eager tensor) lie in
    `[0, num_classes)`. Out of range, the backends disagree and none says so
    clearly: TensorFlow fails mid-step, JAX's one-hot row is all zeros, so
    the example silently adds no loss. Labels counted from 1 are the usual
    cause. Labels that only exist inside a pipeline (`tf.data`, a
    generator) are not read here."""
    if y is None or hasattr(y, "element_spec"):
        return
    try:
        values = np.asarray(y)
    except Exception:  # a symbolic or device tensor: nothing to read here
        return
    if values.dtype.kind not in "iu" or values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
        hint = (
            " Labels counted from 1? Pass `y - 1`."
            if low >= 1 and high == num_classes
            else ""
        )
        raise ValueError(
            f"Labels must be class indices in [0, {num_classes}) for a model with "
            f"{num_classes} outputs; received values from {low} to {high}.{hint}"
        )


def labels_missing(x, y=None) -> bool:
    """Whether `fit(x, y)` surely has no labels: `y` None beside an array or
    tensor of images, or a `tf.data.Dataset` whose elements are not
    `(images, labels, ...)` tuples (e.g. dicts). False when it cannot tell
    (a generator, a PyTorch `DataLoader`)."""
    if y is not None:
        return False
    spec = getattr(x, "element_spec", None)
    if spec is not None:
        return not (isinstance(spec, (tuple, list)) and len(spec) >= 2)
    return hasattr(x, "shape") and hasattr(x, "dtype")


def check_validation_labels(validation_data, num_classes: int | None = None) -> None:
    """`check_fit_labels` of `fit(validation_data=...)`: a dataset, or a
    tuple `(x, y[, sample_weight])`."""
    if isinstance(validation_data, (tuple, list)):
        if len(validation_data) >= 2:
            check_fit_labels(validation_data[0], validation_data[1], num_classes)
    elif validation_data is not None:
        check_fit_labels(validation_data, num_classes=num_classes)


def classification_loss(y_true, z_student, label_smoothing=0.0):
    """CL loss: cross-entropy on logits, batch mean.

    Args:
        y_true: integer labels, `(B,)` or `(B, 1)`.
        z_student: logits, `(B, K)`.
        label_smoothing: epsilon in [0, 1): the target is `1 - eps` on the
            label plus `eps / K` on every class. 0: plain sparse
            cross-entropy.
    """
    _check_rank("z_student", z_student, 2)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"`label_smoothing` must be in [0, 1), received {label_smoothing!r}."
        )
    _check_labels(y_true)
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    logits = ops.cast(z_student, "float32")
    per_example = ops.sparse_categorical_crossentropy(y_true, logits, from_logits=True)
    if label_smoothing:
        uniform = -ops.mean(ops.log_softmax(logits, axis=-1), axis=-1)
        per_example = (1.0 - label_smoothing) * per_example + label_smoothing * uniform
    return ops.mean(per_example)
