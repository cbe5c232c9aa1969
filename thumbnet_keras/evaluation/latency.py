"""Measured inference throughput (images per second) of Keras models."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import numpy as np

__all__ = ["measure_throughput", "measure_throughputs"]


def measure_throughputs(
    models: Mapping[str, object],
    batch_size: int = 32,
    batches: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict]:
    """Times `predict_on_batch` of several models side by side.

    Each model gets `warmup` untimed calls (tracing, compilation), then
    `batches` rounds call every model once in turn, so background load falls
    on all of them alike; a model's score is its **median** call. Random
    images of each model's input shape; whatever device and Keras backend
    this process runs on. For comparing models measured together on one
    machine, not a benchmark (`benchmarks/inference_speed.py` is one).

    Args:
        models: name -> a model with one image input of static shape (any
            object with `inputs[0].shape` and `predict_on_batch`).
        batch_size: images per call. Defaults to 32.
        batches: timed calls per model. Defaults to 10.
        warmup: untimed calls per model first. Defaults to 2.
        seed: seed of the random input.

    Returns:
        `{name: {"images_per_second", "ms_per_batch" (the median call),
        "batch_size", "batches"}}`.
    """
    if batch_size < 1 or batches < 1 or warmup < 0:
        raise ValueError(
            f"batch_size and batches must be >= 1 and warmup >= 0, received "
            f"batch_size={batch_size}, batches={batches}, warmup={warmup}."
        )
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, model in models.items():
        shape = tuple(model.inputs[0].shape[1:])
        if any(d is None for d in shape):
            raise ValueError(f"Model {name!r} has a dynamic input shape {shape}.")
        inputs[name] = rng.random((batch_size, *shape), dtype=np.float32)
    for name, model in models.items():
        for _ in range(warmup):
            np.asarray(model.predict_on_batch(inputs[name]))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(batches):
        for name, model in models.items():
            start = time.perf_counter()
            np.asarray(model.predict_on_batch(inputs[name]))
            seconds[name].append(time.perf_counter() - start)
    out = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        out[name] = {
            "images_per_second": batch_size / median,
            "ms_per_batch": 1000.0 * median,
            "batch_size": batch_size,
            "batches": batches,
        }
    return out


def measure_throughput(
    model, batch_size: int = 32, batches: int = 10, warmup: int = 2, seed: int = 0
) -> dict:
    """`measure_throughputs` of one model: `{"images_per_second",
    "ms_per_batch" (the median call), "batch_size", "batches"}`."""
    name = getattr(model, "name", "model")  # named in a shape error
    return measure_throughputs(
        {name: model}, batch_size=batch_size, batches=batches, warmup=warmup,
        seed=seed,
    )[name]  # fmt: skip
