"""The equal-cost bicubic baseline: S on a slightly larger bicubic thumbnail.

ThumbNet's inference model is E + S at `H/f`. Comparing it with bicubic + S
at the same `H/f` gives bicubic fewer multiply-adds (E costs something). The
fair comparison gives bicubic the same budget: the smallest thumbnail side `s
>= H/f` such that `MACs(bicubic resize H -> s) + MACs(S at s) >= MACs(E +
S at H/f)`, found by bisection (MACs grow with `s`), with S derived from T at
`s` (`make_student(teacher, size=(s, s))`).

The resize from H to a side that need not divide it is
`keras.layers.Resizing(s, s, "bicubic", antialias=True)` (+ the clip to the
image's value range), the same antialiased bicubic filter as
`bicubic_downscaler` for integer factors. Resizing is a preprocessing layer
that puts `training=True` into Keras' call context when its model is called
without `training` (docs/design.md), so these models are only ever called
with `training` given (`predict_on_batch`, the trainer) and are not exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from thumbnet_keras.evaluation.flops import count_flops
from thumbnet_keras.layers.downscaler import clip_to_range, validate_value_range

__all__ = [
    "bicubic_student_macs",
    "equal_cost_size",
    "resize_downscaler",
    "thumbnail_step_macs",
]


def resize_downscaler(
    input_shape: Sequence[int],
    size: int,
    value_range: Sequence[float] | None = None,
    name: str = "bicubic_resize",
) -> keras.Model:
    """image `(H, W, C)` -> antialiased bicubic `(size, size, C)` thumbnail,
    clipped to `value_range` when given."""
    image = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Resizing(
        size, size, interpolation="bicubic", antialias=True, name="resize"
    )(image)
    x = clip_to_range(x, validate_value_range(value_range), name="clip")
    return keras.Model(image, x, name=name)


def bicubic_student_macs(
    teacher: keras.Model, side: int, value_range: Sequence[float] | None = None
) -> int:
    """MACs of bicubic resize (H -> `side`) + S at `side`, for one image.

    Raises:
        ValueError: from `make_student` when T's head needs a fixed size.
    """
    from thumbnet_keras.models.student import make_student

    student = make_student(teacher, size=(side, side))
    image_shape = tuple(int(d) for d in teacher.inputs[0].shape[1:])
    resize = resize_downscaler(image_shape, side, value_range)
    return count_flops(resize) + count_flops(student)


def equal_cost_size(
    teacher: keras.Model,
    factor: int,
    target_macs: int,
    value_range: Sequence[float] | None = None,
) -> dict:
    """The smallest side `s >= H/f` whose bicubic + S costs >= `target_macs`.

    Args:
        teacher: T, taking `(H, W, C)` images (square).
        factor: the run's factor; the search starts at `H/f`.
        target_macs: MACs per image of E + S at `H/f`.
        value_range: the clip of the resize model.

    Returns:
        `{"size": s, "macs": MACs(bicubic + S@s), "target_macs": ...,
        "reached": bool}`; `reached` is False when even `s = H` stays below
        the target (then `s = H`).

    Raises:
        ValueError: from `make_student` when T's head needs a fixed size.
    """
    height, width = (int(d) for d in teacher.inputs[0].shape[1:3])
    if height != width:
        raise ValueError(f"Square images only, received {height}x{width}.")
    cache: dict[int, int] = {}

    def macs(side: int) -> int:
        if side not in cache:
            cache[side] = bicubic_student_macs(teacher, side, value_range)
        return cache[side]

    low, high = height // factor, height
    if macs(high) < target_macs:
        return {"size": high, "macs": macs(high), "target_macs": target_macs,
                "reached": False}  # fmt: skip
    while low < high:  # Invariant: macs(high) >= target.
        mid = (low + high) // 2
        if macs(mid) >= target_macs:
            high = mid
        else:
            low = mid + 1
    return {"size": high, "macs": macs(high), "target_macs": target_macs,
            "reached": True}  # fmt: skip


def thumbnail_step_macs(
    teacher: keras.Model,
    factor: int,
    value_range: Sequence[float] | None = None,
    student: keras.Model | None = None,
) -> int | None:
    """What one more thumbnail pixel costs: `MACs(bicubic + S at H/f + 1) -
    MACs(S at H/f)`.

    E + S at `H/f` stays no dearer than bicubic + S at `H/f + 1` exactly when
    E costs at most this, so the equal-cost baseline (`equal_cost_size`) is
    then the next side up rather than a much dearer one
    (`auto_downscaler_width`'s `step_macs`).

    Args:
        teacher: T, taking `(H, W, C)` images.
        factor: the run's factor.
        value_range: the clip of the resize model.
        student: S at `H/f` when the caller has it (else derived from T).

    Returns:
        The MACs, or None when the next side does not exist (`H/f + 1 > H`)
        or S cannot take another size (T's head fixes it).
    """
    from thumbnet_keras.models.student import make_student

    height, width = (int(d) for d in teacher.inputs[0].shape[1:3])
    side = height // factor
    if height != width or side + 1 > height:
        return None
    try:
        larger = bicubic_student_macs(teacher, side + 1, value_range)
    except ValueError:  # a head that fixes S's input size
        return None
    if student is None:
        student = make_student(teacher, factor)
    return larger - count_flops(student)
