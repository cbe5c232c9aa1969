"""Ctrl-C inside a run (`thumbnet_keras.pipeline.interrupt`): an interrupt a
library swallows still stops the run at the next stopping point."""

from __future__ import annotations

import signal

import keras
import numpy as np
import pytest

from thumbnet_keras.pipeline import interrupt
from thumbnet_keras.pipeline.progress import EpochProgress


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """SIGINT handled as Python sets it up in a terminal: `default_int_handler`,
    not blocked. This test process may have inherited it ignored (a shell's
    background job) or blocked (CI's runner); `handled()` then rightly
    leaves it alone, and a raised signal would never arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    masks = hasattr(signal, "pthread_sigmask")  # not on Windows
    blocked = masks and signal.SIGINT in signal.pthread_sigmask(
        signal.SIG_UNBLOCK, [signal.SIGINT]
    )
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        signal.signal(signal.SIGINT, previous)


class _SwallowsCtrlC:
    """Presses Ctrl-C while Python runs its `__del__`, where an exception
    is printed ("Exception ignored in ...") and dropped, as TensorFlow's
    resource deleters would have it."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def _swallowed_ctrl_c() -> None:
    _SwallowsCtrlC()  # Collected at once: __del__ runs here.


def test_ctrl_c_raises_says_so_and_the_handler_is_put_back(capfd):
    before = signal.getsignal(signal.SIGINT)
    with interrupt.handled():
        assert not interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()  # Asked again: still stopping.
    assert signal.getsignal(signal.SIGINT) is before
    assert "thumbnet: Ctrl-C: stopping the run..." in capfd.readouterr().err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_ctrl_c_stops_fit_at_the_next_epoch():
    class PressCtrlCInDel(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                _swallowed_ctrl_c()

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    history = keras.callbacks.History()
    x, y = np.zeros((8, 2), "float32"), np.zeros((8, 1), "float32")
    with interrupt.handled():
        _swallowed_ctrl_c()  # Nothing raised here, but recorded.
        assert interrupt.requested()
    with interrupt.handled():
        assert not interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, batch_size=2, epochs=3, verbose=0,
                      callbacks=[PressCtrlCInDel(), EpochProgress("s", 3), history])  # fmt: skip
    # The rest of the epoch ran (its end saves a stage's checkpoint); the
    # next one did not start.
    assert history.epoch == [0], history.epoch
    assert not interrupt.requested()  # Cleared on leaving `handled()`.


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.handled():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # Nothing happens.
            assert not interrupt.requested()
    finally:
        signal.signal(signal.SIGINT, previous)
