"""The environment a run executed in: backend, versions, device."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["environment"]


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


def environment() -> dict:
    """Backend, package versions, Python, platform and device, as a dict."""
    import keras

    return {
        "backend": keras.backend.backend(),
        "device": _device(),
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
