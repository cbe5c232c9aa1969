"""`reestimate_batchnorm`: BatchNorm statistics recomputed on new inputs.

A student derived from a teacher inherits the teacher's BatchNorm moving
statistics, measured on full-size images. On thumbnails the activations have
other statistics, so S evaluated in inference mode is off before it has
trained at all. Re-estimating the statistics on thumbnails (forward passes
only, no gradient step) fixes that: it is the cheap baseline practitioners try
first, and the starting point of every stage that initializes S from T.

The moving mean and variance become exact averages over the given examples,
not momentum averages: for the k-th batch (n_k examples after n seen) the
layer's momentum is set to n / (n + n_k), so after the last batch
`moving_mean` is the mean of the layer's inputs over all examples and
`moving_variance` the example-weighted mean of the per-batch variances (the
"precise BN" estimate of Wu & Johnson 2021, fvcore's `update_bn_stats`).
"""

from __future__ import annotations

from collections.abc import Iterable

import keras

__all__ = ["batchnorm_layers", "reestimate_batchnorm"]


def batchnorm_layers(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of `model`, nested models included."""
    # `_flatten_layers` (Keras 3) walks nested models and layers that own
    # layers; each layer object is listed once even when shared.
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def reestimate_batchnorm(
    model: keras.Model, batches: Iterable, num_batches: int | None = 100
) -> dict:
    """Recomputes the moving statistics of every BatchNorm layer of `model`.

    Runs `model(images, training=True)` on each batch, eagerly, with every
    BatchNorm layer temporarily trainable (Keras runs a non-trainable
    BatchNorm in inference mode) and its momentum set so that the moving
    statistics become cumulative averages (see the module docstring). Nothing
    else changes: no weight is trained, and each layer's `momentum` and
    `trainable` are restored afterwards, even on error.

    Args:
        model: the model whose BatchNorm layers to update; BatchNorm layers
            of nested models (e.g. S inside `image -> bicubic -> S`) are
            included, so pass the model that maps the batches' images to the
            inputs S should be calibrated on.
        batches: an iterable of images or of `(images, labels)` (numpy or
            backend tensors), or a `tf.data.Dataset`.
        num_batches: use at most this many batches; None: all of them.

    Returns:
        `{"layers": BatchNorm layers updated, "batches": used, "examples": used}`.

    Raises:
        ValueError: when `batches` yields nothing (statistics unchanged).

    Example:

    >>> calibrate = compose(bicubic_downscaler((64, 64, 3), 2), student, "s")
    >>> reestimate_batchnorm(calibrate, train.as_numpy_iterator(), 50)
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"`num_batches` must be >= 1 or None, received {num_batches}.")
    layers = batchnorm_layers(model)
    if not layers:
        return {"layers": 0, "batches": 0, "examples": 0}
    if hasattr(batches, "as_numpy_iterator"):
        batches = batches.as_numpy_iterator()
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    seen = used = 0
    try:
        for layer in layers:
            layer.trainable = True
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            size = int(images.shape[0])
            if size == 0:
                continue
            for layer in layers:
                # new = old * m + batch * (1 - m): a running mean over examples.
                layer.momentum = seen / (seen + size)
            model(images, training=True)
            seen += size
            used += 1
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum = momentum
            layer.trainable = trainable
    if used == 0:
        raise ValueError("`batches` is empty: no BatchNorm statistics re-estimated.")
    return {"layers": len(layers), "batches": used, "examples": seen}
