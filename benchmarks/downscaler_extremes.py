"""Does E gain from each block's extremes? (issue 8, ELPV f = 4, validation only)

A crack 1-2 px wide in a 128x128 cell fades to a quarter of its contrast in a
4x4-block average; the darkest pixel of the block keeps it. This gives E's
residual branch each f x f block's max and min (`MaxPooling2D` of the image
and of its negative, no multiply-adds) next to the space-to-depth pixels
and the bicubic thumbnail (`es_ext`), against the product's E (`es`) and
bicubic + KD, at the demo's settings (shipped teacher, 4 joint epochs, CL +
KD), on search seeds, with a 30% validation split (590 cells instead of
the demo's 197; a copy of data_manifests/elpv.yaml written to WORK). Every
arm's per-cell validation hits are saved, so arms of one seed compare
paired (`evaluation.paired`).

    KERAS_BACKEND=tensorflow python benchmarks/downscaler_extremes.py

Result (2026-11-29, `docs/results/downscaler_extremes.json`): no gain.
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

import thumbnet_keras.layers.downscaler as D  # noqa: E402
from thumbnet_keras import pipeline  # noqa: E402
from thumbnet_keras.pipeline import presets  # noqa: E402

SEEDS = [int(x) for x in os.environ.get("SEEDS", "100,101,102").split(",")]
ARMS = os.environ.get("ARMS", "bicubic_kd,es,es_ext").split(",")
EPOCHS = int(os.environ.get("EPOCHS", "4"))
FACTOR = int(os.environ.get("FACTOR", "4"))
WORK = Path(os.environ.get("WORK", "/tmp/downscaler_extremes"))
OUT = os.environ.get("OUT", str(WORK / "results.jsonl"))
STATE = {"ext": False}
orig_build = D.build_downscaler


def build(
    input_shape,
    factor,
    width=16,
    depth=2,
    kernel_size=3,
    value_range=None,
    variant="space_to_depth",
    name="downscaler",
):
    if not STATE["ext"]:
        return orig_build(
            input_shape, factor, width, depth, kernel_size, value_range, variant, name
        )
    h, w, c = D.validate_image_shape(input_shape, factor)
    value_range = D.validate_value_range(value_range)
    inputs = keras.Input((h, w, c), name="image")
    base = D._bicubic_branch(inputs, h, w, c, factor)
    x = D.space_to_depth(inputs, factor)
    hi = keras.layers.MaxPooling2D(factor, name="block_max")(inputs)
    neg = keras.layers.Rescaling(-1.0, name="negate")(inputs)
    lo = keras.layers.MaxPooling2D(factor, name="block_min_negated")(neg)
    x = keras.layers.Concatenate(name="with_bicubic")([x, base, hi, lo])
    x = keras.layers.Conv2D(width, 1, activation="relu", name="mix_conv")(x)
    for i in range(depth):
        x = keras.layers.SeparableConv2D(
            width,
            kernel_size,
            padding="same",
            activation="relu",
            name=f"body{i}_sepconv",
        )(x)
    residual = keras.layers.Conv2D(
        c,
        kernel_size,
        padding="same",
        kernel_initializer="zeros",
        bias_initializer="zeros",
        name="residual_conv",
    )(x)
    x = keras.layers.Add(name="thumbnail")([base, residual])
    x = D.clip_to_range(x, value_range, name="clip")
    return keras.Model(inputs, x, name=name)


D.build_downscaler = build


def val_correct(run_dir, arm):
    from thumbnet_keras.evaluation.accuracy import evaluate_classifier
    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.evaluate import compose
    from thumbnet_keras.pipeline.stages import load_run, stage_id

    run, config = load_run(run_dir)
    prepared = Run(run_dir).data()
    stage = "joint" if arm.startswith("es") else arm
    folder = run.stage_dir(stage_id(FACTOR, stage))

    def load(p):
        return keras.saving.load_model(str(folder / p), compile=False)

    if stage == "joint":
        e = load("downscaler.keras")
    elif stage == "bicubic_kd_equal":  # S on the larger, equal-cost thumbnail
        from thumbnet_keras.pipeline.equal_cost import resize_downscaler
        from thumbnet_keras.pipeline.rundir import read_json

        size = read_json(run.stage_record(stage_id(FACTOR, stage)))["input_size"]
        e = resize_downscaler(
            (config.image_size, config.image_size, config.channels), size, (0.0, 1.0)
        )
    else:
        e = D.bicubic_downscaler(
            (config.image_size, config.image_size, config.channels),
            FACTOR,
            value_range=(0.0, 1.0),
        )
    model = compose(e, load("student.keras"), "m")
    batches = split_batches(
        prepared, "validation", config.image_size, config.channels, 64
    )
    r = evaluate_classifier(model, batches, ks=(1,), return_correct=True)
    return r["correct"]


def _manifest() -> str:
    """data_manifests/elpv.yaml with a 30% validation split."""
    source = Path(__file__).resolve().parents[1] / "data_manifests" / "elpv.yaml"
    text = source.read_text().replace(
        "validation_fraction: 0.1", "validation_fraction: 0.3"
    )
    path = WORK / "elpv_val30.yaml"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("name: elpv", "name: elpv_val30", 1))
    return str(path)


def main():
    MANIFEST = _manifest()
    for seed in SEEDS:
        for arm in ARMS:
            STATE["ext"] = arm == "es_ext"
            settings = presets.demo()
            settings.pop("run_name")
            settings |= {
                "dataset": MANIFEST,
                "seed": seed,
                "factors": [FACTOR],
                "fm_weight": 0.0,
                "mm_weight": 0.0,
                "fm_epochs": 0,
                "joint_epochs": EPOCHS,
            }
            run_dir, cfg, prepared = A._resolve(
                settings, f"x{FACTOR}-{arm}-e{EPOCHS}-s{seed}", WORK
            )
            pipeline.get_teacher(run_dir, prepared, verbose=0)
            stage = "joint" if arm.startswith("es") else arm
            t0 = time.time()
            rec = pipeline.train_stage(run_dir, FACTOR, stage, verbose=0)
            correct = val_correct(run_dir, arm)
            np.save(WORK / f"correct-{arm}-e{EPOCHS}-s{seed}.npy", correct)
            row = {
                "seed": seed,
                "arm": arm,
                "epochs": EPOCHS,
                "factor": FACTOR,
                "best": rec["selection"]["best_value"],
                "best_epoch": rec["selection"]["best_epoch"],
                "val": rec["history"].get("val_accuracy"),
                "n_val": int(len(correct)),
                "secs": round(time.time() - t0, 1),
            }
            print("ROW", json.dumps(row), flush=True)
            with open(OUT, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from _report import script_args

    script_args(__doc__)
    main()
