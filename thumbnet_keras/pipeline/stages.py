"""The training steps of a `thumbnet` run, each resumable and skipped once done.

* `get_teacher`: stage 0. Loads a teacher file, builds a backbone with given
  weights, or trains the backbone on the dataset.
* `train_stage(run_dir, factor, stage)` for `stage` in:
  - `"fm_pretrain"`: ThumbNet stage 1, E and S with FM + MM (no labels);
  - `"joint"`: ThumbNet stage 2, CL + KD + FM + MM, from stage 1's weights;
  - `"bicubic_cl"`: the bicubic baseline: S (initialized from T) trained on
    bicubic thumbnails with CL only, for ThumbNet's whole epoch budget (the
    "retrain at low resolution" a practitioner would try first);
  - `"bicubic_kd"`: the same with CL + KD from T.

Every step reads the run's `config.json` and `data.json`, checkpoints every
epoch under `checkpoints/<stage>/`, and when finished writes its models to
`stages/<stage>/` and its record to `stages/<stage>.json` (the record is
written last: its presence means the stage is done, and a rerun skips it).
"""

from __future__ import annotations

import shutil
import warnings

from thumbnet_keras.pipeline.checkpoint import fit_resumable
from thumbnet_keras.pipeline.config import ConfigError, RunConfig
from thumbnet_keras.pipeline.rundir import (
    Run,
    atomic_write,
    read_json,
    save_keras,
    write_json,
)

__all__ = ["STAGES", "get_teacher", "stage_id", "train_stage", "load_run"]

STAGES = ("fm_pretrain", "joint", "bicubic_cl", "bicubic_kd")


def stage_id(factor: int, stage: str) -> str:
    """`f<factor>-<stage>`, the name of a stage's record and folders."""
    return f"f{factor}-{stage}"


def load_run(run_dir: str) -> tuple[Run, RunConfig]:
    """The run folder and its `RunConfig`."""
    run = Run(run_dir)
    return run, RunConfig.from_json(run.config()["config"])


def _log(message: str) -> None:
    print(message, flush=True)


def _image_shape(config: RunConfig) -> tuple[int, int, int]:
    return (config.image_size, config.image_size, config.channels)


def _value_range(prepared: dict):
    # Unit-normalized images live in [0, 1]; clip thumbnails there too.
    return (0.0, 1.0) if prepared["normalization"] == "unit" else None


def _load(path):
    import keras

    return keras.saving.load_model(str(path), compile=False)


def _finish(run: Run, sid: str, record: dict) -> dict:
    write_json(run.stage_record(sid), record)
    shutil.rmtree(run.checkpoint_dir(sid), ignore_errors=True)
    try:
        run.checkpoint_dir(sid).parent.rmdir()  # Only when no stage is left.
    except OSError:
        pass
    _log(f"[{sid}] done")
    return record


def _skip(run: Run, sid: str) -> dict:
    record = read_json(run.stage_record(sid))
    _log(f"[{sid}] already finished, skipped")
    return record | {"skipped": True}


def _classifier_loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def get_teacher(run_dir: str, prepared: dict, verbose: int | str = "auto") -> dict:
    """Stage 0: the run's teacher, saved as `teacher.keras`.

    Records `prepared` (the dataset summary from `prepare_dataset`) as
    `data.json`, then, unless already done: loads `config.teacher`, or builds
    `config.backbone` with `config.backbone_weights`, or trains the backbone
    for `config.teacher_epochs` (checkpointed every epoch).

    Returns:
        The stage record: `source` ("file", "weights" or "trained"), path,
        epochs, history, seconds, `num_classes`.
    """
    import keras

    from thumbnet_keras.models import backbones
    from thumbnet_keras.pipeline.resolve import check_teacher_file

    run, config = load_run(run_dir)
    write_json(run.data_json, prepared)
    sid = "teacher"
    if run.is_done(sid):
        return _skip(run, sid)
    shape, classes = _image_shape(config), prepared["num_classes"]
    fit = {"history": {}, "epochs": 0, "resumed_from": [], "seconds": 0.0}
    if config.teacher is not None:
        check_teacher_file(config.teacher, shape, classes)
        teacher, source = _load(config.teacher), "file"
    elif config.backbone_weights is not None:
        teacher = backbones.build(
            config.backbone,
            shape,
            classes,
            weights=config.backbone_weights,
            **config.backbone_options,
        )
        source = "weights"
    else:
        _log(f"[{sid}] training {config.backbone} for {config.teacher_epochs} epochs")
        keras.utils.set_random_seed(config.seed)
        teacher = backbones.build(
            config.backbone, shape, classes, **config.backbone_options
        )
        teacher.compile(
            optimizer=keras.optimizers.Adam(config.learning_rate),
            loss=_classifier_loss(),
            metrics=["accuracy"],
        )
        train, _ = _datasets(config, prepared)
        fit = fit_resumable(
            teacher,
            train,
            config.teacher_epochs,
            run.checkpoint_dir(sid),
            verbose=verbose,
            log=_log,
        )
        source = "trained"
    save_keras(teacher, run.teacher_keras)
    record = {
        "stage": sid,
        "source": source,
        "path": str(run.teacher_keras),
        "backbone": teacher.name,
        "num_classes": classes,
        **fit,
    }
    return _finish(run, sid, record)


def _datasets(config: RunConfig, prepared: dict):
    from thumbnet_keras.pipeline.datasets import run_datasets

    return run_datasets(
        prepared, config.image_size, config.channels, config.batch_size, config.seed
    )


def _build_adapter(trainer) -> None:
    # The trainer and its FM adapter are built lazily at the first step; build
    # them now so that weights and optimizer state can be restored first.
    if not trainer.built:
        shape = tuple(trainer.downscaler.inputs[0].shape[1:])
        trainer.build((None, *shape))
    if trainer.fm_adapter is not None and not trainer.fm_adapter.built:
        layer = trainer.student.get_layer(trainer.student_feature_layer)
        trainer.fm_adapter.build(tuple(layer.output.shape))


def _trainer(config, prepared, teacher, downscaler, student, stage, **weights):
    from thumbnet_keras.models.trainer import ThumbNetTrainer

    loss_weights = dict(
        cl_weight=config.cl_weight,
        kd_weight=config.kd_weight,
        fm_weight=config.fm_weight,
        mm_weight=config.mm_weight,
    )
    loss_weights.update(weights)
    trainer = ThumbNetTrainer(
        teacher=teacher,
        downscaler=downscaler,
        student=student,
        stage=stage,
        temperature=config.temperature,
        **loss_weights,
    )
    _build_adapter(trainer)
    return trainer


def _thumbnet_trainer(run: Run, config: RunConfig, prepared: dict, factor: int, stage):
    """The (E, S) trainer of a ThumbNet stage, starting where it should."""
    from thumbnet_keras.layers.downscaler import build_downscaler
    from thumbnet_keras.models.student import make_student

    teacher = _load(run.teacher_keras)
    downscaler = build_downscaler(
        _image_shape(config),
        factor,
        width=config.downscaler_width,
        depth=config.downscaler_depth,
        value_range=_value_range(prepared),
    )
    student = make_student(teacher, factor)
    trainer = _trainer(config, prepared, teacher, downscaler, student, stage)
    previous = stage_id(factor, "fm_pretrain")
    if stage == "joint" and run.is_done(previous):
        trainer.load_weights(str(run.stage_dir(previous) / "trainer.weights.h5"))
    return trainer


def train_stage(
    run_dir: str, factor: int, stage: str, verbose: int | str = "auto"
) -> dict:
    """Trains one stage for one factor (see the module docstring).

    Returns:
        The stage record: stage, factor, epochs, history (per-epoch metrics,
        `loss`, `cl_loss`, ...), `resumed_from`, seconds, model paths.
    """
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.models.student import make_student

    if stage not in STAGES:
        raise ConfigError(f"Unknown stage {stage!r}; stages: {', '.join(STAGES)}.")
    run, config = load_run(run_dir)
    sid = stage_id(factor, stage)
    if run.is_done(sid):
        return _skip(run, sid)
    prepared = run.data()
    keras.utils.set_random_seed(config.seed + factor)
    out = run.stage_dir(sid)
    if stage in ("fm_pretrain", "joint"):
        epochs = config.fm_epochs if stage == "fm_pretrain" else config.joint_epochs
        model = _thumbnet_trainer(run, config, prepared, factor, stage)
        metrics = ["accuracy"] if stage == "joint" else None
        model.compile(
            optimizer=keras.optimizers.Adam(config.learning_rate), metrics=metrics
        )
    else:
        epochs = config.baseline_epochs
        teacher = _load(run.teacher_keras)
        bicubic = bicubic_downscaler(
            _image_shape(config), factor, value_range=_value_range(prepared)
        )
        student = make_student(teacher, factor)
        if stage == "bicubic_cl":
            image = keras.Input(_image_shape(config), name="image")
            model = keras.Model(image, student(bicubic(image)), name="bicubic_student")
            model.compile(
                optimizer=keras.optimizers.Adam(config.learning_rate),
                loss=_classifier_loss(),
                metrics=["accuracy"],
            )
        else:
            model = _trainer(
                config,
                prepared,
                teacher,
                bicubic,
                student,
                "joint",
                fm_weight=0.0,
                mm_weight=0.0,
            )
            model.compile(
                optimizer=keras.optimizers.Adam(config.learning_rate),
                metrics=["accuracy"],
            )
    _log(f"[{sid}] training for {epochs} epochs")
    train, _ = _datasets(config, prepared)
    with warnings.catch_warnings():
        # fm_pretrain does not use S's logits layer: Keras warns it has no gradient.
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        fit = fit_resumable(
            model, train, epochs, run.checkpoint_dir(sid), verbose=verbose, log=_log
        )
    paths = {}
    if stage in ("fm_pretrain", "joint"):
        # The trainer's weights (E, S, FM adapter) start the next stage.
        atomic_write(out / "trainer.weights.h5", model.save_weights)
        paths["trainer_weights"] = str(out / "trainer.weights.h5")
        paths["downscaler"] = save_keras(model.downscaler, out / "downscaler.keras")
        paths["student"] = save_keras(model.student, out / "student.keras")
    else:
        student = model.student if stage == "bicubic_kd" else student
        paths["student"] = save_keras(student, out / "student.keras")
    record = {"stage": stage, "factor": factor, "id": sid, "paths": paths, **fit}
    return _finish(run, sid, record)
