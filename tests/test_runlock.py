"""One process per run folder, and nothing outlives `thumbnet`.

* a second process meets the lock and is refused, naming the holder;
* a lock left by a process killed with SIGKILL is taken over; a normal exit
  leaves none;
* a run folder that never started a stage does not block its name;
* `kill -9` of a running `thumbnet train` leaves no process behind (Prefect's
  temporary server dies with it).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
from pipeline_fixtures import subprocess_env, tiny_dataset

from thumbnet_keras.pipeline import ConfigError
from thumbnet_keras.pipeline.rundir import (
    _HELD,
    LOCK_NAME,
    RunLockedError,
    claim,
    discard_unstarted,
    lock_holder,
    lock_run,
    unlock_run,
)

HOLDER = """
import sys, time
from thumbnet_keras.pipeline.rundir import lock_run
lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _hold(folder) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_second_process_is_refused_then_takes_over_a_stale_lock(tmp_path, caplog):
    folder = tmp_path / "runs" / "r"
    proc = _hold(folder)
    try:
        holder = json.loads((folder / ".lock").read_text())
        assert holder["pid"] == proc.pid
        assert lock_holder(folder)["pid"] == proc.pid
        with pytest.raises(
            RunLockedError,
            match=f"in use by another thumbnet process \\(pid {proc.pid} on",
        ):
            lock_run(folder)
        # The command line refuses too, before any framework starts.
        result = subprocess.run(
            [sys.executable, "-m", "thumbnet_keras.cli", "train", "--dataset",
             tiny_dataset(tmp_path, per_class=8), "--runs-dir", str(tmp_path / "runs"),
             "--run-name", "r"],
            capture_output=True, text=True, env=subprocess_env(), timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert (
            f"(pid {proc.pid} on" in result.stderr and "Traceback" not in result.stderr
        )
        # `report` on the folder a run is training in: in use, not "unfinished".
        (folder / "config.json").write_text(
            json.dumps({"kind": "thumbnet", "config": {"factors": [2]}})
        )
        result = subprocess.run(
            [sys.executable, "-m", "thumbnet_keras.cli", "report", "--run", str(folder)],
            capture_output=True, text=True, env=subprocess_env(), timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"is in use by another thumbnet process (pid {proc.pid} on" in (
            result.stderr
        )
        (folder / "config.json").unlink()
    finally:
        _kill(proc)
    # The holder died without unlocking: its lock file is still there, stale.
    assert json.loads((folder / ".lock").read_text())["pid"] == proc.pid
    assert lock_holder(folder) is None
    # ... and, killed mid-write, its `atomic_write` temporaries (a resume
    # trial: `.thumbnet.tmp-<pid>.keras` stayed after every later run).
    (folder / "stages" / ".student.tmp-1.keras").parent.mkdir()
    left = [folder / f".thumbnet.tmp-{proc.pid}.keras",
            folder / "stages" / f".student.tmp-{proc.pid}.keras",
            folder / f".saved.tmp-{proc.pid}"]  # fmt: skip
    for path in left[:2]:
        path.write_bytes(b"half a model")
    (left[2] / "variables").mkdir(parents=True)  # a SavedModel folder
    other = folder / "stages" / ".student.tmp-1.keras"  # not that process's
    other.write_bytes(b"kept")
    longer = folder / f".student.tmp-{proc.pid}7.keras"  # pid 12's is not 127's
    longer.write_bytes(b"kept")
    with caplog.at_level("WARNING", logger="thumbnet_keras.pipeline.rundir"):
        lock_run(folder)
    assert f"pid {proc.pid}" in caplog.text and "taking over" in caplog.text
    assert not any(path.exists() for path in left) and other.exists()
    assert longer.exists()
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock_run(folder)  # Re-entrant in the holding process.
    unlock_run(folder)
    assert not (folder / ".lock").exists()


def test_a_normal_exit_leaves_no_stale_lock(tmp_path, caplog):
    """A process that ends normally without `unlock_run` (a script, the
    accuracy study) removes its lock files at exit, so the next claim has
    nothing stale to report; a forked child's exit leaves its parent's lock."""
    folders = [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]
    script = (
        "import os, sys\n"
        "from thumbnet_keras.pipeline.rundir import lock_run\n"
        "for folder in sys.argv[1:]:\n"
        "    lock_run(folder)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    lock_run(sys.argv[1] + '-child')  # its own: removed at its exit\n"
        "    sys.exit(0)  # runs the inherited exit handlers: must not unlink\n"
        "os.waitpid(child, 0)\n"
        "print(sorted(os.listdir(sys.argv[1])), flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, folders)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['.lock']"  # still there after the child
    assert not (tmp_path / "runs" / "a-child" / ".lock").exists()
    for folder in folders:
        assert folder.is_dir() and not (folder / ".lock").exists()
    with caplog.at_level("WARNING", logger="thumbnet_keras.pipeline.rundir"):
        lock_run(folders[0])
    assert "taking over" not in caplog.text
    unlock_run(folders[0])


def test_a_run_that_never_started_does_not_block_its_name(tmp_path):
    folder = tmp_path / "r"
    run, resumed = claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "old"})
    assert not resumed and (folder / "config.json").is_file()
    unlock_run(folder)
    # The data step failed, the user fixed the manifest: same name accepted.
    run, resumed = claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "new"})
    assert not resumed
    assert json.loads((folder / "config.json").read_text())["inputs"] == {"m": "new"}
    # Once a stage finished, the name is taken.
    (folder / "stages").mkdir()
    (folder / "stages" / "teacher.json").write_text("{}")
    unlock_run(folder)
    with pytest.raises(ConfigError, match="different inputs"):
        claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "newer"})
    lock_run(folder)
    assert not discard_unstarted(folder)  # Work in it: kept.
    (folder / "stages" / "teacher.json").unlink()
    (folder / "stages").rmdir()
    unlock_run(folder)
    # Only under this process's lock: a folder it does not hold (another
    # process may have claimed the name since) is left alone.
    assert not discard_unstarted(folder) and (folder / "config.json").is_file()
    lock_run(folder)
    assert discard_unstarted(folder) and not folder.exists()
    assert os.path.abspath(folder / LOCK_NAME) not in _HELD  # Released.


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"my": "settings"}', "is not a thumbnet run's"),
        ("[1, 2]", "is not a thumbnet run's"),
        ("keep\n", "cannot be read as JSON"),
        ('{"kind": "thumbnet", "conf', "cannot be read as JSON"),  # cut short
    ],
)
def test_a_config_json_a_run_did_not_write_is_refused_and_kept(
    tmp_path, content, problem
):
    """A trial (2026-11-30): a user's folder holding its own config.json was
    taken for a run that had not started and the file deleted; other
    contents gave a JSONDecodeError or AttributeError traceback."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=f"config.json {problem}.*nothing in it"):
        claim(folder, {"a": 1}, kind="thumbnet")
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert (folder / "config.json").read_text() == content


def test_a_run_of_the_other_kind_is_named_as_such(tmp_path):
    """A first-contact trial (2026-11-30): `thumbnet generalize --run-name
    r1` on a thumbnet run listed ~30 "differences" in a 2,000-character
    line and advised rerunning with the saved settings."""
    from thumbnet_keras.pipeline.rundir import check_claimable

    folder = tmp_path / "r1"
    (folder / "stages").mkdir(parents=True)
    (folder / "stages" / "teacher.json").write_text("{}")
    saved = {"kind": "thumbnet", "config": {"dataset": "x", "factors": [2]}}
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as caught:
        check_claimable(folder, {"source_run": "y"}, kind="generalize")
    text = str(caught.value)
    assert "holds a 'thumbnet' run, not a 'generalize' run" in text
    assert f"--source-run {folder}" in text and "differs" not in text
    assert len(text) < 400


def test_a_damaged_json_file_of_a_run_is_named(tmp_path):
    """A first-contact trial (2026-11-30): a damaged stage record made the
    resumed run end in two tracebacks (JSONDecodeError); the file is named,
    with what to do (not "delete it": later stages used its outputs)."""
    from thumbnet_keras.pipeline.rundir import read_json

    (tmp_path / "stages").mkdir()
    record = tmp_path / "stages" / "f2-joint.json"
    record.write_text('{"a": ')
    with pytest.raises(ConfigError, match=r"f2-joint.json' is damaged \(not JSON"):
        read_json(record)
    (tmp_path / "data.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="restore it from a copy, or start a new"):
        read_json(tmp_path / "data.json")


def test_a_run_resumes_only_on_the_backend_that_started_it(tmp_path):
    # A practitioner resumed a torch run under KERAS_BACKEND=jax: accepted
    # without a word, the rest trained on JAX, config.json still said torch.
    folder = tmp_path / "r"
    claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "x"})
    saved = json.loads((folder / "config.json").read_text())
    assert saved["environment"]["backend"] == keras.backend.backend()
    other = "torch" if keras.backend.backend() != "torch" else "jax"
    # Nothing trained yet (the data step failed, say): started afresh on
    # this backend, whatever the saved one, as for any other change.
    unlock_run(folder)
    (folder / "config.json").write_text(
        json.dumps(saved | {"environment": {"backend": other}})
    )
    run, resumed = claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "x"})
    assert not resumed
    assert (
        json.loads((folder / "config.json").read_text())["environment"]["backend"]
        == keras.backend.backend()
    )
    (folder / "stages").mkdir()
    (folder / "stages" / "teacher.json").write_text("{}")
    unlock_run(folder)
    run, resumed = claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "x"})
    assert resumed
    unlock_run(folder)
    saved["environment"]["backend"] = other
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as error:
        claim(folder, {"a": 1}, kind="thumbnet", inputs={"m": "x"})
    assert str(error.value) == (
        f"Run folder {str(folder)!r} was started on the {other!r} backend and this "
        f"process runs {keras.backend.backend()!r}: a run resumes on the backend "
        f"that started it (its checkpoints and the record of what trained it are "
        f"{other}'s). Rerun with KERAS_BACKEND={other}, or choose another run name "
        "to start afresh on this one."
    )
    assert json.loads((folder / "config.json").read_text()) == saved  # untouched


def test_planned_backend_reads_no_framework(tmp_path):
    # Before Keras is imported: KERAS_BACKEND, else keras.json, else tensorflow.
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    code = (
        "import sys; from thumbnet_keras.pipeline.environment import planned_backend;"
        "print(planned_backend(), 'keras' in sys.modules)"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "KERAS_BACKEND"}
    seen = []
    for extra in ({"KERAS_HOME": str(tmp_path)},
                  {"KERAS_HOME": str(tmp_path), "KERAS_BACKEND": "torch"},
                  {"KERAS_HOME": str(tmp_path / "none")}):  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], env=env | extra,
                             capture_output=True, text=True, check=True)  # fmt: skip
        seen.append(out.stdout.strip())
    assert seen == ["jax False", "torch False", "tensorflow False"]


def test_the_command_locks_its_run_folder_before_starting_frameworks(
    tmp_path, monkeypatch
):
    # Two `thumbnet train` on one name started together both pass the
    # checks; the second must meet the lock at once, not after Prefect's
    # server and Keras started (30 s on a busy machine).
    from thumbnet_keras import cli
    from thumbnet_keras.pipeline import rundir
    from thumbnet_keras.pipeline.environment import quiet_env

    # main() sets them for the frameworks; restored after.
    for key in ("PREFECT_LOGGING_EXTRA_LOGGERS", *quiet_env()):
        monkeypatch.setenv(key, os.environ.get(key, ""))
        if not os.environ[key]:
            monkeypatch.delenv(key)
    before = list(rundir._HELD)  # Earlier tests' runs may still be held.
    held = []
    monkeypatch.setattr(
        cli,
        "_start_frameworks",
        lambda args, server=False: held.extend(
            p for p in rundir._HELD if p not in before
        ),
    )
    monkeypatch.setattr(cli, "_run_thumbnet", lambda params: 0)
    manifest = tiny_dataset(tmp_path, per_class=2)
    runs = tmp_path / "runs"
    argv = ["train", "--dataset", manifest, "--runs-dir", str(runs), "--run-name", "r"]
    assert cli.main(argv) == 0
    assert held == [os.path.abspath(runs / "r" / ".lock")]
    assert list(rundir._HELD) == before  # Released at the end.


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return found


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or not sys.platform.startswith("linux"),
    reason="one real `thumbnet train` process (slow): tensorflow backend, Linux",
)
def test_kill_9_leaves_no_process_behind(tmp_path):
    env = subprocess_env() | {"PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "thumbnet_keras.cli", "train", "--smoke",
         "--dataset", tiny_dataset(tmp_path, per_class=8),
         "--runs-dir", str(tmp_path / "runs"), "--run-name", "k"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    children: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        # Until Prefect's temporary server (a uvicorn child) has started.
        while time.monotonic() < deadline and proc.poll() is None:
            children |= _descendants(proc.pid)
            if any("uvicorn" in " ".join(_cmdline(p)) for p in children):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert children, "no child process was started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.2)
    left = sorted(p for p in children if _alive(p))
    for pid in left:  # Do not leak them into the rest of the test session.
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived `thumbnet train`: {left}"
    assert not _group(proc.pid), "its process group still has live processes"


def _sigint_masks(pid: int) -> dict[str, list[bool]]:
    """SIGINT in each of the process's threads, from /proc: blocked,
    ignored, caught (a handler), pending (thread, then process), for the
    failure message. A signal to the process goes to a thread that does
    not block it."""
    bit = 1 << (signal.SIGINT - 1)
    state: dict[str, list[bool]] = {}
    for status in sorted(glob.glob(f"/proc/{pid}/task/*/status")):
        try:
            lines = dict(
                line.split(":\t", 1) for line in open(status).read().splitlines()
                if ":\t" in line
            )  # fmt: skip
        except OSError:  # The thread ended meanwhile.
            continue
        for key in ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd"):
            state.setdefault(key, []).append(bool(int(lines[key], 16) & bit))
    return state


def _as_a_terminal_job() -> None:
    """SIGINT as a terminal's foreground job has it: handled, not blocked.
    A shell's background job ignores it, and a process may inherit it
    blocked from its launcher (a CI runner's signal mask passes through
    fork and exec to nox, pytest and this child): the signal then stays
    pending and the run finishes with exit 0 (CI, 2026-11-29)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or not sys.platform.startswith("linux"),
    reason="one real `thumbnet train` process (slow): tensorflow backend, Linux",
)
def test_ctrl_c_stops_the_run_at_once_and_says_how_to_resume(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process
    group. Prefect's temporary server used to be in that group: it died
    first, and the flow retried it for ~150 s, printed connection
    tracebacks and exited 1 (a practitioner's trial, 2026-11-29). The
    server now has its own session: exit 130 with the resume hint, and no
    process left behind. The hint names the generated run name: "the same
    command" would have started a new run (a trial, 2026-11-30)."""
    env = subprocess_env() | {"PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    runs = tmp_path / "runs"
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "thumbnet_keras.cli", "train", "--smoke",
             "--dataset", tiny_dataset(tmp_path, per_class=8),
             "--runs-dir", str(runs)],  # no --run-name: one is generated
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_as_a_terminal_job,
        )  # fmt: skip
        children: set[int] = set()
        try:
            deadline = time.monotonic() + 240
            # Until the first stage has finished: the flow is mid-run.
            while time.monotonic() < deadline and proc.poll() is None:
                children |= _descendants(proc.pid)
                if list(runs.glob("*/stages/teacher.json")):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            masks = _sigint_masks(proc.pid)  # What decides its delivery.
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    output = log_path.read_text()
    said = "thumbnet: Ctrl-C: stopping the run..." in output
    # The child starts with SIGINT handled and unblocked (`_as_a_terminal_job`):
    # a mask that keeps it out is the product's (or a library's) doing.
    threads = {k: f"{sum(v)} of {len(v)} threads" for k, v in masks.items()}
    assert said, f"{threads}\n{output[-3000:]}"  # said at once
    assert proc.returncode == 130, f"{threads}\n{output[-3000:]}"
    # The generated name (it carries the start time) is what resumes the run.
    (name,) = [p.parent.parent.name for p in runs.glob("*/stages/teacher.json")]
    hint = f"rerun the same command with --run-name {name} to resume."
    assert f"thumbnet: run {name!r}; to resume it after an interruption" in output
    assert f"thumbnet: interrupted; {hint}" in output, output[-3000:]
    assert "ConnectError" not in output and "Traceback" not in output, output[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.2)
    left = sorted(p for p in children if _alive(p))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived `thumbnet train`: {left}"
