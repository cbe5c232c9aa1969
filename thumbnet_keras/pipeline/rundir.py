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
    .lock                  held by the one process working in the folder
    stages/<stage>.json    a finished stage's record (its presence = done)
    stages/<stage>/        the stage's products (.keras files)
    checkpoints/<stage>/   per-epoch checkpoints of an unfinished stage

Every file is written to a temporary name in the same folder and moved into
place with `os.replace`, so a process killed at any moment (kill -9) leaves
either the old file or the new one, never half of one.

One process at a time works in a run folder: `lock_run` takes `.lock` (an
exclusive `flock`, with the holder's pid, host, start time and command in
the file). A second process is refused with a message naming the holder; a
lock left by a killed process is free again (the kernel drops a dead
process's `flock`) and is taken over, the message naming the dead holder.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thumbnet_keras.pipeline.config import ConfigError

__all__ = [
    "Run",
    "RunLockedError",
    "discard_unstarted",
    "lock_run",
    "unlock_run",
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


class DamagedFileError(ConfigError):
    """A run's JSON file that is not JSON; `reason` is the decoder's."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # Pickles (a Prefect task's error).
        return type(self), (str(self), self.reason)


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; `DamagedFileError` naming it when it is not JSON
    (a damaged stage record gave two tracebacks ending in JSONDecodeError).
    Deleting a damaged stage record is not the advice: later stages were
    trained on that stage's outputs, and a record under stages/ may be no
    stage's (E's recorded width)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFileError(
            f"{str(path)!r} is damaged (not JSON: {err}); restore it from a "
            "copy, or start a new run (another --run-name).",
            str(err),
        ) from None


def save_keras(model, path: str | os.PathLike) -> str:
    """Atomically saves a Keras model to a `.keras` file; returns the path.
    A mixed-precision model is saved as float32, synchronized BatchNorm as
    plain BatchNorm (`compute.portable_model`).
    The file holds architecture and weights only: no compile config (a
    stage's loss is this package's, which plain Keras could not rebuild) and
    no optimizer state (stages resume from their checkpoints, not these)."""
    from thumbnet_keras.pipeline.compute import portable_model

    model = portable_model(model)

    def write(tmp: str) -> None:
        model.save(tmp)
        if same_keras_model(tmp, path):
            # The same model saved again (a rerun's export): the file keeps
            # its bytes, so the digests recorded of it (a generalize run's
            # E, a sidecar's) still hold; only `date_saved` differed.
            shutil.copyfile(path, tmp)

    with _uncompiled(model):
        atomic_write(path, write)
    return str(path)


def same_keras_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two `.keras` archives hold the same model: every member but
    `metadata.json` (Keras' version and the save date) byte-identical."""
    import zipfile

    try:
        with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
            names = sorted(n for n in za.namelist() if n != "metadata.json")
            if names != sorted(n for n in zb.namelist() if n != "metadata.json"):
                return False
            return all(za.read(n) == zb.read(n) for n in names)
    except (OSError, zipfile.BadZipFile, KeyError):
        return False  # `b` not there yet, or not an archive: write it.


@contextlib.contextmanager
def _uncompiled(model):
    """`model` seen as never compiled while saved (what `get_compile_config`
    and the optimizer's saving read), as it was afterwards."""
    compiled = getattr(model, "compiled", False)
    optimizer = getattr(model, "optimizer", None)
    if not compiled and optimizer is None:
        yield
        return
    model.compiled, model.optimizer = False, None
    try:
        yield
    finally:
        model.compiled, model.optimizer = compiled, optimizer


def check_writable(directory: str | os.PathLike) -> None:
    """Raises `ConfigError` unless `directory` exists (or can be made) and
    accepts a new file. Creates `directory` if missing, nothing else."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"Output directory {str(directory)!r} is not writable: {err.strerror or err}."
        ) from err


logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Files a run writes before its first stage starts; a folder holding only
# these (and the lock) has no work to lose.
_UNSTARTED = {"config.json", "data.json", "source.json", LOCK_NAME}


def _unstarted_file(name: str) -> bool:
    """One of `_UNSTARTED`, or a generalize run's `target-<i>.json` (written
    before its experiment's first arm: a run refused there was "started",
    and its corrected rerun refused for a changed configuration)."""
    return name in _UNSTARTED or (name.startswith("target-") and name.endswith(".json"))


class PreparedAgainError(ConfigError):
    """A run's prepared data folder holds another index than the one the run
    recorded: files changed under its manifest were prepared again there."""


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


# path -> open file descriptor holding the flock (this process's locks).
_HELD: dict[str, int] = {}


def _secondary_process() -> bool:
    """A multi-host run's processes other than process 0 share its run
    folder (`pipeline.compute.initialize_multi_host`): process 0 holds the lock."""
    try:
        return int(os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID") or 0) > 0
    except ValueError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, someone else's.
        return True
    return True


def _flow_run_text() -> str | None:
    """ "Prefect flow run 'name', id <uuid>" inside a flow run, else None: a run
    folder locked by a deployment's run named the worker's `engine.py`,
    which told an operator nothing about which run to cancel (a trial).
    Prefect is not imported here; only a process already running it has one."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return None
    try:
        run = context.FlowRunContext.get().flow_run
    except AttributeError:  # No flow run in this process (or another API).
        return None
    return f"Prefect flow run {run.name!r}, id {run.id}"


def holder_text(info: dict) -> str:
    """Who holds a lock, as a message says it (pid, host, since, command)."""
    return (
        f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
        + (f" ({info['command']})" if info.get("command") else "")
    )


def _read_lock(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def lock_run(path: str | os.PathLike) -> Path:
    """Takes the run folder's lock for this process (creating the folder).

    Re-entrant within a process. Released by `unlock_run` or when the
    process ends, however it ends. A normal interpreter exit also removes
    the lock file (`_unlock_all_at_exit`), so the next process to claim
    the folder has no stale lock to report; only a process that was killed
    or crashed leaves one ("taking over the lock of a process that ended
    without releasing it").

    Raises:
        RunLockedError: another live process holds it; the message names it.
        ConfigError: the folder cannot be created or written.
    """
    folder = Path(path)
    lock = folder / LOCK_NAME
    key = os.path.abspath(lock)
    if key in _HELD or _secondary_process():
        return lock
    try:
        import fcntl
    except ImportError:  # Not POSIX: no lock (documented in docs/flows.md).
        return lock
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"Run folder {str(folder)!r} is not writable: {err.strerror or err}."
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise RunLockedError(
                f"Run folder {str(folder)!r} is in use by another thumbnet process "
                f"({holder_text(holder)}). Wait for it to finish or stop it, or "
                "choose another run name."
            ) from None
        # The file may have been removed (unlock_run) between open and flock:
        # then this lock guards nothing; try again on the new file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_lock(fd)
    if previous.get("pid"):
        alive = previous.get("host") == socket.gethostname() and _pid_alive(
            int(previous["pid"])
        )
        logger.warning(
            "Run folder %s: taking over the lock of a process that ended without "
            "releasing it (%s%s).",
            folder,
            holder_text(previous),
            "" if not alive else "; that pid is now another process",
        )
        if previous.get("host") == socket.gethostname():
            _remove_temporaries(folder, int(previous["pid"]))
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _flow_run_text()
        or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    if os.getpid() not in _TAKEN_BY.values():
        atexit.register(_unlock_all_at_exit)
    _HELD[key] = fd
    _TAKEN_BY[key] = os.getpid()
    return lock


def _remove_temporaries(folder: Path, pid: int) -> None:
    """Removes what `atomic_write` calls of process `pid` left in `folder`
    (`.<name>.tmp-<pid>...`): that process held the run's lock and was
    killed mid-write (a resume trial: `.thumbnet.tmp-4247.keras` stayed
    after every later run; a whole model's size each time)."""
    exact = re.compile(rf"\..*\.tmp-{pid}(\..*)?")  # not pid 123's for 12
    for path in folder.rglob(f".*.tmp-{pid}*"):
        if not exact.fullmatch(path.name):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# lock path -> pid that took it. A forked child inherits `_HELD` and the exit
# handler; it must unlink only the locks it took itself, not its parent's.
_TAKEN_BY: dict[str, int] = {}


def _unlock_all_at_exit() -> None:
    """`unlock_run` of every folder this process took and still holds, at a
    normal exit (registered by `lock_run`)."""
    for key in [k for k in _HELD if _TAKEN_BY.get(k) == os.getpid()]:
        unlock_run(os.path.dirname(key))


def unlock_run(path: str | os.PathLike) -> None:
    """Releases this process's lock on the run folder (no-op if not held)."""
    lock = Path(path) / LOCK_NAME
    _TAKEN_BY.pop(os.path.abspath(lock), None)
    fd = _HELD.pop(os.path.abspath(lock), None)
    if fd is None:
        return
    try:
        lock.unlink()  # While still locked: a waiter re-checks the inode.
    except FileNotFoundError:
        pass
    os.close(fd)


def discard_unstarted(path: str | os.PathLike) -> bool:
    """Removes a run folder that holds nothing but what a run writes before
    its first stage (config.json, data.json, the lock), so a run that failed
    early leaves nothing that blocks its name; only under this process's
    lock (which it then releases), so never a folder another process has
    claimed since. Returns whether it did."""
    folder = Path(path)
    if os.path.abspath(folder / LOCK_NAME) not in _HELD:
        return False
    if not folder.is_dir() or not is_unstarted(folder):
        return False
    for path in folder.iterdir():  # Under the lock, then the lock.
        if path.name != LOCK_NAME:
            path.unlink(missing_ok=True)
    unlock_run(folder)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def is_unstarted(path: str | os.PathLike) -> bool:
    """Whether the folder holds only what a run writes before its first stage."""
    folder = Path(path)
    return folder.is_dir() and all(_unstarted_file(p.name) for p in folder.iterdir())


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

    def discard_checkpoints(self, stage_id: str) -> None:
        """Removes a finished stage's `checkpoints/<stage_id>/`, and
        `checkpoints/` once no stage has one."""
        folder = self.checkpoint_dir(stage_id)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # Another stage's is still there.
            folder.parent.rmdir()

    def is_done(self, stage_id: str) -> bool:
        """Whether the stage's record exists."""
        return self.stage_record(stage_id).is_file()

    def config(self) -> dict:
        """The parsed `config.json` (`{"config": ..., "environment": ...}`)."""
        return read_json(self.config_json)

    def data(self, require: bool = False) -> dict:
        """The parsed `data.json`, its `prepared_dir` found (`_find_prepared`).

        `require`: raise `ConfigError` when the prepared data is not found
        (for the steps that read its images), instead of returning the
        folder as written, or when the folder's index is no longer the one
        the run recorded (`same_data`: files changed under the manifest
        were prepared again there).
        """
        data = read_json(self.data_json)
        folder, found = data.get("prepared_dir"), None
        if isinstance(folder, str) and folder:
            found = _find_prepared(folder, self.path)
            if require and found is None:
                raise ConfigError(
                    f"Run {str(self.path)!r}: its prepared data {folder!r} is not "
                    f"found (nor {_moved_tail(folder)!r} beside the run folder or "
                    "a folder above it). Move or copy the data folder (`_data` in the runs "
                    "folder, or --data-dir) with the run, or rerun `thumbnet "
                    "train` with the run's options to prepare it again."
                )
            data["prepared_dir"] = found or folder
        if require and found is not None:
            from thumbnet_keras.pipeline.datasets import prepared_summary

            now = prepared_summary(found)
            if now is not None and not same_data(data, now):
                # The folder is one per manifest: files changed under it were
                # prepared again there, and scoring this run's models on them
                # reads other splits than they were trained and selected on.
                raise PreparedAgainError(
                    f"Run {str(self.path)!r}: its prepared data {found!r} was "
                    "prepared again since, from files changed under the same "
                    "manifest, so its splits are not the ones this run trained "
                    "on. Restore the files and prepare them again (rerun "
                    "`thumbnet train` with this run's options), or train a new "
                    "run on the data as it is now."
                )
        return data


def same_data(recorded: dict, prepared: dict) -> bool:
    """Whether `prepared` (a `prepare_dataset` result or a prepared folder's
    summary) is the data a run `recorded` in its data.json: the same index
    fingerprint, or, for a run recorded before fingerprints, the same split
    sizes and class names."""
    old, new = recorded.get("fingerprint"), prepared.get("fingerprint")
    if old and new:
        return old == new
    if not recorded.get("splits"):
        return True  # Nothing recorded to compare.
    return dict(recorded["splits"]) == dict(prepared.get("splits") or {}) and list(
        recorded.get("class_names") or []
    ) == list(prepared.get("class_names") or [])


def _moved_tail(folder: str) -> str:
    """`<data folder>/<name>-<hash>`: how a prepared folder is found after a move."""
    return os.path.join(*Path(folder).parts[-2:])


def _find_prepared(folder: str, run_path: Path) -> str | None:
    """The prepared-data folder a run's `data.json` names, or None.

    An absolute folder that exists is the one. Runs prepared before
    `data.prepare` recorded absolute folders hold it relative to the working
    folder they started in (`runs/_data/elpv-<hash>`), and a runs folder
    may have been moved with its `_data`: the folder, then its last two parts
    (`_data/elpv-<hash>`, named by the manifest's content), are looked for
    beside the run folder's ancestors, nearest first, then in the working
    folder, so `--run /elsewhere/runs/<name>` works from anywhere.
    """
    if os.path.isabs(folder) and os.path.isdir(folder):
        return folder
    tails = dict.fromkeys(
        ([] if os.path.isabs(folder) else [folder]) + [_moved_tail(folder)]
    )
    bases = (*Path(run_path).absolute().parents, Path.cwd())
    for tail in tails:
        for base in bases:
            if (base / tail / "summary.json").is_file():
                return str(base / tail)
    return None


# Config fields that name a folder: equal when they name the same folder.
# `runs_dir` and `run_name` need no comparison at all: the run folder they
# lead to is the one being claimed, however the path was spelled, and a run
# folder renamed, copied or moved resumes under its new name (`claim`
# records the new name).
# Compared as resolved paths: `./t.keras` and `t.keras` name the same file (a
# trial's rerun after Ctrl-C, typed so, was refused as another configuration).
# What the files hold is compared by the run's input hashes.
_LOCATION_FIELDS = ("runs_dir", "data_dir", "dataset", "teacher", "backbone_weights")


def _is_path(value) -> bool:
    """A string naming a file or folder, not a keyword (`imagenet`) or a
    prefixed spec (`pretrained:elpv`, `applications:ResNet50`)."""
    return isinstance(value, str) and value != "imagenet" and ":" not in value


# Config fields that change no trained model, only what the steps after
# training measure (images/s batches): a run resumes with a new value, and
# config.json takes it (`claim`), so evaluation and export use it.
MEASUREMENT_FIELDS = ("throughput_batches",)


def config_differences(old: dict, new: dict) -> list[str]:
    """The fields whose values differ between two run configs, sorted.

    `runs_dir` and `run_name` are ignored (the claimed run folder is the
    same one whatever its spelling, `runs` or `/abs/path/runs`, or its name
    since a rename or copy); `data_dir`, `dataset`,
    `teacher` and `backbone_weights` values are compared as resolved paths
    (a name such as `pretrained:elpv` resolves to itself).
    """

    def same(key):
        a, b = old.get(key), new.get(key)
        if a == b or key in ("runs_dir", "run_name"):
            return True
        if key == "sync_batchnorm" and "data_parallel" not in (
            old.get("distribution"),
            new.get("distribution"),
        ):
            return True  # Without data_parallel it does nothing (and is refused now).
        if key in _LOCATION_FIELDS and _is_path(a) and _is_path(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return False

    return sorted(k for k in set(old) | set(new) if not same(k))


# What each saved input hash is of, for the message when one changed.
_INPUT_NAMES = {
    "manifest_sha256": "the dataset manifest",
    "teacher_sha256": "the teacher file",
    "teacher_preset_sha256": "the teacher's keras-hub preset folder",
    "backbone_weights_sha256": "the backbone weights file",
    "downscaler_sha256": "the source run's downscaler (f<factor>/downscaler.keras)",
}


def changed_inputs(saved: dict | None, inputs: dict | None) -> list[str]:
    """The inputs (keys of `inputs`) whose hash differs from the saved one. A
    key the saved run did not record (it was started before that input was
    hashed) is not a change; a saved key now missing is."""
    if saved is None:  # A run saved before any input was hashed.
        return []
    if inputs is None:
        return sorted(saved)
    return sorted(
        k for k in set(saved) | set(inputs) if k in saved and saved[k] != inputs.get(k)
    )


def _with_current_fields(config: dict, kind: str | None, new: dict) -> dict:
    """A saved `thumbnet` config with the fields added since it was saved
    (`config.LEGACY_VALUES` only, where the `new` config has them) at the
    values that mean what the run did; any other missing field stays
    missing, so it counts as a difference."""
    if kind != "thumbnet":
        return config
    from thumbnet_keras.pipeline.config import LEGACY_VALUES, legacy_backbone

    added = {k: v for k, v in LEGACY_VALUES.items() if k not in config and k in new}
    return legacy_backbone({**added, **config}, new)


def _differences_text(keys: list[str], old: dict, new: dict) -> str:
    """`e_pretrain_epochs (saved 0, now 2), joint_epochs (--epochs; saved 3,
    now 4)`: the command-line option where it is not the field's name
    (`options.SPELLINGS`); long values are named without them."""
    from thumbnet_keras.pipeline.options import SPELLINGS

    def short(value):
        text = repr(value)
        return text if len(text) <= 40 else None

    parts = []
    for key in keys:
        a, b = short(old.get(key)), short(new.get(key))
        notes = [SPELLINGS[key]] if key in SPELLINGS else []
        notes += [f"saved {a}, now {b}"] if a and b else []
        parts.append(f"{key} ({'; '.join(notes)})" if notes else key)
    return ", ".join(parts)


def _other_backend(saved: dict) -> str | None:
    """The backend a saved run started on, when it is not this process's."""
    from thumbnet_keras.pipeline.environment import planned_backend

    started = (saved.get("environment") or {}).get("backend")
    return started if started and started != planned_backend() else None


def _check_same_backend(run: Run, started: str | None) -> None:
    """A run continues on the backend that started it (`started`, from
    `_other_backend`: None when it is this process's): its checkpoints,
    resumed epochs and `config.json`'s environment belong to that backend."""
    from thumbnet_keras.pipeline.environment import planned_backend

    if started:
        now = planned_backend()
        raise ConfigError(
            f"Run folder {str(run.path)!r} was started on the {started!r} backend "
            f"and this process runs {now!r}: a run resumes on the backend that "
            f"started it (its checkpoints and the record of what trained it are "
            f"{started}'s). Rerun with KERAS_BACKEND={started}, or choose another "
            "run name to start afresh on this one."
        )


def check_claimable(
    path: str | os.PathLike, config: dict, kind: str, inputs: dict | None = None
) -> bool:
    """`claim`'s checks, reading only: raises `ConfigError` (or
    `RunLockedError`) when the folder cannot be claimed; returns whether the
    run would resume. A folder that had not started (see `is_unstarted`) is
    claimable whatever its saved settings."""
    run = Run(path)
    holder = lock_holder(run.path)
    if holder is not None:
        raise RunLockedError(
            f"Run folder {str(run.path)!r} is in use by another thumbnet process "
            f"({holder_text(holder)}). Wait for it to finish or stop it, or "
            "choose another run name."
        )
    if run.config_json.is_file():
        saved = _saved_run(run)
        saved_keys = set(saved.get("config", {}))
        old = _with_current_fields(saved.get("config", {}), saved.get("kind"), config)
        keys = [
            k for k in config_differences(old, config) if k not in MEASUREMENT_FIELDS
        ]
        same = saved.get("kind") == kind and not keys
        changed = changed_inputs(saved.get("inputs"), inputs)
        moved = _other_backend(saved)
        if not (same and not changed and not moved) and is_unstarted(run.path):
            return False
        if saved.get("kind") != kind:
            # Not a list of every setting the two kinds do not share (a
            # 2,000-character line advising to "rerun with the saved settings").
            raise ConfigError(
                f"Run folder {str(run.path)!r} holds a {saved.get('kind')!r} run, "
                f"not a {kind!r} run; its outputs are left untouched. Choose "
                "another run name (--run-name; `run_name` in a deployment)"
                + (
                    ", and name this one as the source: `thumbnet generalize "
                    f"--source-run {shlex.quote(str(run.path))}`."
                    if (saved.get("kind"), kind) == ("thumbnet", "generalize")
                    else "."
                )
            )
        if not same:
            raise ConfigError(
                f"Run folder {str(run.path)!r} already holds a {saved.get('kind')!r} "
                f"run with a different configuration (differs in: "
                f"{_differences_text(keys, old, config)}). Its outputs "
                "are left untouched: choose another run name (--run-name; "
                "`run_name` in a deployment), or rerun with the saved settings to "
                "resume it"
                + (
                    ". Only the export formats differ, and they change no "
                    "trained model: add one to this run with `thumbnet export "
                    f"--run {shlex.quote(str(run.path))} --format <format>`."
                    if keys == ["export_formats"] and kind == "thumbnet"
                    else ". It was saved before the e_pretrain stage existed: "
                    "e_pretrain_epochs 0 resumes it (`thumbnet train "
                    "--e-pretrain-epochs 0`; `thumbnet demo` always runs the "
                    "stage, so give it another --run-name)."
                    if "e_pretrain_epochs" in keys
                    and "e_pretrain_epochs" not in saved_keys
                    else "."
                )
            )
        _check_same_backend(run, moved)
        if changed:
            what = " and ".join(_INPUT_NAMES.get(k, k) for k in changed)
            raise ConfigError(
                f"Run folder {str(run.path)!r} was started on different inputs: "
                f"{what} changed since (content hash {', '.join(changed)}). "
                "Finished stages used the old one, so the run is not resumed; its "
                "outputs are left untouched. Choose another run name."
            )
        return True
    if run.path.exists() and any(p.name != LOCK_NAME for p in run.path.iterdir()):
        raise ConfigError(
            f"Run folder {str(run.path)!r} exists and is not a thumbnet run folder "
            "(no config.json); choose another run name."
        )
    return False


def _take_measurement_fields(run: Run, config: dict) -> None:
    """A resumed run's `config.json` takes the `MEASUREMENT_FIELDS` values
    given now (the only differences `check_claimable` lets through), and the
    run's name when the folder was renamed or copied since it started."""
    saved = run.config()
    if "run_name" in config and saved["config"].get("run_name") != config["run_name"]:
        logger.info(
            "Run folder %s was started as run %r (renamed or copied since): it "
            "resumes as %r.",
            run.path,
            saved["config"].get("run_name"),
            config["run_name"],
        )
        saved["config"]["run_name"] = config["run_name"]
        write_json(run.config_json, saved)
    changed = {
        k: config[k]
        for k in MEASUREMENT_FIELDS
        if k in config and saved["config"].get(k) != config[k]
    }
    if changed:
        logger.info(
            "Run folder %s resumes with %s (saved %s): it changes no trained model; "
            "the run's evaluation is redone with it.",
            run.path,
            ", ".join(f"{k} {v!r}" for k, v in changed.items()),
            ", ".join(repr(saved["config"].get(k)) for k in changed),
        )
        saved["config"].update(changed)
        write_json(run.config_json, saved)
        # Its images/s were measured with the old value.
        run.file("evaluation.json").unlink(missing_ok=True)


_KINDS = ("thumbnet", "generalize")


def holds_run(path: str | os.PathLike) -> bool:
    """Whether the folder holds a run's `config.json` (`_saved_run`'s test)."""
    try:
        _saved_run(Run(path))
    except ConfigError:  # Not a run's config.json, or none.
        return False
    return True


def _saved_run(run: Run) -> dict:
    """The folder's `config.json` as a run wrote it (`{"kind", "config",
    ...}`); `ConfigError` when it is not one (unreadable, not JSON, another
    shape): the folder is someone else's, and nothing in it is touched."""
    try:
        saved = run.config()
    except DamagedFileError as err:
        problem = f"cannot be read as JSON ({err.reason})"
    except (OSError, ValueError) as err:
        problem = f"cannot be read as JSON ({err})"
    else:
        if (
            isinstance(saved, dict)
            and saved.get("kind") in _KINDS
            and isinstance(saved.get("config"), dict)
        ):
            return saved
        problem = "is not a thumbnet run's (no 'kind' and 'config')"
    raise ConfigError(
        f"Run folder {str(run.path)!r} exists and its config.json {problem}, so "
        "it is not a thumbnet run folder; nothing in it was changed. Choose "
        "another run name (or --runs-dir)."
    )


def lock_holder(path: str | os.PathLike) -> dict | None:
    """Who holds the run folder's lock (pid, host, started, command), or
    None when it is free or held by this process. Creates nothing."""
    lock = Path(path) / LOCK_NAME
    if os.path.abspath(lock) in _HELD or _secondary_process():
        return None
    try:
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_lock(fd)
    finally:
        os.close(fd)  # Also drops the shared lock taken just now.
    return None


def claim(
    path: str | os.PathLike, config: dict, kind: str, inputs: dict | None = None
) -> tuple[Run, bool]:
    """Creates the run folder, or reopens it when it belongs to this same run,
    and takes its lock (`lock_run`) for this process.

    A folder that already holds a `config.json` is reopened (to resume) only
    when the saved config equals `config` and the saved `inputs` (content
    hashes of what the run reads, e.g. the dataset manifest) equal `inputs`;
    otherwise `ConfigError` is raised and nothing is written. A folder that
    had not started (`is_unstarted`: only config.json, data.json, the lock)
    is started afresh whatever it saved. A non-empty folder without
    `config.json` is someone else's: also refused; so is a folder another
    live process works in (`RunLockedError`).

    Returns:
        `(run, resumed)`.
    """
    run = Run(path)
    check_claimable(run.path, config, kind, inputs)  # Reads only.
    check_writable(run.path)
    lock_run(run.path)
    if run.config_json.is_file() and is_unstarted(run.path):
        saved = _saved_run(run)
        if (
            saved.get("kind") != kind
            or config_differences(saved.get("config", {}), config)
            or changed_inputs(saved.get("inputs"), inputs)
            or _other_backend(saved)
        ):
            # A run that failed before its first stage: nothing to lose.
            logger.info("Run folder %s had not started; starting it afresh.", run.path)
            for path in run.path.iterdir():
                if path.name != LOCK_NAME:
                    path.unlink(missing_ok=True)
    if check_claimable(run.path, config, kind, inputs):  # Again, under the lock.
        _take_measurement_fields(run, config)
        return run, True
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
