"""`predict`: classify image files with an exported model (`thumbnet predict`).

Works with `.keras`, `.onnx` and `.tflite` models (and SavedModel folders);
what the model expects (class names, input size, channels, normalization)
comes from the `thumbnet_model.json` beside it (`deploy.metadata`), never
guessed. Each image is read and validated as the data layer does
(`data.validate`: PNG/JPEG as they are; BMP, GIF, TIFF, WebP, palette,
16-bit converted; broken files rejected with a reason), decoded to the
model's channels (RGB to gray by luminance, gray repeated to RGB), centrally
cropped to the input's aspect ratio and resized (bilinear, antialiased) as
the evaluation pipeline does, normalized, and classified in batches. A bad
file is reported and skipped, never fatal.

    from thumbnet_keras.predict import predict

    result = predict("runs/r1/thumbnet.onnx", ["photos/"], top_k=3)
    for row in result["predictions"]:
        print(row["file"], row["top"][0])
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "collect_files", "predict", "write_predictions"]

logger = logging.getLogger(__name__)

# Files taken from a folder (a file named on the command line is always tried).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_files(inputs: list[str | os.PathLike]) -> tuple[list[str], list[dict]]:
    """Files to classify: each named file, and each image file (by suffix,
    hidden files skipped) under each named folder, sorted.

    Returns:
        `(files, errors)`; `errors` lists inputs that do not exist.
    """
    files, errors = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            from thumbnet_keras.data.manifest import walk_folders

            # Through linked folders, as prepare reads a class folder
            # (`Path.rglob` skipped a linked sub-folder's images in silence).
            found = sorted(
                str(Path(folder, name))
                for folder, _, names in walk_folders(path, hidden=False)
                for name in names
                # (os.walk lists folders, a folder named x.png too, apart;
                # a link to nothing is a name: reported as missing.)
                if not name.startswith(".")
                and Path(name).suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                errors.append({"file": str(path), "reason": "no_images_in_folder"})
            files += found
        elif path.exists():
            files.append(str(path))
        else:
            errors.append({"file": str(path), "reason": "not_found"})
    return files, errors


def _normalize(pixels: np.ndarray, normalization: str, channels: int) -> np.ndarray:
    if normalization == "none":
        return pixels
    import keras

    from thumbnet_keras.data import normalization_layer

    layer = normalization_layer(normalization, channels)
    return np.asarray(keras.ops.convert_to_numpy(layer(pixels)), np.float32)


def _load_image(path: str, height: int, width: int, channels: int):
    """`(pixels float32 (H, W, C) in [0, 255], None)` or `(None, reason)`."""
    import tensorflow as tf

    from thumbnet_keras.data.pipeline import _center_crop, apply_orientation
    from thumbnet_keras.data.validate import QUARANTINED, read_file, validate_bytes

    data, failed = read_file(path)
    if failed is not None:
        return None, failed.reason
    check = validate_bytes(data)
    if check.status == QUARANTINED:
        return None, check.reason
    if 4 * min(check.height, check.width) < min(height, width):
        logger.warning(
            "%s: %dx%d pixels, enlarged to the model's %dx%d input: too small "
            "for its prediction to mean much",
            path,
            check.width,
            check.height,
            width,
            height,
        )
    try:
        image = tf.io.decode_image(
            check.converted or data, channels=channels, expand_animations=False
        )
        # Upright, as training saw it (a phone JPEG's EXIF orientation).
        image = apply_orientation(image, check.orientation)
        # The evaluation pipeline's own crop and resize (data.make_dataset).
        image = _center_crop(image, height / width, 1.0)
        image = tf.image.resize(image, (height, width), "bilinear", antialias=True)
        image = tf.clip_by_value(image, 0.0, 255.0)
    except Exception as err:  # noqa: BLE001 - a decoder error is this file's problem
        return None, f"decode_failed: {str(err).splitlines()[0][:200]}"
    return image.numpy().astype(np.float32), None


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(
    model_path: str | os.PathLike,
    inputs: list[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 32,
    sidecar: str | os.PathLike | None = None,
) -> dict:
    """Classifies image files and folders with an exported model.

    Args:
        model_path: a `.keras`, `.onnx`, `.tflite` file or SavedModel folder
            with `thumbnet_model.json` beside it.
        inputs: image files and folders (searched recursively).
        top_k: classes per image (capped at the number of classes).
        batch_size: images per model call.
        sidecar: another `thumbnet_model.json` to use.

    Returns:
        `{"model", "predictions": [{"file", "top": [{"class", "probability"}]}],
        "skipped": [{"file", "reason"}]}`, predictions in input order.
        Probabilities are the softmax of the model's logits.

    Raises:
        deploy.SidecarError: no or a bad sidecar.
        ValueError: bad arguments, or a model whose input disagrees with its
            sidecar.
    """
    from thumbnet_keras import deploy

    if top_k < 1 or batch_size < 1:
        raise ValueError(
            f"top_k and batch_size must be >= 1, received top_k={top_k}, "
            f"batch_size={batch_size}."
        )
    if not Path(model_path).exists():
        raise ValueError(f"Model {str(model_path)!r} not found.")
    info = deploy.read_sidecar(model_path, sidecar)
    listed, name = info.get("models") or {}, Path(model_path).name
    own = Path(info["path"]).parent == Path(model_path)  # a SavedModel's own
    unlisted = listed and name not in listed and not own
    beside = Path(model_path).parent / deploy.SIDECAR
    named_beside = sidecar is not None and Path(sidecar).resolve() == beside.resolve()
    if unlisted and name in OTHER_INPUTS and (sidecar is None or named_beside):
        # A run folder's teacher.keras or thumbnail_model.keras: other inputs
        # (size, value range) than the sidecar's, so silently wrong. Naming
        # the sidecar beside it is no answer (a trial did, as the message
        # used to suggest, and got confident nonsense).
        raise deploy.SidecarError(
            f"{info['path']} describes {', '.join(sorted(listed))}, not {name}, "
            f"which takes other inputs: its classes and input are not {name}'s. "
            "Predict with a model it lists, or write a sidecar for this model in "
            "another folder (`thumbnet_keras.deploy.write_sidecar`; in this one "
            "it would replace the sidecar of the models above) and pass it "
            "(`thumbnet predict --sidecar PATH`, or `predict(..., sidecar=path)`)."
        )
    if unlisted and sidecar is None:
        # A renamed export (model_v3.tflite beside its sidecar): named with
        # --sidecar, it is the caller's word (the documented use).
        raise deploy.SidecarError(
            f"{info['path']} describes {', '.join(sorted(listed))}, not {name}. "
            f"If {name} is one of those renamed, pass the sidecar "
            f"(`thumbnet predict --sidecar {info['path']}`, or `predict(..., "
            f"sidecar=path)`), or add {name!r} to its `models`."
        )
    if unlisted:  # A sidecar the caller named: their word, with a warning.
        logger.warning(
            "%s describes %s, not %s: used as asked (its classes, input size "
            "and value range must be this model's)",
            info["path"],
            ", ".join(sorted(listed)),
            name,
        )
    deploy.check_model_file(model_path, info)
    height, width = info["input_size"]
    channels, classes = info["channels"], info["class_names"]
    runner = deploy.load_runner(model_path)
    if runner.input_shape != (height, width, channels):
        raise ValueError(
            f"{model_path} takes {runner.input_shape} images but {info['path']} "
            f"describes {(height, width, channels)}: not this model's sidecar."
        )
    files, skipped = collect_files(inputs)
    for row in skipped:
        logger.warning("skipped %s: %s", row["file"], row["reason"])
    predictions = []
    k = min(top_k, len(classes))

    def flush(names, images):
        x = _normalize(np.stack(images), info["normalization"], channels)
        logits = runner(x)
        if logits.shape[-1] != len(classes):
            raise ValueError(
                f"{model_path} outputs {logits.shape[-1]} classes, its sidecar "
                f"names {len(classes)}."
            )
        probs = _softmax(logits.astype(np.float64))
        for name, p in zip(names, probs):
            order = np.argsort(-p, kind="stable")[:k]
            top = [{"class": classes[i], "probability": float(p[i])} for i in order]
            predictions.append({"file": name, "top": top})

    names, images = [], []
    for path in files:
        image, reason = _load_image(path, height, width, channels)
        if image is None:
            logger.warning("skipped %s: %s", path, reason)
            skipped.append({"file": path, "reason": reason})
            continue
        names.append(path)
        images.append(image)
        if len(images) == batch_size:
            flush(names, images)
            names, images = [], []
    if images:
        flush(names, images)
    return {"model": str(model_path), "predictions": predictions, "skipped": skipped}


_CSV_HEADER = ["file", "rank", "class", "probability", "error"]


# A run folder's models that take other inputs than its sidecar describes.
OTHER_INPUTS = ("teacher.keras", "thumbnail_model.keras", "downscaler.keras")


def check_overwrite(path: str | os.PathLike) -> None:
    """Raises ValueError when `path` is an existing file that predictions
    did not write: predictions replace only an earlier predictions file. A
    trial wrote them over the run's own `thumbnet_model.json` (the sidecar
    just read), `metrics.json` and `config.json`, and the run then refused
    to load."""
    path = Path(path).expanduser()
    if not path.is_file() or path.stat().st_size == 0:  # none, or a placeholder
        return
    ours = False
    try:
        # utf-8-sig: a CSV saved again by a spreadsheet starts with a BOM.
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            if path.suffix.lower() == ".csv":
                ours = next(csv.reader(f), None) == _CSV_HEADER
            else:
                data = json.load(f)
                ours = isinstance(data, dict) and {"predictions", "skipped"} <= set(
                    data
                )
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(
            f"--output {str(path)!r} exists and is not a predictions file: "
            "predictions replace only an earlier predictions file. Choose "
            "another path."
        )


def write_predictions(result: dict, path: str | os.PathLike) -> str:
    """Writes `predict`'s result as `.json` (as returned) or `.csv` (one row
    per file and rank: file, rank, class, probability, error; a skipped file
    has one row with its error). An existing file is replaced only if it
    holds earlier predictions (`check_overwrite`)."""
    path = Path(path).expanduser()  # as `thumbnet predict` checked it
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"--output must end in .csv or .json, received {str(path)!r}")
    check_overwrite(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed over: an earlier file is replaced whole
    # or not at all.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # UTF-8 whatever the locale; a file name's undecodable bytes are
        # written \udcNN, as JSON writes them (a CSV that is not UTF-8 would
        # break the reader, pandas included).
        with open(
            tmp, "w", newline="", encoding="utf-8", errors="backslashreplace"
        ) as f:
            if suffix == ".json":
                f.write(json.dumps(result, indent=2) + "\n")
            else:
                writer = csv.writer(f, lineterminator="\n")  # not \r\n
                writer.writerow(_CSV_HEADER)
                for row in result["predictions"]:
                    for rank, item in enumerate(row["top"], 1):
                        writer.writerow(
                            [row["file"], rank, item["class"],
                             f"{item['probability']:.6f}", ""]
                        )  # fmt: skip
                for row in result["skipped"]:
                    writer.writerow([row["file"], "", "", "", row["reason"]])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)
