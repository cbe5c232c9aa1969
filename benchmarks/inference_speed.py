"""Inference speed: ResNet-50 teacher vs the exported ThumbNet model (f=2, f=4).

The ThumbNet inference model is `keras.Model(inp, student(downscaler(inp)))`
with `downscaler = build_downscaler((S, S, 3), f)` and `student = ResNet-50 at
(S/f, S/f, 3)`, the graph `ThumbNetTrainer.export()` produces. Weights are
random: they do not change the speed.

Method: each model is timed with `model.predict_on_batch(x)` (Keras' compiled
predict function: a `tf.function` on TensorFlow, `jax.jit` on JAX, eager under
`torch.no_grad` on torch; on a CPU-only TF machine Keras turns XLA off). After
`--warmup` untimed calls per model and batch size, the models are timed in
round-robin (teacher, f=2, f=4, teacher, ...) so that load from other processes
hits them alike; the score is the median of `--reps` calls, as images/s.

Targets (from the ThumbNet claim that speed follows FLOPs): the measured
speedup over the teacher at batch 32 must reach 85% of the FLOPs ratio at f=2
and 75% at f=4.

Usage:

    KERAS_BACKEND=tensorflow python benchmarks/inference_speed.py          # full
    KERAS_BACKEND=jax python benchmarks/inference_speed.py --small         # <1 min

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thumbnet_keras.evaluation.flops import count_flops, count_params  # noqa: E402
from thumbnet_keras.layers.downscaler import build_downscaler  # noqa: E402
from thumbnet_keras.models import backbones  # noqa: E402

TARGETS = {2: 0.85, 4: 0.75}  # fraction of the FLOPs ratio to reach at batch 32


def thumbnet_model(size: int, factor: int, num_classes: int) -> keras.Model:
    """The exported ThumbNet inference graph: Input -> downscaler -> student.

    Args:
        size: full image side S.
        factor: downscaling factor f (S must be divisible by f).
        num_classes: classes of the student.

    Returns:
        A Functional model mapping `(B, S, S, 3)` images to `(B, num_classes)`.
    """
    downscaler = build_downscaler((size, size, 3), factor)
    student = backbones.build(
        "resnet50", (size // factor, size // factor, 3), num_classes
    )
    inputs = keras.Input((size, size, 3), name="image")
    return keras.Model(inputs, student(downscaler(inputs)), name=f"thumbnet_f{factor}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_models(models, batch_sizes, size, reps, warmup) -> dict:
    """Median seconds per `predict_on_batch` call, per model and batch size.

    Args:
        models: dict name -> model.
        batch_sizes: batch sizes to time.
        size: image side.
        reps: timed calls per model and batch size.
        warmup: untimed calls first.

    Returns:
        `{name: {batch: {"median_s", "images_per_s", "times_s"}}}`.
    """
    rng = np.random.default_rng(0)
    results = {name: {} for name in models}
    for batch in batch_sizes:
        x = rng.normal(size=(batch, size, size, 3)).astype("float32")
        for model in models.values():
            for _ in range(warmup):
                model.predict_on_batch(x)
        times = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                out = model.predict_on_batch(x)
                np.asarray(out)  # make sure the result is materialized
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            median = statistics.median(ts)
            results[name][batch] = {
                "median_s": median,
                "images_per_s": batch / median,
                "times_s": [round(t, 5) for t in ts],
            }
        print(
            f"batch {batch}: "
            + ", ".join(
                f"{n} {r[batch]['images_per_s']:.1f} img/s" for n, r in results.items()
            ),
            file=sys.stderr,
        )
    return results


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints one JSON object.

    Args:
        argv: command-line arguments (see `--help`).

    Returns:
        The report dict that was printed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="quick run: 128x128, batches 1 and 8"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="image side (224; 128 with --small)"
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--reps", type=int, default=None, help="timed calls (full: 15; small: 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls (full: 3; small: 1)"
    )
    args = parser.parse_args(argv)

    # 128 is the smallest side where ResNet-50 still accepts the f=4 thumbnail (32).
    size = args.size or (128 if args.small else 224)
    batch_sizes = (1, 8) if args.small else (1, 32)
    reps = args.reps or (3 if args.small else 15)
    warmup = args.warmup or (1 if args.small else 3)
    big_batch = batch_sizes[-1]

    models = {"teacher": backbones.build("resnet50", (size, size, 3), args.num_classes)}
    for f in TARGETS:
        models[f"thumbnet_f{f}"] = thumbnet_model(size, f, args.num_classes)
    load_before = os.getloadavg()
    timings = time_models(models, batch_sizes, size, reps, warmup)
    load_after = os.getloadavg()

    teacher_flops = count_flops(models["teacher"])
    report_models = {}
    for name, model in models.items():
        flops = count_flops(model)
        entry = {
            "input_shape": [size, size, 3],
            "flops_macs": flops,
            "params": count_params(model),
            "images_per_s": {
                str(b): round(timings[name][b]["images_per_s"], 2) for b in batch_sizes
            },
            "median_s": {
                str(b): round(timings[name][b]["median_s"], 5) for b in batch_sizes
            },
            "times_s": {str(b): timings[name][b]["times_s"] for b in batch_sizes},
        }
        if name != "teacher":
            factor = int(name.rsplit("f", 1)[1])
            ratio = teacher_flops / flops
            speedup = {
                str(b): round(
                    timings[name][b]["images_per_s"]
                    / timings["teacher"][b]["images_per_s"],
                    3,
                )
                for b in batch_sizes
            }
            achieved = speedup[str(big_batch)] / ratio
            entry.update(
                factor=factor,
                student_input_shape=[size // factor, size // factor, 3],
                flops_ratio_vs_teacher=round(ratio, 3),
                speedup_vs_teacher=speedup,
                speedup_over_flops_ratio_at_batch=round(achieved, 3),
                target_fraction=TARGETS[factor],
                target_met=bool(achieved >= TARGETS[factor]),
            )
        report_models[name] = entry

    report = {
        "benchmark": "inference_speed",
        "mode": "small" if args.small else "full",
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "jit_compile": getattr(models["teacher"], "jit_compile", None),
        "timing": "median of predict_on_batch calls after warm-up, models interleaved",
        "batch_sizes": list(batch_sizes),
        "target_batch": big_batch,
        "reps": reps,
        "warmup": warmup,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "models": report_models,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
