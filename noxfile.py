"""nox sessions: `nox -s tests` runs the whole suite once per Keras backend.

One virtualenv serves all three backends (Keras picks its backend from
`KERAS_BACKEND` at import time, and every pytest run is a fresh process), so the
heavy install happens once. Restrict backends with `THUMBNET_BACKENDS=jax,torch`;
pass pytest arguments after `--`, e.g. `nox -s tests -- -k losses -x`.

Each backend's run is spread over `THUMBNET_TEST_WORKERS` pytest-xdist
workers (default 2, the CI machine's cores; 0 runs in one process). Tests of
one module stay on one worker (`--dist loadscope`), so a module's shared
fixture (a trained run, say) is built once.
"""

import os
import tempfile

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

BACKENDS = ("tensorflow", "jax", "torch")

# torch==2.13.0 is pinned because the project's CPU machines carry that CPU
# build locally; an open range would pull a multi-GB CUDA build from PyPI.
TEST_REQUIREMENTS = ["torch==2.13.0", "jax[cpu]>=0.10,<0.11"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, once per Keras backend (tensorflow, jax, torch)."""
    session.install(*TEST_REQUIREMENTS)
    session.install("-e", ".[dev,export]")
    backends = os.environ.get("THUMBNET_BACKENDS", ",".join(BACKENDS)).split(",")
    workers = int(os.environ.get("THUMBNET_TEST_WORKERS", "2"))
    parallel = ["-n", str(workers), "--dist", "loadscope"] if workers > 0 else []
    prefect_home = tempfile.mkdtemp(prefix="thumbnet-prefect-")
    for backend in backends:
        session.log(f"=== Keras backend: {backend} ===")
        session.run(
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *parallel,
            *session.posargs,
            env={
                "KERAS_BACKEND": backend,
                "PREFECT_HOME": prefect_home,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONHASHSEED": "0",
            },
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
