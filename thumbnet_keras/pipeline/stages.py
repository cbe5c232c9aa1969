"""The training steps of a `thumbnet` run, each resumable and skipped once done.

* `get_teacher`: stage 0. Loads a teacher (a file, or a keras.applications /
  keras-hub classifier with its preprocessing inside, `models.teachers`: the
  run then feeds raw [0, 255] pixels, `normalization` "raw" in `data.json`),
  builds a backbone with given weights, or trains the backbone on the
  dataset.
* `train_stage(run_dir, factor, stage)` for `stage` in:
  - `"teacher_bicubic_bn"`: no training: S = T's weights at thumbnail size
    with its BatchNorm statistics re-estimated on bicubic thumbnails of train
    images (the cheap fix practitioners try first);
  - `"e_pretrain"`: E alone, trained through the frozen teacher: the
    teacher reads E's thumbnail scaled back up to full size, with CL + KD
    (`models.DownscalerPretrainer`; not run when `e_pretrain_epochs` is 0);
    not in the paper (docs/design.md);
  - `"fm_pretrain"`: ThumbNet stage 1, E and S with FM + MM (no labels; not
    run when `fm_epochs` is 0, the default);
  - `"joint"`: ThumbNet stage 2, CL + KD (+ FM + MM by their weights), from
    stage 1's weights, or from T's (S) and e_pretrain's or a fresh E when
    stage 1 did not run;
  - `"bicubic_cl"`: the bicubic baseline: S (initialized from T) trained on
    bicubic thumbnails with CL only, for ThumbNet's whole epoch budget (the
    "retrain at low resolution" a practitioner would try first);
  - `"bicubic_kd"`: the same with CL + KD from T;
  - `"bicubic_kd_equal"`: bicubic + KD at equal cost: S on a bicubic
    thumbnail a little larger than H/f, so that bicubic + S costs at least
    as many MACs as E + S (`pipeline.equal_cost`).

The recipe (`pipeline.recipe`): AdamW or SGD-Nesterov with weight decay, a
linear warm-up then cosine decay over each stage, label smoothing on CL, a
learning rate per stage. Every stage with labels evaluates validation top-1
after each epoch and keeps its best epoch (`fit_resumable`); `fm_pretrain`
(no labels) keeps its last; `e_pretrain` keeps its best epoch on the
teacher's validation top-1 on E's up-scaled thumbnails. Every stage that
starts S from T's weights re-estimates S's BatchNorm statistics first
(`config.bn_batches`), on train thumbnails of bicubic or, after e_pretrain,
of its E.

Every step reads the run's `config.json` and `data.json`, checkpoints every
epoch under `checkpoints/<stage>/`, and when finished writes its models to
`stages/<stage>/` and its record to `stages/<stage>.json` (the record is
written last: its presence means the stage is done, and a rerun skips it).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from thumbnet_keras.pipeline import progress
from thumbnet_keras.pipeline.checkpoint import fit_resumable, load_checkpoint
from thumbnet_keras.pipeline.compute import (
    active_replicas,
    even_batches,
    jit_compile_option,
    prepare_model,
    run_compute,
)
from thumbnet_keras.pipeline.config import ConfigError, RunConfig
from thumbnet_keras.pipeline.health import configure_determinism, default_seed_scope
from thumbnet_keras.pipeline.rundir import (
    DamagedFileError,
    PreparedAgainError,
    Run,
    atomic_write,
    is_unstarted,
    read_json,
    same_data,
    save_keras,
    write_json,
)

__all__ = [
    "STAGES",
    "build_run_downscaler",
    "get_teacher",
    "load_run",
    "stage_id",
    "train_stage",
]

STAGES = (
    "teacher_bicubic_bn",
    "e_pretrain",
    "fm_pretrain",
    "joint",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
)
# Stages whose S starts from T's weights (BatchNorm re-estimated first).
_FROM_TEACHER = ("fm_pretrain", "bicubic_cl", "bicubic_kd", "bicubic_kd_equal")


def stage_id(factor: int, stage: str) -> str:
    """`f<factor>-<stage>`, the name of a stage's record and folders."""
    return f"f{factor}-{stage}"


def load_run(run_dir: str) -> tuple[Run, RunConfig]:
    """The run folder and its `RunConfig`."""
    run = Run(run_dir)
    return run, RunConfig.from_json(run.config()["config"])


logger = logging.getLogger(__name__)


def _log(message: str) -> None:
    logger.info(message)


def _image_shape(config: RunConfig) -> tuple[int, int, int]:
    return (config.image_size, config.image_size, config.channels)


def _value_range(prepared: dict):
    # Unit-normalized images live in [0, 1], raw ones in [0, 255]; clip
    # thumbnails there too.
    from thumbnet_keras.data.pipeline import value_range

    return value_range(prepared["normalization"])


def _load(path):
    import keras

    # Under the run's precision (and synchronized BatchNorm), `run_compute`.
    return prepare_model(keras.saving.load_model(str(path), compile=False))


def _finish(run: Run, sid: str, record: dict) -> dict:
    """Records a stage trained now: its model files (`outputs`, checked when a
    rerun skips it), and drops the run's evaluation, which scored the models
    before this stage trained again (a stage retrained after its folder was
    deleted left evaluation.json, metrics.json and the report as they were).

    First the run's prepared data is checked again (`Run.data`): another run
    on the same manifest may have prepared it again while this stage trained
    (a Prefect trial: a baseline trained on the other run's split, was
    recorded as finished, and the report scored it on images it had trained
    on). Such a stage is not recorded, and its checkpoints are dropped, so a
    rerun on restored files trains it again from the start (its model files,
    unrecorded, go too). A data folder merely not found keeps them: moving it
    back is the fix."""
    try:
        run.data(require=True)
    except PreparedAgainError:
        run.discard_checkpoints(sid)
        if sid == "teacher":
            run.teacher_keras.unlink(missing_ok=True)
        else:
            shutil.rmtree(run.stage_dir(sid), ignore_errors=True)
        raise
    folder = run.stage_dir(sid)
    if folder.is_dir():  # (Not the temporary files of a killed attempt.)
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        record = {**record, "outputs": files}
    # Each model file's digest, checked when a rerun skips the stage: a
    # damaged file passed the existence check (a resume trial: a truncated
    # teacher.keras shipped with rc 0; a truncated student.keras failed
    # export with "File not found" for a file that was there).
    record = {**record, "sha256": _digests(_outputs(run, sid, record))}
    # How many replicas it trained on (config.json says data_parallel, not
    # how many devices there were: a platform trial's run found one).
    record = {**record, "replicas": active_replicas()}
    # The evaluation goes before the record is written: killed between the
    # two, a rerun skipped the retrained stage and reported the old model's
    # scores from the evaluation left behind (a resume trial).
    evaluation = run.file("evaluation.json")
    if evaluation.is_file():
        _log(f"[{sid}] trained again: the run's evaluation is redone")
        evaluation.unlink()
    write_json(run.stage_record(sid), record)
    run.discard_checkpoints(sid)
    progress.stage_done(run, sid, record)  # "[k/N] <stage>: done in ..."
    return record


def _outputs(run: Run, sid: str, record: dict) -> list[Path]:
    """The model files finished stage `sid` wrote."""
    if sid == "teacher":
        return [run.teacher_keras]
    return [run.stage_dir(sid) / name for name in record.get("outputs", [])]


def _digests(paths: list[Path]) -> dict[str, str]:
    from thumbnet_keras.deploy.metadata import model_sha256

    return {path.name: model_sha256(path) for path in paths if path.exists()}


def _skip(run: Run, sid: str) -> dict:
    """A finished stage's record; `ConfigError` when a model file it wrote is
    gone (a rerun went on to fail in a later step with a traceback)."""
    record = read_json(run.stage_record(sid))
    wanted = _outputs(run, sid, record)
    _check_outputs(run, sid, wanted)
    recorded = record.get("sha256") or {}  # (None in records made before it)

    def damaged(path: Path) -> bool:
        if path.name in recorded:
            return _digests([path])[path.name] != recorded[path.name]
        # A record made before the digests: a model file that is no readable
        # archive at least (a truncated one was "File not found" in three
        # tracebacks, at export: an upgrade trial).
        return not _readable_keras(path)

    changed = [str(path.relative_to(run.path)) for path in wanted if damaged(path)]
    if changed:
        again = (
            "start a new run (another --run-name): every later stage of this "
            "run learned from that teacher"
            if sid == "teacher"
            else f"delete {str(run.stage_record(sid).relative_to(run.path))} and "
            f"{str(run.stage_dir(sid).relative_to(run.path))}/ in the run folder "
            "to train the stage again"
        )
        raise DamagedFileError(
            f"Stage {sid} of run {str(run.path)!r} finished, but "
            f"{', '.join(changed)} changed since (damaged, or replaced): restore "
            f"it from a copy, or {again}."
        )
    # Left by a process killed between the record and their removal; a stage
    # trained again after its record was deleted would resume from them.
    run.discard_checkpoints(sid)
    _log(f"[{sid}] already finished, skipped")
    return record | {"skipped": True}


def _readable_keras(path: Path) -> bool:
    """Whether a `.keras` file is a zip archive holding a model's config
    (other files: True, not checked)."""
    import zipfile

    if path.suffix != ".keras":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _check_outputs(run: Run, sid: str, wanted: list[Path]) -> None:
    """`ConfigError` naming the files of finished stage `sid` that are gone."""
    missing = [str(path.relative_to(run.path)) for path in wanted if not path.is_file()]
    if missing and sid == "teacher":
        # Deleting its record would train or load a new teacher under
        # students distilled from the old one.
        raise ConfigError(
            f"Run {str(run.path)!r}: its teacher, {missing[0]}, is gone. Restore "
            "it, or start a new run (another --run-name): every later stage of "
            "this run learned from that teacher."
        )
    if missing:
        raise ConfigError(
            f"Stage {sid} of run {str(run.path)!r} finished, but "
            f"{', '.join(missing)} is gone. Restore it, or delete "
            f"{str(run.stage_record(sid).relative_to(run.path))} in the run folder to "
            "train the stage again, and rerun."
        )


def _classifier_loss(config: RunConfig):
    from thumbnet_keras.pipeline.recipe import SparseCrossentropy

    return SparseCrossentropy(label_smoothing=config.label_smoothing)


def _compile(model, config: RunConfig, prepared: dict, stage: str, epochs: int,
             loss=None, metrics=("accuracy",)):  # fmt: skip
    from thumbnet_keras.pipeline.recipe import make_optimizer, steps_per_epoch

    steps = steps_per_epoch(prepared, config.batch_size)
    model.compile(
        optimizer=make_optimizer(config, stage, epochs, steps, model),
        loss=loss,
        metrics=list(metrics) if metrics else None,
        jit_compile=jit_compile_option(config.jit_compile),
    )


def _datasets(config: RunConfig, prepared: dict, seed: int):
    """(epoch -> augmented shuffled train stream, validation or None). Each
    epoch's stream is seeded by (seed, epoch) only, so a resumed stage reads
    what the uninterrupted one read (`health.epoch_seed`)."""
    from thumbnet_keras.pipeline.datasets import run_datasets, split_batches
    from thumbnet_keras.pipeline.health import epoch_seed

    def train(epoch: int):
        return run_datasets(
            prepared,
            config.image_size,
            config.channels,
            config.batch_size,
            epoch_seed(seed, epoch),
        )[0]

    validation = split_batches(
        prepared, "validation", config.image_size, config.channels, config.batch_size
    )
    return train, validation


def _stage_seed(config: RunConfig, sid: str) -> int:
    """The seed of a stage: the run's seed, plus the factor for f<k>-stages."""
    if sid == "teacher":
        return config.seed
    return config.seed + int(sid.split("-")[0][1:])


def _fit(model, config, prepared, run, sid, epochs, verbose, labels=True):
    """`fit_resumable` with validation selection when there are labels and a
    validation split, last-epoch selection otherwise."""
    seed = _stage_seed(config, sid)
    train, validation = _datasets(config, prepared, seed)
    # JAX DataParallel cannot shard a last batch that splits unevenly.
    train, validation = even_batches(train), even_batches(validation)
    reason = "no validation split"
    if not labels:
        validation, reason = None, "no labels (FM + MM): last epoch"
    with warnings.catch_warnings():
        # fm_pretrain does not use S's logits layer: Keras warns it has no gradient.
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        # `even_batches` leaves the batch count unknown to tf.data, and Keras
        # then warns at the end of each stream, which is where it should end.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        return fit_resumable(
            model,
            train,
            epochs,
            run.checkpoint_dir(sid),
            verbose=progress.keras_verbose(verbose),
            log=_log,
            callbacks=[
                progress.EpochProgress(
                    sid, epochs, config.factors, skip=progress.skipped_stages(config)
                )
            ],
            validation_data=validation,
            no_selection_reason=reason,
            seed=seed,
            on_nonfinite=config.on_nonfinite,
            stage=sid,
            learning_rate=config.stage_learning_rate(sid.split("-", 1)[-1]),
        )


def _health(config: RunConfig, prepared: dict, model, fit: dict | None = None,
            judge_accuracy: bool = True) -> dict:  # fmt: skip
    """Sanity checks of a stage's inference model (`health.check_predictions`)
    on the validation split (test when there is none), plus the non-finite
    epochs a `continue` run trained through."""
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.health import MIN_IMAGES, check_predictions, worst

    sizes = {k: int(prepared["splits"].get(k, 0)) for k in ("validation", "test")}
    # Validation; test when validation is too small to judge accuracy.
    split = "validation" if sizes["validation"] >= MIN_IMAGES else "test"
    if sizes[split] == 0:
        split = max(sizes, key=sizes.get)
    batches = split_batches(
        prepared, split, config.image_size, config.channels, config.batch_size
    )
    if batches is None:
        return {"status": "ok", "problems": [], "reason": "no held-out images"}
    health = check_predictions(
        model, batches, prepared["num_classes"], judge_accuracy=judge_accuracy
    )
    health["split"] = split
    events = (fit or {}).get("nonfinite") or []
    if events:
        epochs = ", ".join(str(e["epoch"]) for e in events)
        health["status"] = worst([health["status"], "degraded"])
        health["problems"] = [
            f"non-finite values in epoch(s) {epochs}, trained through "
            "(on_nonfinite=continue)",
            *health["problems"],
        ]
    if health["status"] != "ok":
        _log(f"  health: {health['status']}: " + "; ".join(health["problems"]))
    return health


def reestimate_student_bn(
    config: RunConfig, prepared: dict, downscaler, student
) -> dict:
    """Re-estimates `student`'s BatchNorm statistics on `downscaler`'s
    thumbnails of (unaugmented) train images, `config.bn_batches` batches."""
    from thumbnet_keras.pipeline.bn_recalibrate import reestimate_batchnorm
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.evaluate import compose

    if config.bn_batches == 0:
        return {"layers": 0, "batches": 0, "examples": 0, "reason": "bn_batches=0"}
    batches = split_batches(
        prepared,
        "train",
        config.image_size,
        config.channels,
        config.batch_size,
        shuffle_seed=config.seed,  # the first bn_batches sample every class
    )
    model = compose(downscaler, student, "bn_calibration")
    return reestimate_batchnorm(model, batches, num_batches=config.bn_batches)


def _check_same_data(run: Run, prepared: dict) -> None:
    """A run whose stages started on other data is not resumed.

    The manifest's content is one of the run's inputs (`resolve_run`), but
    the files it lists are not: images added to or removed from a class
    folder under the same manifest gave a prepared index with other splits
    (existing images moved between train and test), and a rerun resumed the
    stages trained on the old ones, then rewrote the run's data.json and
    report. The prepared index's fingerprint (manifest + every file's
    content) now has to match the one the run recorded; runs recorded before
    it have none: for them, the split sizes and class names it recorded
    have to match (an upgrade trial: a run made by an older version resumed
    on splits that moved 4 of its training images into test and validation).
    """
    if is_unstarted(run.path) or not run.data_json.is_file():
        return
    saved = read_json(run.data_json)
    if not same_data(saved, prepared):
        raise ConfigError(_other_data_message(run, saved, prepared))


def _other_data_message(run: Run, saved: dict, prepared: dict) -> str:

    def splits(summary):
        counts = summary.get("splits") or {}
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "unknown"

    # Renamed class folders keep the counts: the classes say what changed (a
    # trial read "then: train 160 ...; now: train 160 ...", the same).
    then, now = saved.get("class_names") or [], prepared.get("class_names") or []
    classes = ""
    if then != now:
        gone, new = [c for c in then if c not in now], [c for c in now if c not in then]

        def names(found):
            return ", ".join(map(repr, found[:5])) + (" ..." if len(found) > 5 else "")

        classes = (
            f"; classes gone: {names(gone) or 'none'}, new: {names(new) or 'none'}"
            if gone or new
            else "; the same classes in another order"
        )

    return (
        f"Run folder {str(run.path)!r} was started on other data: the files of "
        f"dataset {prepared.get('name') or prepared.get('dataset')!r} changed since "
        f"its stages trained, or a thumbnet-keras upgrade indexes them otherwise "
        f"(the prepared index differs; then: {splits(saved)}; now: "
        f"{splits(prepared)}{classes}). "
        "Finished stages used the old files, so the run is not resumed; its "
        "outputs are left untouched. Choose another run name to train on the "
        "data as it is now, or restore the files to resume this run."
    )


@run_compute  # the run's precision and distribution
@default_seed_scope()  # Keras' default seeds from the run's seed, then back
def get_teacher(run_dir: str, prepared: dict, verbose: int | str = "auto") -> dict:
    """Stage 0: the run's teacher, saved as `teacher.keras`.

    Records `prepared` (the dataset summary from `prepare_dataset`) as
    `data.json`, then, unless already done: loads `config.teacher`, or builds
    `config.backbone` with `config.backbone_weights`, or trains the backbone
    for `config.teacher_epochs` (checkpointed every epoch, the epoch of best
    validation top-1 kept).

    Returns:
        The stage record: `source` ("file", "weights" or "trained"), path,
        epochs, history, seconds, `selection`, `num_classes`.
    """

    from thumbnet_keras.models import backbones
    from thumbnet_keras.models.teacher_spec import raw_pixel_source
    from thumbnet_keras.pipeline.resolve import build_with_weights, check_teacher_file

    run, config = load_run(run_dir)
    raw_source = raw_pixel_source(config.teacher)
    if raw_source:
        # Its preprocessing is inside: every stage feeds raw [0, 255] pixels.
        prepared = {**prepared, "normalization": "raw"}
    _check_same_data(run, prepared)
    write_json(run.data_json, prepared)
    sid = "teacher"
    progress.stage_started(config.factors, sid, progress.skipped_stages(config))
    if run.is_done(sid):  # A failed teacher fails a rerun too.
        return _teacher_checked(_skip(run, sid))
    shape, classes = _image_shape(config), prepared["num_classes"]
    fit = {"history": {}, "epochs": 0, "resumed_from": [], "seconds": 0.0}
    if config.teacher is not None:
        teacher = check_teacher_file(config.teacher, shape, classes)
        source = raw_source or "file"
    elif config.backbone_weights is not None:
        teacher = build_with_weights(config, shape, classes)
        source = "weights"
    else:
        _log(f"[{sid}] training {config.backbone} for {config.teacher_epochs} epochs")
        configure_determinism(config.seed, config.deterministic)
        teacher = prepare_model(
            backbones.build(config.backbone, shape, classes, **config.backbone_options)
        )
        epochs = config.teacher_epochs
        _compile(teacher, config, prepared, "teacher", epochs, _classifier_loss(config))
        fit = _fit(teacher, config, prepared, run, sid, epochs, verbose)
        source = "trained"
    save_keras(teacher, run.teacher_keras)
    health = _health(config, prepared, teacher, fit)
    if source == "file":
        health = _value_range_check(config, prepared, teacher, health)
    record = {
        "stage": sid,
        "source": source,
        "path": str(run.teacher_keras),
        "backbone": teacher.name,
        "num_classes": classes,
        **fit,
        "health": health,
    }
    return _teacher_checked(_finish(run, sid, record))


# A given .keras teacher is fed the manifest's `normalization`; one trained on
# other values loses accuracy without a word. Another normalization that does
# this much better on the health split's images is reported (the run goes
# on, `degraded`); this much better stops the run before anything trains on
# the teacher's outputs (a practitioner's teacher scored 33% on [0, 1] and
# 80% on [0, 255], and the run trained on at chance).
VALUE_RANGE_MARGIN = 0.10
VALUE_RANGE_FAIL = 0.25
# Predictions this concentrated on one class say nothing about value ranges.
NEAR_CONSTANT = 0.9
_RANGES = {"unit": "[0, 1]", "symmetric": "[-1, 1]", "imagenet": "ImageNet mean/std",
           "raw": "[0, 255]"}  # fmt: skip


def _checks_skipped(health: dict, checks: str, needed: str, had: str) -> dict:
    """`health` with `skipped` naming the given teacher's checks that did not
    run, said as a warning: too few held-out images to judge by. (A trial's
    teacher, trained on its classes in another order, scored 42% on 10
    validation images and the run went on with status "ok".)"""
    plural = checks.endswith("checks")
    note = (
        f"the {checks} {'need' if plural else 'needs'} {needed}; the "
        f"{health.get('split', 'held-out')} split has {had}, so "
        f"{'they' if plural else 'it'} did not run: a teacher fed other values than it was "
        "trained on, or naming its classes in another order than the manifest's "
        f"`classes:`, would go unnoticed (its top-1 here: "
        f"{100 * health['top1']:.1f}%)"
    )
    logger.warning("[teacher] %s.", note)
    return {**health, "skipped": [*health.get("skipped", []), note]}


def _value_range_check(config, prepared: dict, teacher, health: dict) -> dict:
    """The teacher's health, with its top-1 on the same held-out images under
    every normalization (`value_ranges`); `degraded`, with a problem naming
    the manifest setting to change, when another one beats the manifest's by
    `VALUE_RANGE_MARGIN` or more (judged on `health.MIN_IMAGES` images or
    more; the run goes on: the teacher may be right and the images odd), and
    `failed` (the run stops at the teacher) when by `VALUE_RANGE_FAIL` or
    more. When the best of them answers one class (`NEAR_CONSTANT` of its
    predictions) and scores less than `VALUE_RANGE_MARGIN` above the
    majority-class rate, no value range fits the teacher and the problem
    says to check its class order and training instead. Before both: when
    the teacher's outputs matched to the classes in another order
    (`health.held_out_matching`: chosen on half of the images, scored on
    the other half; `matched_order_top1`) score as well as any range and
    `VALUE_RANGE_MARGIN` above the manifest's order, the problem names that
    order for the manifest's `classes`."""
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.health import (
        MATCHING_IMAGES_PER_CLASS,
        MIN_IMAGES,
        check_predictions,
        held_out_logits,
        held_out_matching,
        worst,
    )

    current = prepared["normalization"]
    if health.get("top1") is None:
        return health
    if health.get("images", 0) < MIN_IMAGES:
        return _checks_skipped(
            health,
            "value-range and class-order checks",
            f"{MIN_IMAGES} held-out images",
            f"{health.get('images', 0)}",
        )
    logits, labels = held_out_logits(
        teacher,
        split_batches(prepared, health["split"], config.image_size, config.channels,
                      config.batch_size),
    )  # fmt: skip
    matched, order = held_out_matching(
        logits.argmax(axis=-1), labels, prepared["num_classes"]
    )
    if matched is None:
        health = _checks_skipped(
            health,
            "class-order check",
            f"{MATCHING_IMAGES_PER_CLASS * prepared['num_classes']} held-out images "
            f"({MATCHING_IMAGES_PER_CLASS} a class)",
            f"{len(labels)}",
        )
    scores = {current: health["top1"]}
    shares = {current: health.get("top_class_share")}
    for other in _RANGES:
        if other != current:
            batches = split_batches(
                {**prepared, "normalization": other}, health["split"],
                config.image_size, config.channels, config.batch_size,
            )  # fmt: skip
            checked = check_predictions(teacher, batches, prepared["num_classes"])
            scores[other] = checked.get("top1") or 0.0
            shares[other] = checked.get("top_class_share")
    best = max(scores, key=scores.get)
    health = {**health, "value_ranges": scores, "matched_order_top1": matched}
    majority = health.get("majority_rate") or 0.0
    names = list(prepared.get("class_names") or [])
    gap = scores[best] - scores[current]
    if (
        matched is not None
        and matched - scores[current] >= VALUE_RANGE_MARGIN
        and matched >= scores[best]
        and matched >= majority + VALUE_RANGE_MARGIN
        and order != sorted(order)
        and len(names) == len(order)
    ):
        # Right values, outputs in another class order: the teacher reads the
        # images and names them otherwise (a trial's teacher, trained on
        # sorted class names under a manifest listing them otherwise, was
        # told to change the normalization instead).
        teacher_order = [names[k] for k in order]
        health["matched_order"] = teacher_order
        listed = _few(teacher_order)
        where = (
            f"`classes: [{listed}]`"
            if len(order) <= _LISTED
            else "`classes`; the whole order is the teacher record's "
            "health.matched_order"
        )
        problem = (
            f"the teacher scores {100 * scores[current]:.1f}% top-1 on "
            f"{health['images']} {health['split']} images in the manifest's class "
            f"order ({_few(names)}) but {100 * matched:.1f}% (on half of them, "
            f"the order chosen on the other half) if its outputs are, in order, "
            f"{listed}: it was likely trained with its classes in that order; "
            f"list them so in the dataset manifest ({where}) and rerun under a "
            "new run name"
        )
        gap = matched - scores[current]
    elif gap < VALUE_RANGE_MARGIN:
        return health
    elif (shares.get(best) or 0.0) >= NEAR_CONSTANT and (
        scores[best] < majority + VALUE_RANGE_MARGIN
    ):
        # The best range scores only what answering one class does, and that
        # is what it does: no value range fits this teacher (a trial's teacher
        # with its classes in another order was told to change the
        # normalization). On imbalanced data a real range mismatch can also
        # score near the majority rate, but with varied answers. As severe as
        # a value range would be: so far from its best, something is wrong.
        classes = ", ".join(prepared.get("class_names") or []) or "see the manifest"
        problem = (
            f"no normalization makes the teacher score {100 * VALUE_RANGE_MARGIN:.0f} "
            f"points above answering the most frequent class "
            f"({100 * majority:.1f}%; best: {100 * scores[best]:.1f}% as "
            f"{best!r}), so the value range is not what is wrong: check that its "
            f"outputs follow the manifest's class order ({classes}) and that it "
            "was trained"
        )
    else:
        _log(
            f"[teacher] warning: {100 * scores[current]:.1f}% top-1 on images in "
            f"{_RANGES[current]}, {100 * scores[best]:.1f}% in {_RANGES[best]}: "
            f"set `normalization: {best}` in the dataset manifest"
        )
        problem = (
            f"the teacher scores {100 * scores[current]:.1f}% top-1 on "
            f"{health['images']} {health['split']} images fed as the manifest's "
            f"normalization {current!r} ({_RANGES[current]}) but "
            f"{100 * scores[best]:.1f}% as {best!r} ({_RANGES[best]}): it was "
            f"likely trained on those values; set `normalization: {best}` in the "
            "dataset manifest and rerun under a new run name"
        )
    status = "failed" if gap >= VALUE_RANGE_FAIL else "degraded"
    health["status"] = worst([health["status"], status])
    health["problems"] = [*health["problems"], problem]
    return health


_LISTED = 12  # Class names a message lists before "... (N in all)".


def _few(names: list[str]) -> str:
    text = ", ".join(names[:_LISTED])
    return text + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


def _teacher_checked(record: dict) -> dict:
    """The teacher's record; `TrainingHealthError` when it failed its health
    checks (every later stage learns from the teacher)."""
    health = record.get("health") or {}
    if health.get("status") == "failed":
        from thumbnet_keras.pipeline.config import TrainingHealthError

        if record.get("source") == "trained":
            cause = "a learning rate too high (or too few epochs)"
        else:  # A given teacher, evaluated on this run's images as it gets them.
            cause = (
                "the teacher does not fit these images: another value range than "
                "it was trained on (the manifest's `normalization`; an "
                "applications: or keras_hub: teacher takes raw [0, 255] pixels), "
                "other classes or class order, or an untrained model"
            )
        raise TrainingHealthError(
            "[teacher] failed its health checks: "
            + "; ".join(health["problems"])
            + ". Every later stage learns from the teacher, so the run stops "
            f"here; likely cause: {cause}."
        )
    return record


def _build_adapter(trainer) -> None:
    # The trainer and its FM adapter are built lazily at the first step; build
    # them now so that weights and optimizer state can be restored first.
    if not trainer.built:
        shape = tuple(trainer.downscaler.inputs[0].shape[1:])
        trainer.build((None, *shape))
    if trainer.fm_adapter is not None and not trainer.fm_adapter.built:
        layer = trainer.student.get_layer(trainer.student_feature_layer)
        trainer.fm_adapter.build(tuple(layer.output.shape))


def _trainer(config, teacher, downscaler, student, stage, **weights):
    from thumbnet_keras.models.trainer import ThumbNetTrainer

    loss_weights = dict(
        cl_weight=config.cl_weight,
        kd_weight=config.kd_weight,
        fm_weight=config.fm_weight,
        mm_weight=config.mm_weight,
    )
    loss_weights.update(weights)
    with warnings.catch_warnings():
        # E's cost is checked where the run builds E (`build_run_downscaler`).
        warnings.filterwarnings(
            "ignore", message="The downscaler .* costs", category=UserWarning
        )
        trainer = ThumbNetTrainer(
            teacher=teacher,
            downscaler=downscaler,
            student=student,
            stage=stage,
            temperature=config.temperature,
            label_smoothing=config.label_smoothing,
            **loss_weights,
        )
    _build_adapter(trainer)
    return trainer


def build_run_downscaler(
    config: RunConfig, prepared: dict, factor: int, student, teacher, run=None
):
    """E as the run builds it: `config.downscaler_width`, or when None the
    width sized from S's cost and from what one more thumbnail pixel would
    cost instead (`auto_downscaler_width`, `thumbnail_step_macs`).

    With `run`, an automatic width is resolved once per factor and recorded
    (`stages/f<factor>-downscaler.json`): a resumed run rebuilds the E its
    checkpoints and finished stages hold even if the sizing rule changed
    since (runs from before the record: the width of the E their finished
    fm_pretrain or joint saved)."""
    from thumbnet_keras.layers.downscaler import (
        auto_downscaler_width,
        build_downscaler,
    )
    from thumbnet_keras.pipeline.equal_cost import thumbnail_step_macs

    shape = _image_shape(config)

    def auto_width():
        return auto_downscaler_width(
            shape,
            factor,
            student,
            depth=config.downscaler_depth,
            variant=config.downscaler_variant,
            step_macs=thumbnail_step_macs(
                teacher, factor, _value_range(prepared), student
            ),
        )

    width = config.downscaler_width
    if width is not None:
        resolved = width
    elif run is not None:
        resolved = _recorded_width(run, factor, auto_width)
    else:
        resolved = auto_width()
    downscaler = build_downscaler(
        shape,
        factor,
        width=resolved,
        depth=config.downscaler_depth,
        variant=config.downscaler_variant,
        value_range=_value_range(prepared),
    )
    # A width the user chose: say so in the run's own terms when E is too
    # costly (the trainer's warning, silenced in `_trainer`, names the Python
    # API). A smoke run's fixed tiny width is a plumbing check: no warning.
    if width is not None and not config.smoke:
        _warn_explicit_width(downscaler, student, width, factor, auto_width)
    return downscaler


def _recorded_width(run: Run, factor: int, auto_width) -> int:
    """The automatic E width of `run` at `factor`, recorded on first use."""
    import keras

    record = run.file("stages", f"f{factor}-downscaler.json")
    if record.is_file():
        return int(read_json(record)["width"])
    width, source = None, "auto_downscaler_width"
    for stage in ("e_pretrain", "fm_pretrain", "joint"):
        saved = run.stage_dir(stage_id(factor, stage)) / "downscaler.keras"
        if run.is_done(stage_id(factor, stage)) and saved.is_file():
            e = keras.saving.load_model(str(saved), compile=False)
            # The residual conv reads `width` channels in every variant.
            width = int(e.get_layer("residual_conv").kernel.shape[2])
            source = f"{stage_id(factor, stage)}/downscaler.keras"
            break
    if width is None:
        width = auto_width()
    write_json(record, {"factor": factor, "width": width, "source": source})
    return width


def _warn_explicit_width(downscaler, student, width, factor, auto_width) -> None:
    from thumbnet_keras.models.trainer import DOWNSCALER_SHARE, downscaler_cost

    e_macs, total, share = downscaler_cost(downscaler, student)
    if share > DOWNSCALER_SHARE:
        warnings.warn(
            f"downscaler_width={width} makes E cost {share:.1%} of the f={factor} "
            f"thumbnail model ({e_macs / 1e6:.2f} M of "
            f"{total / 1e6:.2f} M MACs), more than "
            f"{DOWNSCALER_SHARE:.0%}: it saves less than the factor promises. "
            f"Leave it unset (no --downscaler-width) to size E from S's cost "
            f"(width {auto_width()} here), or choose a smaller one.",
            UserWarning,
            stacklevel=2,
        )


def _equal_cost(
    run: Run, config: RunConfig, prepared: dict, factor: int, teacher
) -> dict:
    """The equal-cost thumbnail side for `factor` (see `pipeline.equal_cost`):
    against the E this run trained (`joint`'s saved E) when there is one, so
    the comparison holds even if E's sizing rule changed since, else E as
    the run would build it."""
    import keras

    from thumbnet_keras.evaluation.flops import count_flops
    from thumbnet_keras.models.student import make_student
    from thumbnet_keras.pipeline.equal_cost import equal_cost_size

    student = make_student(teacher, factor)
    joint = stage_id(factor, "joint")
    saved = run.stage_dir(joint) / "downscaler.keras"
    if run.is_done(joint) and saved.is_file():
        downscaler = keras.saving.load_model(str(saved), compile=False)
    else:
        downscaler = build_run_downscaler(
            config, prepared, factor, student, teacher, run
        )
    target = count_flops(downscaler) + count_flops(student)
    return equal_cost_size(teacher, factor, target, _value_range(prepared))


def _train_e_pretrain(run: Run, config: RunConfig, prepared: dict, factor: int,
                      teacher, student, verbose) -> dict:  # fmt: skip
    """`e_pretrain`: E alone through the frozen teacher
    (`models.DownscalerPretrainer`), CL + KD by the run's weights; keeps the
    epoch of best validation top-1 of the teacher on E's up-scaled
    thumbnails, and saves E (`downscaler.keras`) for the next stage."""
    from thumbnet_keras.models.downscaler_pretrainer import DownscalerPretrainer

    sid = stage_id(factor, "e_pretrain")
    downscaler = build_run_downscaler(config, prepared, factor, student, teacher, run)
    model = DownscalerPretrainer(
        teacher,
        downscaler,
        temperature=config.temperature,
        cl_weight=config.cl_weight,
        kd_weight=config.kd_weight,
        label_smoothing=config.label_smoothing,
        value_range=_value_range(prepared),
    )
    model.build((None, *_image_shape(config)))
    epochs = config.e_pretrain_epochs
    _compile(model, config, prepared, "e_pretrain", epochs)
    _log(f"[{sid}] training E for {epochs} epochs through the frozen teacher")
    fit = _fit(model, config, prepared, run, sid, epochs, verbose)
    health = _health(config, prepared, model, fit)
    out = run.stage_dir(sid)
    paths = {"downscaler": save_keras(downscaler, out / "downscaler.keras")}
    record = {"stage": "e_pretrain", "factor": factor, "id": sid, "paths": paths,
              **fit, "health": health}  # fmt: skip
    return _finish(run, sid, record)


@run_compute  # the run's precision and distribution
@default_seed_scope()  # Keras' default seeds from the run's seed, then back
def train_stage(
    run_dir: str, factor: int, stage: str, verbose: int | str = "auto"
) -> dict:
    """Trains one stage for one factor (see the module docstring).

    Returns:
        The stage record: stage, factor, epochs, history (per-epoch metrics,
        `loss`, `cl_loss`, `val_accuracy`, ...), `selection` (the kept epoch),
        `bn` (BatchNorm re-estimation), `resumed_from`, seconds, model paths;
        `bicubic_kd_equal` adds `input_size` and `equal_cost`, or
        `unavailable` (why) when T's head cannot take another size.
    """
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.models.student import make_student

    if stage not in STAGES:
        raise ConfigError(f"Unknown stage {stage!r}; stages: {', '.join(STAGES)}.")
    run, config = load_run(run_dir)
    sid = stage_id(factor, stage)
    off = {"e_pretrain": "e_pretrain_epochs", "fm_pretrain": "fm_epochs"}.get(stage)
    if off and getattr(config, off) == 0:
        # Not a stage of this run (nor counted in its "[k/N]" labels); no
        # record: the next stage starts E from bicubic (e_pretrain) or S
        # from the teacher's weights (fm_pretrain).
        _log(f"[{sid}] not run ({off}=0)")
        return {"stage": stage, "factor": factor, "id": sid, "epochs": 0,
                "not_run": f"{off}=0"}  # fmt: skip
    progress.stage_started(config.factors, sid, progress.skipped_stages(config))
    if run.is_done(sid):
        return _skip(run, sid)
    prepared = run.data(require=True)
    configure_determinism(config.seed + factor, config.deterministic)
    out = run.stage_dir(sid)
    _check_outputs(run, "teacher", [run.teacher_keras])
    teacher = _load(run.teacher_keras)
    shape, value_range = _image_shape(config), _value_range(prepared)
    extra: dict = {}
    if stage == "bicubic_kd_equal":
        from thumbnet_keras.pipeline.equal_cost import resize_downscaler

        try:
            cost = _equal_cost(run, config, prepared, factor, teacher)
        except ValueError as err:  # T's head needs its own size (Flatten).
            _log(f"[{sid}] unavailable: {err}")
            record = {"stage": stage, "factor": factor, "id": sid, "epochs": 0,
                      "history": {}, "resumed_from": [], "seconds": 0.0,
                      "unavailable": str(err)}  # fmt: skip
            return _finish(run, sid, record)
        size = cost["size"]
        extra = {"input_size": size, "equal_cost": cost}
        downscaler = resize_downscaler(shape, size, value_range)
        student = make_student(teacher, size=(size, size))
    else:
        downscaler = bicubic_downscaler(shape, factor, value_range=value_range)
        student = make_student(teacher, factor)
    if stage == "e_pretrain":
        return _train_e_pretrain(
            run, config, prepared, factor, teacher, student, verbose
        )
    # E trained through the teacher (e_pretrain) starts fm_pretrain, or joint
    # when fm_pretrain did not run; S's statistics are then re-estimated on
    # its thumbnails.
    pretrained_e = None
    pre = stage_id(factor, "e_pretrain")
    if stage == "fm_pretrain" or (
        stage == "joint" and not run.is_done(stage_id(factor, "fm_pretrain"))
    ):
        if run.is_done(pre):
            pretrained_e = _load(run.stage_dir(pre) / "downscaler.keras")
    fresh = load_checkpoint(run.checkpoint_dir(sid)) is None
    starts_from_teacher = stage in _FROM_TEACHER or (
        stage == "joint" and not run.is_done(stage_id(factor, "fm_pretrain"))
    )
    if stage == "teacher_bicubic_bn" or (starts_from_teacher and fresh):
        # On a resume the checkpoint holds S's statistics already.
        extra["bn"] = reestimate_student_bn(
            config, prepared, pretrained_e or downscaler, student
        )
        _log(f"[{sid}] BatchNorm re-estimated: {extra['bn']}")
    if stage == "teacher_bicubic_bn":
        from thumbnet_keras.pipeline.evaluate import compose

        path = save_keras(student, out / "student.keras")
        extra["health"] = _health(
            config, prepared, compose(downscaler, student, "check")
        )
        record = {"stage": stage, "factor": factor, "id": sid, "epochs": 0,
                  "history": {}, "resumed_from": [], "seconds": 0.0,
                  "paths": {"student": path}, **extra}  # fmt: skip
        return _finish(run, sid, record)

    if stage in ("fm_pretrain", "joint"):
        epochs = config.fm_epochs if stage == "fm_pretrain" else config.joint_epochs
        downscaler = pretrained_e or build_run_downscaler(
            config, prepared, factor, student, teacher, run
        )
        model = _trainer(config, teacher, downscaler, student, stage)
        previous = stage_id(factor, "fm_pretrain")
        if stage == "joint" and run.is_done(previous):
            model.load_weights(str(run.stage_dir(previous) / "trainer.weights.h5"))
        metrics = ("accuracy",) if stage == "joint" else None
        _compile(model, config, prepared, stage, epochs, metrics=metrics)
    else:
        epochs = config.baseline_epochs
        if stage == "bicubic_cl":
            image = keras.Input(shape, name="image")
            model = keras.Model(
                image, student(downscaler(image)), name="bicubic_student"
            )
            _compile(model, config, prepared, stage, epochs, _classifier_loss(config))
        else:  # bicubic_kd, bicubic_kd_equal: CL + KD only.
            model = _trainer(
                config, teacher, downscaler, student, "joint",
                fm_weight=0.0, mm_weight=0.0,
            )  # fmt: skip
            _compile(model, config, prepared, stage, epochs)
    _log(f"[{sid}] training for {epochs} epochs")
    fit = _fit(
        model, config, prepared, run, sid, epochs, verbose, stage != "fm_pretrain"
    )
    from thumbnet_keras.pipeline.evaluate import compose

    paths = {}
    checked = compose(
        model.downscaler if stage in ("fm_pretrain", "joint") else downscaler,
        student,
        "check",
    )
    extra["health"] = _health(
        config, prepared, checked, fit, judge_accuracy=stage != "fm_pretrain"
    )
    if stage in ("fm_pretrain", "joint"):
        # The trainer's weights (E, S, FM adapter) start the next stage.
        atomic_write(out / "trainer.weights.h5", model.save_weights)
        paths["trainer_weights"] = str(out / "trainer.weights.h5")
        paths["downscaler"] = save_keras(model.downscaler, out / "downscaler.keras")
        paths["student"] = save_keras(model.student, out / "student.keras")
    else:
        paths["student"] = save_keras(student, out / "student.keras")
    record = {"stage": stage, "factor": factor, "id": sid, "paths": paths,
              **fit, **extra}  # fmt: skip
    return _finish(run, sid, record)
