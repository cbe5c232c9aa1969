"""Copying weights between Keras models so that every layer's state follows."""

from __future__ import annotations

from collections.abc import Iterator


def all_layers(model) -> Iterator:
    """Every layer inside `model`, those of nested models included, depth first."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from all_layers(layer)


def set_weights(model, weights: list) -> None:
    """`model.set_weights(weights)`, then every `Normalization` layer's
    `finalize_state()`.

    A `Normalization` layer fitted with `adapt()` keeps its mean and variance
    as variables, but computes with tensors that `finalize_state` makes from
    them; Keras calls it after `adapt()` and after loading a saved model, not
    after `set_weights`. Without this, a copy normalizes with the layer's
    initial statistics (mean 0, variance 1), and differs from the same copy
    saved and loaded again.
    """
    import keras

    model.set_weights(weights)
    for layer in all_layers(model):
        # Normalization only: other layers' finalize_state recompute from
        # state that set_weights does not restore (an adapted Discretization
        # rebuilt from its config lost its bin boundaries).
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.finalize_state()


def copy_weights(source, target) -> None:
    """`target` takes `source`'s weights (`set_weights`)."""
    set_weights(target, source.get_weights())
