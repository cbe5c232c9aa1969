"""The cost of reproducible training (issue 12): seconds per epoch of the
pipeline's teacher stage with and without `deterministic` (TensorFlow's op
determinism) and with per-epoch data streams (resume-exact) vs. one stream.

    python benchmarks/determinism_cost.py --dataset elpv --limit-per-class 60

Each setting runs in its own process (op determinism is process-wide), one
after another; the median epoch time over epochs 2.. is reported (epoch 1
traces the step function and fills caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
import keras
from thumbnet_keras import pipeline
from thumbnet_keras.models import backbones
from thumbnet_keras.pipeline.checkpoint import fit_resumable
from thumbnet_keras.pipeline.health import configure_determinism, epoch_seed
from thumbnet_keras.pipeline.datasets import run_datasets
from thumbnet_keras.pipeline.recipe import make_optimizer, steps_per_epoch, SparseCrossentropy
dataset, limit, epochs, deterministic, per_epoch, out = sys.argv[1:7]
deterministic, per_epoch, epochs = deterministic == "1", per_epoch == "1", int(epochs)
cfg = pipeline.ThumbNetParams(dataset=dataset, limit_per_class=int(limit) or None,
                              deterministic=deterministic).to_config()
prepared = pipeline.prepare_dataset(dataset, "runs/_data", cfg.limit_per_class)
channels = cfg.channels or prepared["image_shape"][-1]
configure_determinism(cfg.seed, deterministic)
model = backbones.build(cfg.backbone, (cfg.image_size, cfg.image_size, channels),
                        prepared["num_classes"])
steps = steps_per_epoch(prepared, cfg.batch_size)
model.compile(optimizer=make_optimizer(cfg, "teacher", epochs, steps, model),
              loss=SparseCrossentropy(0.1), metrics=["accuracy"])
def stream(e):
    return run_datasets(prepared, cfg.image_size, channels, cfg.batch_size,
                        epoch_seed(cfg.seed, e))[0]
times = []
class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None): times.append(time.perf_counter() - self.t)
data = stream if per_epoch else stream(0)
fit_resumable(model, data, epochs, out, verbose=0, log=lambda m: None,
              callbacks=[Timer()], seed=cfg.seed if per_epoch else None)
print("TIMES " + json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="elpv")
    parser.add_argument("--limit-per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    settings = [
        ("off", "0", "0"),
        ("on", "1", "0"),
        ("on", "1", "1"),
        ("off", "0", "1"),
    ]
    results = {}
    for repeat in range(args.repeats):
        for name, det, per_epoch in settings:
            out = f"/tmp/determinism-cost-{os.getpid()}-{name}-{per_epoch}-{repeat}"
            done = subprocess.run(
                [sys.executable, "-c", WORKER, args.dataset, str(args.limit_per_class),
                 str(args.epochs), det, per_epoch, out],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            lines = [x for x in done.stdout.splitlines() if x.startswith("TIMES ")]
            if not lines:
                sys.exit(done.stderr[-3000:])
            times = json.loads(lines[-1][6:])[1:]
            key = f"deterministic={name} per_epoch_streams={per_epoch == '1'}"
            results.setdefault(key, []).extend(times)
    for key, times in results.items():
        times = sorted(times)
        median = times[len(times) // 2]
        print(f"{key}: median {median:.3f} s/epoch over {len(times)} epochs "
              f"(min {times[0]:.3f}, max {times[-1]:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
