"""Per-epoch checkpoints that survive kill -9, and `fit_resumable`.

Like `keras.callbacks.BackupAndRestore`, but every file is written atomically
(temporary name, then `os.replace`) and the state file that names the latest
epoch is written last, so a process killed at any moment leaves a consistent
checkpoint: the state file always points at a complete weights file. Keras's
`save_weights` of a compiled model includes the optimizer's variables, so a
resumed stage continues with the same Adam moments and step count.

Files in a checkpoint folder:

    state.json               {"epoch": N, "history": {...}, "resumed_from": [...]}
    epoch-000N.weights.h5    model and optimizer variables after epoch N
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import keras

from thumbnet_keras.pipeline.rundir import atomic_write, read_json, write_json

__all__ = ["EpochCheckpoint", "fit_resumable", "load_checkpoint"]

STATE_FILE = "state.json"


def _weights_file(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.weights.h5"


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer variables and the history after every epoch.

    Args:
        directory: the checkpoint folder (created if missing).
        history: metrics of the epochs before this `fit` (when resuming).
        resumed_from: epochs at which earlier processes resumed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        history: dict | None = None,
        resumed_from: list[int] | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.resumed_from = list(resumed_from or [])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        done = epoch + 1
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(_weights_file(self.directory, done), self.model.save_weights)
        write_json(
            self.directory / STATE_FILE,
            {
                "epoch": done,
                "history": self.history,
                "resumed_from": self.resumed_from,
                "time": time.time(),
            },
        )
        for old in self.directory.glob("epoch-*"):
            if not old.name.startswith(f"epoch-{done:04d}."):
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
    return state


def fit_resumable(
    model: keras.Model,
    train_data,
    epochs: int,
    checkpoint_dir: str | os.PathLike,
    verbose: int | str = "auto",
    log=print,
) -> dict:
    """`model.fit` for `epochs`, checkpointing each epoch and resuming.

    The model must be compiled and built. When `checkpoint_dir` holds a
    checkpoint, its weights and optimizer state are loaded and training
    continues at the next epoch.

    Returns:
        `{"history": {metric: [per epoch]}, "epochs": epochs,
        "resumed_from": [epochs at which a process resumed], "seconds": s}`
        (seconds of this process's training).
    """
    state = load_checkpoint(checkpoint_dir)
    history, resumed_from, initial = {}, [], 0
    if state is not None:
        if not model.optimizer.built:  # So that load_weights restores it too.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(state["weights"])
        history, resumed_from = state["history"], list(state["resumed_from"])
        initial = int(state["epoch"])
        if initial < epochs:
            resumed_from.append(initial)
            log(f"  resuming from the checkpoint after epoch {initial}/{epochs}")
    callback = EpochCheckpoint(checkpoint_dir, history, resumed_from)
    start = time.perf_counter()
    if initial < epochs:
        model.fit(
            train_data,
            epochs=epochs,
            initial_epoch=initial,
            callbacks=[callback],
            shuffle=False,  # The tf.data stream is already shuffled.
            verbose=verbose,
        )
    return {
        "history": callback.history,
        "epochs": epochs,
        "resumed_from": callback.resumed_from,
        "seconds": round(time.perf_counter() - start, 3),
    }
