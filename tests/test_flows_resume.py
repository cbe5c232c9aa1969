"""kill -9 in the middle of a stage, rerun the same command: finished stages
are skipped, the interrupted one resumes from its last epoch, and the run
folder ends valid. A real `thumbnet train` subprocess, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
from pipeline_fixtures import REPO, snapshot, subprocess_env, tiny_dataset

JOINT_EPOCHS = 12


def _command(manifest: str, runs) -> list[str]:
    return [
        sys.executable, "-m", "thumbnet_keras.cli", "train",
        "--dataset", manifest, "--runs-dir", str(runs), "--run-name", "resume",
        "--image-size", "32", "--limit-per-class", "8", "--batch-size", "8",
        "--backbone-options", '{"widths": [8, 16]}', "--factor", "2",
        "--teacher-epochs", "1", "--fm-epochs", "1", "--epochs", str(JOINT_EPOCHS),
        "--fm-weight", "1", "--mm-weight", "1",  # the paper's recipe: both stages resume
    ]  # fmt: skip


def _kill_group(proc: subprocess.Popen) -> None:
    # What the killed process had started (Prefect's temporary API server).
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="The CLI and Prefect side of kill -9 (locks, the temporary server, "
    "skipped stages), 90 s a backend: run once, in the shortest suite (torch). "
    "Resume on every backend: test_reproducibility's killed-and-resumed stage.",
)
def test_kill_9_mid_stage_then_resume(tmp_path):
    manifest = tiny_dataset(tmp_path)
    runs = tmp_path / "runs"
    run = runs / "resume"
    command = _command(manifest, runs)
    state_file = run / "checkpoints" / "f2-joint" / "state.json"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            killed_after = None
            while time.monotonic() < deadline and first.poll() is None:
                if state_file.is_file():
                    killed_after = json.loads(state_file.read_text())["epoch"]
                    if killed_after >= 2:
                        os.kill(first.pid, signal.SIGKILL)
                        break
                time.sleep(0.01)
            first.wait(timeout=60)
        finally:
            _kill_group(first)
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, output[-3000:]
    assert killed_after is not None and 2 <= killed_after < JOINT_EPOCHS
    assert not (run / "stages" / "f2-joint.json").exists()
    done_before = snapshot(run / "stages")
    assert {"teacher.json", "f2-fm_pretrain.json"} <= set(done_before)

    second = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
        timeout=600, start_new_session=True,
    )  # fmt: skip
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "[teacher] already finished, skipped" in output
    assert "[f2-fm_pretrain] already finished, skipped" in output
    record = json.loads((run / "stages" / "f2-joint.json").read_text())
    (resumed_at,) = record["resumed_from"]
    assert resumed_at >= killed_after
    assert (
        f"resuming from the checkpoint after epoch {resumed_at}/{JOINT_EPOCHS}"
        in output
    )
    assert len(record["history"]["loss"]) == record["epochs"] == JOINT_EPOCHS
    # Finished stages were not redone: their files are byte- and time-identical.
    after = snapshot(run / "stages")
    for name, value in done_before.items():
        assert after[name] == value, name
    # A valid run folder.
    assert not (run / "checkpoints").exists()  # every stage finished
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["arms"]) == 7  # teacher + 6 arms at f=2
    assert metrics["stages"]["f2-joint"]["resumed_from"] == [resumed_at]
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    model = keras.saving.load_model(
        run / "thumbnet.keras", safe_mode=True, compile=False
    )
    assert model.output_shape == (None, 2)
    assert f"thumbnet.keras: {run / 'thumbnet.keras'}" in output
    assert not list(run.rglob(".*.tmp-*")), "a temporary file was left behind"
