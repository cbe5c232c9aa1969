"""Train the ELPV teacher that ships in `thumbnet_keras/pretrained/`.

ELPV (Deitsch et al., PyPI `elpv-dataset`; data licence CC BY-NC-SA 4.0,
non-commercial) is prepared through the library with the split of
`data_manifests/elpv.yaml`: a stratified 75/25 train/test split (seed 0) and a
stratified 10% of train carved out as `validation`. The teacher is a
`thumbnet_keras.models.backbones.build(...)` model (a Functional model of
built-in layers with a logits output, so `make_student(teacher, 2)` and
`(teacher, 4)` work and the file loads with `safe_mode=True`), trained with:

* AdamW (decoupled weight decay), linear warmup then cosine decay
  (`keras.optimizers.schedules.CosineDecay(warmup_target=, warmup_steps=)`);
* cross-entropy with label smoothing (`CategoricalCrossentropy` on one-hot
  labels);
* augmentation fit for cells, which have no up/down or left/right orientation:
  light random crop, both flips, rotations by multiples of 90 degrees, light
  brightness/contrast (`thumbnet_keras.data.Augment`).

The epoch kept is the one with the best VALIDATION top-1 (ties: lower
validation loss). The test split is evaluated once, at the end, on that epoch.
A JSON summary (val/test top-1, per-class test recall, confusion matrix, epochs,
seconds per epoch, MACs, params, the command and every setting) is printed and
written beside the model (`<out>.json`). The `.keras` file holds the model
only (no optimizer state). Inputs: gray 1-channel images in [0, 1]
(normalization "unit"), as `make_dataset(..., channels=1)` produces.

Usage (TensorFlow backend: the fastest on CPU):

    KERAS_BACKEND=tensorflow python benchmarks/train_elpv_teacher.py \
        --out thumbnet_keras/pretrained/elpv_teacher.keras

Quick trials (model selection on validation only, no test): add `--no-test`
and a short `--epochs`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time

# Run from a checkout without `pip install -e .`: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

LICENSE = "CC BY-NC-SA 4.0 (ELPV, Deitsch et al.) — non-commercial"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--image-size", type=int, default=128, help="square side, a multiple of 4"
    )
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument(
        "--widths",
        default="16,32,64,128,128",
        help="tiny_cnn stage widths (every stage after the first halves the map)",
    )
    p.add_argument(
        "--head",
        default="gap",
        choices=("gap", "flatten"),
        help="tiny_cnn head: strided convs + global average pooling, or "
        "max pooling between stages + Flatten + Dense",
    )
    p.add_argument("--alpha", type=float, default=0.35, help="mobilenetv2 width")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=0.9,
        help="set on every BatchNormalization layer (keras.applications' "
        "MobileNetV2 uses 0.999, too slow for ~3k steps; also what derived "
        "students inherit)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW")
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--crop-min", type=float, default=0.8, help="min crop area")
    p.add_argument("--no-rot90", action="store_true", help="flips only")
    p.add_argument("--brightness", type=float, default=0.1)
    p.add_argument("--contrast", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir", default=os.path.join(tempfile.gettempdir(), "elpv_data")
    )
    p.add_argument("--out", default="runs/elpv_teacher/elpv_teacher.keras")
    p.add_argument("--no-test", action="store_true", help="skip the test split")
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this .keras teacher's weights (same backbone and "
        "options; the input side may differ: e.g. fine-tune a 128x128 teacher "
        "at 160x160, as in FixRes)",
    )
    args = p.parse_args(argv)
    if args.image_size < 16 or args.image_size % 4:
        p.error(
            f"--image-size must be a multiple of 4 >= 16, received {args.image_size}"
        )
    if not args.out.endswith(".keras"):
        p.error(f"--out must end with .keras, received {args.out!r}")
    if args.init_from is not None and not (
        args.init_from.endswith(".keras") and os.path.isfile(args.init_from)
    ):
        p.error(
            f"--init-from must be an existing .keras file, received {args.init_from!r}"
        )
    return args


def _save_deflated(model, path: str) -> None:
    """`model.save(path)`, then the same zip members re-written with deflate.

    Keras writes `.keras` zips uncompressed; deflate shrinks the config and the
    HDF5 metadata (a MobileNetV2 file 2.2 MB -> 1.45 MB) and
    `keras.saving.load_model` reads it the same way.
    """
    import zipfile

    tmp = path[: -len(".keras")] + ".stored.keras"
    model.save(tmp)
    with (
        zipfile.ZipFile(tmp) as zin,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    os.remove(tmp)


def reference_image(size: int):
    """A fixed (1, size, size, 1) image in [0, 1]; its logits are recorded in
    the summary so tests can check the shipped file on every backend."""
    import numpy as np

    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return (((7 * i + 3 * j) % 17) / 16.0).astype("float32")[None, :, :, None]


def _build(args, shape, num_classes, weights=None):
    import keras

    from thumbnet_keras.models import backbones

    model = backbones.build(
        args.backbone, shape, num_classes, weights=weights, **_backbone_options(args)
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = args.bn_momentum
    return model


def _backbone_options(args) -> dict:
    if args.backbone == "tiny_cnn":
        return {"widths": [int(w) for w in args.widths.split(",")], "head": args.head}
    if args.backbone == "mobilenetv2":
        return {"alpha": args.alpha}
    return {}


class _BestOnValidation:
    """Keeps the weights of the epoch with the best validation top-1."""

    def __init__(self):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.epoch_seconds.append(time.perf_counter() - outer._start)
                key = (logs["val_top1"], -logs["val_loss"])
                outer.history.append(
                    {
                        "epoch": epoch + 1,
                        "loss": round(float(logs["loss"]), 4),
                        "top1": round(float(logs["top1"]), 4),
                        "val_loss": round(float(logs["val_loss"]), 4),
                        "val_top1": round(float(logs["val_top1"]), 4),
                        "seconds": round(outer.epoch_seconds[-1], 1),
                    }
                )
                if outer.best_key is None or key > outer.best_key:
                    outer.best_key = key
                    outer.best_epoch = epoch + 1
                    outer.best_weights = self.model.get_weights()

        self.callback = Callback()
        self.history: list[dict] = []
        self.epoch_seconds: list[float] = []
        self.best_key = None
        self.best_epoch = 0
        self.best_weights = None


def main(argv=None) -> dict:
    args = _parse(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    from thumbnet_keras import count_flops, count_params, data
    from thumbnet_keras.data.index import file_sha256
    from thumbnet_keras.pipeline.datasets import prepare_dataset

    keras.utils.set_random_seed(args.seed)
    prepared = prepare_dataset("elpv", args.data_dir)
    num_classes = prepared["num_classes"]
    size = args.image_size
    augment = data.Augment(
        crop_area=(args.crop_min, 1.0),
        flip_left_right=True,
        flip_up_down=True,
        rot90=not args.no_rot90,
        brightness=args.brightness,
        contrast=args.contrast,
    )
    common = dict(channels=1, normalization="unit", cache=True, seed=args.seed)

    def one_hot(x, y):
        return x, tf.one_hot(y, num_classes)

    def split(name, training):
        ds = data.make_dataset(
            prepared["prepared_dir"],
            name,
            size,
            args.batch_size,
            training,
            augment=augment if training else False,
            **common,
        )
        return ds.map(one_hot)

    train, val = split("train", True), split("validation", False)
    steps = math.ceil(prepared["splits"]["train"] / args.batch_size)
    warmup = int(round(args.warmup_epochs * steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / 100,
        decay_steps=max(1, args.epochs * steps - warmup),
        alpha=0.0,
        warmup_target=args.lr,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=args.weight_decay
    )
    # BN scale/offset and biases are not decayed (`variable.name` is matched).
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])

    options = _backbone_options(args)
    shape = (size, size, 1)
    # backbones.build checks every weight shape against the file's.
    model = _build(args, shape, num_classes, weights=args.init_from)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=args.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
        jit_compile=False if keras.backend.backend() == "torch" else "auto",
    )
    best = _BestOnValidation()
    start = time.perf_counter()
    model.fit(
        train,
        validation_data=val,
        epochs=args.epochs,
        callbacks=[best.callback],
        verbose=2,
    )
    train_seconds = time.perf_counter() - start

    # A fresh, uncompiled model with the best weights: no optimizer state in
    # the file, the plain backbone config.
    teacher = _build(args, shape, num_classes)
    teacher.set_weights(best.best_weights)
    teacher.trainable = True
    summary = {
        "command": "KERAS_BACKEND=tensorflow python benchmarks/train_elpv_teacher.py "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "backend": keras.backend.backend(),
        "dataset": "elpv",
        "license": LICENSE,
        "split": {
            "manifest": "data_manifests/elpv.yaml",
            "protocol": "stratified 75/25 train/test (seed 0); stratified 10% "
            "of train as validation; best epoch chosen on validation top-1, "
            "test evaluated once",
            "sizes": prepared["splits"],
        },
        "class_names": prepared["class_names"],
        "backbone": args.backbone,
        "backbone_options": options,
        "input_shape": list(shape),
        "image_size": size,
        "channels": 1,
        "normalization": "unit",
        "input_note": "gray 1-channel images scaled to [0, 1] "
        "(make_dataset(..., channels=1, normalization='unit')); logits out",
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("out", "data_dir")
        },
        "init_from_sha256": file_sha256(args.init_from) if args.init_from else None,
        "augment": {
            "crop_area": list(augment.crop_area),
            "crop_aspect": list(augment.crop_aspect),
            "flip_left_right": augment.flip_left_right,
            "flip_up_down": augment.flip_up_down,
            "rot90": augment.rot90,
            "brightness": augment.brightness,
            "contrast": augment.contrast,
        },
        "epochs": args.epochs,
        "best_epoch": best.best_epoch,
        "val_top1": round(float(best.best_key[0]), 4),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(float(np.median(best.epoch_seconds)), 2),
        "macs": int(count_flops(teacher)),
        "params": count_params(teacher)["total"],
        "reference_logits": np.asarray(teacher(reference_image(size), training=False))[
            0
        ]
        .round(5)
        .tolist(),
        "reference_input": "benchmarks/train_elpv_teacher.py:reference_image",
        "history": best.history,
    }
    if not args.no_test:
        test = split("test", False)
        logits, labels = [], []
        for x, y in test:
            logits.append(np.asarray(teacher(x, training=False)))
            labels.append(np.argmax(y.numpy(), axis=-1))
        pred = np.argmax(np.concatenate(logits), axis=-1)
        labels = np.concatenate(labels)
        confusion = np.zeros((num_classes, num_classes), dtype=int)
        np.add.at(confusion, (labels, pred), 1)
        summary["test_top1"] = round(float(np.mean(pred == labels)), 4)
        summary["test_recall_per_class"] = [
            round(float(confusion[c, c] / max(1, confusion[c].sum())), 4)
            for c in range(num_classes)
        ]
        summary["test_confusion"] = confusion.tolist()
        summary["test_majority_top1"] = round(
            float(confusion.sum(axis=1).max() / confusion.sum()), 4
        )

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _save_deflated(teacher, args.out)
    summary["file_bytes"] = os.path.getsize(args.out)
    with open(args.out[: -len(".keras")] + ".json", "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "history"},
            indent=2,
            ensure_ascii=False,
        )
    )
    return summary


if __name__ == "__main__":
    main()
