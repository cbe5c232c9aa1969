"""Does E pre-trained through the frozen teacher carry over to E + S?
(issue 8, ELPV, validation only)

`e_information_bound.py` showed that E alone, trained so that the frozen
teacher reads `up(E(x))` well, keeps information that bicubic loses. This
checks whether S, fine-tuned on such an E's thumbnails in the joint stage,
reads it too, with the product's own `e_pretrain` stage: the demo's settings
(shipped teacher, 4 joint epochs, CL + KD) for bicubic + KD, E + S without
e_pretrain (`es`), and E + S after `PRE_EPOCHS` epochs of e_pretrain
(`es_pre`, at the run's learning rate; `es_pre_lr<R>` at peak rate R;
`es_pre<W>`: E of width W; `es_pre_frozen`: E fixed in the joint stage), on
search seeds with a 30% validation split (590 cells), per-cell hits saved
so arms of one seed compare paired.

    KERAS_BACKEND=tensorflow FACTOR=4 python benchmarks/e_pretrain.py
"""

import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_study as A  # noqa: E402
import downscaler_extremes as X  # noqa: E402  (val_correct, _manifest)
import numpy as np  # noqa: E402

from thumbnet_keras import pipeline  # noqa: E402
from thumbnet_keras.pipeline import presets, stages  # noqa: E402

SEEDS = [int(x) for x in os.environ.get("SEEDS", "100,101,102").split(",")]
ARMS = os.environ.get("ARMS", "bicubic_kd,es,es_pre").split(",")
EPOCHS = int(os.environ.get("EPOCHS", "4"))
PRE_EPOCHS = int(os.environ.get("PRE_EPOCHS", "2"))
FACTOR = int(os.environ.get("FACTOR", "4"))
WORK = Path(os.environ.get("WORK", "/tmp/e_pretrain_stage"))
OUT = os.environ.get("OUT", str(WORK / "results.jsonl"))
X.FACTOR = FACTOR
X.STATE["ext"] = False
FREEZE = {"on": False}
_trainer = stages._trainer


def _frozen_e_trainer(config, teacher, downscaler, student, stage, **weights):
    """`es_pre_frozen`: E, once pre-trained, stays fixed in the joint stage."""
    if FREEZE["on"] and stage == "joint":
        downscaler.trainable = False
    return _trainer(config, teacher, downscaler, student, stage, **weights)


stages._trainer = _frozen_e_trainer


_ARM = re.compile(
    r"bicubic_cl|bicubic_kd|bicubic_kd_equal|es|es_pre"
    r"|es_pre_frozen|es_pre_lr[0-9.e-]+|es_pre[0-9]+"
)


def main():
    unknown = [arm for arm in ARMS if not _ARM.fullmatch(arm)]
    if unknown:  # An unknown name ran as plain es_pre (a benchmarks audit).
        sys.exit(f"ARMS: unknown arm(s) {', '.join(unknown)}; see the docstring.")
    manifest = X._manifest()
    for seed in SEEDS:
        for arm in ARMS:
            pre = arm.startswith("es_pre")
            FREEZE["on"] = arm == "es_pre_frozen"
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
                "e_pretrain_epochs": PRE_EPOCHS if pre else 0,
            }
            if arm.startswith("es_pre_lr"):
                settings["e_pretrain_learning_rate"] = float(arm[len("es_pre_lr") :])
            elif arm[len("es_pre") :].isdigit():  # es_pre8: E of width 8
                settings["downscaler_width"] = int(arm[len("es_pre") :])
            run_dir, cfg, prepared = A._resolve(
                settings, f"x{FACTOR}-{arm}-p{PRE_EPOCHS}-e{EPOCHS}-s{seed}", WORK
            )
            pipeline.get_teacher(run_dir, prepared, verbose=0)
            stage = "joint" if arm.startswith("es") else arm
            t0 = time.time()
            pre_rec = None
            if pre:
                pre_rec = pipeline.train_stage(run_dir, FACTOR, "e_pretrain", verbose=0)
            rec = pipeline.train_stage(run_dir, FACTOR, stage, verbose=0)
            correct = X.val_correct(run_dir, arm)
            np.save(
                WORK / f"correct-{arm}-p{PRE_EPOCHS}-e{EPOCHS}-s{seed}.npy", correct
            )
            row = {
                "seed": seed,
                "arm": arm,
                "epochs": EPOCHS,
                "pre_epochs": PRE_EPOCHS if pre else 0,
                "factor": FACTOR,
                "best": rec["selection"]["best_value"],
                "best_epoch": rec["selection"]["best_epoch"],
                "val": rec["history"].get("val_accuracy"),
                "n_val": int(len(correct)),
                "secs": round(time.time() - t0, 1),
            }
            if pre_rec:
                row["pre_val"] = pre_rec["history"].get("val_accuracy")
                row["pre_secs"] = pre_rec.get("seconds")
            print("ROW", json.dumps(row), flush=True)
            with open(OUT, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from _report import script_args

    script_args(__doc__)
    main()
