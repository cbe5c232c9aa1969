"""Multiply-add (MAC) and parameter counts for Functional Keras models.

`count_flops(model)` returns the multiply-adds of one forward pass for ONE
image (batch size 1), the unit the ThumbNet paper and the ResNet paper call
"FLOPs" (He et al. 2016, Table 1: ResNet-50 = 3.8e9 "FLOPs", i.e. multiply-adds).
It walks the Functional graph node by node (`model._nodes_by_depth`), so a
layer called twice is counted twice, and it recurses into nested Functional and
Sequential models (the exported ThumbNet model is `Input -> downscaler ->
student`). Shapes come from the graph's symbolic tensors, so every non-batch
dimension must be static.

What is counted (kernel `k`, output spatial positions `P_out`, input
spatial positions `P_in`, input channels `C_in`, output channels `C_out`):

* `Conv1D/2D/3D`: `P_out * prod(k) * C_in / groups * C_out` (strides and
  dilation only change `P_out`).
* `DepthwiseConv1D/2D`: `P_out * prod(k) * C_in * depth_multiplier`.
* `SeparableConv1D/2D`: the depthwise part above plus the pointwise part
  `P_out * C_in * depth_multiplier * C_out`.
* `Conv1D/2D/3DTranspose`: `P_in * prod(k) * C_in * C_out` (each input
  position is scattered through the whole kernel).
* `Dense` on any rank: `prod(leading non-batch dims) * in_features * units`
  (a `Dense` on `(B, T, D)` costs `T * D * units`).
* A `Conv2D` whose kernel is exactly zero off the channel diagonal (E's
  frozen bicubic passes): as the `DepthwiseConv2D` it equals, `P_out *
  prod(k) * C_in` (the exporters write it as one; counted as a dense conv
  until 2026-11-30, 3x for RGB).
* `Resizing` and `UpSampling2D`: a separable filter in two passes, along the
  height to `(h_out, w_in)`, then along the width to `(h_out, w_out)`, so
  `C * (h_out * w_in * taps_h + h_out * w_out * taps_w)` MACs, with taps per
  axis from `RESIZE_TAPS`: 0 "nearest", 2 "bilinear", 4 "bicubic", 6
  "lanczos3", 10 "lanczos5". With `antialias=True` and downscaling by `s` on
  an axis the filter is stretched and that axis's taps are multiplied by
  `s`; "area" counts `s` taps per axis. E.g. an antialiased bicubic 224 ->
  112 resize of 3 channels is `3 * (112 * 224 * 8 + 112 * 112 * 8)` =
  903,168 MACs, the same as E's bicubic passes at an even factor (at an
  odd one E's taps are a little shorter), tiny next to the convolutions.
  `crop_to_aspect_ratio` / `pad_to_aspect_ratio` crop or pad the input
  first. (Both passes were counted at the output's size until 2026-11-30.)

Not counted (0 MACs): biases, batch/layer normalization (foldable into the
preceding conv at inference), activations, pooling, element-wise merges
(`Add`, `Multiply`, `Concatenate`), reshapes and transposes (`Reshape`,
`Permute`: E's space-to-depth is pure data movement), padding, dropout,
rescaling. A
layer outside these lists that holds weights triggers a `UserWarning` naming it
(it is counted as 0, which is likely wrong).

Example:

>>> inputs = keras.Input((16, 16, 3))
>>> model = keras.Model(inputs, keras.layers.Conv2D(8, 3, padding="same")(inputs))
>>> count_flops(model) == 16 * 16 * 3 * 3 * 3 * 8
True
"""

from __future__ import annotations

import math
import warnings

import keras

__all__ = ["count_flops", "count_params"]

# Taps per axis of the interpolation kernels (Keras / TF image resize).
RESIZE_TAPS = {
    "nearest": 0,
    "bilinear": 2,
    "bicubic": 4,
    "lanczos3": 6,
    "lanczos5": 10,
    "area": 1,
}

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_CONVS = _CONV + _DEPTHWISE + _SEPARABLE + _TRANSPOSE

# Layers with weights whose cost is deliberately not counted.
_ZERO_COST_WEIGHTED = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.Normalization,
    keras.layers.Embedding,
)
# The same by class name, for classes that are not public Keras layers:
# keras.applications' ConvNeXt scales each channel (`LayerScale`), an
# element-wise product like BatchNormalization's.
_ZERO_COST_WEIGHTED_NAMES = ("LayerScale",)


def _static(shape, what: str, layer) -> tuple[int, ...]:
    """`shape` without its batch dim; raises if any other dim is unknown."""
    dims = tuple(shape[1:])
    if any(d is None for d in dims):
        raise ValueError(
            f"count_flops needs static shapes, but {what} of layer "
            f"{layer.name!r} ({type(layer).__name__}) has shape {tuple(shape)}. "
            "Build the model with a fixed input size, e.g. "
            "keras.Input((224, 224, 3))."
        )
    return dims


def _conv_macs(layer, in_shape, out_shape) -> int:
    in_dims = _static(in_shape, "the input", layer)
    out_dims = _static(out_shape, "the output", layer)
    c_in = in_dims[-1] if layer.data_format == "channels_last" else in_dims[0]
    if layer.data_format == "channels_last":
        p_in, p_out = math.prod(in_dims[:-1]), math.prod(out_dims[:-1])
    else:
        p_in, p_out = math.prod(in_dims[1:]), math.prod(out_dims[1:])
    taps = math.prod(layer.kernel_size)
    if isinstance(layer, _SEPARABLE):
        mid = c_in * layer.depth_multiplier
        return p_out * taps * mid + p_out * mid * layer.filters
    if isinstance(layer, _DEPTHWISE):
        return p_out * taps * c_in * layer.depth_multiplier
    if isinstance(layer, _TRANSPOSE):
        return p_in * taps * c_in * layer.filters
    from thumbnet_keras.deploy.convert import channel_diagonal

    if channel_diagonal(layer):  # E's bicubic passes: per channel, as depthwise
        return p_out * taps * c_in
    return p_out * taps * (c_in // layer.groups) * layer.filters


def _resize_macs(layer, in_shape, out_shape) -> int:
    in_dims = _static(in_shape, "the input", layer)
    out_dims = _static(out_shape, "the output", layer)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        in_dims, out_dims = in_dims[1:] + in_dims[:1], out_dims[1:] + out_dims[:1]
    (h_in, w_in, _), (h_out, w_out, c) = in_dims, out_dims
    # Cropped or padded to the output's aspect ratio first (Keras' integer
    # arithmetic), then resized.
    tall, wide = int(w_in * h_out / w_out), int(h_in * w_out / h_out)
    if getattr(layer, "crop_to_aspect_ratio", False):
        h_in, w_in = max(min(h_in, tall), 1), max(min(w_in, wide), 1)
    elif getattr(layer, "pad_to_aspect_ratio", False):
        h_in, w_in = max(h_in, tall), max(w_in, wide)
    method = layer.interpolation
    base = RESIZE_TAPS.get(method, 4)
    antialias = getattr(layer, "antialias", False) or method == "area"
    taps = []
    for size_in, size_out in ((h_in, h_out), (w_in, w_out)):
        scale = size_in / size_out if antialias and size_in > size_out else 1.0
        taps.append(base * scale)
    # Two passes: along the height to (h_out, w_in), then along the width.
    return int(round(c * (h_out * w_in * taps[0] + h_out * w_out * taps[1])))


def _layer_macs(layer, node) -> int:
    """MACs of one call (`node`) of a leaf layer."""
    if not node.input_tensors:
        return 0
    in_shape = node.input_tensors[0].shape
    out_shape = node.outputs[0].shape
    if isinstance(layer, _CONVS):
        return _conv_macs(layer, in_shape, out_shape)
    if isinstance(layer, keras.layers.Dense):
        dims = _static(in_shape, "the input", layer)
        return math.prod(dims) * layer.units
    if isinstance(layer, (keras.layers.Resizing, keras.layers.UpSampling2D)):
        return _resize_macs(layer, in_shape, out_shape)
    if (
        layer.weights
        and not isinstance(layer, _ZERO_COST_WEIGHTED)
        and type(layer).__name__ not in _ZERO_COST_WEIGHTED_NAMES
    ):
        warnings.warn(
            f"count_flops does not know layer {layer.name!r} "
            f"({type(layer).__name__}), which has weights; counting it as 0 MACs.",
            stacklevel=3,
        )
    return 0


def _as_functional(model, where: str):
    """The Functional graph behind `model` (itself, or a Sequential's)."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                f"Sequential model {model.name!r}{where} is not built with an "
                "input shape; start it with keras.Input((H, W, C))."
            )
        return graph
    if not hasattr(model, "_nodes_by_depth"):
        raise TypeError(
            f"count_flops needs a Functional or Sequential keras.Model, received "
            f"{type(model).__name__} {getattr(model, 'name', '')!r}{where}: a "
            "subclassed model has no graph to walk. Wrap it in a Functional "
            "model (keras.Model(inputs, outputs)) built from layers."
        )
    return model


def _at_call_shape(model, node):
    """`model`, or a copy built for the static input shapes of its call at
    `node` when its own inputs leave sizes free: S derived from a teacher
    built for any size, inside a fixed-size ThumbNet model, could not be
    counted ("Build the model with a fixed input size")."""
    own = [tuple(t.shape[1:]) for t in getattr(model, "inputs", None) or []]
    given = [tuple(t.shape[1:]) for t in node.input_tensors]
    if (
        not own
        or len(own) != len(given)
        or all(None not in shape for shape in own)
        or any(None in shape for shape in given)
    ):
        return model
    inputs = [keras.Input(shape) for shape in given]
    return keras.models.clone_model(
        model, input_tensors=inputs[0] if len(inputs) == 1 else inputs
    )


def _graph_macs(model, where: str = "") -> int:
    graph = _as_functional(model, where)
    total = 0
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            op = node.operation
            if node.is_input or op is None:
                continue
            if isinstance(op, keras.Model):
                # A nested model: each call costs one pass through its graph.
                total += _graph_macs(
                    _at_call_shape(op, node), f" (inside {model.name!r})"
                )
            elif isinstance(op, keras.layers.Layer):
                total += _layer_macs(op, node)
    return total


def count_flops(model: keras.Model) -> int:
    """Multiply-adds (MACs) of one forward pass of `model` for one image.

    See the module docstring for exactly what is counted.

    Args:
        model: a Functional or built Sequential `keras.Model` with static
            non-batch shapes; nested Functional/Sequential models are followed.

    Returns:
        The number of multiply-adds for a batch of one, as an `int`.

    Raises:
        TypeError: for a subclassed (non-Functional) model or a non-model.
        ValueError: for an unbuilt Sequential model or unknown spatial sizes.

    Example:

    >>> from thumbnet_keras.models import backbones
    >>> model = backbones.build("resnet18", (224, 224, 3), num_classes=1000)
    >>> round(count_flops(model) / 1e9, 2)
    1.81
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"count_flops expects a keras.Model, received {type(model).__name__}."
        )
    return int(_graph_macs(model))


def count_params(model: keras.Model) -> dict[str, int]:
    """Parameter counts of a built model.

    Args:
        model: a built `keras.Model` (or layer).

    Returns:
        `{"total": ..., "trainable": ..., "non_trainable": ...}`; batch-norm
        moving statistics count as non-trainable, as in `model.summary()`.

    Example:

    >>> inputs = keras.Input((4,))
    >>> count_params(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    {'total': 10, 'trainable': 10, 'non_trainable': 0}
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"count_params expects a keras.Model, received {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on data or build it "
            "with an input shape first."
        )
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    non_trainable = sum(math.prod(w.shape) for w in model.non_trainable_weights)
    return {
        "total": int(trainable + non_trainable),
        "trainable": int(trainable),
        "non_trainable": int(non_trainable),
    }
