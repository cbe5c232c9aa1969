"""Inference speed: ResNet-50 teacher vs the exported ThumbNet model (f=2, f=4),
in Keras (this process's backend), ONNX Runtime and LiteRT (float32, int8).

The ThumbNet inference model is `keras.Model(inp, student(downscaler(inp)))`
with `downscaler = build_downscaler((S, S, 3), f, variant=...)` and `student =
ResNet-50 at (S/f, S/f, 3)`, the graph `ThumbNetTrainer.export()` produces.
Weights are random (seed 0): they do not change the speed. Every model is
saved as `.keras` under `--work-dir` and converted with
`thumbnet_keras.deploy.export_model` (the product's own exporter: ONNX via
tf2onnx, LiteRT float32, LiteRT full-integer int8 calibrated on
`--calibration` uniform random images); converted files are reused when
present.

Method: per runtime and batch size, `--warmup` untimed calls per model, then
`--reps` rounds in which every model is called once, round-robin (teacher,
f=2, f=4, ...), so that load from other processes hits them alike; the score
is the median call time, as images/s. Keras: `model.predict_on_batch(x)`
(a `tf.function` without XLA on a CPU). ONNX Runtime: `InferenceSession.run`
(CPU provider, default threads). LiteRT: `Interpreter.invoke` with
`num_threads = os.cpu_count()`, the input already in the model's dtype
(uint8 for int8; quantizing a float batch is not timed).
`--breakdown` adds E alone for every factor, for E's share of the time next
to its share of the multiply-adds.

Targets (issue 11): the measured speedup over the teacher at the largest
batch reaches 90% of the MACs ratio at f=2 and 80% at f=4, per runtime.

Usage:

    KERAS_BACKEND=tensorflow python benchmarks/inference_speed.py --breakdown \
        --reps 7 --out docs/results/inference_speed.json   # full (~5 min quiet, ~45 loaded)
    KERAS_BACKEND=tensorflow python benchmarks/inference_speed.py --small \
        --runtimes keras onnx                            # ~2 min smoke

Prints one JSON object on stdout (and writes it to `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402

from thumbnet_keras.evaluation.flops import count_flops, count_params  # noqa: E402
from thumbnet_keras.layers.downscaler import build_downscaler  # noqa: E402
from thumbnet_keras.models import backbones  # noqa: E402
from thumbnet_keras.pipeline.environment import cpu_model  # noqa: E402

TARGETS = {2: 0.90, 4: 0.80}  # fraction of the MACs ratio, at the largest batch
RUNTIMES = ("keras", "onnx", "litert", "litert_int8")
EXTENSIONS = {"onnx": ".onnx", "litert": ".tflite", "litert_int8": "_int8.tflite"}


def build_models(size, factors, num_classes, variants, breakdown) -> dict:
    """name -> Functional model: the teacher, and per variant and factor the
    ThumbNet inference graph (plus E alone with `breakdown`)."""
    keras.utils.set_random_seed(0)
    models = {"teacher": backbones.build("resnet50", (size, size, 3), num_classes)}
    for factor in factors:
        student = backbones.build(
            "resnet50", (size // factor, size // factor, 3), num_classes
        )
        for variant in variants:
            e = build_downscaler((size, size, 3), factor, variant=variant)
            suffix = "" if variant == variants[0] else f"_{variant}"
            inputs = keras.Input((size, size, 3), name="image")
            models[f"thumbnet_f{factor}{suffix}"] = keras.Model(
                inputs, student(e(inputs)), name=f"thumbnet_f{factor}{suffix}"
            )
            if breakdown:
                models[f"e_f{factor}{suffix}"] = e
    return models


def _litert_caller(path: str, batch: int, x: np.ndarray):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path, num_threads=os.cpu_count())
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], (batch, *inp["shape"][1:]))
    interpreter.allocate_tensors()
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.round(x / scale) + zero, info.min, info.max)
    x = np.ascontiguousarray(x.astype(inp["dtype"]))

    def call():
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    return call


def _callers(runtime: str, files: dict, models: dict, batch: int, x: np.ndarray):
    """name -> zero-argument function running one batch on `runtime`."""
    callers = {}
    for name, model in models.items():
        if runtime == "keras":
            xi = _fit(x, model.inputs[0].shape)
            callers[name] = lambda m=model, xi=xi: np.asarray(m.predict_on_batch(xi))
        elif runtime == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(
                files[name], providers=["CPUExecutionProvider"]
            )
            inp = session.get_inputs()[0]
            xi = _fit(x, model.inputs[0].shape)
            callers[name] = lambda s=session, n=inp.name, xi=xi: s.run(None, {n: xi})
        else:
            callers[name] = _litert_caller(
                files[name], batch, _fit(x, model.inputs[0].shape)
            )
    return callers


def _fit(x: np.ndarray, shape) -> np.ndarray:
    """`x` cropped to a model's input size (S alone takes the thumbnail)."""
    return np.ascontiguousarray(x[:, : shape[1], : shape[2], : shape[3]])


def time_runtime(runtime, files, models, batch_sizes, size, reps, warmup) -> dict:
    """`{name: {batch: {"median_s", "images_per_s", "times_s"}}}` on `runtime`."""
    rng = np.random.default_rng(0)
    results = {name: {} for name in models}
    for batch in batch_sizes:
        x = rng.random((batch, size, size, 3), dtype=np.float32)
        callers = _callers(runtime, files, models, batch, x)
        for call in callers.values():
            for _ in range(warmup):
                call()
        times = {name: [] for name in models}
        for _ in range(reps):
            for name, call in callers.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            median = statistics.median(ts)
            results[name][batch] = {
                "median_s": median,
                "images_per_s": batch / median,
                "times_s": [round(t, 5) for t in ts],
            }
        print(
            f"{runtime} batch {batch}: "
            + ", ".join(
                f"{n} {r[batch]['images_per_s']:.1f} img/s" for n, r in results.items()
            ),
            file=sys.stderr,
            flush=True,
        )
    return results


def convert_all(models: dict, runtimes, work_dir: str, calibration: int) -> dict:
    """`{runtime: {name: path}}`: each model saved and exported (reused if present)."""
    from thumbnet_keras.deploy import export_model

    os.makedirs(work_dir, exist_ok=True)
    files = {runtime: {} for runtime in runtimes}
    for name, model in models.items():
        keras_path = os.path.join(work_dir, f"{name}.keras")
        if not os.path.isfile(keras_path):
            model.save(keras_path)
        for runtime in runtimes:
            if runtime == "keras":
                continue
            path = os.path.join(work_dir, name + EXTENSIONS[runtime])
            if not os.path.exists(path):
                start = time.perf_counter()
                shape = model.inputs[0].shape[1:]
                calib = np.random.default_rng(1).random((calibration, *shape))
                export_model(keras_path, runtime, path, calib.astype(np.float32))
                print(
                    f"exported {path} in {time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            files[runtime][name] = path
    return files


def _speedups(timings, macs, name, factor, batch_sizes) -> dict:
    big = batch_sizes[-1]
    ratio = macs["teacher"] / macs[name]
    speedup = {
        str(b): round(
            timings[name][b]["images_per_s"] / timings["teacher"][b]["images_per_s"], 3
        )
        for b in batch_sizes
    }
    achieved = {str(b): round(speedup[str(b)] / ratio, 3) for b in batch_sizes}
    return {
        "speedup_vs_teacher": speedup,
        "speedup_over_macs_ratio": achieved,
        "target_fraction": TARGETS.get(factor),
        "target_met": (
            bool(achieved[str(big)] >= TARGETS[factor]) if factor in TARGETS else None
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="quick run: 128x128, batches 1 and 8"
    )
    parser.add_argument("--size", type=int, help="image side (224; 128 with --small)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["space_to_depth"],
        choices=("space_to_depth", "strided"),
        help="E designs; the first is named thumbnet_f<f>, others get a suffix",
    )
    parser.add_argument(
        "--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES
    )
    parser.add_argument("--breakdown", action="store_true", help="E alone too")
    parser.add_argument("--reps", type=int, help="timed rounds (full: 9; small: 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls (full: 2; small: 1)")
    parser.add_argument("--calibration", type=int, default=8, help="int8 samples")
    parser.add_argument("--work-dir", default="/tmp/thumbnet-inference-speed")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    # 128 is the smallest side where ResNet-50 still accepts the f=4 thumbnail (32).
    size = args.size or (128 if args.small else 224)
    batch_sizes = tuple(args.batch_sizes or ((1, 8) if args.small else (1, 32)))
    reps = args.reps or (3 if args.small else 9)
    warmup = args.warmup or (1 if args.small else 2)
    models = build_models(
        size, args.factors, args.num_classes, args.variants, args.breakdown
    )
    macs = {name: count_flops(model) for name, model in models.items()}
    work_dir = os.path.join(args.work_dir, f"{size}px-{args.num_classes}")
    files = convert_all(models, args.runtimes, work_dir, args.calibration)

    load_before = os.getloadavg()
    timings = {
        rt: time_runtime(rt, files.get(rt, {}), models, batch_sizes, size, reps, warmup)
        for rt in args.runtimes
    }
    load_after = os.getloadavg()

    report_models = {}
    for name, model in models.items():
        entry = {
            "input_shape": list(model.inputs[0].shape[1:]),
            "macs": macs[name],
            "params": count_params(model),
            "file_bytes": {
                rt: os.path.getsize(files[rt][name])
                for rt in files
                if name in files[rt]
            },
            "runtimes": {},
        }
        found = re.search(r"_f(\d+)", name)
        factor = int(found.group(1)) if found else None
        for rt, timing in timings.items():
            row = {
                "images_per_s": {
                    str(b): round(timing[name][b]["images_per_s"], 2)
                    for b in batch_sizes
                },
                "median_s": {
                    str(b): round(timing[name][b]["median_s"], 5) for b in batch_sizes
                },
                "times_s": {str(b): timing[name][b]["times_s"] for b in batch_sizes},
            }
            if name.startswith("thumbnet"):
                row.update(_speedups(timing, macs, name, factor, batch_sizes))
            entry["runtimes"][rt] = row
        if name.startswith("thumbnet"):
            entry["factor"] = factor
            entry["macs_ratio_vs_teacher"] = round(macs["teacher"] / macs[name], 3)
        report_models[name] = entry

    report = {
        "benchmark": "inference_speed",
        "mode": "small" if args.small else "full",
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "runtimes": list(args.runtimes),
        "variants": list(args.variants),
        "timing": "median call time over rounds, models interleaved per runtime",
        "image_size": size,
        "batch_sizes": list(batch_sizes),
        "reps": reps,
        "warmup": warmup,
        "int8_calibration_images": args.calibration,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model() or "unknown",
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "models": report_models,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
