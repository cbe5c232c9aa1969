"""DownscalerPretrainer: E alone, trained through the frozen teacher."""

import keras
import numpy as np
import pytest
from keras import ops

from thumbnet_keras.layers.downscaler import bicubic_downscaler, build_downscaler
from thumbnet_keras.losses import classification_loss, distillation_loss
from thumbnet_keras.models.downscaler_pretrainer import DownscalerPretrainer

SHAPE = (16, 16, 1)


def _teacher(seed=0, activation=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation=activation),
        ],
        name="teacher",
    )


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *SHAPE)).astype("float32")
    y = rng.integers(0, 3, n)
    return x, y


def _arrays(values):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in values]


def test_an_untrained_e_gives_the_teacher_on_up_scaled_bicubic_thumbnails():
    teacher = _teacher()
    e = build_downscaler(SHAPE, 4, width=4, value_range=(0.0, 1.0))
    pre = DownscalerPretrainer(teacher, e, value_range=(0.0, 1.0))
    x, _ = _data()
    # The reference, built from its parts: bicubic 4x4 thumbnail, bicubic
    # back up to 16x16, clipped to the value range, the teacher.
    thumb = bicubic_downscaler(SHAPE, 4, value_range=(0.0, 1.0))(x)
    up = ops.clip(ops.image.resize(thumb, (16, 16), interpolation="bicubic"), 0, 1)
    want = keras.ops.convert_to_numpy(teacher(up))
    got = keras.ops.convert_to_numpy(pre(x))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_loss_is_kd_to_the_full_image_plus_cl():
    teacher = _teacher()
    e = build_downscaler(SHAPE, 2, width=4)
    pre = DownscalerPretrainer(
        teacher, e, temperature=2.0, cl_weight=0.5, kd_weight=2.0, label_smoothing=0.1
    )
    x, y = _data()
    logits = pre(x)
    want = 2.0 * distillation_loss(teacher(x), logits, 2.0) + 0.5 * (
        classification_loss(y, logits, 0.1)
    )
    got = pre.compute_loss(x, y, logits)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want), rtol=1e-5
    )
    # KD alone needs no labels.
    kd_only = DownscalerPretrainer(teacher, e, cl_weight=0.0)
    assert float(keras.ops.convert_to_numpy(kd_only.compute_loss(x, None, logits))) > 0


def test_fit_trains_e_only_and_lowers_the_loss():
    teacher = _teacher()
    e = build_downscaler(SHAPE, 4, width=4, value_range=(0.0, 1.0))
    pre = DownscalerPretrainer(teacher, e, value_range=(0.0, 1.0))
    t_before = _arrays(teacher.weights)
    e_before = _arrays(e.trainable_weights)
    x, y = _data(32)
    pre.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    first = float(keras.ops.convert_to_numpy(pre.compute_loss(x, y, pre(x))))
    history = pre.fit(x, y, batch_size=32, epochs=30, verbose=0).history
    assert {"loss", "kd_loss", "cl_loss", "accuracy"} <= set(history)
    for before, after in zip(t_before, _arrays(teacher.weights)):
        np.testing.assert_array_equal(before, after)  # the teacher is frozen
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(e_before, _arrays(e.trainable_weights))
    ]
    assert max(moved) > 1e-3  # gradients reach E through the teacher
    last = float(keras.ops.convert_to_numpy(pre.compute_loss(x, y, pre(x))))
    assert last < first


def test_it_round_trips_through_its_config():
    teacher = _teacher()
    e = build_downscaler(SHAPE, 2, width=4, value_range=(0.0, 1.0))
    pre = DownscalerPretrainer(
        teacher, e, temperature=3.0, cl_weight=0.5, value_range=(0.0, 1.0)
    )
    again = DownscalerPretrainer.from_config(pre.get_config())
    again.set_weights(pre.get_weights())
    x, _ = _data(4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(pre(x)),
        atol=1e-6,
    )  # fmt: skip
    assert (again.temperature, again.cl_weight, again.value_range) == (
        3.0, 0.5, (0.0, 1.0),
    )  # fmt: skip


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t, e: DownscalerPretrainer(_teacher(activation="softmax"), e),
         "probabilities, not logits"),
        (lambda t, e: DownscalerPretrainer(
            t, build_downscaler((32, 32, 1), 2, width=4)), r"takes \(32, 32, 1\)"),
        (lambda t, e: DownscalerPretrainer(t, e, cl_weight=0, kd_weight=0),
         "nothing to learn"),
        (lambda t, e: DownscalerPretrainer(t, e, value_range=(1, 0)), "low < high"),
        (lambda t, e: DownscalerPretrainer(t, e, label_smoothing=1.0),
         "label_smoothing"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_with_the_reason(make, match):
    with pytest.raises(ValueError, match=match):
        make(_teacher(), build_downscaler(SHAPE, 2, width=4))


def test_cl_without_labels_says_so():
    pre = DownscalerPretrainer(_teacher(), build_downscaler(SHAPE, 2, width=4))
    x, _ = _data(4)
    with pytest.raises(ValueError, match="CL needs labels"):
        pre.compute_loss(x, None, pre(x))
    # Through fit with a metric compiled (a trial: an AttributeError), and
    # KD alone, which needs no labels, trains with them.
    pre.compile(optimizer="adam", metrics=["accuracy"])
    with pytest.raises(ValueError, match="CL needs labels"):
        pre.fit(x, epochs=1, verbose=0)
    kd_only = DownscalerPretrainer(
        _teacher(), build_downscaler(SHAPE, 2, width=4), cl_weight=0.0
    )
    kd_only.compile(optimizer="adam", metrics=["accuracy"])
    logs = kd_only.fit(x, epochs=1, verbose=0).history
    assert "kd_loss" in logs and "accuracy" not in logs


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="XLA is TensorFlow's and JAX's: jit_compile on torch is torch.compile, "
    "whose first use here started inductor's background imports that raced a "
    "later test's tracing (CI, 2026-11-29)",
)
def test_it_trains_when_xla_is_asked_for():
    """`jit_compile=True` (the flows' `--jit-compile on`, or "auto" on a GPU):
    TensorFlow's bicubic resize has no XLA kernel, so on TensorFlow the
    pretrainer compiles its step without XLA instead of failing."""
    teacher = _teacher()
    e = build_downscaler(SHAPE, 2, width=4, value_range=(0.0, 1.0))
    pre = DownscalerPretrainer(teacher, e, value_range=(0.0, 1.0))
    pre.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    x, y = _data(8)
    history = pre.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    if keras.backend.backend() == "tensorflow":
        assert pre.jit_compile is False
