"""Teacher backbones: the classifiers ThumbNet distills from and shrinks.

In ThumbNet the inference network S has the *same architecture* as the teacher
T, built at thumbnail size, so every backbone here is a function of
`(input_shape, num_classes)` that can be called twice: once at full size for
the teacher, once at `H/f x W/f` for the student.

Every model returned by `build`:

* is a Functional `keras.Model` of built-in Keras layers only, so a saved
  `.keras` file loads with `keras.saving.load_model(path, safe_mode=True)` in a
  process that has never imported `thumbnet_keras`, on any backend;
* takes channels-last images `(B, H, W, C)` with no preprocessing inside (the
  data pipeline normalizes) and outputs LOGITS `(B, num_classes)` (no softmax);
* has explicit layer names and `model.name == name`.

Names (`KNOWN_BACKBONES`):

* `"resnet18"`: BasicBlock ResNet-18 (He et al., CVPR 2016), written here
  with the torchvision layout (explicit zero padding, so strided convs pad
  symmetrically like PyTorch), ~1.82 GMACs at 224x224.
* `"resnet50"`: `keras.applications.ResNet50` (v1: stride on the first 1x1
  conv of a bottleneck), `include_top=True`, `classifier_activation=None`.
* `"vgg16"`: VGG-16 with batch norm (Simonyan & Zisserman, ICLR 2015;
  torchvision's `vgg16_bn` layout) with a Flatten + Dense head of width
  `head_width` (default 4096).
* `"mobilenetv2"`: `keras.applications.MobileNetV2`, `classifier_activation=None`,
  kwarg `alpha` (width multiplier, default 1.0).
* `"tiny_cnn"`: a few conv-BN-ReLU stages for tests and quick runs; kwargs
  `widths` (default `(16, 32, 64)`) and `head` (`"gap"`: strided-conv stages,
  GlobalAveragePooling + Dense; `"flatten"`: MaxPooling between stages,
  Flatten + Dense).

Weights: `None` (random), a local `.weights.h5` file (`Model.load_weights`), a
local `.keras` file (its weights are copied after checking that every weight
shape matches), or `"imagenet"` (passed to `keras.applications` for resnet50
and mobilenetv2; needs internet, and for resnet50 a 224x224x3 input with 1000
classes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import keras

from thumbnet_keras.models.weights import copy_weights

__all__ = ["KNOWN_BACKBONES", "build"]

KNOWN_BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "vgg16",
    "mobilenetv2",
    "tiny_cnn",
)
# Options whose values are a fixed set (the command line checks them before
# Keras starts, reading this literal from the source).
OPTION_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "tiny_cnn": {"head": ("gap", "flatten")},
}

_IMAGENET_BACKBONES = ("resnet50", "mobilenetv2")

# ---------------------------------------------------------------------------
# Architectures written here
# ---------------------------------------------------------------------------


def _conv_bn(x, filters, kernel_size, strides, name, relu=True):
    """Conv (no bias) + BN (+ ReLU), padding like PyTorch (symmetric)."""
    pad = (kernel_size - 1) // 2
    if strides > 1 and pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=1e-5, name=f"{name}_bn"
    )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, strides, name):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_down", relu=False)
    y = _conv_bn(x, filters, 3, strides, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


# BatchNorm moving-average momentum of the backbones written here: PyTorch's
# 0.1 (Keras 0.9). Keras' default 0.99 needs thousands of steps before the
# moving statistics are usable; with the few epochs of a small-data run the
# model then scores at chance in inference mode (seen in the accuracy study:
# Fashion-MNIST tiny_cnn 10% in inference vs 70-75% with batch statistics).
BN_MOMENTUM = 0.9


def _resnet18(input_shape, num_classes, name):
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, 64, 7, 2, "stem")
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    # Zero padding is exact for max pooling here: the input is post-ReLU.
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            strides = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512,) * 3)


def _vgg16(input_shape, num_classes, name, head_width=4096, dropout=0.5):
    _check_int("head_width", head_width, 1)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), received dropout={dropout!r}.")
    if min(input_shape[:2]) < 32:
        raise ValueError(
            "vgg16 halves the image 5 times and needs height and width >= 32, "
            f"received input_shape={tuple(input_shape)!r}."
        )
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for stage, widths in enumerate(_VGG16_STAGES, start=1):
        for i, filters in enumerate(widths, start=1):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", name=f"block{stage}_conv{i}"
            )(x)
            x = keras.layers.BatchNormalization(
                momentum=BN_MOMENTUM, epsilon=1e-5, name=f"block{stage}_bn{i}"
            )(x)
            x = keras.layers.ReLU(name=f"block{stage}_relu{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{stage}_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    for i in (1, 2):
        x = keras.layers.Dense(head_width, activation="relu", name=f"fc{i}")(x)
        x = keras.layers.Dropout(dropout, name=f"fc{i}_dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _tiny_cnn(
    input_shape,
    num_classes,
    name,
    widths=(16, 32, 64),
    head="gap",
    bn_momentum=BN_MOMENTUM,
):
    if head not in OPTION_CHOICES["tiny_cnn"]["head"]:
        raise ValueError(f'`head` must be "gap" or "flatten", received head={head!r}.')
    widths = tuple(widths)
    if not widths:
        raise ValueError("`widths` must name at least one stage, received ().")
    for w in widths:
        _check_int("widths", w, 1)
    if head == "flatten" and min(input_shape[:2]) < 2 ** (len(widths) - 1):
        raise ValueError(
            f"tiny_cnn with head='flatten' halves the image {len(widths) - 1} "
            f"times; input_shape={tuple(input_shape)!r} is too small."
        )
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, filters in enumerate(widths):
        if head == "flatten" and i > 0:
            x = keras.layers.MaxPooling2D(2, name=f"stage{i}_pool")(x)
        strides = 2 if head == "gap" and i > 0 else 1
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=False,
            name=f"stage{i}_conv",
        )(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"stage{i}_bn")(
            x
        )
        x = keras.layers.ReLU(name=f"stage{i}_relu")(x)
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    else:
        x = keras.layers.Flatten(name="head_flatten")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------
# keras.applications wrappers
# ---------------------------------------------------------------------------


def _as_plain_functional(model, name):
    # With `input_tensor`, keras.applications records the inputs as a list,
    # and calling the model on one tensor then warns; re-wrap the same layers.
    for layer in model.layers:
        # MobileNetV2 leaves its pooling layer unnamed; an auto name such as
        # "global_average_pooling2d_3" depends on what was built before.
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            layer.name = "avg_pool"
    return keras.Model(model.inputs[0], model.outputs[0], name=name)


def _resnet50(input_shape, num_classes, name, weights=None):
    app = keras.applications.ResNet50(
        include_top=True,
        weights=weights,
        input_shape=tuple(input_shape),
        input_tensor=keras.Input(input_shape, name="image"),
        classes=num_classes,
        classifier_activation=None,
        name=name,
    )
    return _as_plain_functional(app, name)


def _mobilenetv2(input_shape, num_classes, name, weights=None, alpha=1.0):
    app = keras.applications.MobileNetV2(
        input_shape=tuple(input_shape),
        input_tensor=keras.Input(input_shape, name="image"),
        alpha=alpha,
        include_top=True,
        weights=weights,
        classes=num_classes,
        classifier_activation=None,
        name=name,
    )
    return _as_plain_functional(app, name)


_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "vgg16": _vgg16,
    "mobilenetv2": _mobilenetv2,
    "tiny_cnn": _tiny_cnn,
}

# ---------------------------------------------------------------------------
# Validation and weight loading
# ---------------------------------------------------------------------------


def _check_int(arg, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{arg}` must be an integer >= {minimum}, received {arg}={value!r}."
        )


def _validate_image_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape
    ):
        raise ValueError(
            "`input_shape` must be a channels-last image shape (height, width, "
            f"channels) of positive integers, received input_shape={input_shape!r}."
        )
    if shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"`input_shape` has {shape[-1]} channels; an image has 1 to 4 "
            f"(received input_shape={input_shape!r}). Images are channels-last."
        )
    return shape


def _h5_layout(path: str) -> dict[str, tuple[int, ...]]:
    import h5py  # A Keras dependency.

    layout: dict[str, tuple[int, ...]] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda key, obj: (
                layout.__setitem__(key, tuple(obj.shape))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return layout


def _compare_h5_layout(model: keras.Model, path: str) -> str | None:
    """Returns what differs between `path` and `model`'s weights, or None."""
    try:
        found = _h5_layout(path)
    except OSError as e:
        return f"it is not a readable HDF5 file ({e})."
    # A model compiled and trained before `save_weights` stores its optimizer's
    # variables too (`optimizer/vars/N`); loading into a backbone skips them.
    found = {k: v for k, v in found.items() if not k.startswith("optimizer/")}
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference.weights.h5")
        model.save_weights(reference)
        expected = _h5_layout(reference)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        return (
            f"the file holds {len(found)} weight tensors, the backbone "
            f"{len(expected)}; missing from the file: {missing[:3]}, not in the "
            f"backbone: {extra[:3]}."
        )
    for key in sorted(expected):
        if expected[key] != found[key]:
            return (
                f"weight {key!r} has shape {found[key]} in the file and "
                f"{expected[key]} in the backbone."
            )
    return None


def _load_local_weights(model: keras.Model, name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Weights file for backbone {name!r} not found: {path!r}."
        )
    if path.endswith(".weights.h5"):
        # Keras loads a file with *more* layers than the model without error
        # (it only warns), so compare the whole layout first.
        problem = _compare_h5_layout(model, path)
        if problem:
            raise ValueError(
                f"Weights file {path!r} does not match backbone {name!r} "
                f"(input_shape={model.input_shape[1:]}, "
                f"num_classes={model.output_shape[-1]}): {problem} The file was "
                "saved from a different architecture, size or option set."
            )
        try:
            model.load_weights(path)
        except Exception as e:  # Keras raises ValueError/KeyError/h5py errors.
            raise ValueError(
                f"Could not load weights file {path!r} into backbone {name!r}. "
                f"Keras said: {e}"
            ) from e
        return
    if path.endswith(".keras"):
        source = keras.saving.load_model(path, compile=False, safe_mode=True)
        src, dst = source.weights, model.weights
        if len(src) != len(dst):
            raise ValueError(
                f"Weights file {path!r} (model {source.name!r}) has {len(src)} "
                f"weight tensors; backbone {name!r} has {len(dst)}: it was saved "
                "from a different architecture."
            )
        for s, d in zip(src, dst, strict=True):
            if tuple(s.shape) != tuple(d.shape):
                raise ValueError(
                    f"Weights file {path!r} (model {source.name!r}) does not "
                    f"match backbone {name!r}: weight {s.path!r} has shape "
                    f"{tuple(s.shape)}, backbone weight {d.path!r} has shape "
                    f"{tuple(d.shape)}."
                )
        copy_weights(source, model)
        return
    raise ValueError(
        f"Unsupported weights file {path!r} for backbone {name!r}: pass a "
        "`.weights.h5` or `.keras` file, 'imagenet' or None."
    )


def build(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> keras.Model:
    """Builds a classification backbone that outputs logits.

    Args:
        name: one of `KNOWN_BACKBONES`.
        input_shape: `(H, W, C)` channels-last image shape.
        num_classes: number of classes, >= 2.
        weights: `None` (random init, the default), a local `.weights.h5` or
            `.keras` file, or `"imagenet"` (resnet50 and mobilenetv2 only;
            downloads from the internet).
        **kwargs: architecture options: `head_width` and `dropout` (vgg16),
            `alpha` (mobilenetv2), `widths`, `head` and `bn_momentum`
            (tiny_cnn; default `BN_MOMENTUM` = 0.9, as for resnet18 and vgg16).

    Returns:
        A Functional `keras.Model` named `name`, mapping `(B, H, W, C)` images
        to `(B, num_classes)` logits.

    Example:

    >>> model = build("tiny_cnn", (32, 32, 3), num_classes=10)
    >>> model.output_shape
    (None, 10)
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"Unknown backbone {name!r}. Known backbones: {', '.join(KNOWN_BACKBONES)}."
        )
    shape = _validate_image_shape(input_shape)
    _check_int("num_classes", num_classes, 2)
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights is not None and not isinstance(weights, str):
        raise ValueError(
            "`weights` must be None, 'imagenet' or a path to a local weights "
            f"file, received weights={weights!r}."
        )
    if weights == "imagenet":
        if name not in _IMAGENET_BACKBONES:
            raise ValueError(
                f"No ImageNet weights exist for backbone {name!r} in Keras; "
                "pass weights=None or a local `.weights.h5`/`.keras` file. "
                f"'imagenet' is available for: {', '.join(_IMAGENET_BACKBONES)}."
            )
        return _BUILDERS[name](shape, num_classes, name, weights="imagenet", **kwargs)
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Weights file for backbone {name!r} not found: {weights!r}."
        )
    try:
        model = _BUILDERS[name](shape, num_classes, name, **kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid option for backbone {name!r}: {e}") from e
    if weights is not None:
        _load_local_weights(model, name, weights)
    return model
