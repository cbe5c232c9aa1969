"""P2: what a ThumbNet joint train step costs next to the teacher's own.

Side by side on one batch, interleaved (each round times every variant once,
so a change in the machine's load hits all of them alike); medians over the
rounds. Variants, all compiled by Keras the same way (`train_on_batch` /
`predict_on_batch` after a warm-up call):

* `teacher_train`: T's own train step (SGD + momentum, cross-entropy);
* `joint`: the `ThumbNetTrainer` joint step at factor f (CL + KD + FM + MM);
* `fm_pretrain`: the trainer's MM + FM step;
* `teacher_forward`: T in inference mode on the full image (what the joint
  step needs from T);
* `student_train`: E + S as one model, train step with cross-entropy only
  (the part of the joint step that must be trained);
* `student_forward`: E + S inference;
* `downscaler_train`: E alone, a train step on an MSE to the bicubic
  thumbnail (E's own forward + backward at full resolution).

The ideal joint step is about `teacher_forward + student_train`; the rest
(`joint - teacher_forward - student_train`) is the loss terms' overhead
(FM pooling, MM moments, KD softmax) and the framework's. P2's goal:
`joint / teacher_train <= 0.7` at f=2.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/train_step_cost.py \\
        --backbone resnet18 --image-size 128 --batch 16 --factor 2 \\
        --out docs/results/train_step_cost.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--downscaler-width", type=int, default=None, help="None: auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras
    import numpy as np

    from thumbnet_keras import (
        ThumbNetTrainer,
        auto_downscaler_width,
        backbones,
        bicubic_downscaler,
        build_downscaler,
        count_flops,
        make_student,
    )

    keras.utils.set_random_seed(0)
    shape = (args.image_size, args.image_size, 3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.batch,) + shape).astype("float32")
    y = rng.integers(0, args.classes, args.batch).astype("int32")

    def sgd():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher = backbones.build(args.backbone, shape, args.classes)
    teacher.compile(optimizer=sgd(), loss=ce)
    frozen = backbones.build(args.backbone, shape, args.classes)
    frozen.set_weights(teacher.get_weights())
    student = make_student(frozen, args.factor)
    width = args.downscaler_width or auto_downscaler_width(shape, args.factor, student)
    downscaler = build_downscaler(shape, factor=args.factor, width=width)
    trainers = {}
    for stage in ("joint", "fm_pretrain"):
        trainer = ThumbNetTrainer(frozen, downscaler, student, stage=stage)
        trainer.compile(optimizer=sgd())
        trainers[stage] = trainer
    image = keras.Input(shape)
    e_s = keras.Model(image, student(downscaler(image)))
    e_s.compile(optimizer=sgd(), loss=ce)
    target = np.asarray(bicubic_downscaler(shape, args.factor)(x))
    e_alone = keras.Model(image, downscaler(image))
    e_alone.compile(optimizer=sgd(), loss="mse")

    variants = {
        "teacher_train": lambda: teacher.train_on_batch(x, y),
        "joint": lambda: trainers["joint"].train_on_batch(x, y),
        "fm_pretrain": lambda: trainers["fm_pretrain"].train_on_batch(x),
        "teacher_forward": lambda: frozen.predict_on_batch(x),
        "student_train": lambda: e_s.train_on_batch(x, y),
        "student_forward": lambda: e_s.predict_on_batch(x),
        "downscaler_train": lambda: e_alone.train_on_batch(x, target),
    }
    for fn in variants.values():  # compile and warm up
        fn()
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {k: round(1000 * float(np.median(v)), 2) for k, v in times.items()}
    t = ms["teacher_train"]
    result = {
        "benchmark": "train_step_cost",
        "backend": keras.backend.backend(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch": args.batch,
        "factor": args.factor,
        "downscaler_width": width,
        "macs": {
            "teacher": int(count_flops(teacher)),
            "student": int(count_flops(student)),
            "downscaler": int(count_flops(downscaler)),
        },
        "median_ms": ms,
        "share_of_teacher_train": {k: round(v / t, 3) for k, v in ms.items()},
        "P2_joint_over_teacher_train": round(ms["joint"] / t, 3),
        "ideal_joint_over_teacher_train": round(
            (ms["teacher_forward"] + ms["student_train"]) / t, 3
        ),
        "loss_overhead_ms": round(
            ms["joint"] - ms["teacher_forward"] - ms["student_train"], 2
        ),
        "rounds": args.rounds,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "command": f"KERAS_BACKEND={keras.backend.backend()} python "
        "benchmarks/train_step_cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
