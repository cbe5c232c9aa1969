"""Shared test helpers (keras core's test_case.py and keras-hub's, in miniature).

Every test module runs once per Keras backend: nox sets KERAS_BACKEND and runs
pytest three times. Backend gaps are skipped inside the test, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Under pytest-xdist (`nox -s tests` runs two workers), each worker gets its
# own PREFECT_HOME below the one nox set: the temporary Prefect server that
# in-process flow runs start keeps its SQLite database there, and two
# servers writing one database file fail with "database is locked".
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = os.path.join(
        os.environ["PREFECT_HOME"], os.environ["PYTEST_XDIST_WORKER"]
    )

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
REPO = Path(__file__).resolve().parents[1]


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def tiny_teacher(
    input_shape=(16, 16, 3), num_classes=3, width=8, head="gap", name="tiny"
) -> keras.Model:
    """A small conv-BN-ReLU classifier that outputs logits."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(width * (i + 1), 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.8, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if head == "flatten":
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    if head == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def run_python(code: str, env: dict | None = None, timeout: int = 300, args=()) -> dict:
    """Runs `code` in a fresh interpreter (`args` its sys.argv[1:]); it must
    print one JSON line last."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_config_roundtrip(model: keras.Model, inputs) -> None:
    """from_config(get_config()) builds the same model; with the weights copied
    it computes the same outputs."""
    clone = model.__class__.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(
        to_numpy(clone(inputs)), to_numpy(model(inputs)), atol=1e-6, rtol=1e-6
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before:
    Keras' default seeds are drawn from Python's `random` again (a
    `configure_determinism` outside a `default_seed_scope` leaves a private
    generator in its place, and a later test's initial weights then
    depended on how many tests drew from it: the CI order failed a test
    that passed alone), then everything is seeded with 0."""
    import random

    from keras.src.random import seed_generator

    seed_generator.python_random = random
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_temporary_servers():
    """Stops the temporary Prefect server that in-process flow runs start,
    while pytest's output streams are still open. Left to Prefect's atexit
    hook, its "Stopping temporary server" log line went to a closed stream
    and printed a "--- Logging error ---" traceback after every run."""
    yield
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()
