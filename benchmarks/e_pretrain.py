"""Does E pre-trained through the frozen teacher carry over to E + S?
(issue 8, ELPV, validation only)

`e_information_bound.py` showed that E alone, trained so that the frozen
teacher reads `up(E(x))` well, keeps information that bicubic loses. This
checks whether S, fine-tuned on such an E's thumbnails in the joint stage,
reads it too: the demo's settings (shipped teacher, 4 joint epochs, CL + KD)
for bicubic + KD, the product's E + S (`es`), and E + S with E first
pre-trained `PRE_EPOCHS` epochs through the teacher (`es_pre`; at the run's
own automatic width, or `es_pre<W>` at width W), on search seeds with a 30%
validation split (590 cells), per-cell hits saved so arms of one seed
compare paired.

    KERAS_BACKEND=tensorflow FACTOR=4 python benchmarks/e_pretrain.py
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_study as A  # noqa: E402
import downscaler_extremes as X  # noqa: E402  (val_correct, _manifest)
import e_information_bound as B  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import thumbnet_keras.layers.downscaler as D  # noqa: E402
from thumbnet_keras import pipeline, pretrained  # noqa: E402
from thumbnet_keras.pipeline import presets  # noqa: E402
from thumbnet_keras.pipeline.datasets import run_datasets  # noqa: E402

SEEDS = [int(x) for x in os.environ.get("SEEDS", "100,101,102").split(",")]
ARMS = os.environ.get("ARMS", "bicubic_kd,es,es_pre").split(",")
EPOCHS = int(os.environ.get("EPOCHS", "4"))
PRE_EPOCHS = int(os.environ.get("PRE_EPOCHS", "2"))
FACTOR = int(os.environ.get("FACTOR", "4"))
WORK = Path(os.environ.get("WORK", "/tmp/e_pretrain"))
OUT = os.environ.get("OUT", str(WORK / "results.jsonl"))
X.FACTOR = FACTOR
X.STATE["ext"] = False
STATE = {"pre": False, "prepared": None, "seed": 0, "log": {}}
orig_build = X.orig_build


def build(input_shape, factor, *args, **kwargs):
    e = orig_build(input_shape, factor, *args, **kwargs)
    if not STATE["pre"]:
        return e
    teacher = keras.saving.load_model(pretrained.elpv_teacher_path(), compile=False)
    teacher.trainable = False
    train, _ = run_datasets(STATE["prepared"], input_shape[0], 1, 32, STATE["seed"])
    probe = B.Probe(teacher, e)
    probe.compile(optimizer=keras.optimizers.AdamW(B.LR, weight_decay=1e-4))
    t0 = time.time()
    h = probe.fit(train, epochs=PRE_EPOCHS, verbose=0)
    STATE["log"] = {"pre_loss": [round(v, 4) for v in h.history["loss"]],
                    "pre_secs": round(time.time() - t0, 1)}  # fmt: skip
    return e


D.build_downscaler = build


def main():
    manifest = X._manifest()
    for seed in SEEDS:
        for arm in ARMS:
            STATE["pre"] = arm.startswith("es_pre")
            width = arm[len("es_pre") :] if STATE["pre"] else ""
            settings = presets.demo()
            settings.pop("run_name")
            settings |= {
                "dataset": manifest,
                "seed": seed,
                "factors": [FACTOR],
                "fm_weight": 0.0,
                "mm_weight": 0.0,
                "fm_epochs": 0,
                "joint_epochs": EPOCHS,
            }
            if width:
                settings["downscaler_width"] = int(width)
            run_dir, cfg, prepared = A._resolve(
                settings, f"x{FACTOR}-{arm}-p{PRE_EPOCHS}-e{EPOCHS}-s{seed}", WORK
            )
            STATE["prepared"], STATE["seed"], STATE["log"] = prepared, seed, {}
            pipeline.get_teacher(run_dir, prepared, verbose=0)
            stage = "joint" if arm.startswith("es") else arm
            t0 = time.time()
            rec = pipeline.train_stage(run_dir, FACTOR, stage, verbose=0)
            correct = X.val_correct(run_dir, arm)
            np.save(
                WORK / f"correct-{arm}-p{PRE_EPOCHS}-e{EPOCHS}-s{seed}.npy", correct
            )
            row = {
                "seed": seed,
                "arm": arm,
                "epochs": EPOCHS,
                "pre_epochs": PRE_EPOCHS if STATE["pre"] else 0,
                "factor": FACTOR,
                "best": rec["selection"]["best_value"],
                "best_epoch": rec["selection"]["best_epoch"],
                "val": rec["history"].get("val_accuracy"),
                "n_val": int(len(correct)),
                "secs": round(time.time() - t0, 1),
                **STATE["log"],
            }
            print("ROW", json.dumps(row), flush=True)
            with open(OUT, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
