"""`thumbnet_model.json`: what a user needs to feed an exported model.

One sidecar per folder of exported models, beside them; `thumbnet predict`
reads it and guesses nothing. Example:

    {
      "format_version": 1,
      "class_names": ["bright", "dark"],
      "input_size": [32, 32],
      "channels": 1,
      "normalization": "none",
      "input_value_range": [0, 255],
      "resize": "bilinear, antialias, central crop to the input's aspect ratio",
      "output": "logits",
      "models": {"thumbnet.keras": "keras", "thumbnet.onnx": "onnx",
                 "thumbnet_int8.tflite": "litert_int8"},
      "quantization": {"thumbnet_int8.tflite": {"input": {"dtype": "uint8",
                       "scale": 0.00392, "zero_point": 0}, "output": {...}}},
      "sha256": {"thumbnet.keras": "9f2c...", "thumbnet.onnx": "41ab...", ...}
    }

`normalization` maps 8-bit pixels `p` in [0, 255] to model input: "unit"
`p / 255`, "symmetric" `p / 127.5 - 1`, "imagenet" `(p / 255 - mean) / std`
(`thumbnet_keras.data.normalization_layer`), "none" `p` unchanged (a model
that normalizes inside). A run's exported models (`thumbnet.keras` and its
conversions) normalize inside: "none", i.e. they take raw pixels (uint8, or
float in [0, 255]). `input_value_range` is the range of the model's input
that follows (null for "imagenet": mean/std units). `sha256` holds each
listed model's digest when the sidecar was written (a SavedModel folder's:
`data.index.folder_sha256`), so a model replaced since, e.g. by another
run's file of the same name, is refused rather than labelled with these
classes (`check_model_file`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# One name: the converter, which imports nothing of this package, keeps it.
from thumbnet_keras.deploy.convert import SIDECAR

__all__ = ["SIDECAR", "check_model_file", "read_sidecar", "write_sidecar"]

NORMALIZATIONS = ("unit", "symmetric", "imagenet", "none")
RESIZE = "bilinear, antialias, central crop to the input's aspect ratio"
_DESCRIBES = ("class_names", "input_size", "channels", "normalization")
# normalization -> the model input's value range.
INPUT_VALUE_RANGE = {
    "unit": [0, 1],
    "symmetric": [-1, 1],
    "imagenet": None,
    "none": [0, 255],
}


class SidecarError(ValueError):
    """A missing or invalid `thumbnet_model.json`."""


def model_sha256(path: str | os.PathLike) -> str:
    """The digest a sidecar records for a model file or SavedModel folder
    (less a sidecar of its own inside: `read_sidecar` finds one there)."""
    from thumbnet_keras.data.index import file_sha256, folder_sha256

    if Path(path).is_dir():
        return folder_sha256(path, ignore=(SIDECAR,))
    return file_sha256(path)


def write_sidecar(
    folder: str | os.PathLike,
    *,
    class_names: list[str],
    input_size: tuple[int, int],
    channels: int,
    normalization: str,
    models: dict[str, str] | None = None,
    quantization: dict[str, dict] | None = None,
    source: str | None = None,
) -> str:
    """Writes (or updates) `folder/thumbnet_model.json`; returns its path.

    An existing sidecar that describes the same classes, input and
    normalization keeps its `models`, `quantization` and `sha256` entries
    (the new ones are added); one that describes something else is
    replaced. Each of `models` found in `folder` gets its digest recorded
    now, so write the sidecar after the models.

    Args:
        folder: the folder of the exported model(s).
        class_names: in logit order.
        input_size: `(height, width)` of the model's input.
        channels: 1 (gray) or 3 (RGB).
        normalization: see the module docstring.
        models: file name -> format of the models this sidecar describes.
        quantization: file name -> quantized input/output parameters.
        source: the run folder or file the models came from.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, received {normalization!r}"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, received {channels}")
    record = {
        "format_version": 1,
        "class_names": [str(c) for c in class_names],
        "input_size": [int(s) for s in input_size],
        "channels": int(channels),
        "normalization": normalization,
        "input_value_range": INPUT_VALUE_RANGE[normalization],
        "resize": RESIZE,
        "output": "logits",
        "models": {},
        "quantization": {},
        "sha256": {},
    }
    if source is not None:
        record["source"] = str(source)
    path = Path(folder) / SIDECAR
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and all(old.get(k) == record[k] for k in _DESCRIBES):
        record["models"] = dict(old.get("models", {}))
        record["quantization"] = dict(old.get("quantization", {}))
        record["sha256"] = dict(old.get("sha256") or {})
    record["models"].update(models or {})
    record["quantization"].update(quantization or {})
    for name in models or {}:
        record["sha256"].pop(name, None)
        if (Path(folder) / name).exists():
            record["sha256"][name] = model_sha256(Path(folder) / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SIDECAR}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return str(path)


def read_sidecar(model_path: str | os.PathLike, sidecar: str | None = None) -> dict:
    """The sidecar of `model_path` (its folder's `thumbnet_model.json`, or
    `sidecar`), checked; raises `SidecarError` naming what is wrong."""
    model_path = Path(model_path)
    path = Path(sidecar) if sidecar else model_path.parent / SIDECAR
    if not sidecar and model_path.is_dir() and (model_path / SIDECAR).is_file():
        path = model_path / SIDECAR  # A SavedModel folder holding its own.
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        where = "the sidecar named" if sidecar else "beside the model"
        raise SidecarError(
            f"{path.absolute()} not found ({where}): {SIDECAR} beside a model "
            "names its classes and input. A run's model: copy the run folder's "
            f"{SIDECAR} beside it, or export it again (`thumbnet export --run "
            "RUN_FOLDER --format ...` writes one beside what it exports), or name "
            "it (`thumbnet predict --sidecar PATH`, `predict(..., sidecar=path)`). "
            "A model of your own: write one with `thumbnet_keras.deploy."
            "write_sidecar(folder, class_names=[...], input_size=(h, w), "
            "channels=..., normalization=...)`."
        ) from None
    except (OSError, ValueError) as err:
        raise SidecarError(f"{path} is not readable JSON: {err}") from None
    missing = [k for k in _DESCRIBES if k not in record]
    if missing:
        raise SidecarError(f"{path} lacks {', '.join(missing)}.")
    if record["normalization"] not in NORMALIZATIONS:
        raise SidecarError(
            f"{path}: unknown normalization {record['normalization']!r}."
        )
    record["path"] = str(path)
    return record


def check_model_file(model_path: str | os.PathLike, record: dict) -> None:
    """Raises `SidecarError` when `record` (a `read_sidecar` result) holds a
    digest for `model_path`'s name and the file is no longer that model:
    replaced after its export, e.g. by another run's model of the same name,
    it would be labelled with this sidecar's classes without a word."""
    name = Path(model_path).name
    expected = (record.get("sha256") or {}).get(name)
    if expected is None or model_sha256(model_path) == expected:
        return
    raise SidecarError(
        f"{model_path} is not the {name} that {record['path']} describes: the "
        "file changed after the sidecar was written (another run's model copied "
        "over it?), so its classes may not be these. Copy the sidecar that came "
        f"with this model beside it, or export it again (`thumbnet export --run "
        f"RUN_FOLDER`); if you vouch for this file, delete {name!r} from the "
        "sidecar's `sha256`."
    )
