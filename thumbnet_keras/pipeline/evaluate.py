"""`evaluate_run`: every arm of a `thumbnet` run on the validation and test splits.

Arms (per factor f, plus the teacher once):

* `teacher`: T on full-size images.
* `teacher_bicubic`: T's weights at thumbnail size (S before any training) on
  bicubic thumbnails: what dropping the resolution costs without retraining.
* `teacher_bicubic_bn`: the same with S's BatchNorm statistics re-estimated
  on bicubic thumbnails of train images, no other training.
* `bicubic_cl`: the bicubic baseline (S trained on bicubic thumbnails, CL).
* `bicubic_kd`: the same trained with CL + KD.
* `bicubic_kd_equal`: bicubic + KD at equal cost: S on a larger bicubic
  thumbnail, so that it costs at least E + S's MACs (left out when T's head
  cannot take another size).
* `thumbnet`: E + S from the `joint` stage.

Every trained arm was selected on validation top-1 during training; here each
is evaluated once on test. For each: `top1` (test), `val_top1` (None without
a validation split), `top5` when there are more than 5 classes, multiply-adds
per image of the whole inference model (downscaler included), parameters, and
measured images/s (every model timed side by side at the run's batch size,
taking turns, the median call: `evaluation.latency.measure_throughputs`). Each ThumbNet arm carries `paired`: its top-1 minus
every other arm's on the same test images, with a 95% interval and
McNemar's exact p (`evaluation.paired`), so a difference the test set
cannot resolve is not read as a win or a loss. Written to `evaluation.json`.
"""

from __future__ import annotations

import logging

import keras

from thumbnet_keras.evaluation.accuracy import evaluate_classifier
from thumbnet_keras.evaluation.flops import count_flops, count_params
from thumbnet_keras.evaluation.latency import measure_throughput, measure_throughputs
from thumbnet_keras.pipeline.config import ConfigError
from thumbnet_keras.pipeline.rundir import read_json, write_json
from thumbnet_keras.pipeline.stages import load_run, stage_id

__all__ = [
    "ARM_LABELS",
    "compose",
    "evaluate_model",
    "evaluate_run",
    "paired_comparisons",
]

ARM_LABELS = {
    "teacher": "Teacher (full size)",
    "teacher_bicubic": "Teacher on bicubic thumbnails (no retraining)",
    "teacher_bicubic_bn": "Teacher on bicubic thumbnails, BN re-estimated",
    "bicubic_cl": "Bicubic baseline (CL)",
    "bicubic_kd": "Bicubic + KD",
    "bicubic_kd_equal": "Bicubic + KD on a larger thumbnail",
    "thumbnet": "ThumbNet (E + S)",
}


logger = logging.getLogger(__name__)


def compose(downscaler: keras.Model, student: keras.Model, name: str) -> keras.Model:
    """image -> downscaler -> student -> logits, as a Functional model."""
    image = keras.Input(tuple(downscaler.inputs[0].shape[1:]), name="image")
    return keras.Model(image, student(downscaler(image)), name=name)


def evaluate_model(
    model: keras.Model,
    batches,
    num_classes: int,
    batch_size: int,
    throughput_batches: int,
    validation=None,
    return_correct: bool = False,
) -> dict:
    """Top-1/top-5 on `batches` (test), `val_top1` on `validation` (None when
    not given), MACs, parameters and images/s of one inference model (None
    when `throughput_batches` is 0); with `return_correct`, `"correct"`:
    each test image's top-1 hit (a boolean array, not JSON)."""
    ks = (1, 5) if num_classes > 5 else (1,)
    result = evaluate_classifier(
        model, batches, ks=ks, num_classes=num_classes, return_correct=return_correct
    )
    result["val_top1"] = None
    if validation is not None:
        result["val_top1"] = evaluate_classifier(
            model, validation, ks=(1,), num_classes=num_classes
        )["top1"]
    result["flops"] = count_flops(model)
    result["params"] = count_params(model)["total"]
    result["images_per_second"] = None
    if throughput_batches:
        speed = measure_throughput(
            model, batch_size=batch_size, batches=throughput_batches
        )
        result["images_per_second"] = speed["images_per_second"]
    return result


def paired_comparisons(correct: dict, factor: int) -> list[dict]:
    """ThumbNet at `factor` against the teacher and every other arm of that
    factor, on the same test images. `correct`: `{(arm, factor): per-image
    top-1 hits}` (the teacher's factor is None)."""
    from thumbnet_keras.evaluation.paired import paired_difference

    ours = correct[("thumbnet", factor)]
    return [
        {"versus": name, **paired_difference(ours, hits)}
        for (name, arm_factor), hits in correct.items()
        if name != "thumbnet" and arm_factor in (None, factor)
    ]


def check_files_unchanged(prepared: dict, run_dir: str) -> None:
    """Raises `ConfigError` naming the validation and test images changed,
    made unreadable or removed since the run's data were prepared: the
    pipeline reads them in place, and scored they would give figures for
    another test set than the one the run was selected and reported on (a
    trial changed a test image and `thumbnet evaluate` scored it without a
    word; an unreadable one gave TensorFlow's decode traceback)."""
    from thumbnet_keras.data import PreparedDataset

    dataset = PreparedDataset.load(prepared["prepared_dir"])
    changed = dataset.changed_files(("validation", "test"))
    if not changed:
        return
    shown = "; ".join(f"{path}: {reason}" for path, reason in changed[:3])
    more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
    raise ConfigError(
        f"Run {run_dir!r}: {len(changed)} validation/test image(s) changed since "
        f"its data were prepared: {shown}{more}. Scoring them would not measure "
        "the test set the run was selected and reported on. Restore the files, "
        "or train a new run on the data as it is now."
    )


# What an evaluation.json measured, by version: 2 since 2026-11-30 (MACs
# count E's bicubic passes per channel and a `Resizing`'s first pass at its
# real size; images/s timed for every model side by side). Bump it when a
# change makes the figures of older files differ; those are made again.
EVALUATION_VERSION = 2


def evaluate_run(run_dir: str, force: bool = False) -> dict:
    """Evaluates every arm; skipped when `evaluation.json` exists (unless
    `force`) and was written under this `EVALUATION_VERSION` (a rerun of a
    run made by an older version printed its figures, counted otherwise,
    under this version's description of them: an upgrade trial).

    Returns:
        `{"path": evaluation.json, "arms": [{name, label, factor, input_size,
        top1, val_top1, [top5], flops, params, images_per_second, examples},
        ...]}`. Each `thumbnet` arm also has `paired`: ThumbNet against every
        other arm of its factor and the teacher on the same test images
        (`[{"versus": name, "difference", "ci95", "p_value", "a_only",
        "b_only", "examples"}]`, `evaluation.paired.paired_difference` with
        ThumbNet as A).
    """
    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.models.student import make_student
    from thumbnet_keras.pipeline.datasets import split_batches, test_batches
    from thumbnet_keras.pipeline.equal_cost import resize_downscaler

    run, config = load_run(run_dir)
    path = run.file("evaluation.json")
    if path.is_file() and not force:
        saved = read_json(path)
        if saved.get("evaluation_version") == EVALUATION_VERSION:
            logger.info("[evaluate] already finished, skipped")
            return saved | {"skipped": True}
        logger.info(
            "[evaluate] evaluation.json was written by an older thumbnet-keras, "
            "which counted MACs or timed images/s otherwise: evaluating again"
        )
    prepared = run.data(require=True)
    check_files_unchanged(prepared, run_dir)
    classes = prepared["num_classes"]
    shape = (config.image_size, config.image_size, config.channels)
    test = test_batches(prepared, config.image_size, config.channels, config.batch_size)
    validation = split_batches(
        prepared, "validation", config.image_size, config.channels, config.batch_size
    )

    def load(p):
        return keras.saving.load_model(str(p), compile=False)

    teacher = load(run.teacher_keras)
    from thumbnet_keras.data.pipeline import value_range as _range

    value_range = _range(prepared["normalization"])
    models: list[tuple[str, int | None, int, keras.Model]] = [
        ("teacher", None, config.image_size, teacher)
    ]
    for factor in config.factors:
        size = config.image_size // factor
        bicubic = bicubic_downscaler(shape, factor, value_range=value_range)
        untrained = make_student(teacher, factor)
        models.append(
            ("teacher_bicubic", factor, size,
             compose(bicubic, untrained, "teacher_bicubic"))
        )  # fmt: skip
        for stage in ("teacher_bicubic_bn", "bicubic_cl", "bicubic_kd"):
            student = load(run.stage_dir(stage_id(factor, stage)) / "student.keras")
            models.append((stage, factor, size, compose(bicubic, student, stage)))
        equal = read_json(run.stage_record(stage_id(factor, "bicubic_kd_equal")))
        if "unavailable" not in equal:
            stage_dir = run.stage_dir(stage_id(factor, "bicubic_kd_equal"))
            resize = resize_downscaler(shape, equal["input_size"], value_range)
            student = load(stage_dir / "student.keras")
            models.append(
                ("bicubic_kd_equal", factor, equal["input_size"],
                 compose(resize, student, "bicubic_kd_equal"))
            )  # fmt: skip
        joint = run.stage_dir(stage_id(factor, "joint"))
        models.append(
            (
                "thumbnet",
                factor,
                size,
                compose(
                    load(joint / "downscaler.keras"),
                    load(joint / "student.keras"),
                    "thumbnet",
                ),
            )
        )
    arms, correct = [], {}
    for name, factor, size, model in models:
        logger.info("[evaluate] %s%s", name, f" f={factor}" if factor else "")
        result = evaluate_model(
            model,
            test,
            classes,
            config.batch_size,
            throughput_batches=0,  # below, every model side by side
            validation=validation,
            return_correct=True,
        )
        correct[(name, factor)] = result.pop("correct")
        arms.append(
            {
                "name": name,
                "label": ARM_LABELS[name],
                "factor": factor,
                "input_size": size,
                **result,
            }
        )
    logger.info("[evaluate] images/s, every model side by side")
    speeds = measure_throughputs(
        {str(i): model for i, (*_, model) in enumerate(models)},
        batch_size=config.batch_size,
        batches=config.throughput_batches,
    )
    for i, arm in enumerate(arms):
        arm["images_per_second"] = speeds[str(i)]["images_per_second"]
    for arm in arms:
        if arm["name"] == "thumbnet":
            arm["paired"] = paired_comparisons(correct, arm["factor"])
    evaluation = {
        "path": str(path),
        "evaluation_version": EVALUATION_VERSION,
        "arms": arms,
    }
    write_json(path, evaluation)
    return evaluation
