"""Measured inference throughput (images per second) of a Keras model."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["measure_throughput"]


def measure_throughput(
    model, batch_size: int = 32, batches: int = 10, warmup: int = 2, seed: int = 0
) -> dict:
    """Times `model.predict_on_batch` on random images of the model's input shape.

    Measured on whatever device and Keras backend this process runs on, with
    the backend's compiled predict function; the first `warmup` batches
    (tracing, compilation) are not timed. A number for comparing models
    measured the same way, on the same machine, not a benchmark.

    Args:
        model: a Keras model with one image input of static shape.
        batch_size: images per call. Defaults to 32.
        batches: timed calls. Defaults to 10.
        warmup: untimed calls first. Defaults to 2.
        seed: seed of the random input.

    Returns:
        `{"images_per_second", "ms_per_batch", "batch_size", "batches"}`.
    """
    if batch_size < 1 or batches < 1 or warmup < 0:
        raise ValueError(
            f"batch_size and batches must be >= 1 and warmup >= 0, received "
            f"batch_size={batch_size}, batches={batches}, warmup={warmup}."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"Model {model.name!r} has a dynamic input shape {shape}.")
    x = np.random.default_rng(seed).random((batch_size, *shape), dtype=np.float32)
    for _ in range(warmup):
        np.asarray(model.predict_on_batch(x))
    start = time.perf_counter()
    for _ in range(batches):
        np.asarray(model.predict_on_batch(x))
    seconds = time.perf_counter() - start
    return {
        "images_per_second": batch_size * batches / seconds,
        "ms_per_batch": 1000.0 * seconds / batches,
        "batch_size": batch_size,
        "batches": batches,
    }
