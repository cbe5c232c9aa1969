"""Can any learned downscaler keep more than bicubic does, for this teacher?
(issue 8, validation only)

`thumbnail_information.py` measured what the thumbnail's pixels cost the
shipped ELPV teacher: the teacher, untouched, on images downscaled by f with
bicubic and scaled back up to 128x128. This trains E alone, with the teacher
frozen, to make that same path work: `teacher(up(E(x)))`, with KD to the
teacher's own logits on `x` plus CL. No S is trained, so what validation
top-1 gains over bicubic (E's starting point: its residual is
zero-initialized) is information E keeps that bicubic loses, read by the
network that knows the full-size images. If E cannot lift this path, it
cannot lift E + S either; if it can, the joint stage is leaving it on the
table.

    KERAS_BACKEND=tensorflow FACTORS=4 WIDTHS=4,16 EPOCHS=8 \
        python benchmarks/e_information_bound.py runs/elpv-demo

RUN_DIR: a run folder on the `elpv` manifest, for its prepared splits. Seed
100 (a search seed). Prints one JSON row per (factor, width): validation
top-1 of the path at E's start (bicubic) and at each epoch, and how far E's
thumbnail moved (`e_change`: RMS of E - bicubic over the RMS spread of the
bicubic thumbnail, on validation images).
"""

import json
import os
import sys
import time

import keras
import numpy as np
from keras import ops

from thumbnet_keras import pretrained
from thumbnet_keras.layers.downscaler import bicubic_downscaler, build_downscaler
from thumbnet_keras.losses import classification_loss, distillation_loss
from thumbnet_keras.pipeline import Run
from thumbnet_keras.pipeline.datasets import run_datasets, split_batches

FACTORS = [int(x) for x in os.environ.get("FACTORS", "4").split(",")]
WIDTHS = [int(x) for x in os.environ.get("WIDTHS", "4,16").split(",")]
EPOCHS = int(os.environ.get("EPOCHS", "8"))
LR = float(os.environ.get("LR", "3e-3"))
SEED = int(os.environ.get("SEED", "100"))
SIZE = 128


def _up(t):
    return ops.clip(ops.image.resize(t, (SIZE, SIZE), interpolation="bicubic"), 0, 1)


class Probe(keras.Model):
    """`teacher(up(E(x)))`, the teacher frozen; loss KD + CL."""

    def __init__(self, teacher, downscaler, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.downscaler = downscaler

    def call(self, x, training=False):
        return self.teacher(_up(self.downscaler(x, training=training)), training=False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):  # fmt: skip
        z_t = ops.stop_gradient(self.teacher(x, training=False))
        return distillation_loss(z_t, y_pred, 4.0) + classification_loss(y, y_pred)


def _top1(model, batches):
    correct = n = 0
    for x, y in batches:
        pred = np.argmax(np.asarray(model(x)), -1)
        correct += int(np.sum(pred == np.asarray(y).reshape(-1)))
        n += len(pred)
    return correct / n


def _change(downscaler, bicubic, batches):
    num = den = 0.0
    for x, _ in batches:
        b = np.asarray(bicubic(x))
        e = np.asarray(downscaler(x))
        num += float(np.sum((e - b) ** 2))
        den += float(np.sum((b - b.mean()) ** 2))
    return (num / den) ** 0.5


class Track(keras.callbacks.Callback):
    def __init__(self, val, rows):
        super().__init__()
        self.val, self.rows = val, rows

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(round(_top1(self.model, self.val), 4))


def main():
    prepared = Run(sys.argv[1]).data()
    teacher = keras.saving.load_model(pretrained.elpv_teacher_path(), compile=False)
    teacher.trainable = False
    val = split_batches(prepared, "validation", SIZE, 1, 64)
    for f in FACTORS:
        bicubic = bicubic_downscaler((SIZE, SIZE, 1), f, value_range=(0.0, 1.0))
        for width in WIDTHS:
            keras.utils.set_random_seed(SEED)
            train, _ = run_datasets(prepared, SIZE, 1, 32, SEED)
            e = build_downscaler(
                (SIZE, SIZE, 1), f, width=width, value_range=(0.0, 1.0)
            )
            probe = Probe(teacher, e)
            start = _top1(probe, val)
            probe.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=1e-4))
            epochs = []
            t0 = time.time()
            probe.fit(train, epochs=EPOCHS, verbose=0, callbacks=[Track(val, epochs)])
            row = {
                "factor": f,
                "width": width,
                "e_params": e.count_params(),
                "val_top1_bicubic": round(start, 4),
                "val_top1_by_epoch": epochs,
                "best": max(epochs),
                "e_change": round(_change(e, bicubic, val), 4),
                "seconds": round(time.time() - t0, 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    from _report import script_args

    script_args(__doc__, ("RUN_DIR",))
    main()
