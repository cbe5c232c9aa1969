"""Data preparation throughput (validation: read, hash, decode) vs. workers.

Writes a folder of ImageNet-like JPEGs (500x375 RGB, smooth structure plus
noise so they compress like photos, ~40-60 KB each, 10 classes), then runs
`thumbnet_keras.data.prepare` on it with 1, 2 and all cores' worth of worker
threads, each into a fresh output folder at the same path, and checks that the
three indexes are byte-identical. Prints JSON: images/s per worker count, the
speedup over one worker, the machine's load before and after.

Usage:
    python benchmarks/prepare_speed.py --images 2000 \\
        --out docs/results/prepare_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="median of N runs each")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    from thumbnet_keras import data

    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores})
    work = tempfile.mkdtemp(prefix="prepare_speed_")
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    try:
        write_jpegs(src, args.images)
        size = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(src)
            for f in files
        )
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
        rates, indexes = {}, {}
        for _ in range(args.repeats):
            for workers in counts:
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                prepared = data.prepare(manifest, out, workers=workers)
                seconds = time.perf_counter() - start
                assert prepared.decoded == args.images, prepared.decoded
                rates.setdefault(workers, []).append(args.images / seconds)
                with open(os.path.join(out, "index.parquet"), "rb") as f:
                    indexes.setdefault(workers, set()).add(f.read())
        identical = len(set().union(*indexes.values())) == 1
        median = {w: sorted(r)[len(r) // 2] for w, r in rates.items()}
        result = {
            "benchmark": "prepare_speed",
            "machine": f"{platform.machine()}, {cores} cores",
            "images": args.images,
            "mean_file_kb": round(size / args.images / 1024, 1),
            "image_size": "500x375 RGB JPEG (quality 90)",
            "repeats": args.repeats,
            "images_per_s": {str(w): round(r, 1) for w, r in median.items()},
            "speedup_over_1": {
                str(w): round(r / median[1], 2) for w, r in median.items()
            },
            "index_byte_identical": identical,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "command": "python benchmarks/prepare_speed.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
