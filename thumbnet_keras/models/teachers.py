"""Teachers as users have them, each with its own preprocessing inside.

A pre-trained classifier expects the preprocessing it was trained with:
`keras.applications.ResNet50` wants caffe-style BGR minus the ImageNet channel
means, DenseNet wants torchvision's mean/std, MobileNetV2 wants [-1, 1], a
keras-hub preset carries an image converter with its own scale and offset.
`load_teacher` returns every teacher as one Functional model

    raw pixels in [0, 255] (H, W, C) -> the family's preprocessing -> the
    classifier's layers -> logits

so the pipeline feeds raw pixels and no normalization mismatch is possible.
The preprocessing is built-in Keras layers only (`Rescaling`,
`Normalization`, and for caffe's RGB -> BGR a frozen 3x3 `Dense` whose kernel
is the channel permutation), named `preprocess_*`; the classifier's graph is
inlined (nested Functional models, e.g. a keras-hub backbone, are
flattened), so `make_student` rebuilds it at thumbnail size, FM finds its
feature maps, and an exported `thumbnet.keras` loads with `safe_mode=True`
wherever Keras runs.

Teacher specifications (the `teacher` parameter, `--teacher`):

* a `.keras` file, or `"pretrained:elpv"`: loaded with its own input
  contract (the shipped ELPV teacher takes gray [0, 1] images, fed by the
  manifest's normalization); nested Functional models inside it are
  inlined (`inline_nested`), nothing else changes; except a keras-hub
  image classifier saved with `task.save(...)` whose image converter
  rescales: that converter goes inside, as for `keras_hub:` below
  (`teacher_spec.hub_archive_converter`);
* `"applications:<Name>"` or `"applications:<Name>:<weights>"`: a
  `keras.applications` model (e.g. `ResNet50`, `DenseNet121`, `MobileNetV2`)
  built at the run's image size with `classifier_activation=None`; weights
  `imagenet` (the default; downloads, needs internet and 1000 classes), a
  local weights file (`.weights.h5`, or Keras' legacy `.h5`), or `none`
  (random, for tests);
* `"keras_hub:<preset>"`: a keras-hub `ImageClassifier` preset (a Kaggle
  handle, downloads) or a local folder written by `task.save_to_preset(...)`
  (offline); its image converter's scale and offset become the
  preprocessing (its resizing is the pipeline's job: images arrive at the
  run's size). The task must output logits (`activation=None`).

Example:

>>> teacher = load_teacher("applications:ResNet50:none", (64, 64, 3), 10)
>>> teacher.layers[1].name
'preprocess_caffe'
"""

from __future__ import annotations

import os
import re
import warnings

import keras
import numpy as np

from thumbnet_keras.models.teacher_spec import (
    APPLICATIONS,
    APPLICATIONS_PREFIX,
    HUB_PREFIX,
    TeacherSpecError,
    check_applications_spec,
    hub_archive_converter,
    is_raw_pixel_teacher,
)
from thumbnet_keras.models.weights import copy_weights

__all__ = [
    "APPLICATIONS",
    "PREPROCESSING_MODES",
    "TeacherSpecError",
    "flatten_model",
    "inline_nested",
    "is_raw_pixel_teacher",
    "load_teacher",
    "preprocessing_layers",
]

PREPROCESSING_MODES = ("caffe", "torch", "tf", "none")
# keras.applications.imagenet_utils' constants.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocessing_layers(mode: str, channels: int = 3) -> list:
    """Built-in Keras layers mapping [0, 255] pixels as
    `keras.applications.imagenet_utils.preprocess_input(x, mode=mode)` does.

    Args:
        mode: "caffe" (RGB -> BGR, minus the ImageNet channel means), "torch"
            (`(x / 255 - mean) / std`), "tf" (`x / 127.5 - 1`), "none".
        channels: 3 (caffe and torch need RGB).
    """
    if mode not in PREPROCESSING_MODES:
        raise ValueError(
            f"mode must be one of {PREPROCESSING_MODES}, received {mode!r}"
        )
    if mode in ("caffe", "torch") and channels != 3:
        raise ValueError(f"{mode} preprocessing needs 3 channels, received {channels}")
    if mode == "none":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        layer = keras.layers.Normalization(
            mean=[255.0 * m for m in _TORCH_MEAN],
            variance=[(255.0 * s) ** 2 for s in _TORCH_STD],
            name="preprocess_torch",
        )
        layer.build((None, None, None, 3))
        return [layer]
    # caffe: y = x[..., ::-1] - mean_bgr, as one frozen Dense on the channels.
    layer = keras.layers.Dense(3, name="preprocess_caffe", trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights(
        [np.eye(3, dtype="float32")[::-1], -np.asarray(_CAFFE_MEAN_BGR, "float32")]
    )
    return [layer]


def flatten_model(model: keras.Model, inputs, prefix_layers=()) -> keras.Model:
    """A Functional model `inputs -> prefix_layers -> model's graph`, with
    every nested Functional model (a backbone inside a classifier) inlined,
    so each layer is a layer of the result. Its layers are new, with
    `model`'s weights copied (and `prefix_layers`' config and weights)."""
    x = inputs
    for layer in prefix_layers:
        x = layer(x)

    def run(graph, tensor):
        def op_fn(op):
            if _is_graph(op):
                return lambda *args, **kwargs: run(op, args[0])
            return op

        outputs = graph._run_through_graph([tensor], operation_fn=op_fn)
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs

    if not _is_graph(model):
        raise TeacherSpecError(
            f"Teacher '{model.name}' is not a Functional model; its graph cannot "
            "be wrapped with preprocessing."
        )
    shared = keras.Model(inputs, run(model, x), name=model.name)
    # Fresh layers (the shared ones also belong to `model`'s graph, so their
    # `.output` would point there), with the same weights.
    flat = keras.Model.from_config(shared.get_config())
    copy_weights(shared, flat)
    return flat


def _is_graph(op) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(op, Functional) and len(op.inputs) == 1


def _wrap(classifier, image_shape, layers, name):
    image = keras.Input(image_shape, name="pixels")
    teacher = flatten_model(classifier, image, layers)
    teacher.name = name
    return teacher


def short_error_text(err: Exception, limit: int = 400) -> str:
    """`err`'s message on one line, short enough to read: Keras' weight-loading
    errors print every value of the variable they failed on (100 KB+), and
    Keras' call errors carry terminal colour codes (`\x1b[1m`)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = " ".join(plain.split(" Target variable:")[0].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _applications(rest: str, image_shape, num_classes):
    name, weights = check_applications_spec(
        APPLICATIONS_PREFIX + rest, image_shape[-1], num_classes
    )
    classes = 1000 if num_classes is None else num_classes
    builder = getattr(keras.applications, name)
    local = weights not in (None, "imagenet")
    try:
        classifier = builder(
            weights="imagenet" if weights == "imagenet" else None,
            input_shape=tuple(image_shape),
            classes=classes,
            classifier_activation=None,
        )
        if local:
            # A file that does not fit makes Keras warn once per layer (100+
            # "Skipping nested container" lines) before the error says it
            # all: the warnings are shown only when the weights loaded.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                classifier.load_weights(weights)
            for warning in caught:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
    except Exception as err:  # Download, shape or weights-file errors.
        hint = (
            f" The file's weights do not fit applications:{name} built with its "
            f"default options and {classes} classes: a model saved with other "
            "options (e.g. MobileNetV2's alpha) or another class count needs "
            "its own .keras file as the teacher (model.save('teacher.keras'))."
            # Not for a file that is no weights file at all (a CLI trial
            # passed a PNG: Keras' "File format not supported" says it).
            if local and "format not supported" not in str(err)
            else ""
        )
        raise TeacherSpecError(
            f"Cannot build teacher applications:{name} at {tuple(image_shape)} "
            f"with weights {weights!r}: {short_error_text(err)}{hint}"
        ) from err
    layers = preprocessing_layers(APPLICATIONS[name])
    return _wrap(classifier, tuple(image_shape), layers, name.lower())


def _hub_preprocessing(task, channels):
    converter = getattr(getattr(task, "preprocessor", None), "image_converter", None)
    scale = getattr(converter, "scale", None)
    offset = getattr(converter, "offset", None)
    if converter is None or (scale is None and offset is None):
        return []
    for name, value in (("scale", scale), ("offset", offset)):
        size = int(np.size(value)) if value is not None else 1
        if size not in (1, channels):
            # numpy's broadcast error was all a user saw (a trial).
            raise TeacherSpecError(
                f"Teacher {task.name!r}: its keras-hub image converter has a "
                f"{name} per channel for {size} channels, but the run's images "
                f"have {channels}; set --channels {size} (`channels` in params)."
            )
    scale = np.broadcast_to(
        np.asarray(1.0 if scale is None else scale, "float64"), (channels,)
    )
    offset = np.broadcast_to(
        np.asarray(0.0 if offset is None else offset, "float64"), (channels,)
    )
    # x * scale + offset == (x - mean) / sqrt(variance)
    layer = keras.layers.Normalization(
        mean=list(-offset / scale),
        variance=list((1.0 / scale) ** 2),
        name="preprocess_keras_hub",
    )
    layer.build((None, None, None, channels))
    return [layer]


def _keras_hub(preset: str, image_shape):
    try:
        import keras_hub
    except ImportError as err:
        raise TeacherSpecError(
            "keras_hub teachers need keras-hub: pip install keras-hub"
        ) from err
    try:
        task = keras_hub.models.ImageClassifier.from_preset(preset)
    except Exception as err:  # Download failures, not a classifier preset.
        raise TeacherSpecError(
            f"Cannot load keras-hub classifier {preset!r} (a Kaggle preset "
            f"downloads; a local folder comes from task.save_to_preset): "
            f"{short_error_text(err)}"
        ) from err
    activation = getattr(task, "activation", None)
    if activation not in (None, "linear"):
        raise TeacherSpecError(
            f"keras-hub classifier {preset!r} has activation {activation!r}; "
            "ThumbNet needs logits (activation=None)."
        )
    layers = _hub_preprocessing(task, image_shape[-1])
    # Rebuild the task's graph at the run's input size (presets are often
    # size-agnostic); the weights are the task's own.
    return _wrap(task, tuple(image_shape), layers, task.name)


def load_teacher(spec: str, image_shape=None, num_classes: int | None = None):
    """The teacher named by `spec` (see the module docstring).

    Args:
        spec: a `.keras` path, `"pretrained:elpv"`, `"applications:..."` or
            `"keras_hub:..."`.
        image_shape: `(H, W, C)` of the run (needed for `applications:` and
            `keras_hub:` teachers, built at that size).
        num_classes: the dataset's classes (None: unknown; ImageNet's 1000
            for `applications:` teachers).

    Returns:
        A `keras.Model` outputting logits.

    Raises:
        TeacherSpecError: naming what is wrong (unknown name, missing file,
            a download that failed offline, channels or classes that do not
            fit).
    """
    if spec.startswith(APPLICATIONS_PREFIX):
        if image_shape is None:
            raise TeacherSpecError(f"{spec!r} needs the run's image shape.")
        return _applications(spec[len(APPLICATIONS_PREFIX) :], image_shape, num_classes)
    if spec.startswith(HUB_PREFIX):
        if image_shape is None:
            raise TeacherSpecError(f"{spec!r} needs the run's image shape.")
        return _keras_hub(spec[len(HUB_PREFIX) :], image_shape)
    from thumbnet_keras.pretrained import resolve_teacher

    try:
        path = resolve_teacher(spec)
    except (ValueError, FileNotFoundError) as err:
        raise TeacherSpecError(str(err)) from err
    if not os.path.isfile(path):
        raise TeacherSpecError(
            f"Teacher file not found: {path!r} (a teacher is a .keras file, "
            "'pretrained:elpv', 'applications:<Name>[:<weights>]' or "
            "'keras_hub:<preset or folder>')."
        )
    try:
        with warnings.catch_warnings():
            # A keras-hub task compiles itself when loaded: Keras then warns
            # that it skips the saved optimizer's variables (harmless; it
            # read as a teacher loaded in part).
            warnings.filterwarnings(
                "ignore", message="Skipping variable loading for optimizer"
            )
            teacher = keras.saving.load_model(path, compile=False)
    except Exception as err:
        missing = re.search(r"Could not locate class '([^']+)'", str(err))
        if missing:  # A class of the user's code, not importable here.
            name = missing.group(1)
            text = f"Teacher file {path!r} uses the class '{name}', defined in "
            text += "your code, which this process cannot import. "
            if name == _archive_class(path):  # The model itself.
                text += (
                    "A subclassed model cannot be a teacher (S is derived from "
                    "the teacher's graph): rebuild it functionally (keras.Input, "
                    "then its layers), copy the weights, and save it again."
                )
            else:  # A layer inside a Functional or Sequential model.
                text += (
                    "Use the Python API from code that imports it (registered "
                    "with `@keras.saving.register_keras_serializable()`), or "
                    "rebuild the model from built-in layers."
                )
            raise TeacherSpecError(text) from err
        raise TeacherSpecError(
            f"Teacher file {path!r} is not a loadable .keras model: {short_error_text(err)}"
        ) from err
    if hub_archive_converter(path) is not None:
        # A keras-hub task saved with task.save(): its converter goes
        # inside, as for a keras_hub: preset (the run feeds raw pixels,
        # `teacher_spec.raw_pixel_source`).
        shape = tuple(image_shape or teacher.inputs[0].shape[1:])
        layers = _hub_preprocessing(teacher, shape[-1])
        return _wrap(teacher, shape, layers, teacher.name)
    return at_run_size(inline_nested(teacher), image_shape)


def _archive_class(path: str) -> str | None:
    """The class name of the model a `.keras` archive holds (its
    `config.json`), or None when it cannot be read."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json")).get("class_name")
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return None


def at_run_size(teacher: keras.Model, image_shape) -> keras.Model:
    """A teacher saved with a flexible input, `(None, None, C)` (fully
    convolutional and transfer-learning models often are), rebuilt at the
    run's `(H, W)` with the same layers' weights; any other teacher as it
    is. E and the FM alignment need a fixed size."""
    shape = tuple(teacher.inputs[0].shape[1:]) if teacher.inputs else ()
    if image_shape is None or len(shape) != 3 or shape[:2] != (None, None):
        return teacher
    if shape[2] not in (None, image_shape[2]):
        return teacher  # the channels disagree: the caller says so
    from thumbnet_keras.models.student import make_student

    try:
        return make_student(teacher, size=tuple(image_shape[:2]), name=teacher.name)
    except ValueError as err:
        raise TeacherSpecError(
            f"Teacher {teacher.name!r} takes images of any size, but does not "
            f"rebuild at the run's {image_shape[0]}x{image_shape[1]}: {err}"
        ) from err


def inline_nested(model: keras.Model) -> keras.Model:
    """`model`, with nested Functional models (e.g. a classifier wrapped in
    a user's preprocessing model) inlined so FM can pick a feature map
    inside them; returned unchanged when nothing is nested. Same input (name,
    shape and contract), same layers and weights."""
    if not _is_graph(model) or not any(_is_graph(layer) for layer in model.layers):
        return model
    inputs = model.inputs[0]
    image = keras.Input(tuple(inputs.shape[1:]), name=inputs.name.split(":")[0])
    return flatten_model(model, image)
