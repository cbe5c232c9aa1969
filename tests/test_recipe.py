"""The training recipe (schedule, optimizer, smoothed loss) and BatchNorm
re-estimation, with hand-computed values."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from thumbnet_keras.pipeline import RunConfig
from thumbnet_keras.pipeline.bn_recalibrate import (
    batchnorm_layers,
    reestimate_batchnorm,
)
from thumbnet_keras.pipeline.recipe import (
    SparseCrossentropy,
    learning_rate_schedule,
    make_optimizer,
    steps_per_epoch,
)


def test_steps_per_epoch_counts_the_short_last_batch():
    prepared = {"splits": {"train": 21, "validation": 3, "test": 7}}
    assert steps_per_epoch(prepared, 8) == 3
    assert steps_per_epoch(prepared, 7) == 3
    assert steps_per_epoch(prepared, 3, "validation") == 1


def test_schedule_warms_up_linearly_then_cosine_decays_to_zero():
    # 3 epochs of 10 steps, 1 warm-up epoch: 10 warm-up, 20 decay steps.
    schedule = learning_rate_schedule(0.1, epochs=3, steps=10, warmup_epochs=1)
    lr = [float(schedule(step)) for step in range(31)]
    np.testing.assert_allclose(lr[:11], [0.01 * s for s in range(11)], atol=1e-7)
    for step in range(10, 31):
        expected = 0.05 * (1 + math.cos(math.pi * (step - 10) / 20))
        np.testing.assert_allclose(lr[step], expected, atol=1e-7)
    assert lr[10] == pytest.approx(0.1) and lr[20] == pytest.approx(0.05)
    assert lr[30] == pytest.approx(0.0, abs=1e-9)
    assert max(lr) == pytest.approx(0.1)


def test_schedule_warmup_is_capped_at_half_the_stage():
    schedule = learning_rate_schedule(1.0, epochs=1, steps=4, warmup_epochs=5)
    lr = [float(schedule(step)) for step in range(5)]
    np.testing.assert_allclose(lr, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)
    no_warmup = learning_rate_schedule(1.0, epochs=1, steps=4, warmup_epochs=0)
    assert float(no_warmup(0)) == pytest.approx(1.0)


def _dense():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_make_optimizer(name):
    config = RunConfig(
        optimizer=name, weight_decay=1e-3, learning_rate=0.5, fm_learning_rate=0.2
    )
    model = _dense()
    optimizer = make_optimizer(config, "fm_pretrain", epochs=2, steps=5, model=model)
    expected = keras.optimizers.AdamW if name == "adamw" else keras.optimizers.SGD
    assert isinstance(optimizer, expected)
    assert optimizer.weight_decay == pytest.approx(1e-3)
    schedule = optimizer._learning_rate
    assert float(schedule(5)) == pytest.approx(0.2)  # fm_learning_rate, peak
    if name == "sgd":
        assert optimizer.nesterov and optimizer.momentum == pytest.approx(0.9)
    optimizer.build(model.trainable_variables)
    decayed = [
        v.name for v in model.trainable_variables if optimizer._use_weight_decay(v)
    ]
    assert decayed == ["kernel"]  # no bias, gamma or beta
    assert config.stage_learning_rate("joint") == 0.5
    assert config.stage_learning_rate("bicubic_kd_equal") == 0.5


def test_sparse_crossentropy_label_smoothing_golden():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = np.full((2, 3), 0.3 / 3)
    target[[0, 1], labels] += 0.7
    expected = -(target * log_p).sum(axis=1).mean()
    loss = SparseCrossentropy(label_smoothing=0.3)
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(SparseCrossentropy()(labels, logits)) == pytest.approx(
        float(plain(labels, logits)), rel=1e-5
    )
    again = SparseCrossentropy.from_config(loss.get_config())
    assert again.label_smoothing == 0.3
    with pytest.raises(ValueError, match="label_smoothing"):
        SparseCrossentropy(label_smoothing=1.0)


def _nested_bn_model():
    """image (4, 4, 1) -> x * 2 + 1 -> inner [BN -> conv -> BN] (frozen)."""
    inner_in = keras.Input((4, 4, 1))
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(inner_in)
    # A bias of 1: bn2's input mean is then 1, not the ~1e-8 a zero bias
    # leaves after bn1's normalization, which `np.allclose` could not tell
    # from its starting value (a torch CI run failed on that).
    x = keras.layers.Conv2D(2, 1, bias_initializer="ones", name="conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn2")(x)
    inner = keras.Model(inner_in, x, name="inner")
    inner.trainable = False
    image = keras.Input((4, 4, 1))
    scaled = keras.layers.Rescaling(2.0, offset=1.0, name="affine")(image)
    return keras.Model(image, inner(scaled), name="outer"), inner


def test_reestimate_batchnorm_golden_nested_and_frozen():
    model, inner = _nested_bn_model()
    rng = np.random.default_rng(0)
    # Uneven batches: the average must weight examples, not batches.
    batches = [rng.normal(3.0, 2.0, (n, 4, 4, 1)).astype("float32") for n in (3, 5, 2)]
    before = [w.copy() for w in model.get_weights()]
    trainable = [v.name for v in model.trainable_variables]
    result = reestimate_batchnorm(model, [(b, None) for b in batches], num_batches=None)
    assert result == {"layers": 2, "batches": 3, "examples": 10}
    bn1 = inner.get_layer("bn1")
    inputs = [2 * b + 1 for b in batches]
    np.testing.assert_allclose(
        np.asarray(bn1.moving_mean), [np.concatenate(inputs).mean()], rtol=1e-5
    )
    variance = sum(len(x) * x.var() for x in inputs) / 10
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), [variance], rtol=1e-5)
    # bn2 sees conv(bn1 in training mode): a per-batch normalized input.
    conv = inner.get_layer("conv")
    kernel, bias = (np.asarray(w) for w in conv.get_weights())
    bn2_inputs = [
        ((x - x.mean()) / np.sqrt(x.var() + bn1.epsilon)) @ kernel[0, 0] + bias
        for x in inputs
    ]
    np.testing.assert_allclose(
        np.asarray(inner.get_layer("bn2").moving_mean),
        np.concatenate(bn2_inputs).reshape(-1, 2).mean(axis=0),
        atol=1e-5,
    )
    # Only the moving statistics changed; momentum and trainable restored.
    after = model.get_weights()
    changed = [not np.allclose(a, b) for a, b in zip(before, after)]
    names = [v.path for v in model.weights]
    assert {n for n, c in zip(names, changed) if c} == {
        "bn1/moving_mean", "bn1/moving_variance",
        "bn2/moving_mean", "bn2/moving_variance",
    }  # fmt: skip
    assert bn1.momentum == 0.9 and inner.get_layer("bn2").momentum == 0.99
    assert (
        not bn1.trainable and [v.name for v in model.trainable_variables] == trainable
    )


def test_reestimate_batchnorm_num_batches_and_empty():
    model, inner = _nested_bn_model()
    batches = [np.full((2, 4, 4, 1), float(i), "float32") for i in range(4)]
    reestimate_batchnorm(model, iter(batches), num_batches=2)
    # Batches 0 and 1 only: inputs 1 and 3 -> mean 2.
    np.testing.assert_allclose(np.asarray(inner.get_layer("bn1").moving_mean), [2.0])
    assert len(batchnorm_layers(model)) == 2
    with pytest.raises(ValueError, match="empty"):
        reestimate_batchnorm(model, [], num_batches=None)
    with pytest.raises(ValueError, match="num_batches"):
        reestimate_batchnorm(model, batches, num_batches=0)


def _tiny_teacher_and_student():
    from thumbnet_keras.models import backbones
    from thumbnet_keras.models.student import make_student

    teacher = backbones.build("tiny_cnn", (32, 32, 1), 3, widths=[4, 8])
    return teacher, make_student(teacher, 2)


@pytest.mark.parametrize(
    "width, smoke, expected",
    [(32, False, "downscaler_width=32"), (32, True, None), (None, False, None)],
)
def test_a_costly_explicit_e_width_is_named_in_run_terms(width, smoke, expected):
    """A user's `downscaler_width` that makes E > 15% of E + S is named as the
    run parameter (not the Python API); smoke runs and the auto width stay quiet."""
    import warnings

    from thumbnet_keras.pipeline.stages import build_run_downscaler

    config = RunConfig(image_size=32, channels=1, downscaler_width=width, smoke=smoke)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher, student = _tiny_teacher_and_student()
        downscaler = build_run_downscaler(
            config, {"normalization": "unit"}, 2, student, teacher
        )
    messages = [str(w.message) for w in caught if "MACs" in str(w.message)]
    assert downscaler.output_shape == (None, 16, 16, 1)
    if expected is None:
        assert messages == []
    else:
        (message,) = messages
        assert expected in message and "--downscaler-width" in message
        assert "build_downscaler" not in message
        auto = int(message.split("(width ")[1].split(" ")[0])
        assert auto < width
