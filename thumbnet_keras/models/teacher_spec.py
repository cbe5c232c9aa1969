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
    "is_raw_pixel_teacher",
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
    `applications:` or `keras_hub:` teacher, preprocessing inside)."""
    return bool(spec) and spec.startswith((APPLICATIONS_PREFIX, HUB_PREFIX))


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
