"""The training recipe of every stage: optimizer, schedule, loss.

* `steps_per_epoch`: batches per epoch of the prepared train split.
* `learning_rate_schedule`: linear warm-up from 0 to the stage's peak rate,
  then cosine decay to 0 at the stage's last step
  (`keras.optimizers.schedules.CosineDecay` with `warmup_target`).
* `make_optimizer`: AdamW, or SGD with Nesterov momentum 0.9, on that
  schedule, with decoupled weight decay (Keras optimizers' `weight_decay`)
  on kernels only: biases and BatchNorm scales/offsets are not decayed.
* `SparseCrossentropy`: cross-entropy of integer labels and logits with
  label smoothing, for the stages trained with plain `compile(loss=...)` (the
  teacher and `bicubic_cl`); the `ThumbNetTrainer` stages take
  `label_smoothing` in the trainer.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from thumbnet_keras.pipeline.config import RunConfig

__all__ = [
    "SparseCrossentropy",
    "learning_rate_schedule",
    "make_optimizer",
    "steps_per_epoch",
]

SGD_MOMENTUM = 0.9


def steps_per_epoch(prepared: dict, batch_size: int, split: str = "train") -> int:
    """Batches per epoch of a prepared split (the last batch may be short)."""
    examples = int(prepared["splits"].get(split, 0))
    return max(1, math.ceil(examples / batch_size))


def learning_rate_schedule(
    peak: float, epochs: int, steps: int, warmup_epochs: float = 1.0
) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up to `peak`, then cosine decay to 0 at the last step.

    Args:
        peak: the learning rate reached at the end of the warm-up.
        epochs: epochs of the stage.
        steps: steps per epoch (`steps_per_epoch`).
        warmup_epochs: warm-up length in epochs (fractions allowed), capped
            at half the stage so that a short stage still decays.

    Returns:
        A `CosineDecay` schedule: `lr(0) = 0`, `lr(w) = peak` for `w` warm-up
        steps, `lr(w + d) = 0` at `d = epochs * steps - w`.
    """
    total = max(1, epochs * steps)
    warmup = min(int(round(warmup_epochs * steps)), total // 2)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total - warmup),
        alpha=0.0,
        warmup_target=float(peak),
        warmup_steps=warmup,
    )


def make_optimizer(
    config: RunConfig,
    stage: str,
    epochs: int,
    steps: int,
    model: keras.Model | None = None,
) -> keras.optimizers.Optimizer:
    """The optimizer of one stage, on its warm-up + cosine schedule.

    Args:
        config: the run's `RunConfig` (optimizer, weight_decay,
            warmup_epochs, the stage's learning rate).
        stage: "teacher", "fm_pretrain", "joint" or a baseline stage name.
        epochs, steps: the stage's length (epochs, steps per epoch).
        model: the built model it will train; its 0- and 1-D variables
            (biases, normalization scales and offsets) are excluded from
            weight decay.
    """
    schedule = learning_rate_schedule(
        config.stage_learning_rate(stage), epochs, steps, config.warmup_epochs
    )
    decay = config.weight_decay or None
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=decay or 0.0)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=decay
        )
    else:
        raise ValueError(
            f"`optimizer` must be 'adamw' or 'sgd', received {config.optimizer!r}."
        )
    if decay and model is not None:
        flat = [v for v in model.trainable_variables if len(v.shape) <= 1]
        if flat:
            optimizer.exclude_from_weight_decay(var_list=flat)
    return optimizer


@keras.saving.register_keras_serializable(package="thumbnet_keras")
class SparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels and logits, with label smoothing.

    `keras.losses.SparseCategoricalCrossentropy` has no `label_smoothing`;
    this one-hot encodes the labels and calls `categorical_crossentropy`
    (the target is `(1 - s) * one_hot + s / classes`).

    Args:
        label_smoothing: `s` in [0, 1). Defaults to 0.0.
        name: loss name.

    Inputs: labels `(B,)` or `(B, 1)` integers, logits `(B, classes)`.
    """

    def __init__(
        self, label_smoothing: float = 0.0, name: str = "sparse_crossentropy", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"`label_smoothing` must be in [0, 1), received {label_smoothing!r}."
            )
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        one_hot = ops.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict:
        return {"label_smoothing": self.label_smoothing, **super().get_config()}
