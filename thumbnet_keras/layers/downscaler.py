"""The learned downscaler E and its fixed bicubic baseline.

E maps an (H, W, C) image to an (H/f, W/f, C) thumbnail. It is the sum of two
branches, both built from stock Keras layers so that a saved model loads
anywhere with `safe_mode=True`:

* a fixed antialiased bicubic resize, written as frozen stride-f depthwise
  convolutions (it equals `keras.ops.image.resize(..., "bicubic",
  antialias=True)` on every backend), and
* a learned residual correction computed at thumbnail resolution. The
  default design (`variant="space_to_depth"`) moves every f x f block of the
  image to channels (a reshape/transpose, no arithmetic), mixes it with the
  bicubic thumbnail by a 1x1 conv, then `depth` depthwise-separable 3x3 convs
  and a last 3x3 conv to C channels whose kernel and bias start at zero: no
  convolution reads the full-resolution image. `variant="strided"` is the
  earlier design (a strided conv per prime factor of f, the first reading the
  full image, then full 3x3 convs), kept selectable.

Because the last conv starts at zero, an untrained E *is* the bicubic
thumbnail, and training only has to learn what bicubic loses. The output is an
image in the input's value space (no normalization is applied or undone);
pass `value_range=(lo, hi)` to clip it to the input's range.

References:
    Zhao & Ghanem, "ThumbNet: One Thumbnail Image Contains All You Need for
    Recognition", ACM MM 2020 (arXiv:1904.05034).
    Talebi & Milanfar, "Learning to Resize Images for Computer Vision Tasks",
    ICCV 2021 (the bicubic-plus-residual design).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

__all__ = [
    "auto_downscaler_width",
    "bicubic_downscaler",
    "bicubic_taps",
    "build_downscaler",
    "space_to_depth",
    "validate_image_shape",
]


def validate_image_shape(input_shape: Sequence[int | None], factor: int) -> tuple:
    """Checks an (H, W, C) image shape against a downscaling factor.

    Returns the shape as a tuple of ints; raises `ValueError` naming the problem.
    """
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise ValueError(
            f"`factor` must be an integer >= 2, received factor={factor!r} "
            f"of type {type(factor).__name__}."
        )
    if factor < 2:
        raise ValueError(
            f"`factor` must be an integer >= 2 (a thumbnail smaller than the "
            f"image), received factor={factor}."
        )
    shape = tuple(input_shape)
    if len(shape) != 3 or any(
        d is None or isinstance(d, bool) or not isinstance(d, int) or d <= 0
        for d in shape
    ):
        raise ValueError(
            "`input_shape` must be a channels-last image shape (height, width, "
            f"channels) of positive integers, received input_shape={input_shape!r}."
        )
    height, width, channels = shape
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"`input_shape` has {channels} channels; an image has 1 to 4 "
            f"(received input_shape={input_shape!r}). Images are channels-last."
        )
    if height % factor or width % factor:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by factor={factor}: "
            f"the thumbnail would be {height / factor:g}x{width / factor:g}. "
            f"Choose a factor that divides both {height} and {width}, or resize "
            "the images first."
        )
    return shape


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def _keys_cubic(x, a=-0.5):
    """Keys' cubic convolution kernel (a = -0.5, as TF, JAX and torch use)."""
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_taps(size: int, factor: int):
    """Antialiased bicubic downscaling by an integer factor, as a strided conv.

    Output sample i sits at input coordinate (i + 0.5) * f; input pixel j gets
    weight k((j + 0.5 - (i + 0.5) * f) / f) for Keys' cubic k stretched by f
    (the antialiasing), and each output's weights are normalized over the
    pixels inside the image. That is `tf.image.resize`/`jax.image.resize`/
    `torch.nn.functional.interpolate` with bicubic and antialias (checked in
    the tests). For integer f the weights are the same for every output, so
    it is a stride-f convolution with zero padding, followed by dividing each
    output by the share of its weights that fell inside the image.

    Returns:
        `(taps, pad_before, pad_after, border)`: the normalized kernel
        (length K), the zero padding, and the per-output weight share
        (length size // f, 1.0 away from the borders).
    """
    offsets = np.arange(
        int(np.floor(-1.5 * factor - 0.5)) + 1, int(np.ceil(2.5 * factor - 0.5))
    )
    taps = _keys_cubic((offsets + 0.5 - 0.5 * factor) / factor)
    taps = taps / taps.sum()
    pad_before = int(-offsets[0])
    pad_after = int(offsets[-1] - factor + 1)
    out = size // factor
    positions = np.arange(out)[:, None] * factor + offsets[None, :]
    inside = (positions >= 0) & (positions < size)
    border = (taps[None, :] * inside).sum(axis=1)
    return taps, pad_before, pad_after, border


def _bicubic_branch(inputs, height, width, channels, factor):
    """The fixed antialiased bicubic resize, in stock Keras layers.

    A (K, 1) then a (1, K) stride-f per-channel conv with frozen bicubic taps
    and "same" padding (for these kernels exactly the zero padding
    `bicubic_taps` asks for, so no padded copy of the image is made), then a
    `Normalization` layer (mean 0, per-position variance) that divides border
    outputs by the share of their weights inside the image.
    (`keras.layers.Resizing` would be shorter, but as the first layer of a
    model it sets `training=True` for every later layer when the model is
    called without `training`, so the student's BatchNorm would use batch
    statistics in `model(x)`.)
    """
    taps_h, before_h, after_h, border_h = bicubic_taps(height, factor)
    taps_w, before_w, after_w, border_w = bicubic_taps(width, factor)
    x = inputs
    for taps, before, after in (
        (taps_h, before_h, after_h),
        (taps_w, before_w, after_w),
    ):
        # "same" pads K - f in total, the smaller half first.
        if (before, after) != (
            (len(taps) - factor) // 2,
            -(-(len(taps) - factor) // 2),
        ):
            raise AssertionError(f"bicubic padding {(before, after)} is not 'same'")
    # Each channel filtered on its own: a (K, 1, C, C) kernel, the taps on
    # the channel diagonal and exact zeros elsewhere. Not a DepthwiseConv2D:
    # TensorFlow's own depthwise kernel refuses unequal strides ("only
    # supports equal length strides"); only its oneDNN build (x86 with
    # TF_ENABLE_ONEDNN_OPTS on) accepted (f, 1), so TensorFlow on ARM or with
    # oneDNN off could not run the bicubic thumbnail. The price, for 3
    # channels: 3x the bicubic MACs, and LiteRT int8 17-24% slower
    # (docs/benchmarks.md, "Re-run after the bicubic change").
    eye = np.eye(channels)
    rows = taps_h[:, None, None, None] * eye[None, None]
    cols = taps_w[None, :, None, None] * eye[None, None]
    for direction, kernel, strides in (
        ("rows", rows, (factor, 1)),
        ("cols", cols, (1, factor)),
    ):
        x = keras.layers.Conv2D(
            channels,
            kernel.shape[:2],
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.Constant(kernel.tolist()),
            trainable=False,
            name=f"bicubic_{direction}",
        )(x)
    share = np.outer(border_h, border_w)
    return keras.layers.Normalization(
        axis=(1, 2),
        mean=np.zeros_like(share).tolist(),
        variance=np.square(share).tolist(),
        name="bicubic",
    )(x)


def clip_to_range(x, value_range, name):
    """Clips a tensor to `(low, high)` with stock layers (None: unchanged)."""
    if value_range is None:
        return x
    low, high = value_range
    # ReLU(max_value, threshold) cannot express a general [low, high] clip;
    # shift into [0, high - low], clip with ReLU, shift back.
    x = keras.layers.Rescaling(1.0, offset=-low, name=f"{name}_shift")(x)
    x = keras.layers.ReLU(max_value=high - low, name=f"{name}_relu")(x)
    return keras.layers.Rescaling(1.0, offset=low, name=f"{name}_unshift")(x)


def validate_value_range(value_range):
    """`value_range` as a float `(low, high)` with low < high, or None."""
    if value_range is None:
        return None
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`value_range` must be None or a pair (low, high), received {value_range!r}."
        ) from None
    if not low < high:
        raise ValueError(
            f"`value_range` must satisfy low < high, received {value_range!r}."
        )
    return (low, high)


def bicubic_downscaler(
    input_shape: Sequence[int],
    factor: int,
    value_range: Sequence[float] | None = None,
    name: str = "bicubic_downscaler",
) -> keras.Model:
    """The fixed baseline: an antialiased bicubic resize by `factor`.

    Same interface as `build_downscaler`; it has no weights.

    Args:
        input_shape: `(H, W, C)`, channels last; H and W divisible by `factor`.
        factor: integer >= 2.
        value_range: optional `(low, high)` to clip the thumbnail to.
        name: model name.

    Returns:
        A Functional `keras.Model` mapping `(B, H, W, C)` to `(B, H/f, W/f, C)`.
    """
    height, width, channels = validate_image_shape(input_shape, factor)
    value_range = validate_value_range(value_range)
    inputs = keras.Input((height, width, channels), name="image")
    x = _bicubic_branch(inputs, height, width, channels, factor)
    x = clip_to_range(x, value_range, name="clip")
    return keras.Model(inputs, x, name=name)


# E's designs: "space_to_depth" (default) and "strided" (the E before it).
VARIANTS = ("space_to_depth", "strided")


def validate_variant(variant: str) -> str:
    """`variant` if it names one of `VARIANTS`; else a `ValueError`."""
    if variant not in VARIANTS:
        raise ValueError(
            f"`variant` must be one of {VARIANTS}, received variant={variant!r}."
        )
    return variant


def space_to_depth(x, factor: int, name: str = "space_to_depth"):
    """(B, H, W, C) -> (B, H/f, W/f, f*f*C): each f x f block to channels.

    Pure data movement in stock layers (`Reshape`, `Permute`, `Reshape`, i.e.
    `tf.nn.space_to_depth`'s channel order (row, column, channel)); it exports
    to ONNX and LiteRT as Reshape/Transpose and costs no multiply-adds.
    """
    height, width, channels = (int(d) for d in x.shape[1:])
    x = keras.layers.Reshape(
        (height // factor, factor, width // factor, factor, channels),
        name=f"{name}_split",
    )(x)
    x = keras.layers.Permute((1, 3, 2, 4, 5), name=f"{name}_permute")(x)
    return keras.layers.Reshape(
        (height // factor, width // factor, factor * factor * channels),
        name=name,
    )(x)


def build_downscaler(
    input_shape: Sequence[int],
    factor: int,
    width: int = 16,
    depth: int = 2,
    kernel_size: int = 3,
    value_range: Sequence[float] | None = None,
    variant: str = "space_to_depth",
    name: str = "downscaler",
) -> keras.Model:
    """Builds the learned downscaler E: bicubic thumbnail + learned residual.

    Two designs of the learned branch (the bicubic branch is the same):

    * `"space_to_depth"` (default): every f x f block of the image is moved
      to channels (`space_to_depth`, no arithmetic), concatenated with the
      bicubic thumbnail and mixed by a 1x1 conv to `width` channels; then
      `depth` depthwise-separable convs (`SeparableConv2D`, kernel
      `kernel_size`) and the zero-initialized output conv, all at thumbnail
      resolution. No convolution runs at full resolution; per thumbnail pixel
      the learned branch costs `(f*f*C + C) * width` + `depth * (k*k*width +
      width*width)` + `k*k*width*C` multiply-adds.
    * `"strided"`: the earlier E: one strided conv per prime factor of f (the
      first reads the image at full resolution), then `depth` full
      `kernel_size` convs at thumbnail resolution that also see the bicubic
      thumbnail. Kept for comparison and for runs that ask for it; models
      saved with it load unchanged either way (both are stock layers).

    Args:
        input_shape: `(H, W, C)`, channels last; H and W divisible by `factor`.
        factor: integer >= 2, the downscaling factor per side (FLOPs of the
            inference network drop by about `factor**2`).
        width: channels of the residual branch's hidden convs. Defaults to 16.
        depth: number of conv layers at thumbnail resolution before the
            output conv. Defaults to 2.
        kernel_size: kernel size of the non-strided convs. Defaults to 3.
        value_range: optional `(low, high)`; when given the thumbnail is
            clipped to it (use the range of the input images).
        variant: `"space_to_depth"` (default) or `"strided"`, see above.
        name: model name. Defaults to `"downscaler"`.

    Returns:
        A Functional `keras.Model` mapping `(B, H, W, C)` to
        `(B, H/f, W/f, C)`, built from stock Keras layers only.

    Example:

    >>> e = build_downscaler((224, 224, 3), factor=2)
    >>> e.output_shape
    (None, 112, 112, 3)
    """
    height, img_width, channels = validate_image_shape(input_shape, factor)
    for arg, value, minimum in (("width", width, 1), ("depth", depth, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"`{arg}` must be an integer >= {minimum}, received {arg}={value!r}."
            )
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"`kernel_size` must be an odd positive integer, received {kernel_size!r}."
        )
    value_range = validate_value_range(value_range)
    validate_variant(variant)

    inputs = keras.Input((height, img_width, channels), name="image")
    base = _bicubic_branch(inputs, height, img_width, channels, factor)
    if variant == "space_to_depth":
        x = space_to_depth(inputs, factor)
        # The bicubic thumbnail is mixed in so the residual is computed with
        # the thing it corrects in view.
        x = keras.layers.Concatenate(name="with_bicubic")([x, base])
        x = keras.layers.Conv2D(width, 1, activation="relu", name="mix_conv")(x)
        for i in range(depth):
            x = keras.layers.SeparableConv2D(
                width,
                kernel_size,
                padding="same",
                activation="relu",
                name=f"body{i}_sepconv",
            )(x)
    else:
        x = inputs
        for i, stride in enumerate(_prime_factors(factor)):
            # Kernel 2*stride - 1 (3 for stride 2, 5 for stride 3) overlaps
            # neighbouring windows, like the antialiasing filter it corrects.
            x = keras.layers.Conv2D(
                width,
                2 * stride - 1,
                strides=stride,
                padding="same",
                activation="relu",
                name=f"down{i}_conv",
            )(x)
        x = keras.layers.Concatenate(name="with_bicubic")([x, base])
        for i in range(depth):
            x = keras.layers.Conv2D(
                width,
                kernel_size,
                padding="same",
                activation="relu",
                name=f"body{i}_conv",
            )(x)
    residual = keras.layers.Conv2D(
        channels,
        kernel_size,
        padding="same",
        kernel_initializer="zeros",
        bias_initializer="zeros",
        name="residual_conv",
    )(x)
    x = keras.layers.Add(name="thumbnail")([base, residual])
    x = clip_to_range(x, value_range, name="clip")
    return keras.Model(inputs, x, name=name)


def built_width(downscaler: keras.Model) -> int | None:
    """The `width` an E was built with by `build_downscaler` (the filters of
    its first convolution, named there), or None for another model."""
    for name in ("mix_conv", "down0_conv"):
        try:
            return int(downscaler.get_layer(name).filters)
        except (ValueError, AttributeError):
            continue
    return None


# Widths `auto_downscaler_width` chooses from, widest first.
AUTO_WIDTHS = (32, 24, 16, 12, 8, 6, 4)


def auto_downscaler_width(
    input_shape: Sequence[int],
    factor: int,
    student: keras.Model,
    depth: int = 2,
    max_share: float = 0.15,
    variant: str = "space_to_depth",
    step_macs: int | None = None,
) -> int:
    """The widest E (from `AUTO_WIDTHS`) that stays a small part of E + S.

    E's cost grows with the image and its width, S's with the thumbnail and
    the backbone: a width that is a few % of ResNet-50 at 112x112 can cost
    more than a tiny student. This picks the largest width whose E costs at most
    `max_share` of the inference model's multiply-adds, `MACs(E) /
    (MACs(E) + MACs(S))`, and the narrowest (4) when none does.

    A second budget, `step_macs`, is what one more thumbnail pixel would cost
    instead: `MACs(bicubic + S at H/f + 1) - MACs(S at H/f)`
    (`pipeline.equal_cost.thumbnail_step_macs`). An E dearer than that costs
    more than the plain alternative, a slightly larger bicubic thumbnail, and
    since a strided CNN's cost jumps with the side (Fashion-MNIST's tiny_cnn:
    S costs 3.32 M MACs at 14x14, 3.61 M at 15x15, 6.08 M at 17x17) the
    equal-cost comparison then jumps to a much dearer thumbnail. When some
    width fits both budgets the widest such width is chosen; when none fits
    the step (it can be a few thousand MACs, when the next side gives S the
    same feature-map sizes), the step is ignored and `max_share` alone decides.

    Args:
        input_shape: `(H, W, C)` of the full-size image.
        factor: the downscaling factor.
        student: S at thumbnail size (e.g. `make_student(teacher, factor)`).
        depth: E's depth, as in `build_downscaler`.
        max_share: the largest acceptable share, in (0, 1). Defaults to 0.15.
        variant: E's design, as in `build_downscaler`.
        step_macs: MACs E may cost so that E + S stays no dearer than
            bicubic + S one pixel larger, or None (no such budget).

    Returns:
        An int to pass as `build_downscaler(..., width=...)`.
    """
    from thumbnet_keras.evaluation.flops import count_flops

    if not 0 < max_share < 1:
        raise ValueError(f"`max_share` must be in (0, 1), received {max_share!r}.")
    validate_variant(variant)
    if step_macs is not None and (
        isinstance(step_macs, bool) or not isinstance(step_macs, int)
    ):
        raise ValueError(f"`step_macs` must be an int or None, received {step_macs!r}.")
    student_macs = count_flops(student)
    within_share = []  # (width, MACs of E), widest first
    for width in AUTO_WIDTHS:
        e_macs = count_flops(
            build_downscaler(input_shape, factor, width, depth, variant=variant)
        )
        if e_macs <= max_share * (e_macs + student_macs):
            within_share.append((width, e_macs))
    if not within_share:
        return AUTO_WIDTHS[-1]
    if step_macs is not None:
        for width, e_macs in within_share:
            if e_macs <= step_macs:
                return width
    return within_share[0][0]
