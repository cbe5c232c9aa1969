"""`export_run`: the deployable models of a run; `export_model`: one of them
as SavedModel, ONNX or LiteRT (float32 or int8), with its sidecar.

The conversion itself is `thumbnet_keras.deploy.export_model` (a fresh
TensorFlow process that reads only the `.keras` file); this module adds what
the run folder knows: the int8 calibration images (the prepared train split)
and `thumbnet_model.json` (class names, input size, channels, normalization).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import keras
import numpy as np

from thumbnet_keras import deploy
from thumbnet_keras.deploy.convert import check_output
from thumbnet_keras.pipeline.config import ConfigError
from thumbnet_keras.pipeline.rundir import (
    Run,
    atomic_write,
    read_json,
    save_keras,
    write_json,
)
from thumbnet_keras.pipeline.stages import load_run, stage_id

__all__ = [
    "FORMAT_SUFFIX",
    "export_model",
    "export_run",
    "find_run_dir",
    "representative_inputs",
]

# format -> suffix of the output beside `thumbnet.keras`
FORMAT_SUFFIX = dict(deploy.FORMATS)
# Train images the int8 quantizer calibrates its activation ranges on.
REPRESENTATIVE_IMAGES = 200
# Validation images each conversion is compared with thumbnet.keras on.
AGREEMENT_IMAGES = 200


logger = logging.getLogger(__name__)


def find_run_dir(keras_path: str | os.PathLike) -> str | None:
    """The run folder of a model in it (`<run>/` or `<run>/f<factor>/`)."""
    folder = Path(keras_path).resolve().parent
    for candidate in (folder, folder.parent):
        if (candidate / "config.json").is_file() and (
            candidate / "data.json"
        ).is_file():
            return str(candidate)
    return None


def _input(run_dir: str, require: bool = False) -> tuple[Run, dict, int, int]:
    run, config = load_run(run_dir)
    return run, run.data(require=require), config.image_size, config.channels


def _raw_images(run_dir: str, split: str | None, count: int) -> tuple:
    """Up to `count` images of the run's `split`, preprocessed as for
    evaluation (no augmentation), raw pixels (`thumbnet.keras` normalizes
    inside), float32 `(N, H, W, C)`: a sample across the split drawn from
    seed 0 alone (with tf.data's shuffle it also followed the global seed,
    so `thumbnet export` calibrated on other images than the flow; an edge
    deployer's trial). `split` None: validation, or test when the run has
    no validation split. Returns `(images, split, channels)`."""
    from thumbnet_keras import data
    from thumbnet_keras.pipeline.datasets import has_split

    _, prepared, size, channels = _input(run_dir, require=True)
    if split is None:
        split = "validation" if has_split(prepared, "validation") else "test"
    stream = data.make_dataset(
        prepared["prepared_dir"],
        split,
        size,
        min(count, 64),
        False,
        channels=channels,
        normalization="raw",
        sample=count,
        seed=0,
    )
    images, total = [], 0
    for batch, _ in stream:
        images.append(np.asarray(batch))
        total += len(images[-1])
        if total >= count:
            break
    return np.concatenate(images)[:count].astype(np.float32), split, channels


def representative_inputs(run_dir: str, count: int = REPRESENTATIVE_IMAGES):
    """Up to `count` train images of the run (`_raw_images`): the int8
    calibration set.

    One pixel of the first image is set to 0 and one to 255, so the
    calibrated input range is the whole pixel range: the int8 model's uint8
    input then holds any image without clipping (scale 1, zero point 0,
    i.e. raw pixels).
    """
    from thumbnet_keras import data

    images, _, channels = _raw_images(run_dir, "train", count)
    layer = data.normalization_layer("raw", channels)
    extremes = np.array([[[[0.0] * channels, [255.0] * channels]]], np.float32)
    low, high = keras.ops.convert_to_numpy(layer(extremes))[0, 0]
    images[0, 0, 0], images[0, 0, 1] = low, high
    return images


def _top1(runner: deploy.Runner, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate(
        [runner(images[i : i + batch]).argmax(-1) for i in range(0, len(images), batch)]
    )


def agreement_reference(run_dir: str, keras_path: str) -> dict | None:
    """What each conversion of `keras_path` is compared with (`agreement`):
    up to `AGREEMENT_IMAGES` validation images of the run (its test images
    when it has no validation split) and `keras_path`'s top-1 class on
    each, computed once for all formats. None, with one log line, when the
    run's prepared data is gone (the export itself needs none: a run
    folder copied to a deploy machine)."""
    try:
        images, split, _ = _raw_images(run_dir, None, AGREEMENT_IMAGES)
    except ConfigError as err:
        logger.warning("[export] agreement with %s not measured: %s", keras_path, err)
        return None
    top1 = _top1(deploy.load_runner(keras_path), images)
    return {"keras_path": keras_path, "images": images, "split": split, "top1": top1}


def agreement(path: str, reference: dict) -> dict:
    """How often the exported `path` gives the reference model's top-1
    class (an int8 model can lose what float keeps: a trial's weak int8
    model agreed on 89% of its images and nothing said so):
    `{"agreement": share, "agreement_images": N, "agreement_split": split}`."""
    same = _top1(deploy.load_runner(path), reference["images"]) == reference["top1"]
    return {
        "agreement": float(same.mean()),
        "agreement_images": len(same),
        "agreement_split": reference["split"],
    }


def _described(run_dir: str) -> dict:
    """What the sidecar of `run_dir`'s exported models says of them."""
    _, prepared, size, channels = _input(run_dir)
    return {
        "class_names": [str(c) for c in prepared["class_names"]],
        "input_size": [size, size],
        "channels": channels,
        "normalization": "none",  # thumbnet.keras takes raw pixels
    }


def check_sidecar_folder(run_dir: str, folder, writing: set[str]) -> None:
    """Refuses (`ConfigError`) to export into a folder whose sidecar
    describes other models (other classes, input or normalization) that are
    still there: rewriting it would give them this run's class names, or
    make them refuse to load. The files in `writing` are replaced anyway."""
    from thumbnet_keras.pipeline.config import ConfigError

    path = Path(folder) / deploy.SIDECAR
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    new = _described(run_dir)
    if all(old.get(k) == v for k, v in new.items()):
        return
    others = sorted(
        name
        for name in old.get("models") or {}
        if name not in writing and (Path(folder) / name).exists()
    )
    if others:
        classes = old.get("class_names") or []
        raise ConfigError(
            f"{path} describes other models in that folder ({', '.join(others)}: "
            f"{len(classes)} classes {classes[:4]}{'...' if len(classes) > 4 else ''}, "
            f"input {old.get('input_size')}, from {old.get('source', 'elsewhere')}); "
            "this run's model differs, and rewriting the file would break them. "
            "Export into another folder, or move those files away first."
        )


def _write_sidecar(run_dir: str, folder, models: dict, quantization=None) -> str:
    described = _described(run_dir)
    return deploy.write_sidecar(
        folder,
        class_names=described["class_names"],
        input_size=described["input_size"],
        channels=described["channels"],
        normalization=described["normalization"],
        models=models,
        quantization=quantization,
        source=str(Path(run_dir).resolve()),
    )


def export_model(
    keras_path: str,
    fmt: str,
    out_path: str | None = None,
    run_dir: str | None = None,
    record: bool = True,
) -> str:
    """Exports a run's `.keras` model as `fmt` and updates the sidecar.

    Args:
        keras_path: e.g. `runs/<run>/thumbnet.keras`.
        fmt: "saved_model", "onnx", "litert" or "litert_int8".
        out_path: default: beside the model (`thumbnet_saved_model/`,
            `thumbnet.onnx`, `thumbnet.tflite`, `thumbnet_int8.tflite`).
        run_dir: the run the model belongs to; default: found from
            `keras_path` (`find_run_dir`). Needed for "litert_int8" (its
            calibration images) and for the sidecar; without one, only the
            conversion happens.
        record: list the written file, with its size and images/s, in the
            run's `export.json` (what the report's deployable models come
            from) when it is inside the run folder; `export_run` lists its
            own.

    Returns:
        The written path. Conversion errors (a missing optional package, a
        failed conversion) are raised as `RuntimeError` naming the format.
    """
    if fmt not in FORMAT_SUFFIX:
        raise ValueError(
            f"Unknown format {fmt!r}; choose from {', '.join(FORMAT_SUFFIX)}."
        )
    run_dir = run_dir or find_run_dir(keras_path)
    target = Path(out_path or deploy.default_output(keras_path, fmt))
    try:  # a user's choice to fix, not a failure to retry
        check_output(str(target), fmt, str(keras_path))
    except ValueError as err:
        raise ConfigError(f"Cannot export {fmt}: {err}") from None
    if run_dir is not None:
        check_sidecar_folder(run_dir, target.parent, {target.name})
    representative = None
    if fmt == "litert_int8":
        if run_dir is None:
            raise ValueError(
                f"litert_int8 calibrates on the run's train images, and no run "
                f"folder holds {keras_path}: pass run_dir."
            )
        representative = representative_inputs(run_dir)
    out = deploy.export_model(keras_path, fmt, out_path, representative)
    if run_dir is not None:
        quantization = {}
        if fmt == "litert_int8":
            quantization[Path(out).name] = deploy.load_runner(out).quantization
        models = {Path(out).name: fmt}
        if Path(keras_path).resolve().parent == Path(out).resolve().parent:
            models[Path(keras_path).name] = "keras"  # only a model in that folder
        _write_sidecar(run_dir, Path(out).parent, models, quantization)
        if record:
            _record_deployable(run_dir, out, fmt, str(keras_path))
    return out


def _record_deployable(run_dir: str, path: str, fmt: str, keras_path: str) -> None:
    """Adds (or replaces) `path`'s row in the run's `export.json`, when the
    run has one and `path` is inside the run folder. A `thumbnet export`
    after training was missing from the report (only the formats exported
    while the run trained were listed)."""
    run, config = load_run(run_dir)
    listing = run.file("export.json")
    inside = Path(path).resolve().is_relative_to(run.path.resolve())
    if not inside or not listing.is_file():
        return
    record = read_json(listing)
    measure = dict(batch_size=config.batch_size, batches=config.throughput_batches)
    reference = agreement_reference(run_dir, keras_path)
    row = _deployable(str(path), fmt, **measure, reference=reference)
    same = os.path.realpath(path)
    record["deployables"] = [
        d for d in record.get("deployables", [])
        if os.path.realpath(d["file"]) != same
    ] + [row]  # fmt: skip
    write_json(listing, record)


def _exported_from(run, factors, path: str) -> str:
    """The thumbnet.keras a file in the run folder was exported from: its
    factor's `f<f>/thumbnet.keras` when it lies in `f<f>/` (`thumbnet export
    --factor`), else the run's top one (the first factor's)."""
    for factor in factors:
        folder = run.factor_dir(factor).resolve()
        if Path(path).is_relative_to(folder):
            return str(folder / "thumbnet.keras")
    return str(run.file("thumbnet.keras"))


def _earlier_deployables(run) -> list[dict]:
    """The rows (`file`, `format`) of the run's export.json as it is now."""
    try:
        rows = read_json(run.file("export.json")).get("deployables", [])
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and {"file", "format"} <= r.keys()]


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return os.path.getsize(path)


INT8_AGREEMENT_WARNING = 0.97  # the tests' bound for int8 (docs/deploy.md)


def _deployable(
    path: str, fmt: str, batch_size: int, batches: int, reference: dict | None = None
) -> dict:
    """A deployable file's row of `export.json`: size, images/s, and given
    an `agreement_reference`, its top-1 agreement with that model."""
    speed = deploy.measure_runner(
        deploy.load_runner(path), batch_size=batch_size, batches=batches
    )
    row = {
        "file": path,
        "format": fmt,
        "bytes": _size(path),
        "images_per_second": speed["images_per_second"],
        "batch_size": batch_size,
    }
    if reference is None:
        return row
    row |= agreement(path, reference)
    if row["agreement"] < INT8_AGREEMENT_WARNING:
        logger.warning(
            "[export] %s gives %s's top-1 class on %.1f%% of %d %s images "
            "(below %.0f%%): check its accuracy before deploying it.",
            path,
            os.path.basename(reference["keras_path"]),
            100 * row["agreement"],
            row["agreement_images"],
            row["agreement_split"],
            100 * INT8_AGREEMENT_WARNING,
        )
    return row


def export_run(run_dir: str) -> dict:
    """Writes the run's deployable models.

    For each factor: `f<f>/thumbnet.keras` (raw pixels [0, 255] -> the
    run's normalization -> E -> S -> logits),
    `f<f>/thumbnail_model.keras` (S) and `f<f>/downscaler.keras` (E); the
    primary (first) factor's first two also as `thumbnet.keras` and
    `thumbnail_model.keras` at the top of the run; `thumbnet_model.json`
    beside each `thumbnet.keras`; then `thumbnet.keras` in the formats of
    `config.export_formats`. Each deployable file's size and images/s on
    this machine (batch `config.batch_size`) go to `export.json`, which the
    report shows. Rewrites are atomic and idempotent.

    Returns:
        `{"thumbnet": path, "thumbnail_model": path, "factors": {f: {...}},
        "exports": {format: path}, "deployables": [{file, format, bytes,
        images_per_second, batch_size}]}`.
    """
    from thumbnet_keras.data.pipeline import raw_pixel_model

    run, config = load_run(run_dir)
    prepared = run.data()
    factors = {}
    for factor in config.factors:
        joint = run.stage_dir(stage_id(factor, "joint"))
        downscaler = keras.saving.load_model(joint / "downscaler.keras", compile=False)
        student = keras.saving.load_model(joint / "student.keras", compile=False)
        folder = run.factor_dir(factor)
        # Raw pixels in: the run's normalization is the model's first layer.
        thumbnet = raw_pixel_model(
            [downscaler, student], prepared["normalization"], config.channels,
            "thumbnet",
        )  # fmt: skip
        factors[factor] = {
            "thumbnet": save_keras(thumbnet, folder / "thumbnet.keras"),
            "thumbnail_model": save_keras(student, folder / "thumbnail_model.keras"),
            "downscaler": save_keras(downscaler, folder / "downscaler.keras"),
        }
        _write_sidecar(run_dir, folder, {"thumbnet.keras": "keras"})
    primary = factors[config.factors[0]]
    top = {}
    for key in ("thumbnet", "thumbnail_model"):
        target = run.file(f"{key}.keras")
        atomic_write(target, lambda tmp, src=primary[key]: shutil.copyfile(src, tmp))
        top[key] = str(target)
    _write_sidecar(run_dir, run.path, {"thumbnet.keras": "keras"})
    exports = {
        fmt: export_model(top["thumbnet"], fmt, run_dir=run_dir, record=False)
        for fmt in config.export_formats
    }
    measure = dict(batch_size=config.batch_size, batches=config.throughput_batches)
    deployables = [_deployable(top["thumbnet"], "keras", **measure)]
    reference = agreement_reference(run_dir, top["thumbnet"]) if exports else None
    deployables += [
        _deployable(p, fmt, **measure, reference=reference)
        for fmt, p in exports.items()
    ]
    # Files `thumbnet export --run` added since, still in this run folder:
    # listed again, measured against the thumbnet.keras they were exported
    # from (a rerun's export.json had lost them, so the report no longer
    # listed them: an upgrade trial).
    written = {os.path.realpath(p) for p in [top["thumbnet"], *exports.values()]}
    references = {}
    for row in _earlier_deployables(run):
        path = os.path.realpath(row["file"])
        if path in written or not os.path.exists(path):
            continue
        if not Path(path).is_relative_to(run.path.resolve()):
            continue  # A copied run's rows name the original's files.
        source = _exported_from(run, config.factors, path)
        if source not in references:
            references[source] = agreement_reference(run_dir, source)
        deployables.append(
            _deployable(row["file"], row["format"], **measure,
                        reference=references[source])
        )  # fmt: skip
    write_json(
        run.file("export.json"),
        {"backend": keras.backend.backend(), "deployables": deployables},
    )
    logger.info("[export] %s", top["thumbnet"])
    return {
        **top,
        "factors": {str(f): v for f, v in factors.items()},
        "exports": exports,
        "deployables": deployables,
    }
