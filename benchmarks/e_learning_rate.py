"""Does E learn too slowly at S's learning rate? (issue 8, validation only)

E is a fresh network (its residual starts at zero) while S starts from the
teacher's weights, and one learning rate serves both. This trains the
demo's E + S arm (shipped ELPV teacher, 4 joint epochs, CL + KD) with E's
variables at MULT x the stage's rate (AdamW's update split into two groups
by patching `pipeline.recipe.make_optimizer`; weight decay unchanged), next
to the bicubic + KD arms, on search seeds (never the demo's), and prints one
JSON row per arm: the kept epoch's validation top-1 and how far E's
thumbnail moved from bicubic (`e_change`: RMS of E - bicubic over the RMS
spread of the bicubic thumbnail, validation images).

    KERAS_BACKEND=tensorflow MULTS=1,10 SEEDS=100,101 \
        STAGES=joint,bicubic_kd,bicubic_kd_equal python benchmarks/e_learning_rate.py

Result (2026-11-29, `docs/results/demo_e_learning_rate.json`): 10x moved E
up to 47% but did not raise validation top-1; the product keeps one rate.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_study as A  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from thumbnet_keras import pipeline  # noqa: E402
from thumbnet_keras.pipeline import presets, recipe  # noqa: E402

MULTS = [float(x) for x in os.environ.get("MULTS", "1,10").split(",")]
SEEDS = [int(x) for x in os.environ.get("SEEDS", "100,101").split(",")]
FACTORS = [int(x) for x in os.environ.get("FACTORS", "2,4").split(",")]
STAGES = os.environ.get("STAGES", "joint").split(",")
EPOCHS = int(os.environ.get("EPOCHS", "4"))
WORK = Path(os.environ.get("WORK", "/tmp/elr/work"))
OUT = os.environ.get("OUT", "/tmp/elr/results.jsonl")
CURRENT = {"mult": 1.0}

orig = recipe.make_optimizer


def patched(config, stage, epochs, steps, model=None):
    opt = orig(config, stage, epochs, steps, model)
    mult = CURRENT["mult"]
    if (
        mult != 1
        and model is not None
        and hasattr(model, "downscaler")
        and stage == "joint"
    ):
        ids = {id(v) for v in model.downscaler.trainable_variables}
        base = opt._backend_update_step

        def step(grads, variables, lr):
            pairs = list(zip(grads, variables))
            e = [p for p in pairs if id(p[1]) in ids]
            s = [p for p in pairs if id(p[1]) not in ids]
            if s:
                base([g for g, _ in s], [v for _, v in s], lr)
            if e:
                base([g for g, _ in e], [v for _, v in e], lr * mult)

        opt._backend_update_step = step
    return opt


recipe.make_optimizer = patched


def e_change(run_dir, factor):
    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.stages import load_run, stage_id

    run, config = load_run(run_dir)
    prepared = Run(run_dir).data()
    e = keras.saving.load_model(
        str(run.stage_dir(stage_id(factor, "joint")) / "downscaler.keras"),
        compile=False,
    )
    b = bicubic_downscaler(e.inputs[0].shape[1:], factor, value_range=(0.0, 1.0))
    batches = split_batches(
        prepared, "validation", config.image_size, config.channels, 64
    )
    num = den = 0.0
    for x, _ in batches:
        te, tb = np.asarray(e(x)), np.asarray(b(x))
        num += float(np.sum((te - tb) ** 2))
        den += float(np.sum((tb - tb.mean()) ** 2))
    return (num / den) ** 0.5


def main():
    for seed in SEEDS:
        for mult in MULTS:
            for stage in STAGES:
                if stage != "joint" and mult != MULTS[0]:
                    continue
                CURRENT["mult"] = mult
                settings = presets.demo()
                settings.pop("run_name")
                settings |= {
                    "seed": seed,
                    "factors": FACTORS,
                    "fm_weight": 0.0,
                    "mm_weight": 0.0,
                    "fm_epochs": 0,
                    "joint_epochs": EPOCHS,
                }
                name = (
                    f"elr-m{mult:g}-s{seed}"
                    if stage == "joint"
                    else f"elr-base-s{seed}"
                )
                run_dir, cfg, prepared = A._resolve(settings, name, WORK)
                pipeline.get_teacher(run_dir, prepared, verbose=0)
                for factor in FACTORS:
                    t0 = time.time()
                    rec = pipeline.train_stage(run_dir, factor, stage, verbose=0)
                    row = {
                        "seed": seed,
                        "mult": mult if stage == "joint" else None,
                        "stage": stage,
                        "factor": factor,
                        "best": rec["selection"]["best_value"],
                        "best_epoch": rec["selection"]["best_epoch"],
                        "val": rec["history"].get("val_accuracy"),
                        "secs": round(time.time() - t0, 1),
                    }
                    if stage == "joint":
                        row["e_change"] = e_change(run_dir, factor)
                    print("ROW", json.dumps(row), flush=True)
                    with open(OUT, "a") as fh:
                        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from _report import script_args

    script_args(__doc__)
    main()
