import keras
import numpy as np
import pytest
from conftest import assert_config_roundtrip, to_numpy

from thumbnet_keras import bicubic_downscaler, build_downscaler
from thumbnet_keras.layers.downscaler import bicubic_taps


def _keys(x, a=-0.5):
    x = np.abs(x)
    return np.where(
        x <= 1,
        (a + 2) * x**3 - (a + 3) * x**2 + 1,
        np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0),
    )


def _reference_matrix(size, factor):
    """Antialiased bicubic resampling written out as a dense (out, in) matrix."""
    out = size // factor
    centers = (np.arange(out) + 0.5) * factor
    m = _keys((np.arange(size)[None, :] + 0.5 - centers[:, None]) / factor)
    return m / m.sum(1, keepdims=True)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_shapes_and_config_roundtrip(factor, rng):
    shape = (24, 36, 3)
    e = build_downscaler(shape, factor, width=8, depth=1)
    x = rng.random((2, *shape), dtype="float32")
    assert e.output_shape == (None, shape[0] // factor, shape[1] // factor, 3)
    assert to_numpy(e(x)).shape == (2, shape[0] // factor, shape[1] // factor, 3)
    assert_config_roundtrip(e, x)
    b = bicubic_downscaler(shape, factor)
    assert b.output_shape == e.output_shape
    assert b.count_params() == sum(
        int(np.prod(w.shape)) for w in b.non_trainable_weights
    )
    assert not b.trainable_weights


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_untrained_downscaler_equals_bicubic(factor, rng):
    shape = (24, 36, 3)
    x = rng.random((2, *shape), dtype="float32")
    e = build_downscaler(shape, factor)
    np.testing.assert_array_equal(
        to_numpy(e(x)), to_numpy(bicubic_downscaler(shape, factor)(x))
    )


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bicubic_matches_reference_and_keras_resize(factor, rng):
    shape = (24, 36, 1)
    x = rng.random((2, *shape), dtype="float32")
    out = to_numpy(bicubic_downscaler(shape, factor)(x))
    ref = np.einsum(
        "ih,jw,bhwc->bijc",
        _reference_matrix(24, factor),
        _reference_matrix(36, factor),
        x,
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)
    resized = keras.ops.image.resize(
        x, (24 // factor, 36 // factor), interpolation="bicubic", antialias=True
    )
    np.testing.assert_allclose(out, to_numpy(resized), atol=1e-5)


def test_bicubic_taps_sum_to_one_and_keep_a_constant_image():
    taps, before, after, border = bicubic_taps(12, 2)
    assert len(taps) == 8 and before == 3 and after == 3
    assert taps.sum() == pytest.approx(1.0)
    # Taps reach 3.5 pixels out: outputs 0-1 and 4-5 lose weight off the edge.
    assert border[2:-2] == pytest.approx(np.ones(2))
    assert border[0] == pytest.approx(1 - (-0.01171875 - 0.03515625 + 0.11328125))
    x = np.full((1, 8, 8, 3), 0.7, "float32")
    np.testing.assert_allclose(
        to_numpy(bicubic_downscaler((8, 8, 3), 2)(x)), 0.7, atol=1e-6
    )


def test_value_range_clips(rng):
    x = rng.random((1, 8, 8, 1), dtype="float32")
    x[0, ::2, ::2, 0] = 1.0  # bicubic overshoots around sharp dots
    x[0, 1::2, 1::2, 0] = 0.0
    out = to_numpy(bicubic_downscaler((8, 8, 1), 2, value_range=(0.2, 0.6))(x))
    assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.6 + 1e-6


def test_downscaler_learns_a_target(rng):
    """The residual branch is trainable: it can fit a target bicubic cannot."""
    shape = (8, 8, 1)
    x = rng.random((32, *shape), dtype="float32")
    target = x[:, ::2, ::2, :]  # nearest-neighbour subsampling
    e = build_downscaler(shape, 2, width=8, depth=1)
    e.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = e.evaluate(x, target, verbose=0)
    e.fit(x, target, epochs=30, batch_size=32, verbose=0)
    assert e.evaluate(x, target, verbose=0) < 0.5 * before


def test_bicubic_frozen_inside_downscaler():
    e = build_downscaler((8, 8, 3), 2)
    names = {w.path for w in e.trainable_weights}
    assert not any("bicubic" in n for n in names)
    assert any("residual_conv" in n for n in names)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_shape": (8, 8, 3), "factor": 1}, "factor"),
        ({"input_shape": (8, 8, 3), "factor": 2.0}, "factor"),
        ({"input_shape": (8, 8, 3), "factor": True}, "factor"),
        ({"input_shape": (10, 8, 3), "factor": 4}, "10x8 is not divisible by factor=4"),
        ({"input_shape": (8, 8), "factor": 2}, "channels-last image shape"),
        ({"input_shape": (8, None, 3), "factor": 2}, "channels-last image shape"),
        ({"input_shape": (8, 8, 64), "factor": 2}, "64 channels"),
        ({"input_shape": (8, 8, 3), "factor": 2, "width": 0}, "width"),
        ({"input_shape": (8, 8, 3), "factor": 2, "depth": -1}, "depth"),
        ({"input_shape": (8, 8, 3), "factor": 2, "value_range": (1, 0)}, "value_range"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_downscaler(**kwargs)


def test_bicubic_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        bicubic_downscaler((9, 9, 3), 2)


@pytest.mark.parametrize("factor", [2, 3])
def test_space_to_depth_moves_blocks_to_channels(factor):
    """Golden: channel (dy * f + dx) * C + c of thumbnail pixel (i, j) is
    image pixel (i * f + dy, j * f + dx, c), the order of tf.nn.space_to_depth."""
    from thumbnet_keras.layers.downscaler import space_to_depth

    shape = (2 * factor, 3 * factor, 2)
    x = np.arange(np.prod(shape), dtype="float32").reshape((1, *shape))
    inputs = keras.Input(shape)
    out = to_numpy(keras.Model(inputs, space_to_depth(inputs, factor))(x))
    assert out.shape == (1, 2, 3, factor * factor * 2)
    for i, j, dy, dx, c in np.ndindex(2, 3, factor, factor, 2):
        assert (
            out[0, i, j, (dy * factor + dx) * 2 + c]
            == x[0, i * factor + dy, j * factor + dx, c]
        )


@pytest.mark.parametrize("variant", ["space_to_depth", "strided"])
def test_variants_start_as_bicubic_and_roundtrip(variant, rng):
    shape = (16, 24, 1)
    x = rng.random((2, *shape), dtype="float32")
    e = build_downscaler(shape, 4, width=4, depth=1, variant=variant)
    np.testing.assert_array_equal(
        to_numpy(e(x)), to_numpy(bicubic_downscaler(shape, 4)(x))
    )
    assert_config_roundtrip(e, x)
    layer_types = {type(layer).__name__ for layer in e.layers}
    assert ("SeparableConv2D" in layer_types) == (variant == "space_to_depth")


def test_default_variant_is_space_to_depth_and_cheaper():
    from thumbnet_keras.evaluation.flops import count_flops

    new = build_downscaler((64, 64, 3), 2)
    old = build_downscaler((64, 64, 3), 2, variant="strided")
    assert "space_to_depth" in {layer.name for layer in new.layers}
    assert count_flops(new) < 0.4 * count_flops(old)


def test_bad_variant():
    from thumbnet_keras import auto_downscaler_width
    from thumbnet_keras.models import backbones

    with pytest.raises(ValueError, match="variant='s2d'"):
        build_downscaler((8, 8, 1), 2, variant="s2d")
    student = backbones.build("tiny_cnn", (4, 4, 1), 2, widths=[4])
    with pytest.raises(ValueError, match="variant"):
        auto_downscaler_width((8, 8, 1), 2, student, variant="s2d")


ONEDNN_OFF_WORKER = """
import numpy as np, tensorflow as tf
from thumbnet_keras import bicubic_downscaler, build_downscaler
x = np.random.default_rng(0).random((2, 24, 24, 3), dtype="float32")
for factor in (2, 4):
    for model in (bicubic_downscaler((24, 24, 3), factor),
                  build_downscaler((24, 24, 3), factor, width=4, depth=1)):
        with tf.GradientTape() as tape:
            y = model(x)
            loss = tf.reduce_sum(y * y)
        assert y.shape == (2, 24 // factor, 24 // factor, 3), y.shape
        for grad in tape.gradient(loss, model.trainable_weights):  # E's
            assert np.isfinite(grad.numpy()).all()
        np.save(f"{model.name}_f{factor}.npy", y.numpy())
print("OK")
"""


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TensorFlow's own kernels (TF_ENABLE_ONEDNN_OPTS=0): a TensorFlow check",
)
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_downscalers_run_on_tensorflow_without_onednn(onednn, tmp_path):
    """TensorFlow's own DepthwiseConv2dNative refuses unequal strides; the
    bicubic passes (stride (f, 1) then (1, f)) used it and ran only where
    oneDNN replaced it (x86, TF_ENABLE_ONEDNN_OPTS on), not on ARM builds or
    with oneDNN off. Both the bicubic thumbnail and E (forward, and backward to E's
    weights) run with and without oneDNN, to the same values."""
    import subprocess
    import sys

    from pipeline_fixtures import subprocess_env

    env = subprocess_env() | {"TF_ENABLE_ONEDNN_OPTS": onednn}
    done = subprocess.run(
        [sys.executable, "-c", ONEDNN_OFF_WORKER],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    for factor in (2, 4):
        y = np.load(tmp_path / f"bicubic_downscaler_f{factor}.npy")
        expected = bicubic_downscaler((24, 24, 3), factor)(
            np.random.default_rng(0).random((2, 24, 24, 3), dtype="float32")
        )
        np.testing.assert_allclose(y, to_numpy(expected), atol=1e-5)
