"""Where E's inference time goes: E's parts alone, LiteRT float32 vs int8.

`benchmarks/inference_speed.py --breakdown` found E at 2% of the f=2 model's
MACs but over half of its LiteRT int8 time. This times E's pieces as separate
models (ImageNet size: 224x224x3, f=2, the default width 16) so the cost can
be placed:

* `e`: the whole default E (`build_downscaler(..., value_range=(0, 1))`);
  `e_depth1`, `e_depth0`: the same with one or no separable conv in its body;
* `bicubic`: the fixed bicubic branch (two separable strided depthwise convs
  over the full image, then the border normalization);
* `bicubic_2d`: the same filter as one 2-D depthwise conv (not what E uses;
  shows why the branch is separable);
* `space_to_depth`: the rearrangement alone (reshape / transpose);
* `mix`: space-to-depth + bicubic + concatenation + the 1x1 conv: every
  full-resolution read of the learned branch;
* `patchify_mix`: the same function as `mix` written as an f x f stride-f
  conv on the image plus a 1x1 conv on the bicubic thumbnail (no transpose);
* `body`: the thumbnail-resolution layers after the mix (two separable
  3x3 convs at width 16 and the 3x3 output conv), on a (112, 112, 16) input;
* `avgpool`: a 2x2 average pool, the cheapest possible full-resolution pass.

Each part is saved as `.keras` and converted with the product's exporter
(`thumbnet_keras.deploy.export_model`; int8: full-integer, uint8 input,
calibrated on 8 uniform random images), then every (part, format) is called
round-robin `--reps` times at `--batch` (LiteRT `Interpreter`, 2 threads,
input already in the model's dtype); the score is the median call time.

    KERAS_BACKEND=tensorflow python benchmarks/downscaler_parts.py \
        --out docs/results/downscaler_parts.json

Prints one JSON object (milliseconds per batch) on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thumbnet_keras.layers import downscaler as D  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402
from inference_speed import _litert_caller  # noqa: E402

FORMATS = {"litert": ".tflite", "litert_int8": "_int8.tflite"}


def parts(size: int, factor: int, width: int, channels: int = 3) -> dict:
    """name -> Functional model of one piece of E."""
    shape = (size, size, channels)

    def e_of_depth(depth):
        e = D.build_downscaler(shape, factor, width, depth, value_range=(0.0, 1.0))
        return lambda x: e(x)

    def bicubic(x):
        return D._bicubic_branch(x, size, size, channels, factor)

    def bicubic_2d(x):
        taps, *_ = D.bicubic_taps(size, factor)
        kernel = np.outer(taps, taps)
        return keras.layers.DepthwiseConv2D(
            kernel.shape, strides=factor, padding="same", use_bias=False
        )(x)

    def mix(x):
        joined = keras.layers.Concatenate()([D.space_to_depth(x, factor), bicubic(x)])
        return keras.layers.Conv2D(width, 1, activation="relu")(joined)

    def patchify_mix(x):
        patches = keras.layers.Conv2D(width, factor, strides=factor)(x)
        thumb = keras.layers.Conv2D(width, 1)(bicubic(x))
        return keras.layers.ReLU()(keras.layers.Add()([patches, thumb]))

    builders = {
        "e": e_of_depth(2),
        "e_depth1": e_of_depth(1),
        "e_depth0": e_of_depth(0),
        "bicubic": bicubic,
        "bicubic_2d": bicubic_2d,
        "space_to_depth": lambda x: D.space_to_depth(x, factor),
        "mix": mix,
        "patchify_mix": patchify_mix,
        "avgpool": lambda x: keras.layers.AveragePooling2D(factor)(x),
    }
    models = {}
    for name, build in builders.items():
        image = keras.Input(shape, name="image")
        models[name] = keras.Model(image, build(image), name=name)
    thumb = keras.Input((size // factor, size // factor, width), name="features")
    x = thumb
    for _ in range(2):
        x = keras.layers.SeparableConv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(channels, 3, padding="same")(x)
    models["body"] = keras.Model(thumb, x, name="body")
    return models


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--work-dir", default="/tmp/thumbnet-downscaler-parts")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    from thumbnet_keras.deploy import export_model

    work = os.path.join(args.work_dir, f"{args.size}-f{args.factor}-w{args.width}")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(0)
    callers = {}
    for name, model in parts(args.size, args.factor, args.width).items():
        keras_path = os.path.join(work, f"{name}.keras")
        if not os.path.isfile(keras_path):
            model.save(keras_path)
        for fmt, ext in FORMATS.items():
            path = os.path.join(work, name + ext)
            if not os.path.isfile(path):
                shape = tuple(model.inputs[0].shape[1:])
                calib = np.random.default_rng(1).random((8, *shape), dtype=np.float32)
                export_model(keras_path, fmt, path, calib if "int8" in fmt else None)
            x = rng.random((args.batch, *model.inputs[0].shape[1:]), dtype=np.float32)
            callers[(name, fmt)] = _litert_caller(path, args.batch, x)
    for call in callers.values():
        call()
        call()
    load_before = os.getloadavg()
    times = {key: [] for key in callers}
    for _ in range(args.reps):
        for key, call in callers.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    report = {
        "benchmark": "downscaler_parts",
        "image_size": args.size,
        "factor": args.factor,
        "width": args.width,
        "batch": args.batch,
        "reps": args.reps,
        "unit": "median ms per batch",
        "ms": {
            name: {
                fmt: round(1000 * statistics.median(times[(name, fmt)]), 2)
                for fmt in FORMATS
            }
            for name in dict.fromkeys(name for name, _ in callers)
        },
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }
    return emit(report, args.out, indent=1)


if __name__ == "__main__":
    main()
