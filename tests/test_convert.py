"""The converter's depthwise rewrite (`deploy.convert.depthwise_form`).

E's bicubic passes are saved as frozen channel-diagonal `Conv2D` layers
(TensorFlow's own depthwise kernel refuses their (f, 1) strides). For ONNX and
LiteRT the converter writes them as the `DepthwiseConv2D` they equal: C times
fewer multiply-adds, and a depthwise kernel in LiteRT int8.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
from conftest import to_numpy

from thumbnet_keras import backbones, build_downscaler
from thumbnet_keras.deploy import convert, export_model


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def _diagonal_kernel(rng, size, channels):
    kernel = np.zeros((*size, channels, channels), "float32")
    for c in range(channels):
        kernel[:, :, c, c] = rng.normal(size=size)
    return kernel


def test_depthwise_form_rewrites_only_channel_diagonal_convs():
    rng = np.random.default_rng(0)
    inner_in = keras.Input((16, 16, 3))
    diagonal = keras.layers.Conv2D(3, (3, 1), strides=2, padding="same", name="diag")
    inner = keras.Model(inner_in, diagonal(inner_in), name="inner")
    dense = keras.layers.Conv2D(3, 3, padding="same", name="dense")
    single = keras.layers.Conv2D(1, 3, padding="same", name="single")
    # One group per input channel (ConvNeXt's depthwise convs): depthwise,
    # multiplier 2; two channels per group: a real grouped conv, kept.
    grouped = keras.layers.Conv2D(6, 3, padding="same", groups=3, name="grouped")
    pairs = keras.layers.Conv2D(6, 1, groups=3, name="pairs")
    inputs = keras.Input((16, 16, 3))
    x = pairs(grouped(dense(inner(inputs))))
    model = keras.Model(inputs, single(x), name="outer")
    diagonal.set_weights([_diagonal_kernel(rng, (3, 1), 3), rng.normal(size=3)])
    dense.set_weights([rng.normal(size=(3, 3, 3, 3)), np.zeros(3)])
    x = rng.random((2, 16, 16, 3)).astype("float32")
    before = to_numpy(model(x))

    rewritten, names = convert.depthwise_form(model)

    assert names == ["diag", "grouped"]
    kinds = {layer.name: type(layer).__name__ for layer in _layers(rewritten)}
    assert kinds["diag"] == kinds["grouped"] == "DepthwiseConv2D"
    assert rewritten.get_layer("grouped").depth_multiplier == 2
    assert kinds["dense"] == kinds["single"] == kinds["pairs"] == "Conv2D"
    # The rest is shared, weights included; the original is left as it was.
    assert rewritten.get_layer("dense") is dense
    assert type(model.get_layer("inner").get_layer("diag")) is keras.layers.Conv2D
    np.testing.assert_allclose(to_numpy(rewritten(x)), before, atol=1e-5)
    np.testing.assert_allclose(to_numpy(model(x)), before, atol=0)
    # Nothing to rewrite: the model itself comes back.
    plain = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1)])
    assert convert.depthwise_form(plain) == (plain, [])


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="conversion runs in a TensorFlow subprocess whatever the backend: checked once",
)
def test_bicubic_passes_export_as_depthwise_without_onednn(tmp_path, monkeypatch):
    """RGB E + S exported to ONNX and LiteRT with TensorFlow's own kernels
    (oneDNN off, as on ARM and macOS): the two bicubic passes are depthwise
    convs with strides (f, 1) and (1, f) in both files, and both agree with
    the Keras model, which keeps its Conv2D form."""
    import onnx
    from ai_edge_litert.interpreter import Interpreter

    from thumbnet_keras.deploy import load_runner

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    downscaler = build_downscaler((32, 32, 3), 2, width=8, depth=1)
    student = backbones.build("tiny_cnn", (16, 16, 3), 4, widths=[8])
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, student(downscaler(inputs)))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(1).random((4, 32, 32, 3)).astype("float32")
    reference = to_numpy(model(x))

    onnx_path = export_model(tmp_path / "m.keras", "onnx", tmp_path / "m.onnx")
    tflite_path = export_model(tmp_path / "m.keras", "litert", tmp_path / "m.tflite")

    convs = {}
    for node in onnx.load(onnx_path).graph.node:
        for direction in ("rows", "cols"):
            if node.op_type == "Conv" and f"bicubic_{direction}" in node.name:
                attributes = {a.name: a for a in node.attribute}
                convs[direction] = (
                    attributes["group"].i,
                    list(attributes["strides"].ints),
                )
    assert convs == {"rows": (3, [2, 1]), "cols": (3, [1, 2])}, convs
    ops = collections.Counter(
        op["op_name"]
        for op in Interpreter(model_path=str(tflite_path))._get_ops_details()
    )
    # E's one separable conv is a depthwise op too; the bicubic passes add two.
    assert ops["DEPTHWISE_CONV_2D"] == 3, ops
    for path in (onnx_path, tflite_path):
        np.testing.assert_allclose(load_runner(path)(x), reference, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="conversion runs in a TensorFlow subprocess whatever the backend: checked once",
)
def test_a_depthwise_grouped_conv_exports_to_onnx(tmp_path):
    """A trial's ConvNeXt run: its depthwise convs are Conv2D(groups=C),
    which TensorFlow runs in an XLA function tf2onnx cannot translate; the
    .onnx was written, listed in the sidecar, and would not load. They are
    written as the depthwise convs they equal, and a graph ONNX Runtime
    cannot load is refused without replacing the earlier file."""
    from thumbnet_keras.deploy import load_runner

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(8, 7, padding="same", groups=8, name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.save(tmp_path / "m.keras")
    images = np.random.default_rng(2).random((4, 16, 16, 3)).astype("float32")
    path = export_model(tmp_path / "m.keras", "onnx", tmp_path / "m.onnx")
    np.testing.assert_allclose(
        load_runner(path)(images), to_numpy(model(images)), atol=1e-4
    )
    (tmp_path / "m.onnx").write_bytes(b"earlier export")
    with pytest.raises(RuntimeError, match="ONNX Runtime cannot load"):
        convert._check_onnx(str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").read_bytes() == b"earlier export"
