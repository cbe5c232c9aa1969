"""Teacher specifications, checked without Keras.

The names and rules `models.teachers.load_teacher` builds from, in a module
that imports nothing heavy, so the command line's preflight
(`pipeline.preflight`) refuses a bad `--teacher` in milliseconds with the
same rules and words as the Python API.
"""

from __future__ import annotations

import os

__all__ = [
    "APPLICATIONS",
    "APPLICATIONS_PREFIX",
    "HUB_PREFIX",
    "TeacherSpecError",
    "check_applications_spec",
    "hub_archive_converter",
    "is_raw_pixel_teacher",
    "raw_pixel_source",
]

APPLICATIONS_PREFIX = "applications:"
HUB_PREFIX = "keras_hub:"

# keras.applications model -> the mode of its `preprocess_input`
# ("none": the model rescales inside already and takes [0, 255]).
APPLICATIONS = {
    "ResNet50": "caffe",
    "ResNet101": "caffe",
    "ResNet152": "caffe",
    "VGG16": "caffe",
    "VGG19": "caffe",
    "DenseNet121": "torch",
    "DenseNet169": "torch",
    "DenseNet201": "torch",
    "MobileNet": "tf",
    "MobileNetV2": "tf",
    "ResNet50V2": "tf",
    "ResNet101V2": "tf",
    "ResNet152V2": "tf",
    "InceptionV3": "tf",
    "InceptionResNetV2": "tf",
    "Xception": "tf",
    "NASNetMobile": "tf",
    "NASNetLarge": "tf",
    "MobileNetV3Small": "none",
    "MobileNetV3Large": "none",
    "EfficientNetB0": "none",
    "EfficientNetB1": "none",
    "EfficientNetB2": "none",
    "EfficientNetB3": "none",
    "EfficientNetB4": "none",
    "EfficientNetB5": "none",
    "EfficientNetB6": "none",
    "EfficientNetB7": "none",
    "EfficientNetV2B0": "none",
    "EfficientNetV2B1": "none",
    "EfficientNetV2B2": "none",
    "EfficientNetV2B3": "none",
    "EfficientNetV2S": "none",
    "EfficientNetV2M": "none",
    "EfficientNetV2L": "none",
    "ConvNeXtTiny": "none",
    "ConvNeXtSmall": "none",
    "ConvNeXtBase": "none",
    "ConvNeXtLarge": "none",
    "ConvNeXtXLarge": "none",
}


class TeacherSpecError(ValueError):
    """A teacher specification that cannot be resolved; the message says why."""


def is_raw_pixel_teacher(spec: str | None) -> bool:
    """Whether `spec` names a teacher that takes raw [0, 255] pixels (an
    `applications:` or `keras_hub:` teacher, or a keras-hub task saved as a
    `.keras` file: preprocessing inside)."""
    return raw_pixel_source(spec) is not None


def raw_pixel_source(spec: str | None) -> str | None:
    """`"applications"` or `"keras_hub"` for a teacher `load_teacher` puts
    its preprocessing inside (it then takes raw [0, 255] pixels), else None."""
    if not spec:
        return None
    if spec.startswith(APPLICATIONS_PREFIX):
        return "applications"
    if spec.startswith(HUB_PREFIX) or hub_archive_converter(spec) is not None:
        return "keras_hub"
    return None


def hub_archive_converter(path: str) -> dict | None:
    """The image converter's config (`scale`, `offset`, ...) of a keras-hub
    image classifier saved with `task.save("x.keras")`, when it rescales
    pixels (a scale or an offset set); None for any other file. Read from
    the archive's `config.json`, without Keras: keras-hub applies the
    converter in `predict` and `fit`, outside the model's graph, so a
    teacher loaded as a plain model would be fed unconverted images (a
    trial: 25% where the task scored 95%)."""
    import json
    import zipfile

    if not (isinstance(path, str) and path.endswith(".keras") and os.path.isfile(path)):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        if not str(config.get("module", "")).startswith("keras_hub"):
            return None
        preprocessor = (config.get("config") or {}).get("preprocessor") or {}
        converter = (preprocessor.get("config") or {}).get("image_converter") or {}
        settings = converter.get("config") or {}
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return None
    if settings.get("scale") is None and settings.get("offset") is None:
        return None
    return settings


def check_applications_spec(
    spec: str,
    channels: int,
    num_classes: int | None,
    channels_fix: str = "set channels=3",
) -> tuple[str, str | None]:
    """Checks `applications:<Name>[:imagenet|none|<weights file>]`.

    Args:
        spec: the whole specification, prefix included.
        channels: the run's image channels.
        num_classes: the dataset's classes, or None when unknown.
        channels_fix: how the caller's user sets 3 channels (the Python API's
            `channels=3`, the command line's `--channels 3`).

    Returns:
        `(name, weights)`: the `keras.applications` model name and
        `"imagenet"`, a weights file path, or None (random weights).

    Raises:
        TeacherSpecError: an unknown model, a missing weights file, gray
            images, or ImageNet weights for a dataset without 1000 classes;
            the message starts with the specification.
    """
    name, _, weights = spec.removeprefix(APPLICATIONS_PREFIX).partition(":")
    if name not in APPLICATIONS:
        raise TeacherSpecError(
            f"Teacher {spec!r}: unknown keras.applications model {name!r}; "
            f"choose from {', '.join(APPLICATIONS)}."
        )
    weights = weights or "imagenet"
    if weights.lower() == "none":
        weights = None
    elif weights != "imagenet" and not os.path.isfile(weights):
        raise TeacherSpecError(f"Teacher {spec!r}: weights file {weights!r} not found.")
    if channels != 3:
        raise TeacherSpecError(
            f"Teacher {spec!r} takes RGB images but the run's images have "
            f"{channels} channel(s); {channels_fix}."
        )
    if weights == "imagenet" and num_classes not in (None, 1000):
        raise TeacherSpecError(
            f"Teacher {spec!r}: ImageNet weights give 1000 classes but the "
            f"dataset has {num_classes}; give a weights file trained on this "
            f"dataset (applications:{name}:<file>)."
        )
    return name, weights
