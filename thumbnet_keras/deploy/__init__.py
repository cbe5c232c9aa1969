"""Deployable models: export to SavedModel, ONNX and LiteRT (float32, int8),
their `thumbnet_model.json` sidecar, and one way to run any of them.

    from thumbnet_keras import deploy

    path = deploy.export_model("runs/r1/thumbnet.keras", "onnx")
    runner = deploy.load_runner(path)           # images -> logits, NumPy
    info = deploy.read_sidecar(path)            # classes, input, normalization

Nothing here imports TensorFlow at import time; the conversions run in a
fresh TensorFlow-backend process (`deploy/convert.py`). For a run folder, use
`thumbnet_keras.pipeline.export_model` (it adds the int8 calibration images
and the sidecar); see docs/deploy.md.
"""

from thumbnet_keras.deploy.export import FORMATS, default_output, export_model
from thumbnet_keras.deploy.metadata import (
    SIDECAR,
    SidecarError,
    check_model_file,
    read_sidecar,
    write_sidecar,
)
from thumbnet_keras.deploy.runtime import (
    Runner,
    load_runner,
    measure_runner,
    model_kind,
)

__all__ = [
    "FORMATS",
    "SIDECAR",
    "Runner",
    "SidecarError",
    "check_model_file",
    "default_output",
    "export_model",
    "load_runner",
    "measure_runner",
    "model_kind",
    "read_sidecar",
    "write_sidecar",
]
