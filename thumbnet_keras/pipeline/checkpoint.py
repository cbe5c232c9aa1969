"""Per-epoch checkpoints that survive kill -9, and `fit_resumable`.

Like `keras.callbacks.BackupAndRestore`, but every file is written atomically
(temporary name, then `os.replace`) and the state file that names the latest
epoch is written last, so a process killed at any moment leaves a consistent
checkpoint: the state file always points at a complete weights file. Keras's
`save_weights` of a compiled model includes the optimizer's variables, so a
resumed stage continues with the same optimizer moments and step count (and
so the same point of the learning-rate schedule).

Best-epoch selection: with validation data, the epoch with the highest
validation top-1 (`val_accuracy`; the first one on ties) is kept. Its weights
are saved as `best-epoch-000K.weights.h5`, before the state file that names
it, so the best-so-far epoch and value survive a kill and a resume like the
rest; when training ends, the model is left with the best epoch's weights.

Files in a checkpoint folder:

    state.json               {"epoch": N, "history": {...}, "resumed_from": [...],
                              "best": {"monitor", "epoch", "value"} or null}
    epoch-000N.weights.h5    model and optimizer variables after epoch N
    best-epoch-000K.weights.h5   the same after the best epoch K so far
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import keras

from thumbnet_keras.pipeline.rundir import atomic_write, read_json, write_json

__all__ = ["EpochCheckpoint", "fit_resumable", "load_checkpoint"]

STATE_FILE = "state.json"


MONITOR = "val_accuracy"


def _weights_file(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.weights.h5"


def _best_file(directory: Path, epoch: int) -> Path:
    return directory / f"best-epoch-{epoch:04d}.weights.h5"


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
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        history: dict | None = None,
        resumed_from: list[int] | None = None,
        monitor: str | None = None,
        best: dict | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.resumed_from = list(resumed_from or [])
        self.monitor = monitor
        self.best = dict(best) if best else None

    def _improved(self, logs: dict) -> float | None:
        if self.monitor is None or self.monitor not in logs:
            return None
        value = float(logs[self.monitor])
        if value != value:  # NaN never improves.
            return None
        if self.best is None or value > self.best["value"]:
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
        write_json(
            self.directory / STATE_FILE,
            {
                "epoch": done,
                "history": self.history,
                "resumed_from": self.resumed_from,
                "best": self.best,
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
) -> dict:
    """`model.fit` for `epochs`, checkpointing each epoch and resuming.

    The model must be compiled and built. When `checkpoint_dir` holds a
    checkpoint, its weights and optimizer state are loaded and training
    continues at the next epoch.

    With `validation_data` (and an "accuracy" metric compiled), the model is
    evaluated on it after every epoch and ends with the weights of the epoch
    of highest validation top-1; without, with those of the last epoch.

    Args:
        model, train_data, epochs: as in `model.fit`.
        checkpoint_dir: the stage's checkpoint folder.
        verbose: Keras progress output.
        log: where progress messages go.
        validation_data: batches of `(images, labels)`, or None.
        no_selection_reason: recorded when `validation_data` is None.
        callbacks: more Keras callbacks, run before the checkpoint's.

    Returns:
        `{"history": {metric: [per epoch]}, "epochs": epochs,
        "resumed_from": [epochs at which a process resumed], "seconds": s,
        "selection": {...}}` (seconds of this process's training).
        `selection` is `{"monitor": "val_accuracy", "best_epoch": K,
        "best_value": v}`, or `{"monitor": None, "best_epoch": epochs,
        "reason": ...}` for last-epoch selection.
    """
    state = load_checkpoint(checkpoint_dir)
    monitor = MONITOR if validation_data is not None else None
    history, resumed_from, initial, best = {}, [], 0, None
    if state is not None:
        if not model.optimizer.built:  # So that load_weights restores it too.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(state["weights"])
        history, resumed_from = state["history"], list(state["resumed_from"])
        initial = int(state["epoch"])
        best = state.get("best") if monitor is not None else None
        if initial < epochs:
            resumed_from.append(initial)
            log(f"  resuming from the checkpoint after epoch {initial}/{epochs}")
    callback = EpochCheckpoint(checkpoint_dir, history, resumed_from, monitor, best)
    start = time.perf_counter()
    if initial < epochs:
        model.fit(
            train_data,
            epochs=epochs,
            initial_epoch=initial,
            callbacks=[*(callbacks or []), callback],
            shuffle=False,  # The tf.data stream is already shuffled.
            validation_data=validation_data,
            verbose=verbose,
        )
    if callback.best is not None:
        best_file = _best_file(Path(checkpoint_dir), callback.best["epoch"])
        model.load_weights(str(best_file))
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
    return {
        "history": callback.history,
        "epochs": epochs,
        "resumed_from": callback.resumed_from,
        "seconds": round(time.perf_counter() - start, 3),
        "selection": selection,
    }
