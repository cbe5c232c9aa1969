"""The environment a run executed in (backend, versions, device), and the
switches that keep the frameworks quiet, set before they are imported."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
from importlib import metadata

__all__ = [
    "cpu_model",
    "environment",
    "hidden_stderr",
    "import_backend_quietly",
    "planned_backend",
    "quiet_env",
    "quiet_frameworks",
]

# Loggers of the frameworks that warn about things a user cannot act on
# (tf.function retracing, the tf.data cache, JAX's missing-GPU notice).
_CHATTY_LOGGERS = ("tensorflow", "absl", "jax._src.xla_bridge", "h5py")


def quiet_env(verbosity: int = 0) -> dict[str, str]:
    """The environment switches `quiet_frameworks(verbosity)` sets."""
    return {
        "TF_CPP_MIN_LOG_LEVEL": {0: "3", 1: "1"}.get(verbosity, "0"),
        "GRPC_VERBOSITY": "ERROR" if verbosity == 0 else "INFO",
        "GLOG_minloglevel": "2" if verbosity == 0 else "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def planned_backend() -> str:
    """The Keras backend this process runs, or will once Keras is imported:
    Keras' own when it is, else `KERAS_BACKEND`, else the `backend` of
    Keras' config file (`$KERAS_HOME/keras.json`, default `~/.keras`, or
    `/tmp/.keras` when the home folder is not writable), else
    "tensorflow" (Keras' default). Reads no framework."""
    import json

    if "keras" in sys.modules and hasattr(sys.modules["keras"], "backend"):
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    if "KERAS_HOME" in os.environ:  # as keras/src/backend/config.py finds it
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def quiet_frameworks(verbosity: int = 0) -> None:
    """Sets the logging switches of TensorFlow, absl, oneDNN, gRPC and JAX.

    Call it before Keras or a backend is imported (the C++ switches are read
    once, at import). `verbosity` 0 (default): errors only, and the C++
    start-up lines (oneDNN, CUDA drivers, CPU instructions, cuInit) are
    hidden; 1: warnings; 2: everything. A switch the user set in the
    environment is kept at verbosity 0.
    """
    for key, value in quiet_env(verbosity).items():
        if verbosity == 0:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value
    py_level = {0: logging.ERROR, 1: logging.WARNING}.get(verbosity, logging.DEBUG)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(py_level)


@contextlib.contextmanager
def _stderr_to(file) -> object:
    """Points file descriptor 2 (where C++ writes) at `file` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_backend_quietly(quiet: bool = True) -> None:
    """Imports Keras (and its backend) with the C++ start-up lines hidden.

    TensorFlow writes its oneDNN / CUDA-driver / CPU-instruction notices
    before its logging is initialized, so `TF_CPP_MIN_LOG_LEVEL` does not
    reach them; they go to a temporary file here, shown if the import fails.
    On the JAX and torch backends TensorFlow (tf.data, image decoding) is
    imported here too when installed, so its notices are hidden the same
    way instead of appearing at its first use.
    `quiet=False` (the CLI's `-v`): a plain import, every line shown.
    """
    if "keras" in sys.modules:
        return
    if not quiet:
        import keras  # noqa: F401

        return
    with hidden_stderr():
        import keras

        if keras.backend.backend() != "tensorflow" and (
            importlib.util.find_spec("tensorflow") is not None
        ):
            import tensorflow  # noqa: F401


@contextlib.contextmanager
def hidden_stderr():
    """Hides what is written to file descriptor 2 meanwhile (C++ notices
    that bypass Python's logging), and shows it if the block raises."""
    with tempfile.TemporaryFile(mode="w+") as captured:
        try:
            with _stderr_to(captured):
                yield
        except BaseException:
            captured.seek(0)
            sys.stderr.write(captured.read())
            raise


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device() -> str:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return ", ".join(sorted({str(d.device_kind) for d in jax.devices()}))
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return ", ".join(g.name for g in gpus)
    except Exception:  # A device query must never fail a run.
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def cpu_model() -> str | None:
    """The CPU model (Linux: /proc/cpuinfo's "model name"; else
    `platform.processor()`): float results on CPU depend on it (oneDNN picks
    kernels per instruction set), so two runs of the same code and packages
    on other CPUs can differ from the first epoch on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    """Backend, package versions, Python, platform, CPU and device, as a dict."""
    import keras

    return {
        "backend": keras.backend.backend(),
        "device": _device(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in (
                "thumbnet-keras",
                "keras",
                "tensorflow",
                "jax",
                "torch",
                "prefect",
                "numpy",
            )
        },
    }
