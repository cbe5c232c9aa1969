"""The `thumbnet` and `generalize` flows, run for real in Prefect's ephemeral
mode (temporary PREFECT_HOME, see pipeline_fixtures): the demo on real
ELPV shrunk by `smoke`, then generalize, rerun, bad input and the CLI on it."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import run_python
from pipeline_fixtures import loud_env, snapshot, subprocess_env, tiny_dataset

from thumbnet_keras import pipeline
from thumbnet_keras.pipeline import ConfigError, GeneralizeParams, ThumbNetParams

ARMS = {
    "teacher",
    "teacher_bicubic",
    "teacher_bicubic_bn",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
    "thumbnet",
}


def _task_runs(flow_run_id) -> dict[str, str]:
    """Task run name -> state name of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name: run.state.name for run in runs}


def _demo_params(root: Path) -> ThumbNetParams:
    """`thumbnet demo`'s flow (real ELPV, f = 2 and 4, every arm) with `smoke`
    and a tiny teacher trained in the run: the shipped MobileNetV2 teacher
    takes ~40 s of graph tracing per stage on this CPU, too slow for a test run
    on three backends (its own path is tested in test_demo_preset_*)."""
    from thumbnet_keras.pipeline.presets import demo

    tiny = {"teacher": None, "backbone": "tiny_cnn", "backbone_options": {}}
    return ThumbNetParams(
        **(demo() | tiny | {"smoke": True, "runs_dir": str(root / "runs")})
    )


def test_demo_preset_uses_the_shipped_teacher(tmp_path):
    from thumbnet_keras.pipeline import resolve_run
    from thumbnet_keras.pipeline.presets import demo
    from thumbnet_keras.pretrained import elpv_teacher_info

    params = ThumbNetParams(**(demo() | {"runs_dir": str(tmp_path / "runs")}))
    assert params.teacher == "pretrained:elpv"
    assert params.image_size == elpv_teacher_info()["image_size"]
    # resolve_run loads and checks the shipped file (input shape, classes).
    run = resolve_run(params)
    assert run["config"]["teacher"] == "pretrained:elpv"
    # Smoke keeps the image size a given teacher fixes.
    assert ThumbNetParams(**(demo() | {"smoke": True})).to_config().image_size == 128
    bad = ThumbNetParams(**(demo() | {"teacher": "pretrained:cifar"}))
    with pytest.raises(ConfigError, match="pretrained:elpv"):
        resolve_run(bad.model_copy(update={"runs_dir": str(tmp_path / "r2")}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real thumbnet flow run: the demo on ELPV, shrunk by `smoke`."""
    from flows.thumbnet_flows import thumbnet

    root = tmp_path_factory.mktemp("flow")
    state = thumbnet(_demo_params(root), verbose=0, return_state=True)
    assert state.is_completed(), state.message
    return root, state.result(), state.state_details.flow_run_id


def test_thumbnet_flow_outputs(finished):
    root, result, flow_run_id = finished
    run = Path(result["run_dir"])
    assert run == root / "runs" / "elpv-demo"
    for name in (
        "config.json",
        "data.json",
        "metrics.json",
        "report.md",
        "report.html",
        "teacher.keras",
        "thumbnet.keras",
        "thumbnail_model.keras",
        "f2/thumbnet.keras",
        "f4/thumbnet.keras",
        "f4/downscaler.keras",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    arms = {(a["name"], a["factor"]) for a in metrics["arms"]}
    assert arms == {("teacher", None)} | {
        (n, f) for n in ARMS - {"teacher"} for f in (2, 4)
    }
    for arm in metrics["arms"]:
        assert 0.0 <= arm["top1"] <= 1.0 and "top5" not in arm  # 4 classes
        assert 0.0 <= arm["val_top1"] <= 1.0  # ELPV carves a validation split
        assert arm["flops"] > 0 and arm["params"] > 0 and arm["images_per_second"] > 0
    by_name = {(a["name"], a["factor"]): a for a in metrics["arms"]}
    # The thumbnail arms cost fewer MACs than the full-size teacher.
    assert by_name[("bicubic_cl", 4)]["flops"] < by_name[("teacher", None)]["flops"]
    assert set(metrics["stages"]) == {"teacher"} | {
        f"f{f}-{s}" for f in (2, 4) for s in pipeline.STAGES
    }
    # Stages with labels kept their best validation epoch; fm_pretrain its last.
    for sid, stage in metrics["stages"].items():
        if sid.endswith("fm_pretrain"):
            assert stage["selection"]["monitor"] is None
        elif not sid.endswith("teacher_bicubic_bn"):
            assert stage["selection"]["monitor"] == "val_accuracy", sid
            best = stage["selection"]["best_epoch"]
            val = stage["history"]["val_accuracy"]
            assert stage["selection"]["best_value"] == max(val) == val[best - 1]
    # The equal-cost arm: a larger thumbnail, at least E + S's MACs.
    for f in (2, 4):
        equal = by_name[("bicubic_kd_equal", f)]
        assert equal["input_size"] >= 32 // f
        cost = metrics["stages"][f"f{f}-bicubic_kd_equal"]["equal_cost"]
        assert cost["macs"] == equal["flops"]
        if cost["reached"]:
            assert equal["flops"] >= by_name[("thumbnet", f)]["flops"]
    # ThumbNet against every arm of its factor and the teacher, on the same
    # test images: the paired difference is exactly the gap in test top-1.
    for f in (2, 4):
        ours = by_name[("thumbnet", f)]
        paired = {p["versus"]: p for p in ours["paired"]}
        assert set(paired) == {"teacher"} | {n for n in ARMS - {"teacher", "thumbnet"}}
        for name, p in paired.items():
            other = by_name[(name, None if name == "teacher" else f)]
            assert p["examples"] == ours["examples"] == other["examples"]
            assert p["difference"] == pytest.approx(ours["top1"] - other["top1"])
            low, high = p["ci95"]
            assert low <= p["difference"] <= high and 0.0 <= p["p_value"] <= 1.0
    joint = metrics["stages"]["f2-joint"]["history"]
    assert {"loss", "cl_loss", "kd_loss", "fm_loss", "mm_loss"} <= set(joint)
    assert metrics["environment"]["backend"] == keras.backend.backend()
    # Tasks: one per step, all completed.
    tasks = _task_runs(flow_run_id)
    assert set(tasks.values()) == {"Completed"}
    assert sum(name.startswith("train-stage") or "-f" in name for name in tasks) >= 8


def test_exported_model_loads_safely_and_predicts(finished):
    _, result, _ = finished
    model = keras.saving.load_model(result["thumbnet"], safe_mode=True, compile=False)
    thumb = keras.saving.load_model(
        result["thumbnail_model"], safe_mode=True, compile=False
    )
    assert model.input_shape == (None, 32, 32, 1) and thumb.input_shape == (
        None,
        16,
        16,
        1,
    )
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    assert model.predict_on_batch(x).shape == (2, 4)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="what the files hold does not depend on the backend that wrote them",
)
def test_every_keras_file_of_the_run_loads_in_plain_keras(finished):
    """A trial (2026-11-30) found the run's `teacher.keras` refused by
    `load_model` outside this package: it carried its stage's compile config,
    whose loss is `pipeline.recipe.SparseCrossentropy`. Every `.keras` a run
    writes now holds architecture and weights only."""
    _, result, _ = finished
    paths = sorted(str(p) for p in Path(result["run_dir"]).rglob("*.keras"))
    assert len(paths) >= 10, paths
    loaded = run_python(
        """
        import json, sys
        import keras
        out = {}
        for path in sys.argv[1:]:
            model = keras.saving.load_model(path, safe_mode=True)  # compile=True
            out[path] = model.compiled
        assert "thumbnet_keras" not in sys.modules
        print(json.dumps(out))
        """,
        args=paths,
    )
    assert loaded == {path: False for path in paths}


def test_report_artifacts_are_keyed(finished):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, _, flow_run_id = finished
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="thumbnet-elpv"))
        )
    mine = {a.key: a.type for a in artifacts if a.flow_run_id == flow_run_id}
    # A smoke run's keys say so: its report does not become the latest
    # `thumbnet-elpv-report` over a real run's.
    assert mine == {
        "thumbnet-elpv-smoke-report": "markdown",
        "thumbnet-elpv-smoke-results": "table",
        "thumbnet-elpv-smoke-accuracy-vs-flops": "image",
    }


def test_rerun_skips_everything_and_keeps_outputs(finished):
    from flows.thumbnet_flows import thumbnet

    root, result, _ = finished
    run = Path(result["run_dir"])
    kept = snapshot(run / "stages")
    state = thumbnet(_demo_params(root), verbose=0, return_state=True)
    assert state.is_completed()
    assert snapshot(run / "stages") == kept  # no stage retrained
    tasks = _task_runs(state.state_details.flow_run_id)
    prepare = [s for name, s in tasks.items() if name.startswith("prepare-data")]
    assert prepare == ["Cached"]  # keyed on the manifest content


def test_bad_input_fails_before_any_task(finished):
    from flows.thumbnet_flows import thumbnet

    root, _, _ = finished
    before = snapshot(root / "runs")
    params = ThumbNetParams(
        dataset="elpv",
        smoke=True,
        factors=[3],
        runs_dir=str(root / "runs"),
        run_name="bad",
    )
    state = thumbnet(params, verbose=0, return_state=True)
    assert state.is_failed()
    # The preflight message (as the command line prints it) is the state's.
    assert state.message == (
        "--factor 3 does not fit --image-size 32: a factor is an integer >= 2 "
        "that divides the image size (the thumbnail would be 10.6667 pixels)."
    )
    assert _task_runs(state.state_details.flow_run_id) == {}
    assert snapshot(root / "runs") == before


def test_data_refused_while_preparing_leaves_no_run_folder(tmp_path):
    """A class whose files are all broken is found by prepare-data, after
    the run folder was claimed: the flow run fails with the message and
    takes back the folder holding only config.json (a deployment's dated
    run name used to leave one per failed run)."""
    from flows.thumbnet_flows import thumbnet

    manifest = tiny_dataset(tmp_path, per_class=8)
    for image in (tmp_path / "brightness" / "dark").iterdir():
        image.write_text("not an image")
    runs = tmp_path / "runs"
    params = ThumbNetParams(dataset=manifest, smoke=True, runs_dir=str(runs))
    state = thumbnet(params, verbose=0, return_state=True)
    assert state.is_failed()
    assert "no usable example" in state.message
    assert [p.name for p in runs.iterdir()] == ["_data"]  # No run folder.


def test_generalize_flow(finished):
    from flows.thumbnet_flows import generalize

    root, result, _ = finished
    other = tiny_dataset(root)
    params = GeneralizeParams(
        source_run=result["run_dir"],
        factor=2,
        experiments=[{"dataset": other}, {"backbone": "resnet18"}],
        seeds=[0, 1],
        smoke=True,
        runs_dir=str(root / "runs"),
        run_name="gen",
    )
    state = generalize(params, verbose=0, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    # A smoke run's artifacts say so (a Prefect trial: its 8-image report
    # became the latest `generalize-<source>-report` over a real run's).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="generalize-"))
        )
    flow_run_id = state.state_details.flow_run_id
    keys = {a.key for a in artifacts if a.flow_run_id == flow_run_id}
    source = Path(result["run_dir"]).name
    assert f"generalize-{source}-smoke-report" in keys, keys
    assert not {k for k in keys if "smoke" not in k}, keys
    # Markdown's code spans as HTML (a report reader saw raw backticks).
    page = Path(out["report_html"]).read_text()
    assert "`" not in page and "<code>" in page
    metrics = json.loads(Path(out["metrics_json"]).read_text())
    got = {
        (Path(r["dataset"]).name, r["backbone"], r["seed"], r["arm"])
        for r in metrics["results"]
    }
    assert got == {
        (dataset, backbone, seed, arm)
        for dataset, backbone in (
            ("brightness.yaml", "tiny_cnn"),
            ("elpv", "resnet18"),
        )
        for seed in (0, 1)
        for arm in ("learned", "bicubic")
    }
    for record in metrics["results"]:
        assert 0.0 <= record["top1"] <= 1.0 and record["epochs"] == 1
        assert 0.0 <= record["val_top1"] <= 1.0  # both carve a validation split
        assert record["selection"]["monitor"] == "val_accuracy"
        assert record["normalization"] == "unit"
    assert [s["seeds"] for s in metrics["summary"]] == [[0, 1], [0, 1]]
    # The tiny set's 40x40 images are no smaller than the 16x16 thumbnail:
    # no note; ELPV is E's own source: none either.
    assert [s["notes"] for s in metrics["summary"]] == [[], []]
    for summary in metrics["summary"]:  # paired per seed; what it is out of
        examples = {r["examples"] for r in metrics["results"]
                    if r["backbone"] == summary["backbone"]}  # fmt: skip
        assert {summary["test_examples"]} == examples
        for seed in summary["per_seed"]:
            assert seed["paired"]["examples"] == summary["test_examples"]
            assert seed["paired"]["difference"] == pytest.approx(seed["diff"])
        assert summary["learned_macs"] > summary["bicubic_macs"] > 0
        assert 0 < summary["test_majority"] <= 100
    assert all("test_correct" not in r for r in metrics["results"])
    from thumbnet_keras.pipeline.generalize_report import generalize_summary_text

    text = generalize_summary_text(metrics["summary"])
    assert "tiny_brightness / tiny_cnn" in text and "elpv / resnet18" in text
    report = Path(out["report_md"]).read_text()
    assert "difference (points)" in report and "| tiny_brightness |" in report
    assert "## Per seed" in report
    tasks = _task_runs(state.state_details.flow_run_id)
    assert {n for n in tasks if n.startswith("exp")} == {
        f"exp{i}-s{s}-{a}"
        for i in (0, 1)
        for s in (0, 1)
        for a in ("learned", "bicubic")
    }


def test_an_evaluation_by_an_older_version_is_made_again(finished):
    """An upgrade trial (2026-12-01): rerunning a run made by an older
    version skipped evaluate and printed its evaluation.json, MACs counted
    and images/s timed the old way (3.4x where this version counts 3.6x),
    under this version's description. A file without this version's
    `evaluation_version` is evaluated again; one with it is reused."""
    from thumbnet_keras.pipeline.evaluate import EVALUATION_VERSION, evaluate_run

    _, result, _ = finished
    path = Path(result["run_dir"], "evaluation.json")
    current = json.loads(path.read_text())
    assert current["evaluation_version"] == EVALUATION_VERSION
    older = json.loads(path.read_text())
    del older["evaluation_version"]
    for arm in older["arms"]:
        arm["flops"] = 1  # what an older count said
    path.write_text(json.dumps(older))
    again = evaluate_run(result["run_dir"])
    assert "skipped" not in again
    assert [a["flops"] for a in again["arms"]] == [a["flops"] for a in current["arms"]]
    assert [a["top1"] for a in again["arms"]] == [a["top1"] for a in current["arms"]]
    assert evaluate_run(result["run_dir"])["skipped"]


def test_cli_evaluate_report_export(finished, capsys):
    from thumbnet_keras.cli import main

    _, result, _ = finished
    run = result["run_dir"]
    before = Path(run, "evaluation.json").stat().st_mtime_ns
    # A test image edited since prepare (a data engineer's trial: scored
    # without a word) is refused in one line naming it; nothing is rewritten.
    from thumbnet_keras.data import PreparedDataset
    from thumbnet_keras.pipeline import Run

    index = PreparedDataset.load(Run(run).data()["prepared_dir"]).read_index()
    edited = next(
        Path(r["image_uri"])
        for r in index.to_pylist()
        if r["split"] == "test" and r["status"] == "ok"
    )
    kept = edited.read_bytes()
    edited.write_bytes(kept + b"\0")  # one byte more: another file
    try:
        assert main(["evaluate", "--run", run]) == 2
    finally:
        edited.write_bytes(kept)
    err = capsys.readouterr().err
    assert f"changed since its data were prepared: {edited}: content changed" in err
    assert "Traceback" not in err
    assert Path(run, "evaluation.json").stat().st_mtime_ns == before
    assert main(["evaluate", "--run", run]) == 0
    assert "ThumbNet (E + S) f=4: top-1" in capsys.readouterr().out
    assert Path(run, "evaluation.json").stat().st_mtime_ns > before
    assert main(["report", "--run", run]) == 0
    # The report's headline, the results table, then the paths.
    out = capsys.readouterr().out
    metrics = json.loads(Path(run, "metrics.json").read_text())
    from thumbnet_keras.reports.render import headline

    first = f"Run {metrics['run_name']}: {headline(metrics)}\n"
    assert first in out and "ThumbNet (E + S)" in out
    html = f"report.html:    {Path(run, 'report.html')}"
    assert out.index(first) < out.index("test top-1") < out.index(html)
    # Every backend: the conversion runs in a TensorFlow-backend subprocess.
    assert main(["export", "--run", run, "--format", "saved_model"]) == 0
    exported = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        exported == Path(run, "thumbnet_saved_model")
        and (exported / "saved_model.pb").is_file()
    )
    # Listed with the run's deployable models (an edge deployer's trial: an
    # export after training never reached export.json or the report), once
    # however often it is exported.
    assert main(["export", "--run", run, "--format", "saved_model"]) == 0
    rows = json.loads(Path(run, "export.json").read_text())["deployables"]
    saved = [r for r in rows if r["file"] == str(exported)]
    assert len(saved) == 1 and saved[0]["format"] == "saved_model"
    assert saved[0]["bytes"] > 0 and saved[0]["images_per_second"] > 0
    assert main(["report", "--run", run]) == 0
    assert "thumbnet_saved_model" in Path(run, "report.md").read_text()
    # A rerun's export step keeps it listed, measured again (an upgrade
    # trial: export.json lost it, and the report with it).
    from thumbnet_keras.pipeline.export import export_run

    export_run(run)
    rows = json.loads(Path(run, "export.json").read_text())["deployables"]
    saved = [r for r in rows if r["file"] == str(exported)]
    assert len(saved) == 1 and saved[0]["agreement"] == 1.0
    # ... scored against the model it came from (`--factor 4`: f4's), and a
    # copied run lists only its own files (review: the original's were kept).
    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.export import _exported_from

    f4_file = str(Path(run, "f4", "thumbnet_saved_model").resolve())
    assert _exported_from(Run(run), [2, 4], f4_file) == str(
        Path(run, "f4", "thumbnet.keras").resolve()
    )
    copy = Path(run).parent / "copied-run"
    shutil.copytree(run, copy)
    try:
        export_run(str(copy))
        rows = json.loads((copy / "export.json").read_text())["deployables"]
        assert all(
            Path(r["file"]).resolve().is_relative_to(copy.resolve()) for r in rows
        )
    finally:
        shutil.rmtree(copy)


def test_importing_the_flows_is_quiet():
    """Flows called from Python (or a worker loading the entrypoint) set the
    switches the command line sets, before Prefect and Keras are imported:
    no TensorFlow start-up lines, and Prefect's ephemeral server does not
    try to send telemetry (offline, an ERROR line); a value the user set is
    kept."""
    env = loud_env()
    # What Prefect itself read (it reads its settings once, when imported).
    code = (
        "import flows.thumbnet_flows; from prefect.settings import "
        "get_current_settings; "
        "print(str(get_current_settings().server.analytics_enabled).lower())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("false\n", "")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert run.stdout == "true\n"


def _prefect_caching_runs_once() -> None:
    if keras.backend.backend() != "torch":
        pytest.skip(
            "Prefect caching, independent of the Keras backend: run once, under "
            "KERAS_BACKEND=torch (the shortest suite)."
        )


def test_prepare_is_cached_until_a_source_file_changes(tmp_path):
    """The prepare-data task is cached on the manifest and on its source
    files' names, sizes and times: a rerun reuses it; an image replaced
    under the unchanged manifest prepares again (a practitioner's trial,
    2026-11-29: a run kept training on the replaced data's old index)."""
    _prefect_caching_runs_once()
    from prefect import flow

    from flows.thumbnet_flows import prepare_data_task

    manifest = tiny_dataset(tmp_path, per_class=8)
    data_dir = str(tmp_path / "data")

    @flow
    def prepare_once():
        state = prepare_data_task(manifest, data_dir, None, return_state=True)
        return state.name, state.result()

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    task_runs = logging.getLogger("prefect.task_runs")  # Does not propagate.
    task_runs.addHandler(handler)
    try:
        first, prepared = prepare_once()
    finally:
        task_runs.removeHandler(handler)
    # What preparing warned of (8 images a class leave 'bright' none for
    # validation) is in the task run's log, not a Python warning that only a
    # worker's stderr showed (a trial).
    said = [r.getMessage() for r in records]
    assert any("some classes have no image in a split" in m for m in said), said
    again, _ = prepare_once()
    assert (first, again) == ("Completed", "Cached")
    replaced = tmp_path / "brightness" / "dark" / "000.png"
    before = {r["key"]: r["sha256"] for r in _index_rows(prepared)}
    replaced.write_bytes((tmp_path / "brightness" / "bright" / "001.png").read_bytes())
    after_change, prepared = prepare_once()
    assert after_change == "Completed"
    after = {r["key"]: r["sha256"] for r in _index_rows(prepared)}
    changed = [key for key in before if before[key] != after.get(key)]
    assert changed == ["dark/000.png"], changed


def test_a_user_error_inside_a_step_is_one_line_without_traceback(tmp_path):
    """A Prefect trial: a run resumed after its image files changed was
    refused inside the teacher task, and the flow run's log held two full
    tracebacks (146 lines; the CLI said it in one). Now the step fails at
    once, unretried, with no traceback, and the flow run ends Failed with
    the message (run in a fresh process, its console output read whole)."""
    if keras.backend.backend() != "torch":
        pytest.skip("Orchestration only: run once, under KERAS_BACKEND=torch.")
    manifest = tiny_dataset(tmp_path, per_class=8)
    code = f"""
        import json, os
        from flows.thumbnet_flows import thumbnet
        from thumbnet_keras.pipeline import ThumbNetParams
        params = ThumbNetParams(
            dataset={manifest!r}, smoke=True, runs_dir={str(tmp_path / "runs")!r},
            run_name="r", factors=[2], backbone="tiny_cnn",
            backbone_options={{"widths": [8, 16]}})
        first = thumbnet(params, verbose=0, return_state=True).is_completed()
        os.unlink({str(tmp_path / "brightness" / "dark" / "003.png")!r})
        print("=== rerun", flush=True)
        state = thumbnet(params, verbose=0, return_state=True)
        print(json.dumps({{"first": first, "failed": state.is_failed(),
                           "message": state.message}}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
        text=True, env=subprocess_env(), timeout=600, cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["first"] and outcome["failed"]
    assert "was started on other data" in outcome["message"]
    said = (result.stdout + result.stderr).split("=== rerun")[-1]
    assert "Traceback" not in said and "Retry 1/1" not in said, said
    assert "thumbnet: error: Run folder" in said, said


def test_a_file_added_then_removed_does_not_bring_back_a_stale_cache(tmp_path):
    """A trial: prepare (stamp A), add an image (stamp B: prepared again, in
    the same folder, one per manifest), remove it (stamp A again): the cache
    gave back the first result while the folder held B's index, and every
    run, under any run name, failed on the removed file. `_prepare` now
    checks a cached result against the index the folder holds."""
    _prefect_caching_runs_once()
    from prefect import flow

    from flows.thumbnet_flows import _prepare
    from thumbnet_keras.pipeline.datasets import prepared_fingerprint

    manifest = tiny_dataset(tmp_path, per_class=8)
    data_dir = str(tmp_path / "data")
    extra = tmp_path / "brightness" / "dark" / "extra.png"

    @flow
    def prepare_once():
        return _prepare(manifest, data_dir, None)

    def keys(prepared):
        return sorted(r["key"] for r in _index_rows(prepared))

    first = keys(prepare_once())
    extra.write_bytes((tmp_path / "brightness" / "dark" / "001.png").read_bytes())
    assert keys(prepare_once()) == sorted([*first, "dark/extra.png"])
    extra.unlink()
    prepared = prepare_once()
    assert keys(prepared) == first
    assert prepared_fingerprint(prepared["prepared_dir"]) == prepared["fingerprint"]
    assert keys(prepare_once()) == first  # Cached again, and right.


def test_a_cached_preparation_repeats_what_the_data_warned_of(tmp_path, monkeypatch):
    """The quarantine and duplicate warnings used to come from the task body
    only: the next run, Cached, said nothing about the data (a practitioner's
    trial, 2026-11-29)."""
    if keras.backend.backend() != "torch":
        pytest.skip("Prefect caching: run once, under KERAS_BACKEND=torch.")
    import logging

    from prefect import flow

    from flows.thumbnet_flows import _prepare

    manifest = tiny_dataset(tmp_path, per_class=8)
    (tmp_path / "brightness" / "dark" / "broken.png").write_bytes(b"")
    data_dir = str(tmp_path / "data")

    @flow
    def prepare_once():
        return _prepare(manifest, data_dir, None)

    from flows import thumbnet_flows

    said = []

    class Keep(logging.Handler):  # (caplog's root handler: not when run alone)
        def emit(self, record):
            said[-1].append(record.getMessage())

    logger = logging.getLogger("thumbnet_keras.pipeline.datasets")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        for run in range(2):
            if run == 1:  # Cached: the task's body must not run again
                monkeypatch.setattr(
                    thumbnet_flows.pipeline, "prepare_dataset", lambda *a, **k: 1 / 0
                )
            said.append([])
            prepare_once()
    finally:
        logger.removeHandler(handler)
    quarantined = "data: 1 file(s) quarantined and left out (1 empty_file)"
    # The first run prepared (the task said the class missing from a split as
    # the run's warning); the second was Cached and says both again.
    assert len(said[0]) == 1 and said[0][0].startswith(quarantined), said
    assert len(said[1]) == 2 and said[1][0].startswith(quarantined), said
    assert said[1][1].startswith(
        "tiny_brightness: some classes have no image in a split"
    )


def test_a_steps_user_warnings_reach_the_flow_runs_log():
    """Two trials: a UserWarning raised in a training step (E costing more
    than its share of S) reached only the worker's stderr, never the flow
    run's log. Under `_logs_warnings` it is logged as the run's warning when
    raised; other warnings are shown as Python shows them."""
    import warnings

    from prefect import flow, task

    from flows.thumbnet_flows import _logs_warnings

    logged, shown = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append((record.levelname, record.getMessage()))

    @task
    @_logs_warnings
    def step():
        warnings.warn("E costs 53% of S", UserWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        return 1

    @flow
    def one_step():
        return step()

    handler = Keep()
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: shown.append(
                str(message)
            )
            assert one_step() == 1
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert ("WARNING", "E costs 53% of S") in logged
    assert shown == ["old API"]


def _index_rows(prepared: dict) -> list[dict]:
    from thumbnet_keras.data import PreparedDataset

    return PreparedDataset.load(prepared["prepared_dir"]).read_index().to_pylist()


def test_a_refused_deployment_run_is_not_logged_as_unexpected():
    """Prefect logs a flow's raised error as "Engine execution exited with
    unexpected exception" with its traceback; for a run `_refused` (bad
    parameters or data) the line says so instead, without the traceback (a
    Prefect operator's trial); any other error keeps both."""
    from flows.thumbnet_flows import _RefusedWithoutTraceback

    def record(error):
        try:
            raise error
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                                 "Engine execution exited with unexpected "
                                 "exception", (), info)  # fmt: skip

    refused = ConfigError("--factor 3 does not fit --image-size 32")
    refused._thumbnet_refused = True
    kept = record(refused)
    assert _RefusedWithoutTraceback().filter(kept)
    assert kept.getMessage() == "Flow run refused: the error above."
    assert kept.exc_info is None
    bug = record(KeyError("x"))
    assert _RefusedWithoutTraceback().filter(bug)
    assert "unexpected" in bug.getMessage() and bug.exc_info is not None


def test_a_deployment_runs_refusal_names_params_fields():
    """A deployment's run sets `params` fields, not options: its refusal
    says `factors` and `image_size` where the command line says `--factor`
    and `--image-size`; commands quoted in a message stay commands."""
    from flows.thumbnet_flows import in_params_terms

    assert (
        in_params_terms(
            "--factor 3 does not fit --image-size 32; lower --epochs or --teacher-epochs."
        )
        == "factors 3 does not fit image_size 32; lower joint_epochs or teacher_epochs."
    )
    kept = "add one with `thumbnet export --run runs/x --format <format>`"
    assert in_params_terms(kept) == kept
    assert in_params_terms("--epochs 0", GeneralizeParams) == "epochs 0"
    # A resume refusal names field and option: in params terms, once.
    assert (
        in_params_terms(
            "differs in: joint_epochs (--epochs; saved 3, now 4), export_formats "
            "(--export-format)."
        )
        == "differs in: joint_epochs (saved 3, now 4), export_formats."
    )
    # An experiment is an object in params, not DATASET:BACKBONE: the real
    # refusal of an unknown dataset, in params terms.
    from thumbnet_keras.pipeline import preflight

    with pytest.raises(ConfigError) as refused:
        preflight._check_manifest("nope", "--experiment")
    text = in_params_terms(str(refused.value), GeneralizeParams)
    assert (
        'experiments takes items {"dataset": ..., "backbone": ...}, dataset the' in text
    )
    assert "DATASET" not in text and "--experiment" not in text
    with pytest.raises(ConfigError) as refused:
        preflight._check_manifest("resnet18", "--experiment")
    text = in_params_terms(str(refused.value), GeneralizeParams)
    assert 'with resnet18: experiments [{"backbone": "resnet18"}].' in text


def test_a_run_folder_locked_by_a_flow_run_names_it(tmp_path):
    """A Prefect trial: a second deployment run on a busy run folder was
    told it was held by "(engine.py)", the worker's process, which says
    nothing of which flow run to cancel. Inside a flow run the lock names
    the flow run; outside one, the command."""
    from prefect import flow

    from thumbnet_keras.pipeline.rundir import LOCK_NAME, lock_run, unlock_run

    @flow(name="lock-probe")
    def probe(folder: str) -> dict:
        lock_run(folder)
        try:
            return json.loads((Path(folder) / LOCK_NAME).read_text())
        finally:
            unlock_run(folder)

    state = probe(str(tmp_path / "r"), return_state=True)
    held = state.result()
    assert held["command"].startswith("Prefect flow run '")
    assert held["command"].endswith(f", id {state.state_details.flow_run_id}")
    lock_run(tmp_path / "s")
    try:
        outside = json.loads((tmp_path / "s" / LOCK_NAME).read_text())
    finally:
        unlock_run(tmp_path / "s")
    assert not outside["command"].startswith("Prefect")
