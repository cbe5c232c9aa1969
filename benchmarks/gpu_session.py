"""The one prepared GPU session: Keras on JAX (XLA) on a lent accelerator.

The lent machine has JAX with CUDA but no TensorFlow, so nothing here touches
`thumbnet_keras.data` (tf.data): data come as NumPy arrays. Three parts, each
in its own process, results written to `$OUT/gpu_session.json` as they arrive:

* `teacher` (float32, several candidates in parallel processes): the ELPV
  teacher, MobileNetV2 at 128x128 gray as the demo uses, trained on the
  library's ELPV split (`.gpu/elpv128.npz`, exported from the prepared
  train / validation / test splits), with flips in both axes, a light zoom,
  shift and contrast (no 90-degree rotations: every ELPV cell has horizontal
  busbars), AdamW + warmup + cosine, label smoothing. The best epoch of each
  candidate is kept on validation top-1, the best candidate is chosen on
  validation top-1, and only that one is evaluated on test.
* `numerics` (mixed_bfloat16): a short ThumbNet joint run (E + S at f=2,
  CL + KD + FM + MM) on ELPV under the shipped teacher: every loss term per
  epoch, finite or not, and validation top-1.
* `speed` (mixed_bfloat16, XLA, alone on the GPU): ResNet-50 at 224, batch
  128: the teacher's own train step, the ThumbNet joint step at f=2 (P2 =
  joint / teacher step time), and the inference of the teacher and of the
  exported E + S at f=2 and f=4 (P1 = speedup / MACs ratio).

Usage on the device (see docs/benchmarks.md for the recorded run):

    python benchmarks/gpu_session.py all --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Run from a checkout without `pip install -e .`: make the package importable.
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CANDIDATES = {
    # name: (alpha, peak lr, weight decay, label smoothing). The CPU-trained
    # shipped teacher (alpha 0.35, lr 3e-3, wd 0.01, ls 0.05, 100 epochs)
    # under-fits (train top-1 0.75): wider networks and longer schedules.
    "a35": (0.35, 3e-3, 0.01, 0.05),
    "a50": (0.5, 3e-3, 0.01, 0.05),
    "a75": (0.75, 3e-3, 0.01, 0.05),
    "a50_lowreg": (0.5, 2e-3, 0.002, 0.0),
}
MAX_EPOCHS = 400
WARMUP_EPOCHS = 3


def export_arrays(npz, size=128, data_dir=None):
    """Write the library's ELPV splits as uint8 arrays (run here, with TF).

    The lent machine has no TensorFlow, so the splits travel as arrays:
    `prepare_dataset("elpv")` (the manifest's stratified split), then
    `make_dataset(..., channels=1, normalization="unit")` without
    augmentation, each image rounded to uint8 (at most 1/510 from the
    pipeline's float value).
    """
    import tempfile

    import numpy as np

    from thumbnet_keras import data
    from thumbnet_keras.pipeline.datasets import prepare_dataset

    data_dir = data_dir or os.path.join(tempfile.gettempdir(), "elpv_data")
    prepared = prepare_dataset("elpv", data_dir)
    arrays = {}
    for split in ("train", "validation", "test"):
        ds = data.make_dataset(
            prepared["prepared_dir"],
            split,
            size,
            256,
            False,
            channels=1,
            normalization="unit",
        )
        xs, ys = [], []
        for x, y in ds:
            xs.append(np.rint(np.asarray(x) * 255.0).clip(0, 255).astype("uint8"))
            ys.append(np.asarray(y).astype("int32"))
        arrays[f"x_{split}"] = np.concatenate(xs)
        arrays[f"y_{split}"] = np.concatenate(ys)
    arrays["class_names"] = np.array(prepared["class_names"])
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez_compressed(npz, **arrays)
    return {k: list(v.shape) for k, v in arrays.items()}


def _load(npz):
    import numpy as np

    d = np.load(npz)
    limit = int(os.environ.get("GPU_SESSION_LIMIT", "0"))  # local dry runs only
    return {
        k: d[k][:limit] if limit and k.startswith(("x_", "y_")) else d[k]
        for k in d.files
    }


def _float(x):
    return x.astype("float32") / 255.0


def _augment():
    import keras

    layers = [
        keras.layers.RandomFlip("horizontal_and_vertical"),
        keras.layers.RandomZoom((-0.15, 0.0), fill_mode="reflect"),
        keras.layers.RandomTranslation(0.04, 0.04, fill_mode="reflect"),
        keras.layers.RandomContrast(0.1, value_range=(0, 1)),
    ]
    if keras.backend.backend() == "jax":
        # RandomZoom / RandomTranslation say `supports_jit = False` (for
        # TensorFlow); their JAX ops compile, and without XLA the whole train
        # step would run op by op on the GPU.
        for layer in layers:
            layer.supports_jit = True
    return keras.Sequential(layers, name="augment")


def _build_teacher(alpha, num_classes):
    import keras

    from thumbnet_keras.models import backbones

    model = backbones.build("mobilenetv2", (128, 128, 1), num_classes, alpha=alpha)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def run_teacher(name, npz, workdir, deadline, max_epochs=MAX_EPOCHS):
    """Train one candidate until `deadline` (a `time.time()` value).

    The epoch count is set after two epochs from their measured time, so the
    cosine schedule (per epoch, linear warmup first) always reaches its end
    inside the budget whatever the GPU's speed or its sharing. The best epoch
    on validation top-1 is saved as it arrives (a killed run still leaves it).
    """
    import keras

    alpha, lr, wd, ls = CANDIDATES[name]
    keras.utils.set_random_seed(0)
    d = _load(npz)
    k = int(d["y_train"].max()) + 1
    x, y = _float(d["x_train"]), keras.utils.to_categorical(d["y_train"], k)
    xv, yv = _float(d["x_validation"]), keras.utils.to_categorical(d["y_validation"], k)
    teacher = _build_teacher(alpha, k)
    image = keras.Input((128, 128, 1))
    model = keras.Model(image, teacher(_augment()(image)))
    optimizer = keras.optimizers.AdamW(learning_rate=lr / 100, weight_decay=wd)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ls),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
        jit_compile=True,
    )
    path = os.path.join(workdir, f"teacher_{name}.keras")
    result = {
        "name": name,
        "alpha": alpha,
        "lr": lr,
        "weight_decay": wd,
        "label_smoothing": ls,
        "batch": 32,
        "augment": "RandomFlip both, RandomZoom in <=15%, RandomTranslation 4%, "
        "RandomContrast 0.1 (reflect fill)",
        "path": path,
        "history_every_10": [],
    }
    state = {"epochs": max_epochs, "best": None, "t0": time.time(), "times": []}

    def lr_at(epoch):
        total = state["epochs"]
        if epoch < WARMUP_EPOCHS:
            return lr * (0.01 + 0.99 * epoch / WARMUP_EPOCHS)
        progress = (epoch - WARMUP_EPOCHS) / max(1, total - WARMUP_EPOCHS)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    class Budget(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.time()
            self.model.optimizer.learning_rate.assign(lr_at(epoch))

        def on_epoch_end(self, epoch, logs=None):
            state["times"].append(time.time() - self.t)
            if epoch == 2:  # epochs 2-3 are compiled: size the schedule
                per_epoch = max(state["times"][1:])
                left = deadline - time.time() - 20
                state["epochs"] = int(min(max_epochs, 3 + left / (1.1 * per_epoch)))
                result["epochs"] = state["epochs"]
                result["seconds_per_epoch"] = round(per_epoch, 2)
            row = [epoch + 1] + [
                round(float(logs[m]), 4)
                for m in ("loss", "top1", "val_loss", "val_top1")
            ]
            if (epoch + 1) % 10 == 0:
                result["history_every_10"].append(row)
            key = (round(float(logs["val_top1"]), 6), -float(logs["val_loss"]))
            if state["best"] is None or key > state["best"]:
                state["best"] = key
                teacher.save(path)
                result.update(
                    best_epoch=epoch + 1, val_top1=key[0], train_top1_at_best=row[2]
                )
            result["epochs_done"] = epoch + 1
            result["train_top1_last"] = row[2]
            result["seconds"] = round(time.time() - state["t0"], 1)
            with open(os.path.join(workdir, f"teacher_{name}.json"), "w") as f:
                json.dump(result, f)
            if epoch + 1 >= state["epochs"]:
                self.model.stop_training = True

    model.fit(
        x,
        y,
        batch_size=32,
        epochs=max_epochs,
        validation_data=(xv, yv),
        callbacks=[Budget()],
        verbose=0,
    )
    return result


def evaluate_teacher(path, npz):
    import keras
    import numpy as np

    d = _load(npz)
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    pred = np.argmax(model.predict(_float(d["x_test"]), batch_size=256, verbose=0), -1)
    y = d["y_test"]
    k = int(y.max()) + 1
    recall = [float(np.mean(pred[y == c] == c)) for c in range(k)]
    return {
        "test_top1": round(float(np.mean(pred == y)), 4),
        "test_recall_per_class": [round(r, 4) for r in recall],
        "test_majority_top1": round(float(np.bincount(y).max() / len(y)), 4),
    }


def run_numerics(npz, teacher_path, epochs=8):
    import keras
    import numpy as np

    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    from thumbnet_keras import (
        ThumbNetTrainer,
        auto_downscaler_width,
        build_downscaler,
        make_student,
    )

    d = _load(npz)
    teacher = keras.saving.load_model(teacher_path, compile=False, safe_mode=True)
    student = make_student(teacher, 2)
    width = auto_downscaler_width((128, 128, 1), 2, student)
    downscaler = build_downscaler((128, 128, 1), factor=2, width=width)
    trainer = ThumbNetTrainer(teacher, downscaler, student, stage="joint")
    trainer.compile(
        optimizer=keras.optimizers.AdamW(1e-3), metrics=["accuracy"], jit_compile=True
    )
    h = trainer.fit(
        _float(d["x_train"]),
        d["y_train"],
        batch_size=32,
        epochs=epochs,
        validation_data=(_float(d["x_validation"]), d["y_validation"]),
        verbose=0,
    )
    logs = {k: [round(float(v), 5) for v in vals] for k, vals in h.history.items()}
    finite = all(np.isfinite(v).all() for v in h.history.values())
    return {
        "policy": "mixed_bfloat16",
        "downscaler_width": width,
        "epochs": epochs,
        "finite": bool(finite),
        "compute_dtype_of_logits": str(
            trainer(_float(d["x_validation"][:2]))["logits"].dtype
        ),
        "history": logs,
    }


def run_speed(save, batch=128, steps=12, size=224, backbone="resnet50"):
    import jax
    import keras
    import numpy as np

    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    from thumbnet_keras import (
        ThumbNetTrainer,
        auto_downscaler_width,
        backbones,
        build_downscaler,
        count_flops,
        make_student,
    )

    shape = (size, size, 3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch * steps,) + shape).astype("float32")
    y = rng.integers(0, 1000, batch * steps).astype("int32")
    out = {
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "backbone": backbone,
        "image_size": size,
        "policy": "mixed_bfloat16",
        "jit_compile": True,
    }

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t)

    def fit_speed(model, labels=True):
        timer = Timer()
        model.fit(
            x,
            y if labels else None,
            batch_size=batch,
            epochs=4,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
        per_epoch = float(np.median(timer.times[1:]))
        return {
            "images_per_s": round(len(x) / per_epoch, 1),
            "step_ms": round(1000 * per_epoch / steps, 2),
            "first_epoch_s": round(timer.times[0], 1),
        }

    teacher = backbones.build(backbone, shape, 1000)
    teacher.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    out["teacher_train"] = fit_speed(teacher)
    save(out)
    print("teacher train", out["teacher_train"], flush=True)

    exported = {}
    for factor in (2, 4):
        student = make_student(teacher, factor)
        width = auto_downscaler_width(shape, factor, student)
        downscaler = build_downscaler(shape, factor=factor, width=width)
        trainer = ThumbNetTrainer(teacher, downscaler, student, stage="joint")
        if factor == 2:
            trainer.compile(
                optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=True
            )
            out["joint_train_f2"] = fit_speed(trainer)
            out["P2_joint_over_teacher_step"] = round(
                out["joint_train_f2"]["step_ms"] / out["teacher_train"]["step_ms"], 3
            )
            save(out)
            print("joint", out["joint_train_f2"], flush=True)
        exported[factor] = (trainer.export(), width)

    def infer_speed(model, n=30):
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        fn = jax.jit(lambda tv, ntv, xb: model.stateless_call(tv, ntv, xb)[0])
        xb = jax.device_put(x[:256])
        nb = xb.shape[0]
        fn(tv, ntv, xb).block_until_ready()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn(tv, ntv, xb).block_until_ready()
            times.append(time.perf_counter() - t)
        return round(nb / float(np.median(times)), 1)

    t_macs = count_flops(teacher)
    out["inference_batch256"] = {
        "teacher": {"images_per_s": infer_speed(teacher), "macs": int(t_macs)}
    }
    save(out)
    for factor, (model, width) in exported.items():
        macs = count_flops(model)
        ips = infer_speed(model)
        entry = {
            "images_per_s": ips,
            "macs": int(macs),
            "downscaler_width": width,
            "macs_ratio": round(t_macs / macs, 2),
        }
        entry["speedup"] = round(
            ips / out["inference_batch256"]["teacher"]["images_per_s"], 2
        )
        entry["P1_speedup_over_macs_ratio"] = round(
            entry["speedup"] / entry["macs_ratio"], 3
        )
        out["inference_batch256"][f"f{factor}"] = entry
        save(out)
    return out


def _sub(args, log, script=__file__):
    """`python <script> <args>`, output to `log` (this script by default)."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(script)] + args,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def run_all(out_dir, npz, teacher_path, budget_s, speed_s, speed_args=()):
    """Speed first, alone on the GPU (at most `speed_s`), then the teacher
    candidates and the numerics run side by side until the budget's end,
    then the selected teacher's one test evaluation. Every part writes its
    JSON as results arrive, so a killed part still reports what it had."""
    start = time.time()
    work = os.path.join("/tmp", "gpu_work")
    os.makedirs(work, exist_ok=True)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s}
    path = os.path.join(out_dir, "gpu_session.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    def collect(name):
        f = os.path.join(work, f"{name}.json")
        if os.path.exists(f):
            with open(f) as fh:
                return json.load(fh)
        return None

    log = open(os.path.join(out_dir, "log.txt"), "w")
    p = _sub(["speed", "--work", work, *speed_args], log)
    try:
        p.wait(timeout=speed_s)
    except subprocess.TimeoutExpired:
        p.kill()
        result["speed_killed_after_s"] = speed_s
    result["speed"] = collect("speed")
    result["speed_seconds"] = round(time.time() - start, 1)
    save()
    print(json.dumps(result["speed"], indent=1), flush=True)

    deadline = start + budget_s - 25  # the test evaluation and the copy
    procs = {
        n: _sub(
            [
                "teacher",
                "--name",
                n,
                "--npz",
                npz,
                "--work",
                work,
                "--deadline",
                str(deadline),
            ],
            log,
        )
        for n in CANDIDATES
    }
    procs["numerics"] = _sub(
        ["numerics", "--npz", npz, "--teacher", teacher_path, "--work", work], log
    )
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1, deadline + 10 - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            result.setdefault("killed", []).append(name)
    cands = [c for c in (collect(f"teacher_{n}") for n in CANDIDATES) if c]
    result["teacher_candidates"] = cands
    result["numerics"] = collect("numerics")
    save()
    if cands:
        best = max(cands, key=lambda c: (c["val_top1"], -c["alpha"]))
        result["teacher_selected"] = best["name"]
        result["teacher_selected_test"] = evaluate_teacher(best["path"], npz)
        import shutil

        shutil.copy(best["path"], os.path.join(out_dir, "elpv_teacher.keras"))
    result["total_seconds"] = round(time.time() - start, 1)
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "speed"}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("all", "arrays", "teacher", "numerics", "speed"))
    p.add_argument("--name", default="a35", choices=sorted(CANDIDATES))
    p.add_argument("--npz", default=".gpu/elpv128.npz")
    p.add_argument("--teacher", default="thumbnet_keras/pretrained/elpv_teacher.keras")
    p.add_argument("--work", default="/tmp/gpu_work")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--epochs", type=int, default=None, help="override (local dry run)")
    p.add_argument("--deadline", type=float, default=None, help="time.time() value")
    p.add_argument("--speed-batch", type=int, default=128)
    p.add_argument("--speed-size", type=int, default=224)
    p.add_argument("--speed-backbone", default="resnet50")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for `all`")
    p.add_argument("--speed-budget", type=float, default=170.0)
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    if a.part == "arrays":
        print(json.dumps(export_arrays(a.npz)), flush=True)
    elif a.part == "teacher":
        deadline = a.deadline or time.time() + 3600
        r = run_teacher(a.name, a.npz, a.work, deadline, a.epochs or MAX_EPOCHS)
        print(json.dumps(r), flush=True)
    elif a.part == "numerics":
        r = run_numerics(a.npz, a.teacher, a.epochs or 8)
        with open(os.path.join(a.work, "numerics.json"), "w") as f:
            json.dump(r, f)
        print(json.dumps(r), flush=True)
    elif a.part == "speed":

        def save(r):
            with open(os.path.join(a.work, "speed.json"), "w") as f:
                json.dump(r, f)

        r = run_speed(
            save,
            batch=a.speed_batch,
            steps=a.epochs or 12,
            size=a.speed_size,
            backbone=a.speed_backbone,
        )
        print(json.dumps(r), flush=True)
    else:
        os.makedirs(a.out, exist_ok=True)
        speed_args = [
            f"--speed-batch={a.speed_batch}",
            f"--speed-size={a.speed_size}",
            f"--speed-backbone={a.speed_backbone}",
        ]
        run_all(a.out, a.npz, a.teacher, a.budget, a.speed_budget, speed_args)


if __name__ == "__main__":
    main()
