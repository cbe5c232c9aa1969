"""A/B timing of two conversions of the same models, side by side.

For each file name given, the copy in `A` and the copy in `B` (e.g. two
`inference_speed.py --work-dir` folders converted before and after a
converter change) are timed round-robin in one process, so load from other
processes hits both alike: ONNX Runtime for `.onnx`, LiteRT for `.tflite`
(int8 files get uint8 input), as `inference_speed.py` times them.

    python benchmarks/converted_ab.py /tmp/w11new/224px-1000 \
        /tmp/w11dw/224px-1000 thumbnet_f2_int8.tflite thumbnet_f4_int8.tflite \
        --batch 32 --reps 15

Prints one JSON object (median images/s per file and side, B/A).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402
from inference_speed import _litert_caller  # noqa: E402


def _caller(path: str, batch: int, x: np.ndarray):
    if path.endswith(".tflite"):
        return _litert_caller(path, batch, x)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).random((args.batch, args.size, args.size, 3))
    x = x.astype(np.float32)
    callers = {
        (name, side): _caller(os.path.join(folder, name), args.batch, x)
        for name in args.files
        for side, folder in (("a", args.a), ("b", args.b))
    }
    for call in callers.values():
        for _ in range(args.warmup):
            call()
    times = {key: [] for key in callers}
    load_before = os.getloadavg()
    for _ in range(args.reps):
        for key, call in callers.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    result = {
        "benchmark": "converted_ab",
        "a": args.a,
        "b": args.b,
        "batch": args.batch,
        "reps": args.reps,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "files": {},
    }
    for name in args.files:
        rate = {
            side: args.batch / statistics.median(times[(name, side)])
            for side in ("a", "b")
        }
        result["files"][name] = {
            "images_per_s_a": round(rate["a"], 1),
            "images_per_s_b": round(rate["b"], 1),
            "b_over_a": round(rate["b"] / rate["a"], 3),
        }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
