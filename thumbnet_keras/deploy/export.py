"""`export_model`: a saved `.keras` classifier to SavedModel, ONNX or LiteRT
(float32 or int8), converted in a fresh TensorFlow-backend process.

The conversion runs `deploy/convert.py` as a script with
`KERAS_BACKEND=tensorflow`: that process reads only the `.keras` file (and,
for int8, a `.npy` of representative inputs) and never imports
`thumbnet_keras`, as a user's own conversion would; exporting therefore works
the same from a JAX or torch process. Writes are atomic.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from thumbnet_keras.deploy.convert import check_output

__all__ = ["CONVERT_SCRIPT", "FORMATS", "default_output", "export_model"]

CONVERT_SCRIPT = str(Path(__file__).with_name("convert.py"))

# format -> suffix of the output beside `<stem>.keras`
FORMATS = {
    "saved_model": "_saved_model",
    "onnx": ".onnx",
    "litert": ".tflite",
    "litert_int8": "_int8.tflite",
}
# format -> modules the conversion needs (beyond keras and tensorflow)
_NEEDS = {"onnx": ("tf2onnx", "onnx")}


def default_output(keras_path: str | os.PathLike, fmt: str) -> str:
    """`thumbnet.keras` -> `thumbnet.onnx`, `thumbnet.tflite`,
    `thumbnet_int8.tflite` or `thumbnet_saved_model/`."""
    return str(Path(keras_path).with_suffix("")) + FORMATS[fmt]


def _any_size_advice(keras_path) -> str:
    """For a failed conversion of a model that takes images of any size
    (`Input((None, None, C))`): how to give it one. The converter traces such
    a model at 1x1, where a valid-padded convolution or a pooling has no
    output (a trial's teacher failed deep in TensorFlow: "could not create a
    descriptor for a pooling forward propagation primitive"). "" for a model
    of fixed size, or an archive it cannot read."""
    import zipfile

    try:
        with zipfile.ZipFile(keras_path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError, OSError):
        return ""
    for layer in layers:
        shape = layer.get("config", {}).get("batch_shape") or []
        if layer.get("class_name") == "InputLayer" and len(shape) == 4:
            if shape[1] is None or shape[2] is None:
                return (
                    f"\n{keras_path} takes images of any size {tuple(shape[1:])}: "
                    "give it the size to deploy, save that and export it: "
                    f"`keras.Sequential([keras.Input((224, 224, {shape[3]})), "
                    "model]).save(path)` (your size for 224)."
                )
    return ""


def export_model(
    keras_path: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike | None = None,
    representative: np.ndarray | None = None,
    timeout: float = 900,
) -> str:
    """Converts `keras_path` to `fmt` in a fresh TensorFlow process.

    Args:
        keras_path: a saved `.keras` model of built-in layers.
        fmt: "saved_model", "onnx", "litert" (float32) or "litert_int8"
            (full-integer, uint8 input and output; see `deploy/convert.py`).
        output: default: `default_output(keras_path, fmt)`.
        representative: "litert_int8" only: float32 model inputs
            `(N, H, W, C)` preprocessed as the model expects, e.g. a few
            hundred training images.
        timeout: seconds before the conversion process is stopped.

    Returns:
        The written path.

    Raises:
        ValueError: an unknown format, int8 without representative data, or
            an `output` whose replacement would destroy what is not an
            earlier export of that format (`convert.check_output`: a folder
            that is not a SavedModel, the model's own folder, ...).
        RuntimeError: a missing package or a failed conversion, with the
            converter's last error lines.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if not os.path.isfile(keras_path):
        raise ValueError(f"{keras_path} is not a file.")
    output = os.path.normpath(str(output or default_output(keras_path, fmt)))
    check_output(output, fmt, str(keras_path))  # before the slow conversion
    missing = [m for m in _NEEDS.get(fmt, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"Exporting as {fmt} needs {', '.join(missing)}: "
            "pip install 'thumbnet-keras[export]'."
        )
    if fmt == "litert_int8" and (representative is None or len(representative) == 0):
        raise ValueError("litert_int8 needs representative model inputs.")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, CONVERT_SCRIPT, str(keras_path)]
    command += ["--format", fmt, "--output", output]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="thumbnet-export-") as tmp:
        if representative is not None and fmt == "litert_int8":
            npy = os.path.join(tmp, "representative.npy")
            np.save(npy, np.asarray(representative, np.float32))
            command += ["--representative", npy]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"Exporting {keras_path} as {fmt} took over {timeout:g} s."
            ) from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise RuntimeError(
            f"Exporting {keras_path} as {fmt} failed:\n{tail}"
            + _any_size_advice(keras_path)
        )
    return json.loads(result.stdout.strip().splitlines()[-1])["output"]
