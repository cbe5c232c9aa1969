"""Converts a saved `.keras` classifier to ONNX or LiteRT (float32 or int8).

This file is self-contained on purpose: it imports only the standard library,
NumPy, Keras and TensorFlow (and tf2onnx, through Keras, for ONNX), never
`thumbnet_keras`. `thumbnet_keras.deploy.export_model` runs it as a script in
a fresh process with `KERAS_BACKEND=tensorflow`, so an export reads only the
saved `.keras` file, as a user's own conversion would, and works the same
whichever backend trained the model. It also runs by hand:

    KERAS_BACKEND=tensorflow python convert.py runs/r1/thumbnet.keras \
        --format litert_int8 --representative calib.npy --output m.tflite

Formats:
    saved_model: `keras.Model.export(format="tf_saved_model")`, a folder.
    onnx:        `keras.Model.export(format="onnx")` (tf2onnx), float32.
    litert:      `keras.Model.export(format="litert")`, float32, built-in
                 TFLite ops only (no Flex ops: runs in the plain LiteRT
                 interpreter, `ai-edge-litert`).
    litert_int8: full-integer post-training quantization: int8 weights and
                 activations (`Optimize.DEFAULT`, a representative dataset,
                 `TFLITE_BUILTINS_INT8` only), uint8 input and output tensors
                 (the type camera frames come in and that the LiteRT/MediaPipe
                 image classifiers accept); their scale and zero point are in
                 the model's tensor details.

For ONNX and LiteRT, every `Conv2D` whose kernel is zero off the channel
diagonal (E's frozen bicubic passes) is converted as the `DepthwiseConv2D` it
equals (`depthwise_form`): C times fewer multiply-adds, and LiteRT int8 runs
it as a depthwise kernel. The `.keras` model keeps `Conv2D` there because
TensorFlow's own depthwise kernel refuses the (f, 1) strides those passes use
(only its oneDNN build runs them); ONNX Runtime and LiteRT accept them, and
the rewrite only traces the graph, so converting works without oneDNN too.
SavedModel, which TensorFlow runs, is written as saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

FORMATS = ("saved_model", "onnx", "litert", "litert_int8")
# What `Model.export(format="tf_saved_model")` writes: an earlier export
# holding only these may be replaced.
_SAVED_MODEL_ENTRIES = {"saved_model.pb", "variables", "assets", "fingerprint.pb"}
SIDECAR = "thumbnet_model.json"  # `deploy.metadata`'s; may sit in a SavedModel


def check_output(output: str, fmt: str, keras_path: str | None = None) -> None:
    """Raises `ValueError` where writing `fmt` to `output` would destroy
    something that is not an earlier export: an ONNX or LiteRT file over a
    folder; a SavedModel over a file, or over a folder holding anything but
    what a SavedModel export writes (the current folder, a run folder, a
    user's project); anything over the model being converted or its
    folder; or a symbolic link. An earlier export of the same kind (a
    SavedModel folder may also hold hidden files such as .DS_Store and a
    copied `thumbnet_model.json`), or an empty folder, is replaced."""
    output = os.path.normpath(output)  # "sm/" and "sm" are one folder
    if os.path.islink(output):
        raise ValueError(
            f"{output!r} is a symbolic link; give the path it points to, or a new one."
        )
    path = os.path.realpath(output)
    if keras_path is not None and os.path.exists(path):
        model = os.path.realpath(keras_path)
        if path == model:
            raise ValueError(
                f"{output!r} is the model being converted; choose another output."
            )
        if os.path.isdir(path) and model.startswith(os.path.join(path, "")):
            raise ValueError(
                f"{output!r} holds the model being converted ({keras_path}); "
                "choose a new path for the export."
            )
    if fmt != "saved_model":
        if os.path.isdir(path):
            raise ValueError(
                f"{output!r} is a folder; a {fmt} export is one file: choose a "
                "file name."
            )
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"{output!r} is a file; a SavedModel is a folder: choose a new path."
        )
    if not os.path.isdir(path):
        return
    entries = set(os.listdir(path))
    other = sorted(
        e for e in entries - _SAVED_MODEL_ENTRIES - {SIDECAR} if not e.startswith(".")
    )
    if entries and ("saved_model.pb" not in entries or other):
        what = (
            f"holds {', '.join(map(repr, other[:3]))}"
            f"{' ...' if len(other) > 3 else ''} besides a SavedModel"
            if "saved_model.pb" in entries
            else "is not a SavedModel (no saved_model.pb)"
        )
        raise ValueError(
            f"{output!r} is a folder that {what}; exporting would replace it and "
            "everything in it: choose a new path, or remove the folder yourself."
        )


def _load(keras_path: str):
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "Converting to ONNX/LiteRT needs the TensorFlow backend, this process "
            f"runs {keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow."
        )
    model = keras.saving.load_model(keras_path, compile=False, safe_mode=True)
    # The ONNX exporter refuses a model that has never been called.
    shape = [1 if d is None else d for d in model.inputs[0].shape]
    model(keras.ops.zeros(shape, dtype=model.inputs[0].dtype), training=False)
    return model


def channel_diagonal(layer) -> bool:
    """Whether `layer` is a `Conv2D` (no groups, 2+ channels in and out, as
    many) whose kernel is exactly zero off the channel diagonal and not on it
    (E's zero-initialised residual conv of width C is a dense conv that has
    not trained yet; the review saw it counted as depthwise): it filters
    each channel on its own, as the `DepthwiseConv2D` it equals (E's frozen
    bicubic passes). `count_flops` counts it as that depthwise conv."""
    import keras
    import numpy as np

    if type(layer) is not keras.layers.Conv2D or layer.groups != 1:
        return False
    channels = layer.kernel.shape[-1]  # read before the values: cheap
    if channels < 2 or layer.kernel.shape[-2] != channels:
        return False
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    diagonal = np.arange(channels)
    if not kernel[:, :, diagonal, diagonal].any():
        return False  # all zeros: an untrained zero-initialised conv, dense
    off = kernel.copy()
    off[:, :, diagonal, diagonal] = 0
    return not off.any()


def _depthwise_twin(layer):
    """The `DepthwiseConv2D` equal to `layer`, or None if there is none.

    A `Conv2D` (no groups) with as many filters as input channels whose kernel
    is exactly zero off the channel diagonal filters each channel on its own:
    it is a depthwise conv with the diagonal as its kernel. One channel has
    nothing to gain and is left alone. A `Conv2D` with one group per input
    channel is a depthwise conv too (multiplier `filters / groups`).
    """
    import keras
    import numpy as np

    grouped = (
        type(layer) is keras.layers.Conv2D
        and layer.groups > 1
        and layer.kernel.shape[-2] == 1  # one input channel per group
    )
    if not grouped and not channel_diagonal(layer):
        return None
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    if grouped:
        # Conv2D(groups=C): kernel (kh, kw, 1, C*m), output c*m + k reads
        # channel c: the depthwise kernel (kh, kw, C, m). ConvNeXt's
        # depthwise convs are such; on TensorFlow they run inside an XLA
        # function that tf2onnx cannot translate (a trial's ConvNeXt
        # thumbnet.onnx would not load in ONNX Runtime).
        channels, multiplier = layer.groups, layer.filters // layer.groups
        depthwise = kernel.reshape(*kernel.shape[:2], channels, multiplier)
    else:
        channels = kernel.shape[-1]
        diagonal = np.arange(channels)
        depthwise = kernel[:, :, diagonal, diagonal][..., None]
        multiplier = 1
    bias = layer.bias is not None
    twin = keras.layers.DepthwiseConv2D(
        layer.kernel_size,
        depth_multiplier=multiplier,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=bias,
        dtype=layer.dtype_policy,
        trainable=False,
        name=layer.name,
    )
    if layer.data_format == "channels_first":
        twin.build((None, channels, None, None))
    else:
        twin.build((None, None, None, channels))
    weights = [depthwise]
    if bias:
        weights.append(keras.ops.convert_to_numpy(layer.bias))
    twin.set_weights(weights)
    return twin


def depthwise_form(model):
    """`model` with every channel-diagonal `Conv2D` as a `DepthwiseConv2D`.

    Returns `(model, names)`: a clone sharing every other layer (and its
    weights) with `model`, nested models included, and the names of the
    rewritten layers; `model` itself when there is nothing to rewrite. The
    outputs are the same up to float rounding.
    """
    import keras

    def flatten(layer):
        yield layer
        for inner in getattr(layer, "layers", ()):
            yield from flatten(inner)

    twins = {}
    for layer in flatten(model):
        twin = _depthwise_twin(layer)
        if twin is not None:
            twins[id(layer)] = twin
    if not twins:
        return model, []
    clone = keras.models.clone_model(
        model,
        clone_function=lambda layer: twins.get(id(layer), layer),
        recursive=True,
    )
    # A layer inside a subclassed model is not reached by the clone: name
    # only the twins that are in it.
    placed = {id(layer) for layer in flatten(clone)}
    return clone, sorted(t.name for t in twins.values() if id(t) in placed)


def _to_onnx(model, path: str) -> None:
    """tf2onnx on the model's frozen graph.

    Not `model.export(format="onnx")`: Keras 3.15 hands tf2onnx a function
    whose constant captures (e.g. a `Normalization` layer's mean and
    variance, as in E's bicubic branch) tf2onnx turns into extra graph
    inputs, so the ONNX model asks for them at run time. Freezing the graph
    first makes them constants; input "image", output "logits".
    """
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    try:  # The numpy>=2 fixes Keras applies before its own tf2onnx export.
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        patch_tf2onnx()
    except ImportError:
        pass
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="image")
    function = tf.function(lambda image: model(image, training=False))
    frozen = convert_variables_to_constants_v2(function.get_concrete_function(spec))
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise RuntimeError(
            f"expected one input and one output, got {inputs} -> {outputs}"
        )
    tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        name=model.name,
        input_names=inputs,
        output_names=outputs,
        tensors_to_rename={inputs[0]: "image", outputs[0]: "logits"},
        output_path=path,
    )


def _check_onnx(path: str) -> None:
    """Raises RuntimeError when ONNX Runtime cannot load `path`: tf2onnx
    writes a graph with the ops it could not translate left in (it only
    logs "Unsupported ops"), and that file replaced an earlier export and
    was listed in the sidecar (a trial's ConvNeXt run). Skipped without
    onnxruntime (the `export` extra installs it)."""
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's own error types
        first = str(err).strip().splitlines()[0][:300]
        raise RuntimeError(
            f"tf2onnx wrote a graph ONNX Runtime cannot load ({first}); nothing "
            "was written. The model holds an op tf2onnx does not translate."
        ) from None


def _litert_kwargs(int8: bool, representative) -> dict:
    import tensorflow as tf

    if not int8:
        return {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if representative is None or len(representative) == 0:
        raise ValueError("litert_int8 needs a non-empty representative dataset.")

    def samples():
        for image in representative:
            yield [image[None].astype("float32")]

    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": samples,
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        "inference_input_type": tf.uint8,
        "inference_output_type": tf.uint8,
    }


def convert(keras_path: str, fmt: str, output: str, representative=None) -> str:
    """Writes `keras_path` as `fmt` to `output` (atomically) and returns it.

    Args:
        keras_path: a saved `.keras` model, built-in layers only.
        fmt: "saved_model", "onnx", "litert" or "litert_int8".
        output: the target file (`.onnx`, `.tflite`) or folder (SavedModel).
        representative: for "litert_int8", float32 model inputs
            `(N, H, W, C)`, preprocessed as the model expects (a few hundred
            training images is the usual amount).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, received {fmt!r}")
    output = os.path.normpath(output)  # the temporary path is its sibling
    check_output(output, fmt, keras_path)
    model = _load(keras_path)
    if fmt != "saved_model":  # TensorFlow runs SavedModel: keep the saved form.
        model = depthwise_form(model)[0]
    suffix = {"saved_model": "", "onnx": ".onnx"}.get(fmt, ".tflite")
    tmp = f"{output}.tmp-{os.getpid()}{suffix}"
    try:
        if fmt == "saved_model":
            model.export(tmp, format="tf_saved_model", verbose=False)
        elif fmt == "onnx":
            _to_onnx(model, tmp)
            _check_onnx(tmp)
        else:
            kwargs = _litert_kwargs(fmt == "litert_int8", representative)
            model.export(tmp, format="litert", verbose=False, **kwargs)
        check_output(output, fmt, keras_path)  # again: time has passed
        if os.path.isdir(output):  # an earlier SavedModel (check_output)
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("keras_path")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--representative", default=None, help=".npy of float32 model inputs"
    )
    args = parser.parse_args(argv)
    representative = None
    if args.representative:
        import numpy as np

        representative = np.load(args.representative)
    out = convert(args.keras_path, args.format, args.output, representative)
    print(json.dumps({"output": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
