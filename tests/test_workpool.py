"""`prefect.yaml` on a real process work pool: a temporary local server,
`prefect work-pool create --type process`, `prefect deploy --all` from the
repository root, `prefect worker start`, and the `thumbnet/smoke` deployment
run by that worker to COMPLETED (the commands docs/deploy.md gives a user)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import pytest
import yaml
from pipeline_fixtures import REPO, prefect_server_env

POOL = "thumbnet-pool"  # the pool every deployment in prefect.yaml names
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PREFECT = [sys.executable, "-m", "prefect"]


def _api(url: str, body: dict | None = None):
    """GET (or POST `body` to) the server's REST API; the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def _tail(*logs: Path, chars: int = 4000) -> str:
    return "".join(
        f"\n--- {log.name} (last {chars} chars) ---\n{log.read_text()[-chars:]}"
        for log in logs
        if log.exists()
    )


def _cli(args: list[str], env: dict, logs: tuple[Path, ...], **kwargs) -> str:
    """Runs a `prefect` command; fails the test with its output if it fails."""
    done = subprocess.run(
        [*PREFECT, *args], env=env, capture_output=True, text=True, **kwargs
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        command = " ".join(args)
        pytest.fail(f"prefect {command} -> {done.returncode}:\n{output}{_tail(*logs)}")
    return output


def _wait(what: str, ready, seconds: float, procs: list, logs: tuple[Path, ...]):
    """Polls `ready()` until it returns a truthy value; fails on timeout or if
    one of `procs` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args} exited ({proc.returncode}){_tail(*logs)}")
        try:
            value = ready()
        except OSError:  # the server not listening yet, a dropped connection
            value = None
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what}: not after {seconds} s{_tail(*logs)}")


@contextlib.contextmanager
def _sigint_not_ignored():
    """Children inherit an ignored SIGINT (a pytest started as `cmd &` from a
    script), and a worker started so ignores SIGTERM too: Prefect's handler
    turns SIGTERM into a SIGINT to itself. Give the children the default."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _popen(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with _sigint_not_ignored():
        return subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen, grace: float) -> bool:
    """SIGTERM, wait up to `grace` s; True if that stopped it. Otherwise kill
    its process group (it started it) so that nothing is left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
            return True
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return False
    return True


def _descendants(procs: list, seen: dict) -> None:
    """Adds every live descendant of `procs` to `seen` (pid -> psutil.Process,
    which remembers the process's start time, so a reused pid is not it)."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)


def _run_refused(api, env, logs, procs, seen, params) -> dict:
    """Runs `thumbnet/smoke` on an unknown dataset to its end: the flow
    run's log has the one error line and no traceback (Prefect's engine
    logged ~50 lines of it after that line before), and the engine's line
    says the run was refused, not "unexpected exception"."""
    bad = {"params": {**params["params"], "dataset": "no_such_dataset"}}
    output = _cli(
        ["deployment", "run", "thumbnet/smoke", "--params", json.dumps(bad)],
        env, logs, timeout=120,
    )  # fmt: skip
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", output)[1]
    url = f"{api}/flow_runs/{run_id}"

    def finished():
        _descendants(procs, seen)
        run = _api(url)
        return run if run["state_type"] in FINAL else None

    run = _wait("the refused flow run", finished, 240, procs, logs)

    def flushed():  # The run's logs reach the server in batches.
        query = {
            "logs": {"flow_run_id": {"any_": [run["id"]]}},
            "sort": "TIMESTAMP_ASC",
        }
        text = "\n".join(r["message"] for r in _api(f"{api}/logs/filter", query))
        return text if "Flow run refused: the error above." in text else None

    text = _wait("the refused run's logs", flushed, 60, procs, logs)
    errors = [line for line in text.splitlines() if "thumbnet: error:" in line]
    assert len(errors) == 1 and "no_such_dataset" in errors[0], text
    assert "Traceback" not in text, text
    # The engine's own line for the raised error, which said "unexpected".
    assert "Engine execution exited with unexpected exception" not in text, text
    assert len(text.splitlines()) < 15, text
    return run


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_smoke(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip(
            "Orchestration test, independent of the Keras backend (the worker's "
            "flow run uses the worker's KERAS_BACKEND): run once, under "
            "KERAS_BACKEND=tensorflow (test_flows_server.py's served deployment "
            "runs under torch), to keep each backend's suite time down."
        )
    psutil = pytest.importorskip("psutil")
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    listed = {d["name"]: d for d in spec["deployments"]}
    assert {d["work_pool"]["name"] for d in listed.values()} == {POOL}
    runs = tmp_path / "runs"
    # `--params` replaces `params` whole: the deployment's own, in a tmp folder.
    params = {
        "params": {**listed["smoke"]["parameters"]["params"], "runs_dir": str(runs)}
    }
    port, env = prefect_server_env(tmp_path)
    api = env["PREFECT_API_URL"]
    env |= {
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # default 10: poll sooner
        "KERAS_BACKEND": keras.backend.backend(),
        # `{{ $PWD }}` in prefect.yaml's pull step reads the variable, which a
        # subprocess's cwd does not set: a shell in the checkout would.
        "PWD": str(REPO),
    }
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    logs = (server_log, worker_log)
    yaml_before = (REPO / "prefect.yaml").read_bytes()
    seen: dict = {}
    stopped = True
    server = _popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        server_log,
    )
    worker = None
    try:
        _wait("server health", lambda: _api(f"{api}/health"), 120, [server], logs)
        _cli(["work-pool", "create", POOL, "--type", "process"], env, logs, timeout=120)
        _cli(["--no-prompt", "deploy", "--all"], env, logs, cwd=REPO, timeout=300)
        assert (REPO / "prefect.yaml").read_bytes() == yaml_before

        # The server holds exactly prefect.yaml's deployments, as written there.
        flows = {f["id"]: f["name"] for f in _api(f"{api}/flows/filter", {})}
        deployed = {
            f"{flows[d['flow_id']]}/{d['name']}": d
            for d in _api(f"{api}/deployments/filter", {})
        }
        assert set(deployed) == {
            f"{d['entrypoint'].rsplit(':', 1)[1]}/{name}" for name, d in listed.items()
        }
        for d in deployed.values():
            entry = listed[d["name"]]
            assert d["work_pool_name"] == POOL
            assert d["entrypoint"] == entry["entrypoint"]
            assert d["parameters"] == entry["parameters"], d["name"]
            assert d["pull_steps"] == [
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": str(REPO)
                    }
                }
            ]

        worker = _popen([*PREFECT, "worker", "start", "--pool", POOL], env, worker_log)
        pool = f"{api}/work_pools/{POOL}"
        online = lambda: _api(pool)["status"] == "READY"  # noqa: E731
        # Serving the same names on this server would take the pool's
        # deployments over (a trial, 2026-11-29: both sides then crashed).
        served = subprocess.run(
            [sys.executable, "-m", "flows.serve"], env=env, cwd=REPO,
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert served.returncode == 2, served.stdout + served.stderr
        assert "already has thumbnet/train-imagenet (work pool 'thumbnet-pool')" in (
            served.stderr
        ), served.stderr
        _wait("worker online", online, 120, [server, worker], logs)
        output = _cli(
            ["deployment", "run", "thumbnet/smoke", "--params", json.dumps(params)],
            env,
            logs,
            timeout=120,
        )
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        assert match, output
        run_url = f"{api}/flow_runs/{match.group(1)}"

        def finished():
            _descendants([server, worker], seen)
            run = _api(run_url)
            return run if run["state_type"] in FINAL else None

        run = _wait("the smoke flow run", finished, 480, [server, worker], logs)
        assert run["state_type"] == "COMPLETED", f"{run['state']}{_tail(*logs)}"
        bad = _run_refused(api, env, logs, [server, worker], seen, params)
        assert bad["state_type"] == "FAILED", bad
        assert bad["state"]["message"].startswith("Unknown or invalid dataset")
        assert run["work_pool_name"] == POOL and run["parameters"] == params
        # The worker ran it in a child process (infrastructure_pid: its pid,
        # "host:pid" in some Prefect versions).
        flow_pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
        assert flow_pid in seen, (run["infrastructure_pid"], sorted(seen))
        assert "Completed" in worker_log.read_text()
    finally:
        if worker is not None:
            _descendants([worker], seen)
            stopped = _terminate(worker, grace=60)
        _descendants([server], seen)
        server_stopped = _terminate(server, grace=60)
    assert stopped, f"the worker ignored SIGTERM{_tail(worker_log)}"
    assert server_stopped, f"the server ignored SIGTERM{_tail(server_log)}"
    assert worker.returncode == 0, _tail(worker_log)
    # Nothing they started outlives them (the server's uvicorn, the flow run).
    alive = [p for p in seen.values() if p.is_running()]
    left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.cmdline()) for p in left]

    (run_dir,) = [p for p in runs.iterdir() if p.name != "_data"]
    assert run_dir.name.startswith("elpv-tiny_cnn-")
    for name in ("thumbnet.keras", "thumbnail_model.keras", "report.html"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["dataset"] == "elpv" and config["config"]["smoke"]
    assert config["config"]["runs_dir"] == str(runs)
    assert config["environment"]["backend"] == "tensorflow"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "thumbnet" in {a["name"] for a in metrics["arms"]}
