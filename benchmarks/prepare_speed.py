"""Data preparation throughput (validation: read, hash, decode) vs. workers.

Writes a folder of ImageNet-like JPEGs (500x375 RGB, smooth structure plus
noise so they compress like photos, ~70 KB each, 10 classes), then runs
`thumbnet_keras.data.prepare` on it with 1 worker, and with 2 and all cores'
worth of worker processes and (for comparison) worker threads, each into a
fresh output folder at the same path, runs interleaved, and checks that all
the indexes are byte-identical. Prints JSON: images/s per worker count
(medians; every run too), the speedup over one worker, the CPU time per
image, the time to start the process pool, the machine's load before and
after.

Usage:
    python benchmarks/prepare_speed.py --images 8000 \\
        --out docs/results/prepare_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402


def write_jpegs(root: str, images: int, classes: int = 10) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype("float32")
    for i in range(images):
        label = f"n{i % classes:08d}"
        os.makedirs(os.path.join(root, label), exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6)]
        base = (
            127 + 80 * np.sin(fx * xx + phase)[..., None] * np.cos(fy * yy)[..., None]
        )
        pixels = base * np.array([1.0, 0.8, 0.6]) + rng.normal(0, 12, (375, 500, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(
            os.path.join(root, label, f"img_{i:06d}.JPEG"), quality=90
        )


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    import resource

    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def idle_percent(seconds: float = 5.0) -> float:
    """Share of all CPUs' time spent idle over the next `seconds` (Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    (idle0, total0), _ = sample(), time.sleep(seconds)
    idle1, total1 = sample()
    return 100.0 * (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(limit_s: float, threshold: float = 85.0) -> float:
    """Wait (at most `limit_s`) until the CPUs are `threshold` % idle over 5 s;
    return the last idle share measured."""
    deadline = time.monotonic() + limit_s
    while True:
        idle = idle_percent()
        if idle >= threshold or time.monotonic() >= deadline:
            return round(idle, 1)


def pool_start_seconds(workers: int) -> float:
    """Wall time to start `workers` spawned processes and run an empty task."""
    import importlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # The module (`thumbnet_keras.data.prepare` the attribute is the function).
    examine_chunk = importlib.import_module(
        "thumbnet_keras.data.prepare"
    )._examine_chunk
    start = time.perf_counter()
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        list(pool.map(examine_chunk, [[]] * workers))
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="median of N runs each")
    p.add_argument(
        "--executors",
        default="processes,threads",
        help="pools to time for more than 1 worker; the first is the headline",
    )
    p.add_argument(
        "--src",
        default=None,
        help="write the JPEGs into this folder and keep them, or reuse the "
        "--images JPEGs already there (default: a temporary folder)",
    )
    p.add_argument(
        "--idle-wait",
        type=float,
        default=0.0,
        help="on a shared machine: before each repeat, wait up to this many "
        "seconds for the CPUs to be 85%% idle over 5 s (Linux)",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    executors = args.executors.split(",")

    from thumbnet_keras import data

    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores})
    # (workers, executor): 1 worker runs in the calling thread, no pool.
    configs = [(1, "serial")] + [(w, e) for w in counts if w > 1 for e in executors]
    work = tempfile.mkdtemp(prefix="prepare_speed_")
    src, out = args.src or os.path.join(work, "src"), os.path.join(work, "out")
    try:
        files = [os.path.join(d, f) for d, _, names in os.walk(src) for f in names]
        if files and len(files) != args.images:
            raise SystemExit(f"{src} holds {len(files)} files, not {args.images}")
        if not files:
            write_jpegs(src, args.images)
            files = [os.path.join(d, f) for d, _, names in os.walk(src) for f in names]
        size = sum(os.path.getsize(f) for f in files)
        manifest = data.Manifest.model_validate(
            {
                "name": "jpegs",
                "description": "synthetic ImageNet-like JPEGs",
                "license": "generated",
                "source": {"type": "image_folder", "root": src},
                "image": {"channels": 3},
            }
        )
        load_before = os.getloadavg()
        rates, cpus, indexes = {}, {}, set()
        idle_before, load_by_repeat = [], []
        for _ in range(args.repeats):
            if args.idle_wait > 0:
                idle_before.append(wait_until_idle(args.idle_wait))
            load_by_repeat.append([round(os.getloadavg()[0], 2)])
            for workers, executor in configs:
                shutil.rmtree(out, ignore_errors=True)
                cpu = cpu_seconds()
                start = time.perf_counter()
                prepared = data.prepare(
                    manifest,
                    out,
                    workers=workers,
                    executor="threads" if executor == "serial" else executor,
                )
                seconds = time.perf_counter() - start
                cpus.setdefault((workers, executor), []).append(cpu_seconds() - cpu)
                assert prepared.decoded == args.images, prepared.decoded
                rates.setdefault((workers, executor), []).append(args.images / seconds)
                with open(os.path.join(out, "index.parquet"), "rb") as f:
                    indexes.add(f.read())
            load_by_repeat[-1].append(round(os.getloadavg()[0], 2))
        pool_start = {w: round(pool_start_seconds(w), 2) for w in counts if w > 1}
        load_after = os.getloadavg()
        median = {c: sorted(r)[len(r) // 2] for c, r in rates.items()}
        base = median[(1, "serial")]

        def table(executor: str, values: dict) -> dict:
            return {
                str(w): v
                for (w, e), v in values.items()
                if e == executor or (w == 1 and e == "serial")
            }

        by_executor = {
            e: {
                "images_per_s": table(e, {c: round(r, 1) for c, r in median.items()}),
                "speedup_over_1": table(
                    e, {c: round(r / base, 2) for c, r in median.items()}
                ),
                "all_runs_images_per_s": table(
                    e, {c: [round(x, 1) for x in r] for c, r in rates.items()}
                ),
                # Each repeat's rate over the same repeat's 1-worker rate: less
                # sensitive to a slow or fast 1-worker run than the medians.
                "speedup_by_repeat": table(
                    e,
                    {
                        c: [
                            round(x / one, 2)
                            for x, one in zip(r, rates[(1, "serial")], strict=True)
                        ]
                        for c, r in rates.items()
                    },
                ),
                # CPU time of this process and its worker processes: what
                # parallel examination adds to the work itself.
                "cpu_ms_per_image": table(
                    e,
                    {
                        c: round(1000 * sorted(t)[len(t) // 2] / args.images, 3)
                        for c, t in cpus.items()
                    },
                ),
            }
            for e in executors
        }
        result = {
            "benchmark": "prepare_speed",
            "machine": f"{platform.machine()}, {cores} cores",
            "images": args.images,
            "mean_file_kb": round(size / args.images / 1024, 1),
            "image_size": "500x375 RGB JPEG (quality 90)",
            "repeats": args.repeats,
            "executor": executors[0],
            **by_executor[executors[0]],
            "other_executors": {e: by_executor[e] for e in executors[1:]},
            "process_pool_start_s": {str(w): s for w, s in pool_start.items()},
            "index_byte_identical": len(indexes) == 1,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            # 1-minute load before and after each repeat, and the CPUs' idle
            # share over 5 s before it (with --idle-wait).
            "load_1min_by_repeat": load_by_repeat,
            "idle_percent_before_repeat": idle_before,
            "command": "python benchmarks/prepare_speed.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
