"""Run folders: layout, atomic writes, and claiming a folder without ever
writing over another run's outputs.

Layout of `runs/<run-name>/` (a `thumbnet` run):

    config.json            the resolved RunConfig + environment (written first)
    data.json              the prepared dataset (path, classes, split counts)
    teacher.keras          the teacher (trained as stage 0, or copied in)
    thumbnet.keras         image -> E -> S -> logits, primary factor
    thumbnail_model.keras  S alone (thumbnail -> logits), primary factor
    f<factor>/             thumbnet.keras, thumbnail_model.keras, downscaler.keras
    metrics.json           every evaluated arm, stage histories, environment
    report.md, report.html
    stages/<stage>.json    a finished stage's record (its presence = done)
    stages/<stage>/        the stage's products (.keras files)
    checkpoints/<stage>/   per-epoch checkpoints of an unfinished stage

Every file is written to a temporary name in the same folder and moved into
place with `os.replace`, so a process killed at any moment (kill -9) leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "atomic_write",
    "check_writable",
    "read_json",
    "save_keras",
    "write_json",
]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` on a temporary path beside `path`, then renames it.

    The temporary name keeps `path`'s suffixes (Keras checks `.keras` and
    `.weights.h5`). If `write` raises, `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        write(str(tmp))
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically writes `obj` as indented JSON."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, _write)


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file."""
    with open(path) as f:
        return json.load(f)


def save_keras(model, path: str | os.PathLike) -> str:
    """Atomically saves a Keras model to a `.keras` file; returns the path."""
    atomic_write(path, lambda tmp: model.save(tmp))
    return str(path)


def check_writable(directory: str | os.PathLike) -> None:
    """Raises `ConfigError` unless `directory` exists (or can be made) and
    accepts a new file. Creates `directory` if missing, nothing else."""
    from thumbnet_keras.pipeline.config import ConfigError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"Output directory {str(directory)!r} is not writable: {err.strerror or err}."
        ) from err


def default_run_name(prefix: str) -> str:
    """`<prefix>-YYYYmmdd-HHMMSS` (local time)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in prefix)
    return f"{safe}-{stamp}"


class Run:
    """Paths inside one run folder.

    Args:
        path: the run folder (`runs/<run-name>`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def name(self) -> str:
        """The run name (folder name)."""
        return self.path.name

    def file(self, *parts: str) -> Path:
        """A path inside the run folder."""
        return self.path.joinpath(*parts)

    @property
    def config_json(self) -> Path:
        return self.file("config.json")

    @property
    def data_json(self) -> Path:
        return self.file("data.json")

    @property
    def teacher_keras(self) -> Path:
        return self.file("teacher.keras")

    @property
    def metrics_json(self) -> Path:
        return self.file("metrics.json")

    def factor_dir(self, factor: int) -> Path:
        """`f<factor>/`, the per-factor exported models."""
        return self.file(f"f{factor}")

    def stage_record(self, stage_id: str) -> Path:
        """`stages/<stage_id>.json`: present once the stage finished."""
        return self.file("stages", f"{stage_id}.json")

    def stage_dir(self, stage_id: str) -> Path:
        """`stages/<stage_id>/`: the finished stage's model files."""
        return self.file("stages", stage_id)

    def checkpoint_dir(self, stage_id: str) -> Path:
        """`checkpoints/<stage_id>/`: per-epoch state of a running stage."""
        return self.file("checkpoints", stage_id)

    def is_done(self, stage_id: str) -> bool:
        """Whether the stage's record exists."""
        return self.stage_record(stage_id).is_file()

    def config(self) -> dict:
        """The parsed `config.json` (`{"config": ..., "environment": ...}`)."""
        return read_json(self.config_json)

    def data(self) -> dict:
        """The parsed `data.json`."""
        return read_json(self.data_json)


def claim(
    path: str | os.PathLike, config: dict, kind: str, inputs: dict | None = None
) -> tuple[Run, bool]:
    """Creates the run folder, or reopens it when it belongs to this same run.

    A folder that already holds a `config.json` is reopened (to resume) only
    when the saved config equals `config` and the saved `inputs` (content
    hashes of what the run reads, e.g. the dataset manifest) equal `inputs`;
    otherwise `ConfigError` is raised and nothing is written. A non-empty
    folder without `config.json` is someone else's: also refused.

    Returns:
        `(run, resumed)`.
    """
    from thumbnet_keras.pipeline.config import ConfigError

    run = Run(path)
    if run.config_json.is_file():
        saved = run.config()
        if saved.get("kind") != kind or saved.get("config") != config:
            old, new = saved.get("config", {}), config
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"Run folder {str(run.path)!r} already holds a {saved.get('kind')!r} "
                f"run with a different configuration (differs in: "
                f"{', '.join(keys) or 'kind'}). Its outputs are left untouched: "
                "choose another run name, or rerun with the same settings to resume."
            )
        if saved.get("inputs") != inputs:
            raise ConfigError(
                f"Run folder {str(run.path)!r} was started on different inputs "
                f"(saved {saved.get('inputs')}, now {inputs}): the dataset manifest "
                "changed since. Finished stages used the old data, so the run is not "
                "resumed; its outputs are left untouched. Choose another run name."
            )
        return run, True
    if run.path.exists() and any(run.path.iterdir()):
        raise ConfigError(
            f"Run folder {str(run.path)!r} exists and is not a thumbnet run folder "
            "(no config.json); choose another run name."
        )
    check_writable(run.path)
    from thumbnet_keras.pipeline.environment import environment

    write_json(
        run.config_json,
        {
            "kind": kind,
            "config": config,
            "inputs": inputs,
            "environment": environment(),
        },
    )
    return run, False
