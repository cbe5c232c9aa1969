"""Training health: non-finite losses, degenerate models, determinism.

* `NonFiniteGuard`: a Keras callback (like `keras.callbacks.TerminateOnNaN`,
  checked once per epoch) that stops a stage whose loss, any logged metric or
  any weight became NaN or infinite. With `on_nonfinite="fail"` (default)
  `fit_resumable` then restores the last good epoch and raises
  `TrainingDivergedError`, whose message names the stage, the epoch and the
  likely cause (the learning rate); with `"continue"` the epoch is recorded
  and training goes on.
* `check_predictions`: after a stage, the model's logits on held-out images.
  `"failed"` when they are non-finite or do not depend on the input (the
  spread of every logit across images is below `CONSTANT_RTOL` of its
  magnitude); `"degraded"` when top-1 is at or below the majority-class rate
  of those images, or one class is predicted for all of them.
* `run_health`: the worst status over a run's stage records.
* `configure_determinism`: `keras.utils.set_random_seed`, Keras' default
  seeds from a generator no other thread draws from (`private_default_seeds`,
  inside a `default_seed_scope`), plus the backends' deterministic-ops
  switches (`tf.config.experimental.enable_op_determinism`,
  `torch.use_deterministic_algorithms`); JAX on CPU is deterministic as is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import keras
import numpy as np

from thumbnet_keras.pipeline.config import ConfigError, TrainingHealthError

logger = logging.getLogger(__name__)

__all__ = [
    "CONSTANT_RTOL",
    "NonFiniteGuard",
    "TrainingDivergedError",
    "TrainingHealthError",
    "check_logits",
    "check_predictions",
    "configure_determinism",
    "default_seed_scope",
    "epoch_seed",
    "failed_message",
    "held_out_logits",
    "held_out_matching",
    "matched_classes",
    "run_health",
    "worst",
    "write_run_health",
]

# Logits whose spread across inputs is below this fraction of their size do
# not depend on the input (a dead network outputs its last bias exactly).
CONSTANT_RTOL = 1e-4
# Accuracy is judged on at least this many images (a smoke run's validation
# split may hold one image, whose majority-class rate is 100%).
MIN_IMAGES = 10
ORDER = ("ok", "degraded", "failed")


class TrainingDivergedError(ConfigError):
    """A stage's loss became non-finite (usually: the learning rate)."""


def worst(statuses) -> str:
    """The worst of "ok" < "degraded" < "failed"."""
    return max(statuses, key=ORDER.index, default="ok")


def epoch_seed(seed: int, epoch: int) -> int:
    """The data and RNG seed of epoch `epoch` (0-based) of a stage seeded
    `seed`: depends on nothing else, so a resumed stage draws what the
    uninterrupted one drew."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 1) % (2**31 - 1)


def _nonfinite(logs: dict) -> dict:
    bad = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            bad[key] = number
    return bad


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the end of an epoch whose logs or weights are not
    finite.

    Args:
        on_nonfinite: "fail" (stop: `stopped` holds the epoch and what was
            non-finite) or "continue" (record it in `events` and go on).
        log: where a warning goes.

    It must run before the checkpoint callback: in "fail" mode it raises
    `_Stop` from `on_epoch_end`, so the bad epoch is never checkpointed.
    """

    def __init__(self, on_nonfinite: str = "fail", log=print):
        super().__init__()
        if on_nonfinite not in ("fail", "continue"):
            raise ValueError(
                f"on_nonfinite must be 'fail' or 'continue', received {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.log = log
        self.events: list[dict] = []
        self.stopped: dict | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        bad = _nonfinite(logs or {})
        if not bad:
            names = [
                w.path for w in self.model.trainable_weights
                if not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))
            ]  # fmt: skip
            if names:
                bad = {"weights": f"{len(names)} non-finite ({names[0]}, ...)"}
        if not bad:
            return
        event = {"epoch": epoch + 1, "values": {k: str(v) for k, v in bad.items()}}
        self.events.append(event)
        if self.on_nonfinite == "continue":
            self.log(f"  warning: non-finite values after epoch {epoch + 1}: {bad}")
            return
        self.stopped = event
        self.model.stop_training = True
        raise _Stop(event)


class _Stop(Exception):
    """Raised by `NonFiniteGuard` inside `fit` (caught by `fit_resumable`)."""


def diverged_message(stage: str, event: dict, epochs: int, restored: int,
                     learning_rate: float | None) -> str:  # fmt: skip
    """The error of a stage stopped on a non-finite loss."""
    values = ", ".join(f"{k}={v}" for k, v in event["values"].items())
    rate = f" (peak learning rate {learning_rate:g})" if learning_rate else ""
    kept = (
        f"the weights of epoch {restored} were restored and its checkpoint kept"
        if restored
        else "the stage's starting weights were restored"
    )
    return (
        f"[{stage}] training diverged: non-finite values in epoch "
        f"{event['epoch']}/{epochs} ({values}); the stage was stopped and {kept}. "
        f"Likely cause: the learning rate is too high for this stage{rate}. "
        "Lower it (--learning-rate or the stage's own rate), or pass "
        "--on-nonfinite continue to train on anyway."
    )


def check_predictions(
    model, batches, num_classes: int, max_images: int = 512, judge_accuracy: bool = True
) -> dict:
    """Sanity checks of a trained classifier on held-out `(images, labels)`
    batches (validation, else test).

    Returns:
        `{"status": "ok"|"degraded"|"failed", "problems": [str],
        "images": N, "top1": a, "majority_rate": m, "top_class_share": t,
        "logit_spread": s}`.
        `failed`: non-finite logits, or logits that do not depend on the
        input (`logit_spread`, the largest per-class standard deviation over
        images divided by `1 + mean |logit|`, below `CONSTANT_RTOL`).
        `degraded` (judged on at least `MIN_IMAGES` images): top-1 at or
        below the majority-class rate `m` (the share of the most frequent
        label), or one class predicted for all images; only
        with `judge_accuracy` (a stage trained without labels is not judged on
        accuracy).
    """
    logits, labels = held_out_logits(model, batches, max_images)
    if not len(labels):
        return {"status": "ok", "problems": [], "images": 0, "reason": "no images"}
    return check_logits(logits, labels, num_classes, accuracy=judge_accuracy)


def held_out_logits(model, batches, max_images: int = 512):
    """The model's logits (float64, `(N, classes)`) and the labels (int) of
    up to `max_images` images of `(images, labels)` batches."""
    logits, labels = [], []
    seen = 0
    for images, y in batches:
        out = keras.ops.convert_to_numpy(model(images, training=False))
        logits.append(np.asarray(out, dtype=np.float64).reshape(len(out), -1))
        labels.append(np.asarray(y).reshape(-1))
        seen += len(out)
        if seen >= max_images:
            break
    if not logits:
        return np.zeros((0, 0)), np.zeros((0,), int)
    return (
        np.concatenate(logits)[:max_images],
        np.concatenate(labels)[:max_images].astype(int),
    )


def matched_classes(predicted, labels, num_classes: int) -> tuple[float, list[int]]:
    """The top-1 the predictions would have if the model's outputs were in
    another class order, and that order: one output per class, matched
    greedily on the confusion counts (the largest count first). `order[k]`
    is the class that output `k` stands for; the identity when the order is
    right. A model trained with its classes listed otherwise scores near its
    real accuracy here and far under it in the given order."""
    predicted = np.asarray(predicted).astype(int)
    labels = np.asarray(labels).astype(int)
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predicted), 1)
    order = [-1] * num_classes
    work = confusion.copy()
    matched = 0.0
    for _ in range(num_classes):
        true, output = np.unravel_index(np.argmax(work), work.shape)
        matched += confusion[true, output]
        order[int(output)] = int(true)
        work[true, :] = work[:, output] = -1.0
    return float(matched / max(len(labels), 1)), order


# `held_out_matching` needs this many images a class: fitted and scored on
# the same few images a class, a matching "finds" an order in noise (a
# right-order 1000-class teacher on 512 images was told to reorder them).
MATCHING_IMAGES_PER_CLASS = 4


def held_out_matching(
    predicted, labels, num_classes: int
) -> tuple[float | None, list[int]]:
    """`matched_classes` fitted on half of the images (every other one of
    each class) and scored on the other half: the top-1 another class order
    would give on images it was not chosen on, and that order (fitted on
    all). `(None, identity)` with fewer than `MATCHING_IMAGES_PER_CLASS`
    images a class."""
    predicted = np.asarray(predicted).astype(int)
    labels = np.asarray(labels).astype(int)
    identity = list(range(num_classes))
    if len(labels) < MATCHING_IMAGES_PER_CLASS * num_classes:
        return None, identity
    ranked = np.argsort(labels, kind="stable")  # each class's images together
    fit, score = ranked[0::2], ranked[1::2]
    _, order = matched_classes(predicted[fit], labels[fit], num_classes)
    mapped = np.asarray(order)[predicted[score]]  # output -> the class it means
    top1 = float(np.mean(mapped == labels[score]))
    return top1, matched_classes(predicted, labels, num_classes)[1]


def check_logits(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, accuracy: bool = True
) -> dict:
    """`check_predictions` on logits already computed (the pure part)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    problems, status = [], "ok"
    result = {"images": int(n)}
    if not np.all(np.isfinite(logits)):
        bad = int(np.sum(~np.all(np.isfinite(logits), axis=1)))
        result |= {"top1": None, "majority_rate": None, "logit_spread": None}
        return result | {
            "status": "failed",
            "problems": [f"non-finite predictions for {bad} of {n} images"],
        }
    spread = float(np.max(np.std(logits, axis=0)) / (1.0 + np.mean(np.abs(logits))))
    predicted = np.argmax(logits, axis=1)
    top1 = float(np.mean(predicted == labels))
    counts = np.bincount(labels, minlength=num_classes)
    majority = float(counts.max() / n)
    top_share = float(np.bincount(predicted).max() / n) if n else 0.0
    result |= {
        "top1": top1,
        "majority_rate": majority,
        "top_class_share": top_share,  # of the most often predicted class
        "logit_spread": spread,
    }
    if n >= 2 and spread < CONSTANT_RTOL:
        status = "failed"
        problems.append(
            "predictions do not depend on the input: the same logits for all "
            f"{n} images (relative spread {spread:.1e})"
        )
    accuracy = accuracy and n >= MIN_IMAGES
    if accuracy and top1 <= majority:
        status = worst([status, "degraded"])
        problems.append(
            f"top-1 {100 * top1:.2f}% is at or below the majority-class rate "
            f"{100 * majority:.2f}% ({n} images)"
        )
    if accuracy and len(set(predicted.tolist())) == 1:
        status = worst([status, "degraded"])
        problems.append(f"class {int(predicted[0])} predicted for all {n} images")
    return result | {"status": status, "problems": problems}


def run_health(records: dict[str, dict]) -> dict:
    """The run's health from its stage records (`{stage id: record}`).

    Returns:
        `{"status": worst status, "problems": ["<stage id>: <problem>"],
        "stages": {id: health}}`, listing only stages that are not "ok".
    """
    stages = {
        sid: rec["health"]
        for sid, rec in records.items()
        if rec and (rec.get("health") or {}).get("status", "ok") != "ok"
    }
    problems = [
        f"{sid}: {text}"
        for sid, health in stages.items()
        for text in health.get("problems") or [health["status"]]
    ]
    return {
        "status": worst(h["status"] for h in stages.values()),
        "problems": problems,
        "stages": stages,
    }


def write_run_health(run_dir: str) -> dict:
    """`health.json` of a run folder from its finished stages' records
    (`run_health`); the report shows it at the top."""
    from thumbnet_keras.pipeline.rundir import read_json, write_json
    from thumbnet_keras.pipeline.stages import STAGES, load_run, stage_id

    run, config = load_run(run_dir)
    ids = ["teacher"] + [stage_id(f, s) for f in config.factors for s in STAGES]
    records = {sid: read_json(run.stage_record(sid)) for sid in ids if run.is_done(sid)}
    health = run_health(records)
    write_json(run.file("health.json"), health)
    if health["status"] != "ok":
        logger.warning(
            "[health] run %s:\n%s",
            health["status"].upper(),
            "\n".join(f"  {line}" for line in health["problems"]),
        )
    return health


def failed_message(health: dict, report: str | None = None) -> str:
    """The error of a run with a failed stage."""
    lines = [p for p in health["problems"]]
    where = f" See {report}." if report else ""
    return (
        "the run FAILED its health checks, so no model was exported: "
        + "; ".join(lines)
        + "."
        + where
        + " Likely causes: a learning rate too high (losses exploded) or too "
        "few epochs/images."
    )


def _seed_source():
    """Keras' module that draws default seeds (`make_default_seed`)."""
    from keras.src.random import seed_generator

    if not hasattr(seed_generator, "python_random"):
        raise RuntimeError(
            "keras.src.random.seed_generator.python_random is gone in Keras "
            f"{keras.__version__}: thumbnet-keras cannot make Keras' default "
            "seeds independent of other threads; install keras 3.15 or update "
            "thumbnet_keras.pipeline.health.private_default_seeds."
        )
    return seed_generator


def private_default_seeds(seed: int) -> None:
    """Gives Keras' default seeds a random generator of their own, seeded.

    Every initializer and random layer built without a seed (E's convs,
    the FM adapter, a Dropout in S) takes its seed from
    `keras.src.random.seed_generator.make_default_seed`, which draws from
    Python's process-wide `random` module. Other threads draw from that
    module too, at times that vary from run to run: in a `thumbnet` process,
    the websocket keepalive pings of Prefect's event clients. One draw
    between `keras.utils.set_random_seed` and building E changed E's initial
    weights, which is why the demo's joint stage took one of several
    trajectories from one process to the next (`docs/design.md`, "Same
    seed, side by side"). With a `random.Random(seed)` of its own, which
    gives the sequence `random.seed(seed)` gives when nobody else draws, the
    same seed builds the same weights whatever other threads do.

    Keras has no public hook for this: the module's `python_random` is
    replaced, until the enclosing `default_seed_scope` ends (for good
    without one); a Keras without it gets an error naming the missing hook
    rather than silent drift.
    """
    import random

    _seed_source().python_random = random.Random(int(seed))


@contextlib.contextmanager
def default_seed_scope():
    """Puts back Keras' default-seed source on exit (also as a decorator).

    The pipeline's stage functions run inside one, so that after a stage a
    caller's own `keras.utils.set_random_seed` seeds Keras' default seeds
    again, as Keras documents.
    """
    source = _seed_source()
    saved = source.python_random
    try:
        yield
    finally:
        source.python_random = saved


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seeds every generator (`keras.utils.set_random_seed`: Python, NumPy,
    the backend, Keras' global SeedGenerator; Keras' default seeds from a
    generator of their own, `private_default_seeds`) and, when
    `deterministic`, turns on the backends' deterministic kernels:
    TensorFlow's op determinism (also used by the tf.data input pipeline on
    every backend), torch's deterministic algorithms; `deterministic=False`
    turns TensorFlow's off again (one process may run several runs)."""
    import tensorflow as tf  # The input pipeline runs on tf.data everywhere.

    keras.utils.set_random_seed(int(seed))
    private_default_seeds(seed)
    if not deterministic:
        from tensorflow.python.framework import config as tf_config

        if getattr(tf_config, "is_op_determinism_enabled", lambda: False)():
            tf_config.disable_op_determinism()  # An earlier run in this process.
        return
    tf.config.experimental.enable_op_determinism()
    if keras.backend.backend() == "torch":
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
