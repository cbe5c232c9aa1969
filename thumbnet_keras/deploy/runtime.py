"""Running an exported classifier: `.keras`, `.onnx`, `.tflite`, SavedModel.

`load_runner(path)` returns a `Runner`: float32 images `(B, H, W, C)`,
preprocessed as the model expects, in; float32 logits `(B, classes)` out,
whatever the format. A quantized LiteRT model (uint8 or int8 input/output)
is quantized and dequantized here with the scale and zero point stored in
the model. Each runtime is imported only when its format is loaded:
`onnxruntime` for `.onnx`, `ai-edge-litert` (or TensorFlow's
`tf.lite.Interpreter`) for `.tflite`, Keras for `.keras`, TensorFlow for a
SavedModel folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Runner", "load_runner", "measure_runner", "model_kind"]

KINDS = {".keras": "keras", ".onnx": "onnx", ".tflite": "litert"}


def model_kind(path: str | os.PathLike) -> str:
    """ "keras", "onnx", "litert" or "saved_model" (a folder), from the path."""
    path = Path(path)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "saved_model"
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"Unknown model format {str(path)!r}: expected a .keras, .onnx or "
            ".tflite file or a SavedModel folder."
        )
    return kind


@dataclass
class Runner:
    """A loaded model: `runner(images) -> logits` (NumPy in and out).

    Attributes:
        path: the model file.
        kind: "keras", "onnx", "litert" or "saved_model".
        input_shape: `(H, W, C)` the model takes.
        quantization: for a quantized LiteRT model, its input and output
            dtype, scale and zero point; else empty.
    """

    path: str
    kind: str
    input_shape: tuple[int, int, int]
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    quantization: dict[str, Any] = field(default_factory=dict)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.path} takes images of shape (batch, {self.input_shape}), "
                f"received {images.shape}."
            )
        return np.asarray(self.predict(images), dtype=np.float32)


def _keras(path: str) -> Runner:
    import keras

    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    return Runner(
        path,
        "keras",
        shape,
        lambda x: keras.ops.convert_to_numpy(model.predict_on_batch(x)),
    )


def _onnx(path: str) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    shape = tuple(int(d) for d in inp.shape[1:])
    return Runner(path, "onnx", shape, lambda x: session.run(None, {inp.name: x})[0])


def _interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's copy of the same interpreter.
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=path)


def _litert(path: str) -> Runner:
    interpreter = _interpreter(path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    shape = tuple(int(d) for d in inp["shape"][1:])
    quantization = {}
    for name, detail in (("input", inp), ("output", out)):
        if detail["dtype"] != np.float32:
            scale, zero_point = detail["quantization"]
            quantization[name] = {
                "dtype": np.dtype(detail["dtype"]).name,
                "scale": float(scale),
                "zero_point": int(zero_point),
            }
    state = {"batch": int(inp["shape"][0])}
    from thumbnet_keras.pipeline.environment import hidden_stderr

    with hidden_stderr():  # LiteRT's "INFO: Created ... XNNPACK delegate".
        interpreter.allocate_tensors()

    def predict(x: np.ndarray) -> np.ndarray:
        if x.shape[0] != state["batch"]:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
            state["batch"] = x.shape[0]
        if "input" in quantization:
            q = quantization["input"]
            info = np.iinfo(q["dtype"])
            x = np.round(x / q["scale"]) + q["zero_point"]
            x = np.clip(x, info.min, info.max).astype(q["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if "output" in quantization:
            q = quantization["output"]
            y = (y.astype(np.float32) - q["zero_point"]) * q["scale"]
        return y

    return Runner(path, "litert", shape, predict, quantization)


def _saved_model(path: str) -> Runner:
    import tensorflow as tf

    function = tf.saved_model.load(path).signatures["serving_default"]
    (spec,) = function.structured_input_signature[1].values()
    shape = tuple(int(d) for d in spec.shape[1:])

    def predict(x):
        (y,) = function(**{spec.name: tf.constant(x)}).values()
        return y.numpy()

    return Runner(path, "saved_model", shape, predict)


def load_runner(path: str | os.PathLike) -> Runner:
    """Loads an exported model (see the module docstring) as a `Runner`."""
    loader = {
        "keras": _keras,
        "onnx": _onnx,
        "litert": _litert,
        "saved_model": _saved_model,
    }[model_kind(path)]
    try:
        return loader(str(path))
    except ImportError as err:
        raise ValueError(
            f"Cannot run {path}: {err}. Install the runtimes with "
            "`pip install 'thumbnet-keras[export]'`."
        ) from err
    except ValueError as err:
        if str(path) in str(err):  # this package's own message, naming it
            raise
        # LiteRT's "not a valid Flatbuffer buffer" and TensorFlow's advice
        # to pass `tags=` (which no thumbnet command takes) named no file.
        raise ValueError(
            f"Cannot load {path} as a {model_kind(path)} model: {err}"
        ) from err
    except Exception as err:  # The runtime's own "not a model" errors.
        raise ValueError(
            f"Cannot load {path} as a {model_kind(path)} model: {err}"
        ) from err


def measure_runner(
    runner: Runner, batch_size: int = 32, batches: int = 10, warmup: int = 2
) -> dict:
    """Images/s of `runner` on random inputs, measured on this machine
    (`evaluation.latency.measure_throughput`, the number the report's other
    models use)."""
    from thumbnet_keras.evaluation.latency import measure_throughput

    class _AsModel:  # The two members measure_throughput reads.
        inputs = [type("Spec", (), {"shape": (None, *runner.input_shape)})()]
        name = os.path.basename(runner.path)

        @staticmethod
        def predict_on_batch(x):
            return runner(x)

    return measure_throughput(
        _AsModel(), batch_size=batch_size, batches=batches, warmup=warmup
    )
