"""Per-epoch checkpoints that survive kill -9, and `fit_resumable`.

Like `keras.callbacks.BackupAndRestore`, but every file is written atomically
(temporary name, then `os.replace`) and the state file that names the latest
epoch is written last, so a process killed at any moment leaves a consistent
checkpoint: the state file always points at a complete weights file. Keras's
`save_weights` of a compiled model includes the optimizer's variables, so a
resumed stage continues with the same optimizer moments and step count (and
so the same point of the learning-rate schedule).

Best-epoch selection: with validation data, the epoch with the highest
validation top-1 (`val_accuracy`) is kept; on ties, the one with the lower
validation loss (`val_loss`), then the first (a small validation split that
every epoch scores 100% on kept the warm-up epoch of 12 in a trial). Its weights
are saved as `best-epoch-000K.weights.h5`, before the state file that names
it, so the best-so-far epoch and value survive a kill and a resume like the
rest; when training ends, the model is left with the best epoch's weights.

Resume continues the same run: with `train_data` given as a function of the
epoch (a stream whose order and augmentation depend only on the epoch's seed,
`health.epoch_seed`), every epoch is one `fit` call that starts from the
same state in an uninterrupted and in a resumed process: weights and
optimizer moments and step (so the schedule's position) from the checkpoint,
the epoch's data stream, the global RNG and every layer's SeedGenerator
(dropout) reseeded from (seed, epoch). The old single-stream resume restarted
the tf.data shuffle at its first epoch's order, which is why a resumed stage
drifted from the uninterrupted one from its first resumed epoch.

Training health: a `NonFiniteGuard` runs before the checkpoint; a non-finite
loss, metric or weight stops the stage before that epoch is checkpointed, the
last good epoch's weights are restored, and `TrainingDivergedError` names the
stage, the epoch and the learning rate (`on_nonfinite="continue"`: recorded
in `nonfinite` and training goes on).

Files in a checkpoint folder:

    state.json               {"epoch": N, "history": {...}, "resumed_from": [...],
                              "best": {"monitor", "epoch", "value"} or null,
                              "seed": stage seed or null, "nonfinite": [...]}
    epoch-000N.weights.h5    model and optimizer variables after epoch N
    best-epoch-000K.weights.h5   the same after the best epoch K so far
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import keras
import numpy as np

from thumbnet_keras.models.weights import set_weights
from thumbnet_keras.pipeline.health import (
    NonFiniteGuard,
    TrainingDivergedError,
    _Stop,
    diverged_message,
    epoch_seed,
)
from thumbnet_keras.pipeline.rundir import (
    DamagedFileError,
    atomic_write,
    read_json,
    write_json,
)

__all__ = ["EpochCheckpoint", "fit_resumable", "load_checkpoint"]

STATE_FILE = "state.json"


MONITOR = "val_accuracy"


def _weights_file(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.weights.h5"


def _best_file(directory: Path, epoch: int) -> Path:
    return directory / f"best-epoch-{epoch:04d}.weights.h5"


# Between epochs of equal validation top-1: the lower validation loss.
TIEBREAK = "val_loss"


def improves(value: float, loss: float | None, best: dict | None) -> bool:
    """Whether an epoch's validation top-1 `value` (and validation `loss`,
    or None) beats `best` (`{"value", "val_loss"?}`, or None): higher
    top-1, or the same with a lower loss. NaN never improves; a best saved
    without a loss, or with a NaN one, is beaten on ties by any loss
    (`fit_resumable` fills an older checkpoint's from its history)."""
    if value != value:
        return False
    if best is None or value > best["value"]:
        return True
    if value < best["value"] or loss is None or loss != loss:
        return False
    kept = best.get(TIEBREAK)
    return kept is None or kept != kept or loss < kept


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer variables and the history after every epoch.

    Args:
        directory: the checkpoint folder (created if missing).
        history: metrics of the epochs before this `fit` (when resuming).
        resumed_from: epochs at which earlier processes resumed.
        monitor: a metric to maximize (e.g. "val_accuracy"): the weights of
            the best epoch so far are kept too. None: no selection.
        best: the best epoch so far, `{"monitor", "epoch", "value"}` (when
            resuming).
        extra: more JSON-able entries of the state file (seed, nonfinite).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        history: dict | None = None,
        resumed_from: list[int] | None = None,
        monitor: str | None = None,
        best: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__()
        self.extra = dict(extra or {})
        self.directory = Path(directory)
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.resumed_from = list(resumed_from or [])
        self.monitor = monitor
        self.best = dict(best) if best else None

    def _improved(self, logs: dict) -> float | None:
        if self.monitor is None or self.monitor not in logs:
            return None
        value = float(logs[self.monitor])
        if improves(value, logs.get(TIEBREAK), self.best):
            return value
        return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        done = epoch + 1
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(_weights_file(self.directory, done), self.model.save_weights)
        value = self._improved(logs)
        if value is not None:
            atomic_write(_best_file(self.directory, done), self.model.save_weights)
            self.best = {"monitor": self.monitor, "epoch": done, "value": value}
            if logs.get(TIEBREAK) is not None:
                self.best[TIEBREAK] = float(logs[TIEBREAK])
        write_json(
            self.directory / STATE_FILE,
            {
                "epoch": done,
                "history": self.history,
                "resumed_from": self.resumed_from,
                "best": self.best,
                **self.extra,
                "time": time.time(),
            },
        )
        keep = {_weights_file(self.directory, done).name}
        if self.best is not None:
            keep.add(_best_file(self.directory, self.best["epoch"]).name)
        for old in self.directory.glob("*epoch-*"):
            if old.name.endswith(".weights.h5") and old.name not in keep:
                old.unlink(missing_ok=True)


def load_checkpoint(directory: str | os.PathLike) -> dict | None:
    """The state of a checkpoint folder, or None when there is none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    state = read_json(path)
    epoch = state["epoch"]
    directory = Path(directory)
    if not _weights_file(directory, epoch).is_file():
        return None
    state["weights"] = str(_weights_file(directory, epoch))
    best = state.get("best")
    if best is not None:
        if not _best_file(directory, best["epoch"]).is_file():
            return None
        state["best_weights"] = str(_best_file(directory, best["epoch"]))
    return state


def _load_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.load_weights(path)`; a damaged checkpoint file is named, with
    the fix (a resume trial: a truncated epoch file ended in two tracebacks
    and h5py's "truncated file: eof = 70676", the file named nowhere)."""
    try:
        model.load_weights(str(path))
    except (OSError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        folder = Path(path).parent
        raise DamagedFileError(
            f"Checkpoint {str(path)!r} is damaged ({reason}). Delete {str(folder)!r} "
            "to train the stage again from its start, and rerun.",
            reason,
        ) from None


def _reseed(model: keras.Model, seed: int, epoch: int) -> None:
    """Global RNG and every layer's SeedGenerator (dropout) from (seed, epoch)
    only: SeedGenerator states are not in a weights file."""
    keras.utils.set_random_seed(epoch_seed(seed, epoch))
    for layer in model._flatten_layers():
        for generator in getattr(layer, "_seed_generators", ()):
            state = keras.ops.convert_to_numpy(generator.state)
            generator.state.assign(
                np.array([state[0], epoch * 2**20], dtype=state.dtype)
            )


def _prebuild(model: keras.Model, batches) -> None:
    """Builds the model's compiled metrics, loss and optimizer from one batch
    of a separate stream before `fit`.

    JAX and torch would otherwise peek at (and so advance) the epoch's
    stream: the first epoch of a resumed process then reads what the
    uninterrupted process read. TensorFlow would otherwise create those
    variables while tracing the train step, and a `tf.function` that creates
    variables is traced twice: ~10 s more per stage for MobileNetV2 on a
    2-core CPU."""
    build = getattr(model, "_symbolic_build", None)
    if build is None:
        return
    batch = next(iter(batches.as_numpy_iterator()))
    build(data_batch=batch)


def fit_resumable(
    model: keras.Model,
    train_data,
    epochs: int,
    checkpoint_dir: str | os.PathLike,
    verbose: int | str = "auto",
    log=print,
    validation_data=None,
    no_selection_reason: str = "no validation split",
    callbacks: list | None = None,
    seed: int | None = None,
    on_nonfinite: str = "fail",
    stage: str = "stage",
    learning_rate: float | None = None,
) -> dict:
    """`model.fit` for `epochs`, checkpointing each epoch and resuming.

    The model must be compiled and built. When `checkpoint_dir` holds a
    checkpoint, its weights and optimizer state are loaded and training
    continues at the next epoch.

    With `validation_data` (and an "accuracy" metric compiled), the model is
    evaluated on it after every epoch and ends with the weights of the epoch
    of highest validation top-1; without, with those of the last epoch.

    Args:
        model, epochs: as in `model.fit`.
        train_data: a batched dataset, or a function `epoch -> dataset`
            (0-based) whose stream depends only on the epoch: then each epoch
            is its own `fit` call, and a resumed stage reads exactly the data
            the uninterrupted one read.
        checkpoint_dir: the stage's checkpoint folder.
        verbose: Keras progress output.
        log: where progress messages go.
        validation_data: batches of `(images, labels)`, or None.
        no_selection_reason: recorded when `validation_data` is None.
        callbacks: more Keras callbacks, run before the checkpoint's.
        seed: with a per-epoch `train_data`: the global RNG and layers'
            SeedGenerators are reseeded from (seed, epoch) before each epoch.
        on_nonfinite: "fail": a non-finite loss, metric or weight stops the
            stage, restores the last good epoch and raises
            `TrainingDivergedError`; "continue": recorded, training goes on.
        stage, learning_rate: named in that error.

    Returns:
        `{"history": {metric: [per epoch]}, "epochs": epochs,
        "resumed_from": [epochs at which a process resumed], "seconds": s,
        "selection": {...}, "nonfinite": [{"epoch", "values"}]}` (seconds
        of this process's training). `selection` is `{"monitor":
        "val_accuracy", "best_epoch": K, "best_value": v}`, or `{"monitor":
        None, "best_epoch": epochs, "reason": ...}` for last-epoch selection.
    """
    from thumbnet_keras.pipeline.compute import active_replicas

    state = load_checkpoint(checkpoint_dir)
    monitor = MONITOR if validation_data is not None else None
    history, resumed_from, initial, best, nonfinite = {}, [], 0, None, []
    replicas = active_replicas()
    # The replicas each process of the stage trained on (a trial: a run
    # started on 2 devices resumed on 1 in silence, its record saying 1).
    attempts = [replicas]
    if state is not None:
        if not model.optimizer.built:  # So that load_weights restores it too.
            model.optimizer.build(model.trainable_variables)
        _load_weights(model, state["weights"])
        history, resumed_from = state["history"], list(state["resumed_from"])
        initial = int(state["epoch"])
        best = state.get("best") if monitor is not None else None
        if best is not None and TIEBREAK not in best:
            # Saved before the tie-break: its loss is in the history.
            losses = history.get(TIEBREAK) or []
            if len(losses) >= best["epoch"]:
                best = {**best, TIEBREAK: float(losses[best["epoch"] - 1])}
        nonfinite = list(state.get("nonfinite", []))
        attempts = list(state.get("replicas_by_attempt", [replicas]))
        if initial < epochs:  # (a process that trains nothing adds none)
            attempts.append(replicas)
            resumed_from.append(initial)
            log(f"  resuming from the checkpoint after epoch {initial}/{epochs}")
            if attempts[-2] != replicas:
                logging.getLogger(__name__).warning(
                    "[%s] the checkpoint's epochs trained on %d replica(s); this "
                    "process trains the rest on %d: the global batch is the same, "
                    "the devices are not (batch statistics differ per replica "
                    "on TensorFlow without --sync-batchnorm).",
                    stage, attempts[-2], replicas,
                )  # fmt: skip
        for extra_callback in callbacks or []:
            if best is not None and hasattr(extra_callback, "restore_best"):
                extra_callback.restore_best(best)  # progress lines
    per_epoch = callable(train_data)
    extra = {
        "seed": seed if per_epoch else None,
        "nonfinite": nonfinite,
        "replicas_by_attempt": attempts,
    }
    callback = EpochCheckpoint(
        checkpoint_dir, history, resumed_from, monitor, best, extra
    )
    guard = NonFiniteGuard(on_nonfinite, log=log)
    guard.events = extra["nonfinite"]  # Shared: the checkpoint saves them.
    start = time.perf_counter()
    fit_args = dict(
        callbacks=[*(callbacks or []), guard, callback],
        shuffle=False,  # The tf.data stream is already shuffled.
        validation_data=validation_data,
        verbose=verbose,
    )
    good = model.get_weights() if initial == 0 else None
    try:
        if initial < epochs and per_epoch:
            _prebuild(model, train_data(initial))
            for epoch in range(initial, epochs):
                if seed is not None:
                    _reseed(model, seed, epoch)
                model.fit(
                    train_data(epoch), epochs=epoch + 1, initial_epoch=epoch,
                    **fit_args,
                )  # fmt: skip
        elif initial < epochs:
            model.fit(train_data, epochs=epochs, initial_epoch=initial, **fit_args)
    except _Stop:
        event = guard.stopped
        restored = load_checkpoint(checkpoint_dir)
        if restored is not None:
            _load_weights(model, restored["weights"])
            last = int(restored["epoch"])
        else:
            set_weights(model, good)
            last = 0
        message = diverged_message(stage, event, epochs, last, learning_rate)
        log(message)
        raise TrainingDivergedError(message) from None
    nonfinite = guard.events
    if callback.best is not None:
        best_file = _best_file(Path(checkpoint_dir), callback.best["epoch"])
        _load_weights(model, best_file)
        selection = {
            "monitor": monitor,
            "best_epoch": callback.best["epoch"],
            "best_value": callback.best["value"],
        }
        log(
            f"  best epoch {selection['best_epoch']}/{epochs}: "
            f"{monitor} {selection['best_value']:.4f}"
        )
    else:
        reason = no_selection_reason if monitor is None else f"no {monitor} logged"
        selection = {"monitor": None, "best_epoch": epochs, "reason": reason}
        if monitor is not None:
            why = (
                f" (under data_parallel on JAX, a validation batch is cut to a "
                f"multiple of the {replicas} devices: a validation split of fewer "
                "images than that leaves none)"
                if replicas > 1 and keras.backend.backend() == "jax"
                else ""
            )
            logging.getLogger(__name__).warning(
                "[%s] no %s was logged: every validation batch was empty%s. No "
                "epoch was selected: keeping the last, %d/%d.",
                stage, monitor, why, epochs, epochs,
            )  # fmt: skip
    return {
        "history": callback.history,
        "epochs": epochs,
        "resumed_from": callback.resumed_from,
        "seconds": round(time.perf_counter() - start, 3),
        "selection": selection,
        "nonfinite": nonfinite,
        **({"replicas_by_attempt": attempts} if len(set(attempts)) > 1 else {}),
    }
