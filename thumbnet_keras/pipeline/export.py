"""`export_run`: the deployable models of a run, and `export_model` to other
formats (TF SavedModel, ONNX, LiteRT) through `keras.Model.export`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import keras

from thumbnet_keras.pipeline.rundir import atomic_write, save_keras
from thumbnet_keras.pipeline.stages import load_run, stage_id

__all__ = ["FORMAT_SUFFIX", "export_model", "export_run"]

# CLI format name -> (keras.Model.export format, output suffix)
FORMAT_SUFFIX = {
    "saved_model": ("tf_saved_model", "_saved_model"),
    "onnx": ("onnx", ".onnx"),
    "litert": ("litert", ".tflite"),
}


def export_model(keras_path: str, fmt: str, out_path: str | None = None) -> str:
    """Exports a `.keras` model with `keras.Model.export`.

    Args:
        keras_path: e.g. `runs/<run>/thumbnet.keras`.
        fmt: "saved_model", "onnx" or "litert".
        out_path: default: beside the model (`thumbnet_saved_model/`,
            `thumbnet.onnx`, `thumbnet.tflite`).

    Returns:
        The written path. Errors from the exporter (a missing optional
        package such as `onnx`/`tf2onnx`, an unsupported backend) are raised
        with the format named.
    """
    if fmt not in FORMAT_SUFFIX:
        raise ValueError(
            f"Unknown format {fmt!r}; choose from {', '.join(FORMAT_SUFFIX)}."
        )
    keras_format, suffix = FORMAT_SUFFIX[fmt]
    if out_path is None:
        out_path = str(Path(keras_path).with_suffix("")) + suffix
    model = keras.saving.load_model(keras_path, compile=False)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    if fmt == "onnx":
        tmp += ".onnx"
    elif fmt == "litert":
        tmp += ".tflite"
    try:
        model.export(tmp, format=keras_format, verbose=False)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else None
        if os.path.isfile(tmp):
            os.unlink(tmp)
        raise RuntimeError(
            f"Exporting {keras_path} as {fmt} ({keras_format}) on the "
            f"{keras.backend.backend()} backend failed: {err}"
        ) from err
    if os.path.isdir(out_path):
        shutil.rmtree(out_path)
    os.replace(tmp, out_path)
    return out_path


def export_run(run_dir: str) -> dict:
    """Writes the run's deployable models.

    For each factor: `f<f>/thumbnet.keras` (image -> E -> S -> logits),
    `f<f>/thumbnail_model.keras` (S) and `f<f>/downscaler.keras` (E); the
    primary (first) factor's first two also as `thumbnet.keras` and
    `thumbnail_model.keras` at the top of the run; then the extra formats of
    `config.export_formats`. Rewrites are atomic and idempotent.

    Returns:
        `{"thumbnet": path, "thumbnail_model": path, "factors": {f: {...}},
        "exports": {format: path}}`.
    """
    from thumbnet_keras.pipeline.evaluate import compose

    run, config = load_run(run_dir)
    factors = {}
    for factor in config.factors:
        joint = run.stage_dir(stage_id(factor, "joint"))
        downscaler = keras.saving.load_model(joint / "downscaler.keras", compile=False)
        student = keras.saving.load_model(joint / "student.keras", compile=False)
        folder = run.factor_dir(factor)
        factors[factor] = {
            "thumbnet": save_keras(
                compose(downscaler, student, "thumbnet"), folder / "thumbnet.keras"
            ),
            "thumbnail_model": save_keras(student, folder / "thumbnail_model.keras"),
            "downscaler": save_keras(downscaler, folder / "downscaler.keras"),
        }
    primary = factors[config.factors[0]]
    top = {}
    for key in ("thumbnet", "thumbnail_model"):
        target = run.file(f"{key}.keras")
        atomic_write(target, lambda tmp, src=primary[key]: shutil.copyfile(src, tmp))
        top[key] = str(target)
    exports = {fmt: export_model(top["thumbnet"], fmt) for fmt in config.export_formats}
    print(f"[export] {top['thumbnet']}", flush=True)
    return {
        **top,
        "factors": {str(f): v for f, v in factors.items()},
        "exports": exports,
    }
