"""Which image region each feature-map cell sees, and FM pooling that respects it.

Feature mapping (FM) compares S's feature map with T's. Both maps are smaller
than their inputs, and with strided "same" padding (TensorFlow's rule: the
extra padding goes after) or explicit padding a map's cells are *not* centred
where naive pooling assumes. Example (tiny_cnn, Fashion-MNIST, f = 2): T's last
4x4 map has cell centres at image x = 8i + 3.5, S's 2x2 map (on the 14x14
thumbnail) at x = 16j + 11; average-pooling T's cells in pairs puts S's cell 0
on x = 7.5, 3.5 pixels from where S looks.

`feature_geometry(model, layer_name, input_hw)` walks the Functional graph from
the model input to the layer (into nested Functional models) and returns, per
spatial axis, `Axis(stride, offset, size)`: cell `i` is centred on input pixel
index `stride * i + offset` (pixel `p` spans [p, p + 1)) and is `stride`
pixels wide. Every convolution, pooling, zero-padding and cropping layer
changes it; layers that keep the spatial size (BatchNorm, activations, merges)
do not; anything else (resizing, reshapes) raises `GeometryError`.

`alignment_matrices(t_axes, s_axes, scale)` turns the two geometries into
averaging matrices: row j of an axis's matrix weights T's cells by how much of
S's cell j (in image coordinates: a thumbnail pixel covers `scale` image
pixels) each one covers. When the cells line up this is plain average pooling;
when they do not it follows S's cells. FM then compares features of the same
image regions for any backbone and factor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import numpy as np

__all__ = [
    "Axis",
    "GeometryError",
    "alignment_matrices",
    "feature_geometry",
    "fm_pooling",
]


class GeometryError(ValueError):
    """The receptive-field geometry of a feature map cannot be traced."""


class Axis(NamedTuple):
    """Cell i of a map is centred on input pixel index `stride * i + offset`."""

    stride: float
    offset: float
    size: int


_SPATIAL_ONLY_CHANGES = (
    "UpSampling2D",
    "Resizing",
    "Reshape",
    "Conv2DTranspose",
    "Flatten",
    "Permute",
)


def _pair(value):
    if isinstance(value, int):
        return (value, value)
    return tuple(value)


def _history(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise GeometryError(f"Tensor {tensor!r} has no Keras history to trace.")
    return history


def _path(tensor, stop_id):
    """Layers from the tensor back to the input `stop_id`, output first."""
    steps = []
    while id(tensor) != stop_id:
        layer, node_index, tensor_index = _history(tensor)
        if isinstance(layer, keras.layers.InputLayer):
            raise GeometryError(f"Reached input '{layer.name}' of another model.")
        node = layer._inbound_nodes[node_index]
        sources = [t for t in node.input_tensors if len(t.shape) == 4]
        if not sources:
            raise GeometryError(
                f"Layer '{layer.name}' has no 4-D input between the model input "
                "and the feature layer."
            )
        if isinstance(layer, keras.Model) and getattr(layer, "inputs", None):
            inner = layer.outputs[tensor_index]
            steps.extend(_path(inner, id(layer.inputs[0])))
        else:
            steps.append(layer)
        # Residual merges: every branch lands on the same grid; follow the first.
        tensor = sources[0]
    return steps


def _axis_step(layer, axis, size):
    """(stride, offset in input cells, output size) of one layer on one axis."""
    cls = type(layer).__name__
    if cls in _SPATIAL_ONLY_CHANGES:
        raise GeometryError(f"Layer '{layer.name}' ({cls}) changes the grid.")
    if cls == "ZeroPadding2D":
        before, after = layer.padding[axis]
        return 1, -before, size + before + after
    if cls == "Cropping2D":
        before, after = layer.cropping[axis]
        return 1, before, size - before - after
    kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    strides = getattr(layer, "strides", None)
    if kernel is not None and strides is not None and hasattr(layer, "padding"):
        k = _pair(kernel)[axis]
        s = _pair(strides)[axis]
        d = _pair(getattr(layer, "dilation_rate", 1))[axis]
        extent = d * (k - 1) + 1
        if layer.padding == "same":
            out = math.ceil(size / s)
            before = max((out - 1) * s + extent - size, 0) // 2
        elif layer.padding == "valid":
            out = (size - extent) // s + 1
            before = 0
        else:
            raise GeometryError(
                f"Layer '{layer.name}' has padding {layer.padding!r}, which "
                "cannot be traced."
            )
        return s, -before + (extent - 1) / 2, out
    return 1, 0.0, size  # Keeps the grid: BatchNorm, activations, merges, ...


def layer_output(model: keras.Model, layer: keras.Layer):
    """`layer`'s output in `model`'s own graph. A nested model's `.output`
    is its inner graph's, not connected to `model.inputs` (a base model
    inside a Sequential classifier made the trainer fail with Keras' "Output
    with path `1` is not connected to `inputs`"), so the call node in
    `model`'s graph is read instead. Raises ValueError for a layer used
    more than once or with several outputs."""
    graph = getattr(model, "_functional", model)  # a Sequential's graph
    nodes = {id(n) for level in graph._nodes_by_depth.values() for n in level}
    calls = [n.outputs for n in layer._inbound_nodes if id(n) in nodes]
    if len(calls) != 1 or len(calls[0]) != 1:
        raise ValueError(f"Layer '{layer.name}' has no single output in the graph.")
    return calls[0][0]


def feature_geometry(
    model: keras.Model, layer_name: str, input_hw: tuple[int, int]
) -> tuple[Axis, Axis]:
    """Where the cells of `layer_name`'s output sit on the model's input.

    Args:
        model: a Functional model with one image input.
        layer_name: a layer of `model` with a 4-D `(B, h, w, D)` output.
        input_hw: the input's `(H, W)` (needed for "same" padding, and for
            models built with a size-agnostic input).

    Returns:
        `(Axis for height, Axis for width)` in input pixel units.

    Raises:
        GeometryError: when a layer on the path changes the grid in a way not
            traced here (resizing, reshapes, transposed convolutions).
    """
    if any(not isinstance(d, int) for d in input_hw):
        raise GeometryError(f"The input size {tuple(input_hw)} is not fixed.")
    try:
        # In `model`'s own graph: a nested base model's `.output` is its
        # inner graph's, which leads to the inner input, not `model`'s (FM
        # then fell back to plain pooling, cells 2.5-7.5 px apart).
        output = layer_output(model, model.get_layer(layer_name))
    except ValueError as err:
        raise GeometryError(str(err)) from None
    steps = list(reversed(_path(output, id(model.inputs[0]))))
    axes = []
    for axis in (0, 1):
        stride, offset, size = 1.0, 0.0, int(input_hw[axis])
        for layer in steps:
            s, o, size = _axis_step(layer, axis, size)
            stride, offset = stride * s, offset + stride * o
        axes.append(Axis(stride, offset, size))
    expected = tuple(output.shape[1:3])
    got = (axes[0].size, axes[1].size)
    if all(e is not None for e in expected) and expected != got:
        raise GeometryError(
            f"Traced map size {got} of '{layer_name}' differs from its shape "
            f"{expected}; the path holds a layer that is not traced."
        )
    return axes[0], axes[1]


def _overlap_matrix(teacher: Axis, student: Axis, scale: float) -> np.ndarray:
    t_centre = teacher.stride * np.arange(teacher.size) + teacher.offset + 0.5
    s_centre = scale * (student.stride * np.arange(student.size) + student.offset + 0.5)
    t_half, s_half = teacher.stride / 2, scale * student.stride / 2
    low = np.maximum(s_centre[:, None] - s_half, t_centre[None, :] - t_half)
    high = np.minimum(s_centre[:, None] + s_half, t_centre[None, :] + t_half)
    matrix = np.clip(high - low, 0.0, None)
    sums = matrix.sum(axis=1, keepdims=True)
    empty = sums[:, 0] == 0
    if empty.any():  # S's cell lies beyond T's map: take the nearest T cell.
        nearest = np.abs(s_centre[empty, None] - t_centre[None, :]).argmin(axis=1)
        matrix[empty] = 0.0
        matrix[np.flatnonzero(empty), nearest] = 1.0
        sums = matrix.sum(axis=1, keepdims=True)
    return (matrix / sums).astype("float32")


def alignment_matrices(
    teacher_axes: tuple[Axis, Axis],
    student_axes: tuple[Axis, Axis],
    scale: float | tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """`(M_h, M_w)`: pool T's map onto S's cells, `einsum("ih,jw,bhwd->bijd")`.

    Args:
        teacher_axes: `feature_geometry` of T's feature layer (image pixels).
        student_axes: `feature_geometry` of S's feature layer (thumbnail pixels).
        scale: image pixels per thumbnail pixel (the factor f), or one per axis.
    """
    scales = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
    m_h, m_w = (
        _overlap_matrix(t, s, k)
        for t, s, k in zip(teacher_axes, student_axes, scales, strict=True)
    )
    return m_h, m_w


def fm_pooling(
    teacher: keras.Model,
    teacher_layer: str,
    student: keras.Model,
    student_layer: str,
    image_hw: tuple[int, int],
    thumbnail_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The FM pooling matrices for a teacher/student pair (see module doc)."""
    t_axes = feature_geometry(teacher, teacher_layer, image_hw)
    s_axes = feature_geometry(student, student_layer, thumbnail_hw)
    scales = tuple(i / t for i, t in zip(image_hw, thumbnail_hw, strict=True))
    return alignment_matrices(t_axes, s_axes, scales)
