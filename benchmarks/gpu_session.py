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
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CANDIDATES = {
    # name: (alpha, peak lr, weight decay, label smoothing, epochs)
    "a35": (0.35, 3e-3, 0.05, 0.1, 150),
    "a35_lowreg": (0.35, 2e-3, 0.01, 0.05, 150),
    "a50": (0.5, 3e-3, 0.05, 0.1, 150),
}


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

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical"),
            keras.layers.RandomZoom((-0.15, 0.0), fill_mode="reflect"),
            keras.layers.RandomTranslation(0.04, 0.04, fill_mode="reflect"),
            keras.layers.RandomContrast(0.1, value_range=(0, 1)),
        ],
        name="augment",
    )


def _build_teacher(alpha, num_classes):
    import keras

    from thumbnet_keras.models import backbones

    model = backbones.build("mobilenetv2", (128, 128, 1), num_classes, alpha=alpha)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def run_teacher(name, npz, workdir, epochs=None):
    import keras

    alpha, lr, wd, ls, default_epochs = CANDIDATES[name]
    epochs = epochs or default_epochs
    keras.utils.set_random_seed(0)
    d = _load(npz)
    k = int(d["y_train"].max()) + 1
    x, y = _float(d["x_train"]), keras.utils.to_categorical(d["y_train"], k)
    xv, yv = _float(d["x_validation"]), keras.utils.to_categorical(d["y_validation"], k)
    teacher = _build_teacher(alpha, k)
    image = keras.Input((128, 128, 1))
    model = keras.Model(image, teacher(_augment()(image)))
    batch = 32
    steps = -(-len(x) // batch)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 100,
        decay_steps=max(1, epochs * steps - 3 * steps),
        alpha=0.0,
        warmup_target=lr,
        warmup_steps=3 * steps,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=wd)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ls),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
        jit_compile=True,
    )
    best = {"key": None}
    history = []

    class Best(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            key = (round(float(logs["val_top1"]), 6), -float(logs["val_loss"]))
            history.append(
                [epoch + 1]
                + [
                    round(float(logs[m]), 4)
                    for m in ("loss", "top1", "val_loss", "val_top1")
                ]
            )
            if best["key"] is None or key > best["key"]:
                best.update(key=key, epoch=epoch + 1, weights=teacher.get_weights())

    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=batch,
        epochs=epochs,
        validation_data=(xv, yv),
        callbacks=[Best()],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    teacher.set_weights(best["weights"])
    path = os.path.join(workdir, f"teacher_{name}.keras")
    teacher.save(path)
    result = {
        "name": name,
        "alpha": alpha,
        "lr": lr,
        "weight_decay": wd,
        "label_smoothing": ls,
        "epochs": epochs,
        "batch": batch,
        "best_epoch": best["epoch"],
        "val_top1": best["key"][0],
        "train_top1_last": history[-1][2],
        "seconds": round(seconds, 1),
        "history_every_10": history[9::10],
        "path": path,
    }
    with open(os.path.join(workdir, f"teacher_{name}.json"), "w") as f:
        json.dump(result, f)
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
    from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student

    d = _load(npz)
    teacher = keras.saving.load_model(teacher_path, compile=False, safe_mode=True)
    student = make_student(teacher, 2)
    downscaler = build_downscaler((128, 128, 1), factor=2, width=8)
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
        "epochs": epochs,
        "finite": bool(finite),
        "compute_dtype_of_logits": str(
            trainer(_float(d["x_validation"][:2]))["logits"].dtype
        ),
        "history": logs,
    }


def run_speed(batch=128, steps=12, size=224, backbone="resnet50"):
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
    return out


def _sub(args, log):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + args,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def run_all(out_dir, npz, teacher_path, budget_s):
    start = time.perf_counter()
    work = os.path.join("/tmp", "gpu_work")
    os.makedirs(work, exist_ok=True)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(out_dir, "gpu_session.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    log = open(os.path.join(out_dir, "log.txt"), "w")
    procs = {
        n: _sub(["teacher", "--name", n, "--npz", npz, "--work", work], log)
        for n in CANDIDATES
    }
    procs["numerics"] = _sub(
        ["numerics", "--npz", npz, "--teacher", teacher_path, "--work", work], log
    )
    deadline = start + 0.45 * budget_s
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            result.setdefault("killed", []).append(name)
    cands = []
    for n in CANDIDATES:
        f = os.path.join(work, f"teacher_{n}.json")
        if os.path.exists(f):
            cands.append(json.load(open(f)))
    result["teacher_candidates"] = cands
    f = os.path.join(work, "numerics.json")
    if os.path.exists(f):
        result["numerics"] = json.load(open(f))
    if cands:
        best = max(cands, key=lambda c: (c["val_top1"], -c["alpha"]))
        result["teacher_selected"] = best["name"]
        result["teacher_selected_test"] = evaluate_teacher(best["path"], npz)
        import shutil

        shutil.copy(best["path"], os.path.join(out_dir, "elpv_teacher.keras"))
    result["phase1_seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(result, indent=1), flush=True)
    p = _sub(["speed", "--work", work], log)
    try:
        p.wait(timeout=max(1, start + budget_s - time.perf_counter()))
    except subprocess.TimeoutExpired:
        p.kill()
        result["speed_killed"] = True
    f = os.path.join(work, "speed.json")
    if os.path.exists(f):
        result["speed"] = json.load(open(f))
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(result.get("speed"), indent=1), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("all", "teacher", "numerics", "speed"))
    p.add_argument("--name", default="a35")
    p.add_argument("--npz", default=".gpu/elpv128.npz")
    p.add_argument("--teacher", default="thumbnet_keras/pretrained/elpv_teacher.keras")
    p.add_argument("--work", default="/tmp/gpu_work")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--epochs", type=int, default=None, help="override (local dry run)")
    p.add_argument("--speed-batch", type=int, default=128)
    p.add_argument("--speed-size", type=int, default=224)
    p.add_argument("--speed-backbone", default="resnet50")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for `all`")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    if a.part == "teacher":
        print(json.dumps(run_teacher(a.name, a.npz, a.work, a.epochs)), flush=True)
    elif a.part == "numerics":
        r = run_numerics(a.npz, a.teacher, a.epochs or 8)
        json.dump(r, open(os.path.join(a.work, "numerics.json"), "w"))
        print(json.dumps(r), flush=True)
    elif a.part == "speed":
        r = run_speed(
            batch=a.speed_batch,
            steps=a.epochs or 12,
            size=a.speed_size,
            backbone=a.speed_backbone,
        )
        json.dump(r, open(os.path.join(a.work, "speed.json"), "w"))
        print(json.dumps(r), flush=True)
    else:
        os.makedirs(a.out, exist_ok=True)
        run_all(a.out, a.npz, a.teacher, a.budget)


if __name__ == "__main__":
    main()
