"""A seed reproduces a run, and a resumed stage continues the same run
(issue 12). Real subprocesses running the pipeline's teacher stage (a tiny
CNN trained on tiny real images, augmentation on), no mocks:

* two runs with one seed, started at the same time, end bit-identical
  (weights, per-epoch metrics);
* a run killed with SIGKILL in the middle of the stage and resumed ends
  with the weights of a run left alone (started beside it);
* the joint stage (E and S trained together against the teacher, every
  loss computed) of two runs with one seed, started at the same time, ends
  bit-identical too, in the backend under test.

The teacher tests' subprocesses run TensorFlow; the joint test's run the
backend under test (18-52 s of two CPU cores on each, measured 2026-11-28).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from pipeline_fixtures import REPO, subprocess_env, tiny_dataset

pytestmark = [pytest.mark.slow]

EPOCHS = 6

# One stage of the pipeline (the trained teacher), as `thumbnet train` runs it.
WORKER = """
import json, sys
from thumbnet_keras import pipeline
from thumbnet_keras.pipeline.stages import get_teacher
manifest, runs, name, data_dir, epochs = sys.argv[1:6]
params = pipeline.ThumbNetParams(
    dataset=manifest, runs_dir=runs, run_name=name, data_dir=data_dir,
    image_size=32, limit_per_class=12, batch_size=4, teacher_epochs=int(epochs),
    backbone_options={"widths": [8, 16]}, learning_rate=3e-3, seed=7,
)
run = pipeline.resolve_run(params)
cfg = run["config"]
prepared = pipeline.prepare_dataset(cfg["dataset"], data_dir, cfg["limit_per_class"])
record = get_teacher(run["run_dir"], prepared, verbose=0)
print("RECORD " + json.dumps({k: record[k] for k in ("history", "resumed_from")}))
"""


# The teacher (2 epochs), then the f=2 joint stage, as `thumbnet train` runs them.
JOINT_WORKER = """
import json, sys
from thumbnet_keras import pipeline
from thumbnet_keras.pipeline.stages import get_teacher, train_stage
manifest, runs, name, data_dir, epochs = sys.argv[1:6]
params = pipeline.ThumbNetParams(
    dataset=manifest, runs_dir=runs, run_name=name, data_dir=data_dir,
    image_size=32, limit_per_class=12, batch_size=4, teacher_epochs=2,
    joint_epochs=int(epochs), factors=[2], backbone_options={"widths": [8, 16]},
    learning_rate=3e-3, seed=7,
)
run = pipeline.resolve_run(params)
cfg = run["config"]
prepared = pipeline.prepare_dataset(cfg["dataset"], data_dir, cfg["limit_per_class"])
get_teacher(run["run_dir"], prepared, verbose=0)
record = train_stage(run["run_dir"], 2, "joint", verbose=0)
print("RECORD " + json.dumps({k: record[k] for k in ("history", "resumed_from")}))
"""


def _start(
    manifest, tmp_path, name, worker=WORKER, epochs=EPOCHS, backend="tensorflow"
):
    args = [sys.executable, "-c", worker, manifest, str(tmp_path / "runs"), name,
            str(tmp_path / "data"), str(epochs)]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "a")  # noqa: SIM115 (closed by _finish)
    env = subprocess_env() | {"KERAS_BACKEND": backend}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    proc.log_file = log
    return proc


def _finish(proc, tmp_path, name, timeout=300) -> dict:
    proc.wait(timeout=timeout)
    proc.log_file.close()
    output = (tmp_path / f"{name}.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    line = [x for x in output.splitlines() if x.startswith("RECORD ")][-1]
    return json.loads(line[len("RECORD ") :])


def _weights(tmp_path, name, model="teacher.keras") -> list[np.ndarray]:
    path = tmp_path / "runs" / name / model
    return keras.saving.load_model(path, compile=False).get_weights()


def _prepare(tmp_path) -> str:
    """The dataset, prepared once here (the workers then reuse it)."""
    from thumbnet_keras import pipeline

    manifest = tiny_dataset(tmp_path, per_class=16)
    # No validation split: the stage keeps its last epoch, so the weights
    # compared are those of the last epoch (not an early best one).
    path = Path(manifest)
    text = path.read_text()
    assert "split: {test_fraction: 0.25, seed: 0}" in text
    path.write_text(text.replace("seed: 0}", "validation_fraction: 0.0, seed: 0}"))
    pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 12)
    return manifest


def _assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), float(np.max(np.abs(x - y)))


def test_same_seed_concurrent_runs_are_bit_identical(tmp_path):
    manifest = _prepare(tmp_path)
    first = _start(manifest, tmp_path, "a")
    second = _start(manifest, tmp_path, "b")  # at the same time, competing
    a, b = _finish(first, tmp_path, "a"), _finish(second, tmp_path, "b")
    assert len(a["history"]["loss"]) == EPOCHS
    assert a["history"] == b["history"]  # every metric of every epoch, exactly
    _assert_identical(_weights(tmp_path, "a"), _weights(tmp_path, "b"))
    # The runs did train (the loss moved): identical is not "nothing happened".
    assert a["history"]["loss"][0] != a["history"]["loss"][-1]


def test_killed_and_resumed_stage_ends_with_the_uninterrupted_weights(tmp_path):
    manifest = _prepare(tmp_path)
    alone = _start(manifest, tmp_path, "alone")
    killed = _start(manifest, tmp_path, "killed")
    state = tmp_path / "runs" / "killed" / "checkpoints" / "teacher" / "state.json"
    killed_after = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if state.is_file():
            killed_after = json.loads(state.read_text())["epoch"]
            if killed_after >= 2:
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    killed.wait(timeout=60)
    killed.log_file.close()
    assert killed.returncode == -signal.SIGKILL
    assert killed_after is not None and 2 <= killed_after < EPOCHS
    resumed = _finish(_start(manifest, tmp_path, "killed"), tmp_path, "killed")
    reference = _finish(alone, tmp_path, "alone")
    (at,) = resumed["resumed_from"]
    assert killed_after <= at < EPOCHS
    assert resumed["history"] == reference["history"]
    _assert_identical(_weights(tmp_path, "killed"), _weights(tmp_path, "alone"))


def test_same_seed_concurrent_joint_stages_are_bit_identical(tmp_path):
    """The stage whose E trains: two runs' histories (total, CL, KD, FM and
    MM losses, train top-1; no validation split, so the last epoch is kept)
    and saved E and S are equal, bit for bit."""
    manifest = _prepare(tmp_path)
    backend = keras.backend.backend()
    first = _start(manifest, tmp_path, "a", JOINT_WORKER, 3, backend)
    second = _start(manifest, tmp_path, "b", JOINT_WORKER, 3, backend)
    a, b = _finish(first, tmp_path, "a"), _finish(second, tmp_path, "b")
    assert {"cl_loss", "kd_loss", "fm_loss", "mm_loss"} <= set(a["history"])
    assert len(a["history"]["loss"]) == 3
    assert a["history"] == b["history"]
    for model in ("downscaler.keras", "student.keras"):
        path = f"stages/f2-joint/{model}"
        _assert_identical(_weights(tmp_path, "a", path), _weights(tmp_path, "b", path))
    # E trained: its output conv (zero at the start) moved.
    residual = keras.saving.load_model(
        tmp_path / "runs" / "a" / "stages/f2-joint/downscaler.keras", compile=False
    ).get_layer("residual_conv")
    assert np.abs(residual.get_weights()[0]).max() > 0


def test_default_seeds_ignore_other_threads_drawing_from_random():
    """Keras seeds unseeded initializers and random layers from Python's
    process-wide `random`; in a `thumbnet` process other threads (Prefect's)
    draw from it too, and one draw between seeding and building E gave E
    other initial weights (the demo's run-to-run flips). After
    `configure_determinism(seed)` the same seed builds the same E and the
    same Dropout seed while another thread draws from `random` non-stop."""
    import random
    import threading

    from thumbnet_keras import build_downscaler
    from thumbnet_keras.pipeline.health import configure_determinism, default_seed_scope

    @default_seed_scope()  # as the pipeline's stage functions
    def build(seed):
        configure_determinism(seed, deterministic=True)
        e = build_downscaler((16, 16, 3), 2, width=4, depth=1)
        dropout = keras.layers.Dropout(0.5)  # its SeedGenerator's state
        return [np.asarray(w) for w in e.weights], dropout.seed_generator.state.numpy()

    quiet = build(3)
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        busy = [build(3) for _ in range(3)]
        other = build(4)
    finally:
        stop.set()
        thread.join()
    for weights, dropout_seed in busy:
        np.testing.assert_array_equal(dropout_seed, quiet[1])
        for a, b in zip(quiet[0], weights, strict=True):
            np.testing.assert_array_equal(a, b)
    # A different seed gives other weights: the comparison can fail.
    assert any(not np.array_equal(a, b) for a, b in zip(quiet[0], other[0]))


def test_default_seed_scope_gives_keras_its_seed_source_back(monkeypatch):
    """Inside a stage (`default_seed_scope`) Keras' default seeds come from
    the stage's seed; after it, `keras.utils.set_random_seed` seeds them
    again, as Keras documents."""
    import random

    from keras.src.random import seed_generator

    from thumbnet_keras.pipeline.health import configure_determinism, default_seed_scope

    def default_seed(seed):
        keras.utils.set_random_seed(seed)
        return keras.initializers.GlorotUniform().seed  # drawn, as E's are

    # Keras' own source, whatever an unscoped configure_determinism left.
    monkeypatch.setattr(seed_generator, "python_random", random)
    with default_seed_scope():
        configure_determinism(3, deterministic=True)
        assert isinstance(seed_generator.python_random, random.Random)
        assert seed_generator.python_random is not random._inst
        inside = default_seed(5)
        assert default_seed(5) != inside  # set_random_seed does not reach it
    assert seed_generator.python_random is random
    assert default_seed(5) == default_seed(5) != default_seed(6)
