"""Derive the inference network S from a teacher T.

S is T's architecture run at thumbnail size, with T's weights copied:

* Teachers whose head does not care about spatial size (global pooling, or an
  input that is already size-agnostic) are rebuilt from their config at the
  thumbnail input shape; every weight keeps its shape.
* Teachers whose head needs a fixed spatial size (Flatten + Dense, e.g. VGG)
  get their last log2(f) pooling layers removed, so the map reaching Flatten
  has the size the Dense kernel expects (f must be a power of two).
* Anything else raises a `ValueError` asking for an explicit student.
"""

from __future__ import annotations

import copy
import math
import os

import keras

from thumbnet_keras.layers.downscaler import validate_image_shape
from thumbnet_keras.models.weights import all_layers, copy_weights

__all__ = ["make_student", "image_input_shape"]

_POOLING_CLASSES = ("MaxPooling2D", "AveragePooling2D", "MaxPool2D", "AvgPool2D")
_SHAPE_KEYS = ("batch_shape", "batch_input_shape")
_IMAGE_SHAPE_KEYS = ("image_shape", "input_shape")
# Layers of a teacher's embedded preprocessing (`models.teachers`).
PREPROCESS_PREFIX = "preprocess_"


def not_a_graph_message(model, role: str = "model") -> str:
    """What a subclassed `keras.Model` (no `inputs`/`outputs` graph) is told:
    ThumbNet reads feature maps inside it and rebuilds it at thumbnail size
    from its config, which a `call()` method does not give."""
    if isinstance(model, keras.Sequential):
        return (
            f"The {role} '{model.name}' is a Sequential model with no input yet: "
            "start it with `keras.Input((H, W, C))` (or call "
            "`model.build((None, H, W, C))`) so its layers have shapes."
        )
    return (
        f"The {role} '{model.name}' is a subclassed keras.Model "
        f"({type(model).__name__}): ThumbNet reads feature maps inside it and "
        "rebuilds it at thumbnail size, which needs a Functional or Sequential "
        "model. Build the same layers as `keras.Model(inputs, outputs)` or "
        "`keras.Sequential([...])` and copy the weights (`set_weights`)."
    )


def image_input_shape(model: keras.Model) -> tuple:
    """Returns `(H, W, C)` of a model's single image input (H, W may be None)."""
    if not isinstance(model, keras.Model):
        hint = (
            " Load it first: keras.saving.load_model(path)."
            if isinstance(model, (str, os.PathLike))
            else ""
        )
        raise TypeError(f"Expected a keras.Model, received {model!r}.{hint}")
    inputs = getattr(model, "inputs", None)
    if not inputs and not getattr(model, "outputs", None):
        raise ValueError(not_a_graph_message(model))
    if not inputs or len(inputs) != 1:
        raise ValueError(
            f"Model '{model.name}' must have exactly one image input, "
            f"found {0 if not inputs else len(inputs)}."
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(
            f"Model '{model.name}' input must be an image batch (B, H, W, C), "
            f"received input shape {shape}."
        )
    return shape[1:]


def _rewrite_shapes(obj, old_hw, new_hw, nested=False, scale_nested=True):
    """Returns a copy of a Keras config with the input size replaced.

    Drops `build_config` entries (they record the old input size) and rewrites
    `batch_shape`/`image_shape`-like entries whose spatial part is `old_hw`.
    Inside a nested model (ConvNeXt's downsampling blocks are Sequential
    models built for a fixed map, e.g. 56x56 in a 224x224 teacher), a 4-D
    input shape is scaled by the same ratio (28x28 at f=2), or left free
    where the ratio gives no whole size.
    """
    if isinstance(obj, dict):
        out = {}
        config = obj.get("config")
        if obj.get("class_name") == "Resizing" and isinstance(config, dict):
            # A resize to the input's own size (a no-op) stays one at the
            # thumbnail's; any other size is refused (`_check_no_fixed_resizing`).
            if (config.get("height"), config.get("width")) == tuple(old_hw):
                obj = {**obj, "config": {**config, "height": new_hw[0],
                                         "width": new_hw[1]}}  # fmt: skip
        inner = nested or obj.get("class_name") in ("Functional", "Sequential")
        for key, value in obj.items():
            if key == "build_config":
                continue
            if key in _SHAPE_KEYS and isinstance(value, (list, tuple)):
                if len(value) == 4 and tuple(value[1:3]) == old_hw:
                    value = [value[0], *new_hw, value[3]]
                elif len(value) == 4 and nested and scale_nested:
                    value = [value[0], *_scaled(value[1:3], old_hw, new_hw), value[3]]
            elif key in _IMAGE_SHAPE_KEYS and isinstance(value, (list, tuple)):
                if len(value) == 3 and tuple(value[:2]) == old_hw:
                    value = [*new_hw, value[2]]
            out[key] = _rewrite_shapes(value, old_hw, new_hw, inner, scale_nested)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(
            _rewrite_shapes(v, old_hw, new_hw, nested, scale_nested) for v in obj
        )
    return obj


def _scaled(hw, old_hw, new_hw) -> list:
    """A nested model's input `(h, w)` at the student's scale, None where
    the ratio gives no whole size (or a size is unknown)."""
    out = []
    for size, old, new in zip(hw, old_hw, new_hw, strict=True):
        whole = None not in (size, old, new) and (size * new) % old == 0
        out.append(size * new // old if whole else None)
    return out


def _redirect_history(obj, removed, replacement):
    """Points every `keras_history` that names `removed` to `replacement`."""
    if isinstance(obj, dict):
        history = obj.get("keras_history")
        if isinstance(history, (list, tuple)) and history and history[0] == removed:
            obj["keras_history"] = list(replacement)
        for value in obj.values():
            _redirect_history(value, removed, replacement)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _redirect_history(value, removed, replacement)


def _find_history(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("keras_history"), (list, tuple)):
            return obj["keras_history"]
        for value in obj.values():
            found = _find_history(value)
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found = _find_history(value)
            if found is not None:
                return found
    return None


def _remove_last_poolings(config, count):
    """Removes the last `count` 2-D pooling layers from a model config."""
    layers = config.get("layers")
    if not isinstance(layers, list):
        return None
    pools = [
        i for i, layer in enumerate(layers) if layer["class_name"] in _POOLING_CLASSES
    ]
    if len(pools) < count:
        return None
    config = copy.deepcopy(config)
    layers = config["layers"]
    for index in sorted(pools[-count:], reverse=True):
        pool = layers.pop(index)
        if "inbound_nodes" in pool:  # Functional: rewire consumers.
            source = _find_history(pool["inbound_nodes"])
            if source is None:
                return None
            _redirect_history(layers, pool["name"], source)
            for key in ("output_layers", "input_layers"):
                entries = config.get(key)
                if entries and isinstance(entries[0], str):  # A single entry.
                    entries = [entries]
                if entries and any(entry[0] == pool["name"] for entry in entries):
                    return None  # The pooling layer is a model output.
    return config


def _weights_fit(teacher, candidate):
    t_shapes = [tuple(w.shape) for w in teacher.weights]
    c_shapes = [tuple(w.shape) for w in candidate.weights]
    return t_shapes == c_shapes


def _try_from_config(cls, config):
    try:
        # from_config may consume the dict it is given.
        return cls.from_config(copy.deepcopy(config)), None
    except Exception as error:  # A head that cannot take the new size.
        return None, error


def _layers(model: keras.Model) -> list:
    """The layers of `model`'s graph, nested models' graphs included; not
    what `_flatten_layers` also walks: tracked attributes outside the graph,
    such as a keras-hub classifier's preprocessor and its `Resizing` (every
    preset classifier was refused as resizing its input)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            found += _layers(layer)
    return found


# A classifier's head: what makes it take any input size (make_student), and
# what no feature map comes after (the trainer's FM layer).
GLOBAL_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


def _has_global_pooling(model: keras.Model) -> bool:
    return any(isinstance(layer, GLOBAL_POOLING) for layer in _layers(model))


def _check_no_fixed_resizing(teacher: keras.Model, old_hw, where: str) -> None:
    """Refuses a teacher that resizes its input to a fixed size inside (other
    than its own input size): S would scale the thumbnail back up to it and
    cost what T costs (a trial's exported model cost 1.3x its teacher)."""
    for layer in _layers(teacher):
        if not isinstance(layer, keras.layers.Resizing):
            continue
        size = (layer.height, layer.width)
        if size != tuple(old_hw):
            raise StudentDerivationError(
                f"Cannot derive a student from teacher '{teacher.name}' {where}: "
                f"its layer '{layer.name}' resizes every input to "
                f"{size[0]}x{size[1]}, so S would scale the thumbnail back up and "
                "cost what the teacher costs.",
                "Remove the Resizing layer from the teacher (resize the images "
                "before the model instead), or build the student yourself and "
                "pass it as `ThumbNetTrainer(..., student=my_student)`.",
                "Remove the Resizing layer from the teacher and give the run's "
                "--image-size instead.",
            )


class StudentDerivationError(ValueError):
    """`make_student` cannot derive S from the teacher at this factor.
    `reason` is the message without the Python-API advice, and `cli_advice`
    what the command line says instead."""

    def __init__(self, reason: str, advice: str = "", cli_advice: str = ""):
        super().__init__(f"{reason} {advice}".strip())
        self.reason, self.cli_advice = reason, cli_advice

    def __reduce__(self):  # Pickles (a Prefect task's or a worker's error).
        return type(self), (
            self.reason,
            str(self)[len(self.reason) + 1 :],
            self.cli_advice,
        )


def make_student(
    teacher: keras.Model,
    factor: int | None = None,
    name: str | None = None,
    size: tuple[int, int] | None = None,
) -> keras.Model:
    """Builds S: the teacher's architecture at thumbnail size, weights copied.

    Args:
        teacher: a Functional or Sequential `keras.Model` (including keras-hub
            and keras-cv classifiers) with one `(H, W, C)` image input.
        factor: integer >= 2; the student's input is `(H/f, W/f, C)`.
        name: the student's name. Defaults to `"<teacher name>_student"`.
        size: instead of `factor`, the student's input `(h, w)`, any size
            smaller than the teacher's (e.g. the slightly larger thumbnail of
            an equal-cost bicubic baseline). Only teachers whose head does not
            need a fixed spatial size (global pooling) take arbitrary sizes.

    Returns:
        A new model with the teacher's weights, whose output shape equals the
        teacher's. Every layer of it is trainable, whatever the teacher's
        `trainable` flags (a frozen teacher, e.g. one already handed to a
        `ThumbNetTrainer`, must not give a frozen student), except the
        teacher's embedded preprocessing (layers named `preprocess_*`, see
        `thumbnet_keras.models.teachers`), which S keeps frozen.

    Raises:
        ValueError: when the factor does not divide the image size, or when the
            teacher's head needs a fixed spatial size that removing pooling
            layers cannot restore. Then build a student yourself and pass it to
            `ThumbNetTrainer(student=...)`.

    Example:

    >>> teacher = backbones.build("resnet18", (224, 224, 3), num_classes=10)
    >>> student = make_student(teacher, factor=2)
    >>> student.input_shape
    (None, 112, 112, 3)
    """
    height, width, channels = image_input_shape(teacher)
    if (factor is None) == (size is None):
        raise ValueError(
            "Pass exactly one of `factor` and `size` to make_student, received "
            f"factor={factor!r}, size={size!r}."
        )
    if size is not None:
        return _student_at_size(teacher, size, name)
    if height is None or width is None:
        # Size-agnostic teacher: same architecture, any thumbnail size fits.
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"`factor` must be an integer >= 2, received {factor!r}.")
        old_hw = new_hw = (height, width)
    else:
        validate_image_shape((height, width, channels), factor)
        old_hw, new_hw = (height, width), (height // factor, width // factor)

    _check_no_fixed_resizing(teacher, old_hw, f"at factor {factor}")
    config = teacher.get_config()
    resized = _rewrite_shapes(config, old_hw, new_hw)
    cls = teacher.__class__
    student, error = _try_from_config(cls, resized)
    first_error = error
    if student is None or not _weights_fit(teacher, student):
        # Only a head that needs a fixed size (Flatten + Dense, VGG) loses
        # poolings; a global-pool head keeps its architecture, and where it
        # does not build at the thumbnail's size it is refused below (a
        # DenseNet at f=4 silently lost two of its transition poolings).
        trim = student is not None or not _has_global_pooling(teacher)
        student = None
        levels = math.log2(factor)
        if levels.is_integer() and trim:
            # Nested models keep their sizes here: with the last poolings
            # gone, the maps they read are the teacher's again (a nested
            # Flatten + Dense head, scaled, was refused).
            unscaled = _rewrite_shapes(config, old_hw, new_hw, scale_nested=False)
            trimmed = _remove_last_poolings(unscaled, int(levels))
            if trimmed is not None:
                candidate, error = _try_from_config(cls, trimmed)
                if candidate is not None and _weights_fit(teacher, candidate):
                    student = candidate
    if student is None and "Could not locate class" in str(first_error):
        raise StudentDerivationError(
            f"Cannot derive a student from teacher '{teacher.name}': its config "
            "names a class Keras cannot rebuild from it "
            f"({str(first_error).split('. ')[0]}).",
            "Register the class with `@keras.saving.register_keras_serializable()` "
            "and give it a `get_config`, or build the student yourself and pass "
            "it as `ThumbNetTrainer(..., student=my_student)`.",
            "Register the class with `@keras.saving.register_keras_serializable()` "
            "in a module that is imported before the run.",
        )
    if student is None and "deserialization of a `Lambda`" in str(first_error):
        raise StudentDerivationError(
            f"Cannot derive a student from teacher '{teacher.name}': it contains "
            "a `Lambda` layer, whose Python function Keras does not rebuild from "
            "a config in safe mode (a smaller factor does not change that).",
            "Replace the Lambda with a registered layer "
            "(`@keras.saving.register_keras_serializable()`), or build the "
            "student yourself and pass it as `ThumbNetTrainer(..., "
            "student=my_student)`.",
            "Replace the Lambda with a registered layer "
            "(`@keras.saving.register_keras_serializable()`) in a module that is "
            "imported before the run.",
        )
    if student is None and first_error is not None and new_hw[0] is not None:
        from thumbnet_keras.models.teachers import short_error_text

        # The architecture itself refuses inputs this small (e.g. a conv
        # kernel larger than its feature map, keras.applications' minimum
        # input size): no head change helps.
        raise StudentDerivationError(
            f"Cannot derive a student from teacher '{teacher.name}' at factor "
            f"{factor}: its architecture does not build at {new_hw[0]}x{new_hw[1]} "
            f"inputs ({short_error_text(first_error, 300)}).",
            (
                "Use a smaller factor or a larger image size"
                if factor > 2
                else "Use a larger image size"
            )
            + ", or build a student for the thumbnail size yourself and pass it "
            "as `ThumbNetTrainer(..., student=my_student)`.",
            (
                "Choose a smaller factor, or a larger --image-size"
                if factor > 2
                else "Choose a larger --image-size (2 is the smallest factor)"
            )
            + " (for a .keras teacher: one built for larger images; its input "
            "size is the run's image size).",
        )
    if student is None:
        detail = f" (rebuilding failed with: {error})" if error is not None else ""
        raise StudentDerivationError(
            f"Cannot derive a student from teacher '{teacher.name}' at factor "
            f"{factor}: its head needs a fixed spatial size and removing its last "
            f"log2({factor}) pooling layers does not restore it{detail}.",
            "Build a student for the thumbnail size yourself and pass it as "
            "`ThumbNetTrainer(..., student=my_student)`.",
            "Rebuild the teacher with a global pooling layer before its "
            "classifier (GlobalAveragePooling2D; keras.applications: "
            'include_top=False, pooling="avg" and a Dense head), so that its '
            "head takes any size, or train with the Python API and a student "
            "of your own (README, Python API).",
        )
    if tuple(student.outputs[0].shape[1:]) != tuple(teacher.outputs[0].shape[1:]):
        raise ValueError(
            f"The derived student's output shape {tuple(student.outputs[0].shape)} "
            f"differs from the teacher's {tuple(teacher.outputs[0].shape)}; pass a "
            "student explicitly."
        )
    return _finish_student(teacher, student, name)


def _finish_student(teacher, student, name):
    copy_weights(teacher, student)
    student.name = name or f"{teacher.name}_student"
    # The config carries the teacher's `trainable` flags; S is trained.
    # Every layer is set, nested ones too: on TensorFlow, a Sequential model's
    # `trainable` setter does not reach its layers (a frozen Sequential
    # teacher gave an S with no trainable weight). Except an embedded
    # preprocessing (`teachers.preprocessing_layers`, named `preprocess_*`):
    # it is the input contract, not a weight to learn.
    student.trainable = True
    for layer in all_layers(student):
        layer.trainable = True
    for layer in student.layers:
        if layer.name.startswith(PREPROCESS_PREFIX):
            for frozen in (layer, *all_layers(layer)):
                frozen.trainable = False
    return student


def _student_at_size(teacher, size, name):
    height, width, _ = image_input_shape(teacher)
    try:
        new_hw = tuple(int(v) for v in size)
    except (TypeError, ValueError):
        new_hw = ()
    if len(new_hw) != 2 or min(new_hw) < 1 or tuple(size) != new_hw:
        raise ValueError(f"`size` must be a pair of positive ints, received {size!r}.")
    if height is not None and (new_hw[0] > height or new_hw[1] > width):
        raise ValueError(
            f"`size` {new_hw} is larger than the teacher's input {(height, width)}."
        )
    _check_no_fixed_resizing(teacher, (height, width), f"at {new_hw[0]}x{new_hw[1]}")
    resized = _rewrite_shapes(teacher.get_config(), (height, width), new_hw)
    student, error = _try_from_config(teacher.__class__, resized)
    if student is None or not _weights_fit(teacher, student):
        detail = f" ({error})" if error is not None else ""
        raise ValueError(
            f"Cannot rebuild teacher '{teacher.name}' at {new_hw[0]}x{new_hw[1]}: "
            f"its head needs a fixed spatial size{detail}. Arbitrary thumbnail "
            "sizes need a global-pooling head."
        )
    return _finish_student(teacher, student, name)
