"""Input-pipeline throughput on ELPV at 224x224 vs. a ResNet-18 train step.

Measures, on this machine and the current Keras backend:

* `pipeline_images_per_s`: the training pipeline of `thumbnet_keras.data`
  (read PNG, decode, random crop, resize to 224x224, flip, brightness,
  contrast, gray->3 channels, normalize, batch, prefetch), uncached, iterated
  alone; also with `cache=True` from the second epoch on.
* `resnet18_train_images_per_s`: what a ResNet-18 (`models.backbones.build
  ("resnet18")`, 4 classes) consumes in `train_on_batch` at the same batch
  size on synthetic tensors already in memory.

The target is pipeline >= 1.5x consumption. Both are measured separately (in
real training they share the CPU cores), so the ratio is an upper bound there.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/input_pipeline.py \
        --out docs/results/input_pipeline.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# Run from a checkout without `pip install -e .`: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402


def _pipeline_rate(prepared, size: int, batch: int, batches: int, cache: bool) -> float:
    from thumbnet_keras import data

    ds = data.make_dataset(
        prepared, "train", size, batch, training=True, channels=3, cache=cache
    ).repeat()
    it = iter(ds)
    # Uncached: a few batches to start the threads. Cached: one full epoch so
    # the cache is filled before timing.
    warmup = prepared.splits["train"] // batch + 1 if cache else 3
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - start)


def _resnet18_rate(size: int, batch: int, steps: int) -> float:
    import keras
    import numpy as np

    try:
        from thumbnet_keras.models import backbones

        model = backbones.build("resnet18", (size, size, 3), num_classes=4)
    except ImportError:  # pragma: no cover - backbones not available
        raise SystemExit("thumbnet_keras.models.backbones is required") from None
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False if keras.backend.backend() == "torch" else "auto",
    )
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 4, size=(batch,)).astype(np.int32)
    for _ in range(2):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print JSON, optionally write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", default=os.path.expanduser("~/.cache/thumbnet/elpv")
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pipeline-batches", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from thumbnet_keras import data

    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    prepared = data.prepare("elpv", args.work_dir)
    prepare_s = time.perf_counter() - t0
    pipe = _pipeline_rate(
        prepared, args.image_size, args.batch_size, args.pipeline_batches, cache=False
    )
    pipe_cached = _pipeline_rate(
        prepared, args.image_size, args.batch_size, args.pipeline_batches, cache=True
    )
    train = _resnet18_rate(args.image_size, args.batch_size, args.train_steps)
    result = {
        "dataset": "elpv (CC BY-NC-SA 4.0)",
        "train_examples": prepared.splits["train"],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "keras_backend": keras.backend.backend(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "machine": platform.platform(),
        "prepare_s": round(prepare_s, 2),
        "prepare_reused": prepared.reused,
        "pipeline_images_per_s": round(pipe, 1),
        "pipeline_cached_images_per_s": round(pipe_cached, 1),
        "resnet18_train_images_per_s": round(train, 1),
        "ratio": round(pipe / train, 2),
        "target_ratio": 1.5,
        "meets_target": pipe / train >= 1.5,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
