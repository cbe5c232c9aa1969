"""Tests for `thumbnet_keras.models.backbones` (run on every Keras backend)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from thumbnet_keras.models import backbones

# Small enough for a 2-core CPU; 32x32 is the minimum keras.applications
# accepts for ResNet50 and MobileNetV2.
SMALL = (32, 32, 3)
SMALL_KWARGS = {"vgg16": {"head_width": 16}, "mobilenetv2": {"alpha": 0.35}}
DEFAULT_NAME = re.compile(
    r"^(conv2d|dense|batch_normalization|re_lu|activation|add|max_pooling2d|"
    r"flatten|dropout|input_layer|zero_padding2d|global_average_pooling2d)(_\d+)?$"
)


def _images(n: int = 2, shape=SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


@pytest.mark.parametrize("name", backbones.KNOWN_BACKBONES)
def test_builds_logits_model_of_builtin_layers(name):
    model = backbones.build(name, SMALL, num_classes=3, **SMALL_KWARGS.get(name, {}))
    assert model.name == name
    assert model.input_shape == (None, *SMALL)
    assert model.output_shape == (None, 3)
    out = np.asarray(model.predict_on_batch(_images()))
    assert out.shape == (2, 3)
    assert np.all(np.isfinite(out))
    # Logits: the classifier is linear and nothing after it normalizes.
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense)
    assert last.activation is keras.activations.linear
    for layer in model.layers:
        assert not isinstance(layer, keras.layers.Softmax), layer.name
        assert getattr(layer, "activation", None) is not keras.activations.softmax
        # Built-in layers only (loadable with safe_mode without our package).
        assert type(layer).__module__.startswith("keras."), type(layer)
        assert not DEFAULT_NAME.match(layer.name), f"auto-generated name {layer.name}"
        assert not isinstance(layer, keras.layers.Rescaling), "no preprocessing inside"


def test_resnet18_shapes_match_torchvision_layout():
    model = backbones.build("resnet18", (224, 224, 3), num_classes=1000)
    assert model.get_layer("stem_conv").output.shape == (None, 112, 112, 64)
    assert model.get_layer("stem_pool").output.shape == (None, 56, 56, 64)
    assert model.get_layer("stage4_block1_out").output.shape == (None, 7, 7, 512)
    # torchvision.models.resnet18 has 11,689,512 parameters (BN stats excluded).
    assert sum(np.prod(w.shape) for w in model.trainable_weights) == 11_689_512


def test_vgg16_has_batchnorm_and_flatten_head():
    model = backbones.build("vgg16", SMALL, num_classes=4, head_width=16)
    bn = [x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)]
    convs = [x for x in model.layers if isinstance(x, keras.layers.Conv2D)]
    assert len(convs) == 13 and len(bn) == 13
    assert isinstance(model.get_layer("head_flatten"), keras.layers.Flatten)
    assert model.get_layer("fc1").units == 16
    assert model.get_layer("fc2").units == 16
    default = backbones.build("vgg16", SMALL, num_classes=4)
    assert default.get_layer("fc1").units == 4096


def test_tiny_cnn_heads():
    gap = backbones.build("tiny_cnn", SMALL, num_classes=5)
    flat = backbones.build("tiny_cnn", SMALL, num_classes=5, head="flatten")
    assert any(isinstance(x, keras.layers.GlobalAveragePooling2D) for x in gap.layers)
    assert not any(isinstance(x, keras.layers.Flatten) for x in gap.layers)
    assert isinstance(flat.get_layer("head_flatten"), keras.layers.Flatten)
    pools = [x for x in flat.layers if isinstance(x, keras.layers.MaxPooling2D)]
    assert len(pools) == 2
    # 32 -> 16 -> 8 with 64 channels feeds the Dense.
    assert flat.get_layer("logits").kernel.shape == (8 * 8 * 64, 5)
    assert flat.output_shape == (None, 5)


def test_mobilenetv2_alpha_is_width_multiplier():
    model = backbones.build("mobilenetv2", SMALL, num_classes=3, alpha=0.35)
    # 32 * 0.35 rounded to a multiple of 8 (alpha=1.0 gives 32); the last
    # 1x1 conv stays 1280 wide for alpha <= 1 (Sandler et al. 2018).
    assert model.get_layer("Conv1").filters == 16
    assert model.get_layer("Conv_1").filters == 1280


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_weights_h5_round_trip(name, tmp_path):
    source = backbones.build(name, SMALL, num_classes=3)
    path = str(tmp_path / f"{name}.weights.h5")
    source.save_weights(path)
    loaded = backbones.build(name, SMALL, num_classes=3, weights=path)
    fresh = backbones.build(name, SMALL, num_classes=3)
    x = _images()
    expected = np.asarray(source.predict_on_batch(x))
    np.testing.assert_allclose(
        np.asarray(loaded.predict_on_batch(x)), expected, atol=1e-5
    )
    # The fresh random init differs, so the comparison above is meaningful.
    assert not np.allclose(np.asarray(fresh.predict_on_batch(x)), expected)


def test_keras_file_loads_with_safe_mode_without_package(tmp_path):
    model = backbones.build("resnet18", SMALL, num_classes=3)
    path = str(tmp_path / "resnet18.keras")
    model.save(path)
    x = _images()
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(model.predict_on_batch(x))
    script = textwrap.dedent(
        f"""
        import sys
        import keras, numpy as np
        m = keras.saving.load_model({path!r}, safe_mode=True)
        y = np.asarray(m.predict_on_batch(np.load({str(tmp_path / "x.npy")!r})))
        assert "thumbnet_keras" not in sys.modules
        np.save({str(tmp_path / "y.npy")!r}, y)
        print(m.name)
        """
    )
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "resnet18"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)

    # The same file also serves as `weights=` for build().
    rebuilt = backbones.build("resnet18", SMALL, num_classes=3, weights=path)
    np.testing.assert_allclose(
        np.asarray(rebuilt.predict_on_batch(x)), expected, atol=1e-5
    )


# ----------------------------------------------------------------- errors


def test_unknown_name_lists_known_backbones():
    with pytest.raises(ValueError, match="resnet19") as info:
        backbones.build("resnet19", SMALL, num_classes=3)
    for known in backbones.KNOWN_BACKBONES:
        assert known in str(info.value)


@pytest.mark.parametrize(
    "shape", [(32, 32), (32, 32, 3, 1), (None, 32, 3), (32, 0, 3), (32, 32, 64), 32]
)
def test_non_image_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        backbones.build("tiny_cnn", shape, num_classes=3)


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True])
def test_num_classes_below_two(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        backbones.build("tiny_cnn", SMALL, num_classes=num_classes)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_missing_weights_file_names_path(tmp_path, suffix):
    path = str(tmp_path / f"nowhere{suffix}")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        backbones.build("tiny_cnn", SMALL, num_classes=3, weights=path)


def test_weights_h5_from_another_architecture(tmp_path):
    path = str(tmp_path / "tiny.weights.h5")
    backbones.build("tiny_cnn", SMALL, num_classes=3).save_weights(path)
    with pytest.raises(ValueError, match="resnet18") as info:
        backbones.build("resnet18", SMALL, num_classes=3, weights=path)
    assert path in str(info.value)
    assert "weight tensors" in str(info.value)
    # Same architecture, other head: the mismatching shapes are named.
    with pytest.raises(ValueError, match=r"\(64, 3\).*\(64, 5\)"):
        backbones.build("tiny_cnn", SMALL, num_classes=5, weights=path)
    # A file with MORE layers than the model (Keras alone only warns).
    bigger = str(tmp_path / "bigger.weights.h5")
    backbones.build(
        "tiny_cnn", SMALL, num_classes=3, widths=(16, 32, 64, 64)
    ).save_weights(bigger)
    with pytest.raises(ValueError, match="not in the backbone"):
        backbones.build("tiny_cnn", SMALL, num_classes=3, weights=bigger)


def test_weights_h5_of_a_trained_model_loads(tmp_path):
    """A trial: `save_weights` after `compile` and `fit` (the usual way)
    stores the optimizer's variables too, and the file was refused as "from
    a different architecture". Its layers' weights load; the rest is
    skipped."""
    model = backbones.build("tiny_cnn", SMALL, num_classes=3, widths=(8, 8))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((8, *SMALL), dtype=np.float32)
    model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    path = str(tmp_path / "trained.weights.h5")
    model.save_weights(path)
    loaded = backbones.build(
        "tiny_cnn", SMALL, num_classes=3, widths=(8, 8), weights=path
    )
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_file_from_another_architecture(tmp_path):
    path = str(tmp_path / "tiny.keras")
    backbones.build("tiny_cnn", SMALL, num_classes=3).save(path)
    with pytest.raises(ValueError, match="logits/kernel") as info:
        backbones.build("tiny_cnn", SMALL, num_classes=4, weights=path)
    assert path in str(info.value) and "tiny_cnn" in str(info.value)
    with pytest.raises(ValueError, match="weight tensors"):
        backbones.build("tiny_cnn", SMALL, num_classes=3, weights=path, widths=(8, 8))


def test_unsupported_weights_file_type(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        backbones.build("tiny_cnn", SMALL, num_classes=3, weights=str(path))


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "tiny_cnn"])
def test_imagenet_unavailable_for_own_backbones(name):
    with pytest.raises(
        ValueError, match=f"No ImageNet weights exist for backbone '{name}'"
    ):
        backbones.build(name, SMALL, num_classes=3, weights="imagenet")


def test_bad_architecture_options():
    with pytest.raises(ValueError, match="head"):
        backbones.build("tiny_cnn", SMALL, num_classes=3, head="avg")
    with pytest.raises(ValueError, match="head_width"):
        backbones.build("vgg16", SMALL, num_classes=3, head_width=0)
    with pytest.raises(ValueError, match="height and width >= 32"):
        backbones.build("vgg16", (16, 16, 3), num_classes=3, head_width=8)
    with pytest.raises(ValueError, match="resnet18"):
        backbones.build("resnet18", SMALL, num_classes=3, alpha=0.5)


def test_own_backbones_use_pytorch_like_bn_momentum():
    from thumbnet_keras.models.backbones import BN_MOMENTUM

    for name, kwargs in (
        ("tiny_cnn", {}),
        ("resnet18", {}),
        ("vgg16", {"head_width": 8}),
    ):
        model = backbones.build(name, (32, 32, 3), 3, **kwargs)
        momenta = {
            layer.momentum
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }
        assert momenta == {BN_MOMENTUM} == {0.9}, name
    model = backbones.build("tiny_cnn", (32, 32, 3), 3, bn_momentum=0.5)
    assert model.get_layer("stage0_bn").momentum == 0.5
