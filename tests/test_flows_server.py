"""Deployments: prefect.yaml agrees with flows/serve.py, and a real local
Prefect server runs a served deployment (`prefect deployment run --watch`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import pytest
import yaml
from pipeline_fixtures import REPO, prefect_server_env, tiny_dataset

from thumbnet_keras.pipeline import GeneralizeParams, ThumbNetParams


def test_prefect_yaml_matches_serve():
    from flows.serve import DEPLOYMENTS, build_deployments

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    listed = {d["name"]: d for d in spec["deployments"]}
    assert set(listed) == set(DEPLOYMENTS) == {
        "train-imagenet", "train-places", "train-elpv", "generalize", "smoke",
    }  # fmt: skip
    for name, (flow_name, parameters) in DEPLOYMENTS.items():
        entry = listed[name]
        assert entry["entrypoint"] == f"flows/thumbnet_flows.py:{flow_name}"
        assert entry["parameters"] == parameters, name
        model = ThumbNetParams if flow_name == "thumbnet" else GeneralizeParams
        model.model_validate(parameters["params"])  # valid flow parameters
    imagenet = DEPLOYMENTS["train-imagenet"][1]["params"]
    assert (imagenet["dataset"], imagenet["backbone"], imagenet["factors"]) == (
        "imagenet2012", "resnet50", [2],
    )  # fmt: skip
    places = DEPLOYMENTS["train-places"][1]["params"]
    assert (places["dataset"], places["factors"]) == ("places365", [4])
    smoke = DEPLOYMENTS["smoke"][1]["params"]
    assert smoke["smoke"] is True and smoke["dataset"] == "elpv"  # no download
    built = build_deployments(runs_dir="/tmp/x", smoke_dataset="tiny.yaml")
    assert {d.name for d in built} == set(DEPLOYMENTS)
    (served_smoke,) = [d for d in built if d.name == "smoke"]
    assert served_smoke.parameters["params"]["dataset"] == "tiny.yaml"
    assert {d.flow_name for d in built} == {"thumbnet", "generalize"}


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except Exception:
        return None


def _wait_for(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited early:\n{log.read_text()[-3000:]}")
        if _get(url) == 200:
            return
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {seconds} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process (and its group, which only it started), then kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    proc.wait(timeout=10)


@pytest.mark.slow
def test_served_deployment_runs_on_local_server(tmp_path):
    if keras.backend.backend() != "torch":
        pytest.skip(
            "Orchestration test, independent of the Keras backend (the flow runs "
            "on whatever backend the serving process has): run once, under "
            "KERAS_BACKEND=torch (the backend with the shortest suite), to keep "
            "the suite's time per backend down."
        )
    manifest = tiny_dataset(tmp_path)
    runs = tmp_path / "runs"
    port, env = prefect_server_env(tmp_path)
    api = env["PREFECT_API_URL"]
    prefect = [sys.executable, "-m", "prefect"]
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen(
        [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(server_log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(f"{api}/health", 120, server, server_log)
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--runs-dir", str(runs),
             "--smoke-dataset", manifest],
            cwd=REPO, env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_for(f"{api}/deployments/name/thumbnet/smoke", 180, serve, serve_log)
            # One field of `params`: the others (the served tiny dataset,
            # smoke, the runs folder) stay the deployment's, where Prefect
            # alone would replace the whole object with the ELPV demo's.
            run = subprocess.run(
                [*prefect, "deployment", "run", "thumbnet/smoke", "--watch",
                 "--watch-timeout", "400",
                 "--params", '{"params": {"run_name": "one-field"}}'],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=460,
            )  # fmt: skip
            output = run.stdout + run.stderr
            assert run.returncode == 0, output + serve_log.read_text()[-4000:]
            assert "Completed" in output, output
            said = "params: run_name from this run, every other field from deployment 'smoke'."
            served = serve_log.read_text()
            assert said in served
            # The folder is named at the start (a run stopped early never
            # said it, and resuming needs it).
            assert (
                f"run folder: {runs / 'one-field'} (new; run_name 'one-field'" in served
            )
            # `params: null` (Prefect accepts it: the flow's `params` may be
            # None) runs the deployment's settings, not the library's
            # defaults (a full ELPV run, in the working folder's runs/).
            run = subprocess.run(
                [*prefect, "deployment", "run", "thumbnet/smoke", "--watch",
                 "--watch-timeout", "400", "--params", '{"params": null}'],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=460,
            )  # fmt: skip
            output = run.stdout + run.stderr
            assert run.returncode == 0, output + serve_log.read_text()[-4000:]
            said = "params: null in this run, so deployment 'smoke''s own are used."
            assert said in serve_log.read_text()
        finally:
            _stop(serve)
    finally:
        _stop(server)
    folders = {p.name: p for p in runs.iterdir() if p.name != "_data"}
    run_dir = folders.pop("one-field")
    (null_run,) = folders.values()  # Its generated name, in the served runs/.
    saved = json.loads((null_run / "config.json").read_text())["config"]
    assert saved["dataset"] == manifest and saved["smoke"] is True
    assert (
        json.loads((run_dir / "config.json").read_text())["config"]["dataset"]
        == manifest
    )
    for name in (
        "thumbnet.keras",
        "thumbnail_model.keras",
        "report.html",
        "config.json",
    ):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {a["name"] for a in metrics["arms"]} == {
        "teacher", "teacher_bicubic", "teacher_bicubic_bn", "bicubic_cl",
        "bicubic_kd", "bicubic_kd_equal", "thumbnet",
    }  # fmt: skip
    assert server.poll() is not None and serve.poll() is not None
