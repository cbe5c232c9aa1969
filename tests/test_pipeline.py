"""The pipeline library without Prefect: metrics, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from pipeline_fixtures import REPO, snapshot, tiny_dataset

from thumbnet_keras import pipeline
from thumbnet_keras.evaluation.accuracy import evaluate_classifier, topk_correct
from thumbnet_keras.evaluation.latency import measure_throughput, measure_throughputs
from thumbnet_keras.pipeline import ConfigError, GeneralizeParams, ThumbNetParams
from thumbnet_keras.pipeline.checkpoint import fit_resumable, load_checkpoint


def test_topk_correct_golden():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.0, 0.1, 0.9]])
    labels = np.array([2, 1, 0])
    assert topk_correct(logits, labels, 1).tolist() == [False, False, False]
    # Row 1 ties 0 and 1: the stable sort ranks class 0 first, so 1 is 2nd.
    assert topk_correct(logits, labels, 2).tolist() == [True, True, False]
    assert topk_correct(logits, labels, 3).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="k must be in"):
        topk_correct(logits, labels, 4)


def test_evaluate_classifier_golden():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    x = np.array([[1, 0, 0], [0, 2, 1], [0, 1, 2], [3, 2, 1]], np.float32)
    y = np.array([0, 2, 2, 1], np.int32)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    result = evaluate_classifier(model, batches, ks=(1, 2, 5))
    assert result == {"top1": 0.5, "top2": 1.0, "examples": 4}


def test_measure_throughput():
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Flatten()(inputs))
    speed = measure_throughput(model, batch_size=3, batches=2, warmup=1)
    assert speed["batch_size"] == 3 and speed["batches"] == 2
    assert speed["images_per_second"] > 0
    with pytest.raises(ValueError, match="batch_size"):
        measure_throughput(model, batch_size=0)


class _Sleeper:
    """A model whose calls take the given seconds, in turn; logs its calls."""

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log, self.calls = name, seconds, log, 0
        self.inputs = [keras.KerasTensor((None, 2, 2, 1))]

    def predict_on_batch(self, x):
        time.sleep(self.seconds[min(self.calls, len(self.seconds) - 1)])
        self.calls += 1
        self.log.append(self.name)
        return x


def test_measure_throughputs_interleaves_models_and_scores_the_median_call():
    """A trial (2026-11-30) saw two arms of identical compute reported at
    11,742 and 32,330 images/s: each model was timed alone, one after the
    other, and a burst of load fell on one. Models now take turns and each
    scores its median call, so one slow call (here 0.2 s among 0.01 s ones)
    does not move it."""
    log = []
    fast = _Sleeper("a", [0.0, 0.01, 0.2, 0.01, 0.01, 0.01], log)
    slow = _Sleeper("b", [0.0, 0.03], log)
    speed = measure_throughputs(
        {"a": fast, "b": slow}, batch_size=4, batches=5, warmup=1
    )
    assert log == ["a", "b"] + ["a", "b"] * 5  # warm-up each, then rounds
    assert 8.0 <= speed["a"]["ms_per_batch"] < 30.0  # the median, not the 0.2 s
    assert 28.0 <= speed["b"]["ms_per_batch"] < 60.0
    assert speed["a"]["images_per_second"] == pytest.approx(
        4 / (speed["a"]["ms_per_batch"] / 1000)
    )


def test_params_smoke_and_bounds():
    config = ThumbNetParams(smoke=True, factors=[2, 4]).to_config()
    assert config.image_size == 32 and config.joint_epochs == 1
    assert config.factors == (2, 4) and config.baseline_epochs == 2
    assert config.backbone_options == {"widths": [8, 16]}
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="joint_epochs"):
        ThumbNetParams(joint_epochs=0)
    with pytest.raises(ValidationError, match="run_name"):
        ThumbNetParams(run_name="../escape")


def test_smoke_names_what_it_replaces_in_a_flows_parameters():
    """The command line refuses `--smoke --epochs 5`; a deployment's
    parameters used to have smoke replace them without a word."""
    from thumbnet_keras.pipeline.config import smoke_replaced

    params = ThumbNetParams(smoke=True, joint_epochs=5, image_size=64, seed=3)
    assert smoke_replaced(params) == ["image_size 64 -> 32", "joint_epochs 5 -> 1"]
    assert smoke_replaced(ThumbNetParams(smoke=True, joint_epochs=1)) == []
    assert smoke_replaced(ThumbNetParams(joint_epochs=5)) == []  # No smoke.
    # A teacher fixes the image size: smoke keeps it, so it is not named.
    with_teacher = ThumbNetParams(smoke=True, teacher="t.keras", image_size=64)
    assert smoke_replaced(with_teacher) == []
    # `thumbnet demo --smoke`: the preset's epochs are not the user's.
    from thumbnet_keras import cli
    from thumbnet_keras.pipeline.presets import demo

    values = cli._demo_values(cli._parser().parse_args(["demo", "--smoke"]))
    assert smoke_replaced(ThumbNetParams(**values)) == []
    assert smoke_replaced(ThumbNetParams(**(demo() | {"smoke": True}))) != []
    assert (
        ThumbNetParams(**values).to_config()
        == ThumbNetParams(**(demo() | {"smoke": True})).to_config()
    )  # The same run.
    generalize = GeneralizeParams(source_run="runs/r", smoke=True, epochs=2)
    assert smoke_replaced(generalize) == ["epochs 2 -> 1"]
    assert generalize.to_config().epochs == 1


def _dataset(n=16):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.random((n, 6), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _model():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_fit_resumable_restores_weights_and_optimizer(tmp_path):
    first = _model()
    done = fit_resumable(first, _dataset(), 2, tmp_path, verbose=0, log=lambda m: None)
    assert len(done["history"]["loss"]) == 2 and done["resumed_from"] == []
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0002.weights.h5",
        "state.json",
    ]
    # A new process: same epochs -> restores, trains nothing.
    second = _model()
    again = fit_resumable(
        second, _dataset(), 2, tmp_path, verbose=0, log=lambda m: None
    )
    assert again["resumed_from"] == []
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_allclose(a, b)
    assert int(second.optimizer.iterations) == int(first.optimizer.iterations) == 8
    # More epochs -> resumes after epoch 2 with the optimizer's step count.
    third = _model()
    more = fit_resumable(third, _dataset(), 3, tmp_path, verbose=0, log=lambda m: None)
    assert more["resumed_from"] == [2]
    assert len(more["history"]["loss"]) == 3
    assert more["history"]["loss"][:2] == done["history"]["loss"]
    assert int(third.optimizer.iterations) == 12


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.function's second trace for variables created while tracing",
)
def test_fit_resumable_traces_the_tensorflow_train_step_once(tmp_path):
    """The optimizer's and the compiled metrics' variables exist before
    `fit`: a `tf.function` that creates variables is traced twice, and every
    stage paid that (~10 s for MobileNetV2 on 2 cores). Two epochs of 18
    examples in batches of 4 (a short last batch): one trace."""
    traces = []

    class Counting(keras.Model):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    inputs = keras.Input((6,))
    model = Counting(inputs, keras.layers.Dense(2)(inputs))
    model.compile(
        optimizer=keras.optimizers.AdamW(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    record = fit_resumable(
        model, lambda epoch: _dataset(18), 2, tmp_path, verbose=0, log=lambda m: None
    )
    assert len(record["history"]["loss"]) == 2
    assert len(traces) == 1


@pytest.fixture
def earlier_run(tmp_path):
    manifest = tiny_dataset(tmp_path)
    runs = tmp_path / "runs"
    run = pipeline.resolve_run(
        ThumbNetParams(
            dataset=manifest, smoke=True, runs_dir=str(runs), run_name="earlier"
        )
    )
    Path(run["run_dir"], "thumbnet.keras").write_bytes(b"model bytes")
    Path(run["run_dir"], "metrics.json").write_text("{}")
    return manifest, runs


def _teacher(path, classes, size=32, softmax=False):
    from thumbnet_keras.models import backbones

    model = backbones.build("tiny_cnn", (size, size, 1), classes, widths=(4,))
    if softmax:  # Probabilities: refused before any stage trains.
        model = keras.Model(model.input, keras.layers.Softmax()(model.output))
    model.save(path)
    return str(path)


BAD = {
    "unknown dataset": (
        {"dataset": "no_such_dataset"},
        "Unknown or invalid dataset 'no_such_dataset'",
    ),
    "unknown backbone": ({"backbone": "resnet99"}, "Unknown backbone 'resnet99'"),
    "factor": ({"factors": [3]}, "not divisible by factor=3"),
    "missing teacher": (
        {"teacher": "/nonexistent/teacher.keras"},
        "Teacher file not found",
    ),
    "teacher classes": (
        {"teacher": "CLASSES3"},
        "outputs 3 classes but the dataset has 2",
    ),
    "teacher size": ({"teacher": "SIZE48"}, r"takes \(48, 48, 1\) images"),
    "teacher softmax": ({"teacher": "SOFTMAX"}, "ends in a softmax activation"),
    # Builds at 16x16 (f = 2), not at 8x8 (f = 4): found before f = 2 trains.
    "teacher too small at f=4": (
        {"teacher": "VALID_CONVS", "factors": [2, 4]},
        r"Factor 4 \(--factor\): .* does not build at 8x8 inputs .*\. Choose a "
        r"smaller factor, or a larger --image-size \(for a \.keras teacher: one "
        r"built for larger images; its input size is the run's image size\)\.$",
    ),
    "unwritable": ({"runs_dir": "FILE/runs"}, "is not writable"),
    "same name, other config": ({"run_name": "earlier", "seed": 7}, "differs in: seed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_first_and_touches_nothing(case, earlier_run, tmp_path):
    manifest, runs = earlier_run
    overrides, message = BAD[case]
    params = {
        "dataset": manifest,
        "smoke": True,
        "runs_dir": str(runs),
        "run_name": "new",
    }
    params.update(overrides)
    if "teacher" in params:  # smoke keeps the size a given teacher fixes
        params["image_size"] = 32
    if params.get("teacher") == "CLASSES3":
        params["teacher"] = _teacher(tmp_path / "t3.keras", 3)
    if params.get("teacher") == "SOFTMAX":
        params["teacher"] = _teacher(tmp_path / "ts.keras", 2, softmax=True)
    if params.get("teacher") == "VALID_CONVS":
        image = keras.Input((32, 32, 1))
        x = keras.layers.Conv2D(4, 5, strides=2, padding="valid")(image)
        x = keras.layers.Conv2D(4, 5, padding="valid")(x)
        logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
        keras.Model(image, logits).save(tmp_path / "valid.keras")
        params["teacher"] = str(tmp_path / "valid.keras")
    if params.get("teacher") == "SIZE48":
        params["teacher"] = _teacher(tmp_path / "t48.keras", 2, size=48)
    if params["runs_dir"].startswith("FILE"):
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        params["runs_dir"] = str(blocker / "runs")
    before = snapshot(runs)
    with pytest.raises(ConfigError, match=message):
        pipeline.resolve_run(ThumbNetParams(**params))
    assert snapshot(runs) == before
    assert not (runs / "new").exists()


def test_a_replaced_teacher_file_is_not_resumed(earlier_run, tmp_path):
    """A user fixed their teacher, saved it under the same name and reran the
    same run: it used to resume on the old copy the run had kept. Now the
    teacher's content is one of the run's inputs."""
    manifest, runs = earlier_run
    teacher = _teacher(tmp_path / "teacher.keras", 2)
    params = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=str(runs), run_name="t",
        teacher=teacher, image_size=32,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    saved = json.loads(Path(run["run_dir"], "config.json").read_text())
    assert set(saved["inputs"]) == {"manifest_sha256", "teacher_sha256"}
    stages = Path(run["run_dir"], "stages")
    stages.mkdir()
    (stages / "teacher.json").write_text("{}")  # A stage finished.
    from thumbnet_keras.pipeline.rundir import unlock_run

    unlock_run(run["run_dir"])
    assert pipeline.resolve_run(params)["resumed"]  # Same file: resumes.
    unlock_run(run["run_dir"])
    _teacher(tmp_path / "teacher.keras", 2, size=32)  # New weights, same name.
    before = snapshot(runs)
    with pytest.raises(ConfigError, match="the teacher file changed since"):
        pipeline.resolve_run(params)
    assert snapshot(runs) == before
    # A run saved before the teacher was hashed still resumes.
    saved["inputs"].pop("teacher_sha256")
    Path(run["run_dir"], "config.json").write_text(json.dumps(saved))
    assert pipeline.resolve_run(params)["resumed"]
    unlock_run(run["run_dir"])


def test_claim_reopens_same_config(earlier_run):
    manifest, runs = earlier_run
    params = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=str(runs), run_name="earlier"
    )
    again = pipeline.resolve_run(params)
    assert again["resumed"] is True
    saved = json.loads((runs / "earlier" / "config.json").read_text())
    assert saved["config"]["run_name"] == "earlier" and saved["kind"] == "thumbnet"
    assert saved["environment"]["backend"] == keras.backend.backend()
    # The CPU model: float results on CPU depend on it (recorded since a
    # fresh-clone demo in a later session differed from the first epoch on).
    assert saved["environment"]["cpu"] and saved["environment"]["cpu_count"] >= 1


def test_a_measurement_setting_alone_resumes_and_is_taken(tmp_path):
    """`--throughput-batches 50` on a rerun (a steadier images/s) was refused
    as another configuration; it changes no trained model, so the run
    resumes and its config.json takes the new value, which evaluation and
    export read. (Not a smoke run: smoke sets throughput_batches itself.)"""
    from thumbnet_keras.pipeline.rundir import unlock_run

    common = dict(dataset=tiny_dataset(tmp_path), runs_dir=str(tmp_path / "runs"),
                  run_name="m", image_size=32, limit_per_class=4)  # fmt: skip
    run = pipeline.resolve_run(ThumbNetParams(**common, throughput_batches=2))
    path = Path(run["run_dir"], "config.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["throughput_batches"] == 2
    Path(run["run_dir"], "stages").mkdir()
    Path(run["run_dir"], "stages", "teacher.json").write_text("{}")  # Started.
    Path(run["run_dir"], "evaluation.json").write_text("{}")  # Measured with 2.
    unlock_run(run["run_dir"])
    again = ThumbNetParams(**common, throughput_batches=50)
    assert pipeline.resolve_run(again)["resumed"] is True
    now = json.loads(path.read_text())
    assert now["config"]["throughput_batches"] == 50
    assert now["config"] | {"throughput_batches": 2} == saved["config"]
    assert now["inputs"] == saved["inputs"]
    assert not Path(run["run_dir"], "evaluation.json").exists()  # Redone with 50.
    unlock_run(run["run_dir"])
    # With another difference it is still refused, naming only that one,
    # and config.json is left as it was.
    other = ThumbNetParams(**common, throughput_batches=3, seed=9)
    with pytest.raises(ConfigError, match=r"differs in: seed \(saved 0, now 9\)\)"):
        pipeline.resolve_run(other)
    assert json.loads(path.read_text()) == now


def test_claim_reopens_when_the_runs_dir_is_spelled_otherwise(earlier_run, monkeypatch):
    """`--runs-dir runs` then `--runs-dir /abs/.../runs`: the same run folder,
    resumed (was refused as "differs in: runs_dir")."""
    manifest, runs = earlier_run
    monkeypatch.chdir(runs.parent)
    relative = os.path.relpath(runs)
    assert not os.path.isabs(relative) and str(runs) != relative
    params = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=relative, run_name="earlier"
    )
    assert pipeline.resolve_run(params)["resumed"] is True
    # A real difference is still refused, and names only that field.
    other = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=relative, run_name="earlier", seed=9
    )
    with pytest.raises(ConfigError, match=r"differs in: seed \(saved 0, now 9\)\)"):
        pipeline.resolve_run(other)
    # Export formats alone: the refusal says how to add one to the run.
    formats = ThumbNetParams(dataset=manifest, smoke=True, runs_dir=relative,
                             run_name="earlier", export_formats=["onnx"])  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        pipeline.resolve_run(formats)
    # The option's name beside the field's (`--epochs` for joint_epochs too).
    assert "differs in: export_formats (--export-format; saved" in str(refused.value)
    run_path = os.path.join(relative, "earlier")
    assert f"thumbnet export --run {run_path} --format <format>" in str(refused.value)


def test_a_run_saved_before_a_new_field_resumes_at_its_old_meaning(earlier_run):
    """A config.json saved before `e_pretrain_epochs` existed holds a run
    without that stage: it resumes with `e_pretrain_epochs=0`, and the new
    default (on) is refused with both values named."""
    from thumbnet_keras.pipeline import Run

    manifest, runs = earlier_run
    run = Run(str(runs / "earlier"))
    saved = json.loads(run.config_json.read_text())
    for key in ("e_pretrain_epochs", "e_pretrain_learning_rate"):
        saved["config"].pop(key)
    run.config_json.write_text(json.dumps(saved))
    base = dict(dataset=manifest, smoke=True, runs_dir=str(runs), run_name="earlier")
    # Smoke turns e_pretrain on (1 epoch); the saved run predates it.
    with pytest.raises(
        ConfigError,
        match=r"e_pretrain_epochs \(saved 0, now 1\)\).*stage existed: "
        r"e_pretrain_epochs 0 resumes it \(`thumbnet train --e-pretrain-epochs 0`;"
        r" `thumbnet demo` always runs the stage, so give it another --run-name\)\.",
    ):
        pipeline.resolve_run(ThumbNetParams(**base))
    assert json.loads(run.config_json.read_text()) == saved  # untouched


def test_a_runs_prepared_dir_is_found_from_any_working_folder(tmp_path, monkeypatch):
    """Runs made before `prepare` recorded absolute folders hold
    `prepared_dir` relative to where they started (`runs/_data/...`): it is
    found beside the run folder's ancestors, so `thumbnet export --run
    /abs/runs/<name>` works from another folder; and a runs folder moved
    with its `_data` finds its data by the folder's last two parts."""
    import shutil

    from thumbnet_keras.pipeline import Run

    project = tmp_path / "project"
    (project / "runs" / "_data" / "toy-abc").mkdir(parents=True)
    (project / "runs" / "_data" / "toy-abc" / "summary.json").write_text("{}")
    run_dir = project / "runs" / "old"
    run_dir.mkdir()
    relative = os.path.join("runs", "_data", "toy-abc")
    (run_dir / "data.json").write_text(json.dumps({"prepared_dir": relative}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = str(project / "runs" / "_data" / "toy-abc")
    assert Run(str(run_dir)).data()["prepared_dir"] == expected
    monkeypatch.chdir(project)  # and from its own folder, by a relative path
    assert Run("runs/old").data()["prepared_dir"] == expected
    # An absolute folder (what runs record now) that was moved with its runs.
    (run_dir / "data.json").write_text(json.dumps({"prepared_dir": expected}))
    assert Run(str(run_dir)).data()["prepared_dir"] == expected
    shutil.move(project / "runs", tmp_path / "moved")
    moved = str(tmp_path / "moved" / "_data" / "toy-abc")
    assert Run(str(tmp_path / "moved" / "old")).data()["prepared_dir"] == moved
    # A folder found nowhere is left as written, for the caller's "no
    # readable summary.json" error.
    (tmp_path / "moved" / "old" / "data.json").write_text(
        json.dumps({"prepared_dir": "gone/x"})
    )
    assert Run(str(tmp_path / "moved" / "old")).data()["prepared_dir"] == "gone/x"
    # The steps that read its images (evaluate, training, int8 calibration,
    # generalize) ask for it and get one line naming the way out.
    with pytest.raises(ConfigError, match=r"its prepared data 'gone/x' is not found"):
        Run(str(tmp_path / "moved" / "old")).data(require=True)


def test_a_run_saved_before_e_pretrain_resumes_with_it_off(tmp_path):
    """The other half: the same settings with `e_pretrain_epochs=0` resume
    it (what a run saved without the field did)."""
    from thumbnet_keras.pipeline import Run

    manifest = tiny_dataset(tmp_path)
    settings = dict(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="old",
        image_size=32, limit_per_class=8, teacher_epochs=1, factors=[2],
        backbone_options={"widths": [8, 16]}, e_pretrain_epochs=0,
    )  # fmt: skip
    run = pipeline.resolve_run(ThumbNetParams(**settings))
    folder = Run(run["run_dir"])
    (folder.path / "metrics.json").write_text("{}")  # started
    saved = json.loads(folder.config_json.read_text())
    for key in ("e_pretrain_epochs", "e_pretrain_learning_rate"):
        saved["config"].pop(key)
    folder.config_json.write_text(json.dumps(saved))
    assert pipeline.resolve_run(ThumbNetParams(**settings))["resumed"] is True
    # A field not in LEGACY_VALUES, missing from the saved config, is a
    # difference (it is not filled in with today's default).
    saved["config"].pop("bn_batches")
    folder.config_json.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"differs in: bn_batches"):
        pipeline.resolve_run(ThumbNetParams(**settings))


def test_config_differences_compares_locations_as_folders(tmp_path):
    from thumbnet_keras.pipeline.rundir import config_differences

    base = {"runs_dir": "runs", "data_dir": str(tmp_path / "d"), "seed": 0}
    assert config_differences(base, base | {"runs_dir": "/elsewhere/runs"}) == []
    assert config_differences(base, base | {"data_dir": str(tmp_path / "x/../d")}) == []
    assert config_differences(base, base | {"data_dir": str(tmp_path / "e")}) == [
        "data_dir"
    ]
    assert config_differences(base, base | {"data_dir": None, "seed": 1}) == [
        "data_dir",
        "seed",
    ]
    # The teacher and manifest as typed after Ctrl-C: `./t.keras` is `t.keras`
    # (their content is compared by the input hashes).
    files = base | {"teacher": "t.keras", "dataset": "m.yaml"}
    retyped = files | {"teacher": "./t.keras", "dataset": "./sub/../m.yaml"}
    assert config_differences(files, retyped) == []
    assert config_differences(files, files | {"teacher": "pretrained:elpv"}) == [
        "teacher"
    ]
    keyword = {"backbone_weights": "imagenet"}  # a keyword, not ./imagenet
    assert config_differences(keyword, {"backbone_weights": "./imagenet"}) == [
        "backbone_weights"
    ]


def test_changed_manifest_is_not_resumed_onto(earlier_run):
    manifest, runs = earlier_run
    path = Path(manifest)
    path.write_text(
        path.read_text().replace("test_fraction: 0.25", "test_fraction: 0.5")
    )
    before = snapshot(runs)
    with pytest.raises(ConfigError, match="manifest changed"):
        pipeline.resolve_run(
            ThumbNetParams(
                dataset=manifest, smoke=True, runs_dir=str(runs), run_name="earlier"
            )
        )
    assert snapshot(runs) == before


def test_a_teacher_file_records_no_backbone_it_does_not_have(earlier_run, tmp_path):
    """A run with a teacher file and no `backbone` used to record the field's
    default, tiny_cnn: its default name said tiny_cnn, and `generalize`
    trained a fresh tiny_cnn as "the source's backbone" of, say, a
    MobileNetV2 teacher. Now the architecture stays unnamed, the run is
    named after the file, and generalize asks for a backbone."""
    from thumbnet_keras.pipeline.config import (
        RunConfig,
        architecture_label,
        experiment_backbone,
        legacy_backbone,
    )
    from thumbnet_keras.pipeline.rundir import unlock_run

    manifest, runs = earlier_run
    teacher = _teacher(tmp_path / "my_mobilenet.keras", 2)
    params = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=str(runs), teacher=teacher,
        image_size=32,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    unlock_run(run["run_dir"])
    assert run["run_name"].startswith("tiny_brightness-my_mobilenet-")
    for teacher, label in (
        ("keras_hub:kaggle://keras/resnetv2/keras/resnet_50_imagenet/2", "resnet_50_imagenet"),
        ("keras_hub:/models/my_preset/", "my_preset"),
        ("applications:ResNet50:imagenet", "ResNet50"),
    ):  # fmt: skip
        named = params.model_copy(update={"teacher": teacher}).to_config()
        assert architecture_label(named) == label
    saved = json.loads(Path(run["run_dir"], "config.json").read_text())
    assert saved["config"]["backbone"] is None
    assert saved["config"]["backbone_options"] == {}  # Not the smoke widths.
    with pytest.raises(ConfigError, match="--experiment DATASET:BACKBONE"):
        experiment_backbone(None, saved["config"])
    assert experiment_backbone("resnet18", saved["config"]) == "resnet18"
    named = ThumbNetParams(**{**params.model_dump(), "backbone": "resnet18"})
    assert named.to_config().backbone == "resnet18"
    # Without a teacher the default is still the tiny_cnn stage 0 trains,
    # also in a RunConfig built directly.
    assert ThumbNetParams(dataset=manifest).to_config().backbone == "tiny_cnn"
    assert RunConfig(dataset=manifest).backbone == "tiny_cnn"
    # The shipped teacher names its architecture, options included.
    elpv = ThumbNetParams(dataset="elpv", teacher="pretrained:elpv").to_config()
    assert (elpv.backbone, elpv.backbone_options) == ("mobilenetv2", {"alpha": 0.35})
    for smoke in (False, True):  # Such a run saved before: tiny_cnn.
        new = ThumbNetParams(
            dataset="elpv", teacher="pretrained:elpv", smoke=smoke
        ).to_config()
        widths = {"widths": [8, 16]} if smoke else {}
        old = {**new.to_json(), "backbone": "tiny_cnn", "backbone_options": widths}
        assert legacy_backbone(old, new.to_json()) == new.to_json()
    # Not an explicit, different backbone of the new run.
    other = elpv.model_copy(update={"backbone": "resnet18", "backbone_options": {}})
    old = {**elpv.to_json(), "backbone": "tiny_cnn", "backbone_options": {}}
    assert legacy_backbone(old, other.to_json())["backbone"] == "tiny_cnn"
    # A run started before this change (tiny_cnn and, in smoke, its widths
    # recorded) still resumes.
    named_run = params.model_copy(update={"run_name": "legacy"})
    legacy = Path(pipeline.resolve_run(named_run)["run_dir"])
    unlock_run(legacy)
    old = json.loads((legacy / "config.json").read_text())
    old["config"] |= {"backbone": "tiny_cnn", "backbone_options": {"widths": [8, 16]}}
    (legacy / "config.json").write_text(json.dumps(old))
    (legacy / "stages").mkdir()
    (legacy / "stages" / "teacher.json").write_text("{}")
    assert pipeline.resolve_run(named_run)["resumed"]
    unlock_run(legacy)


def test_unnamed_runs_get_distinct_folders(earlier_run):
    manifest, runs = earlier_run
    run = pipeline.resolve_run(
        ThumbNetParams(dataset=manifest, smoke=True, runs_dir=str(runs))
    )
    assert run["run_name"].startswith("tiny_brightness-tiny_cnn-")
    assert os.path.isdir(run["run_dir"]) and run["resumed"] is False


# Validation top-1 per epoch, forced: labels = argmax(x), 3 of 4 are class 0.
_VAL_X = np.array([[1, 0], [2, 1], [3, 0], [0, 1]], np.float32)
_VAL_Y = np.array([0, 0, 0, 1], np.int32)
_KERNELS = {"zeros": np.zeros((2, 2)), "eye": np.eye(2), "neg": -np.eye(2),
            "3eye": 3 * np.eye(2)}  # fmt: skip
_TOP1 = {"zeros": 0.75, "eye": 1.0, "neg": 0.0, "3eye": 1.0}  # zeros: ties go to 0


class _ForceKernel(keras.callbacks.Callback):
    """Sets the model's kernel to a given matrix per epoch (lr is 0)."""

    def __init__(self, plan):
        super().__init__()
        self.plan, self.epoch = plan, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        kernel = _KERNELS[self.plan[self.epoch]].astype("float32")
        self.model.get_layer("out").kernel.assign(kernel)


def _select_model():
    inputs = keras.Input((2,))
    out = keras.layers.Dense(2, use_bias=False, name="out")(inputs)
    model = keras.Model(inputs, out)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _val_data():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((_VAL_X, _VAL_Y)).batch(4)


def _fit_selected(directory, epochs, plan):
    model = _select_model()
    record = fit_resumable(
        model,
        _val_data(),
        epochs,
        directory,
        verbose=0,
        log=lambda m: None,
        validation_data=_val_data(),
        callbacks=[_ForceKernel(plan)],
    )
    return model, record


def test_best_epoch_is_selected_on_validation_and_survives_resume(tmp_path):
    plan = ["zeros", "eye", "neg", "zeros", "eye", "neg"]
    # First process: epochs 1-3, best is epoch 2 (identity, top-1 1.0).
    model, record = _fit_selected(tmp_path, 3, plan)
    assert record["history"]["val_accuracy"] == [0.75, 1.0, 0.0]
    assert record["selection"] == {
        "monitor": "val_accuracy", "best_epoch": 2, "best_value": 1.0
    }  # fmt: skip
    np.testing.assert_allclose(model.get_layer("out").kernel, np.eye(2))
    assert load_checkpoint(tmp_path)["best"]["epoch"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {
        "best-epoch-0002.weights.h5", "epoch-0003.weights.h5", "state.json"
    }  # fmt: skip
    # A new process resumes after epoch 3; epoch 5 ties epoch 2: the first stays.
    model, record = _fit_selected(tmp_path, 6, plan)
    assert record["resumed_from"] == [3]
    assert record["history"]["val_accuracy"] == [0.75, 1.0, 0.0, 0.75, 1.0, 0.0]
    assert record["selection"]["best_epoch"] == 2
    np.testing.assert_allclose(model.get_layer("out").kernel, np.eye(2))
    # A resumed process that finds a better epoch moves the selection.
    other = tmp_path / "other"
    _fit_selected(other, 1, ["neg", "zeros"])
    best = load_checkpoint(other)["best"]
    assert best.pop("val_loss") > 0  # the tie-break, kept with it
    assert best == {"monitor": "val_accuracy", "epoch": 1, "value": 0.0}
    model, record = _fit_selected(other, 2, ["neg", "zeros"])
    assert record["selection"]["best_epoch"] == 2
    np.testing.assert_allclose(model.get_layer("out").kernel, np.zeros((2, 2)))
    assert sorted(p.name for p in other.iterdir()) == [
        "best-epoch-0002.weights.h5", "epoch-0002.weights.h5", "state.json"
    ]  # fmt: skip


def test_no_epoch_selected_is_a_warning_and_the_report_says_so(tmp_path, caplog):
    """A platform trial: 2 validation images over 4 data-parallel JAX devices
    left every validation batch empty; the stages kept their last epoch
    with an INFO line, and the report said every model kept its best
    validation epoch."""
    import logging

    from thumbnet_keras.reports.render import _results_note

    empty = _val_data().filter(lambda x, y: False)
    with caplog.at_level(logging.WARNING, logger="thumbnet_keras.pipeline.checkpoint"):
        record = fit_resumable(
            _select_model(), _val_data(), 2, tmp_path, verbose=0, log=lambda m: None,
            validation_data=empty, callbacks=[_ForceKernel(["eye", "neg"])], stage="f2-joint",
        )  # fmt: skip
    assert record["selection"] == {
        "monitor": None, "best_epoch": 2, "reason": "no val_accuracy logged"
    }  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        "[f2-joint] no val_accuracy was logged: every validation batch was empty. "
        "No epoch was selected: keeping the last, 2/2."
    )
    metrics = {"dataset": {"splits": {"train": 9, "validation": 2, "test": 4}},
               "stages": {"f2-joint": record, "teacher": {"selection": {
                   "monitor": "val_accuracy", "best_epoch": 1}}}}  # fmt: skip
    note = _results_note(metrics)
    assert (
        "Except f2-joint: no validation top-1 was logged (every validation batch "
        "empty), so they kept their last epoch." in note
    )
    del metrics["stages"]["f2-joint"]
    assert "Except" not in _results_note(metrics)


def test_a_tie_keeps_the_epoch_with_the_lower_validation_loss(tmp_path):
    """A trial (2026-11-30): a 7-image validation split scored 100% from
    epoch 1 on, and the stage kept epoch 1 of 12, the warm-up. Between
    epochs of equal top-1 the lower validation loss wins: 3x the identity's
    logits are as right (top-1 1.0) and surer (cross-entropy by hand:
    mean of log(1 + e^-(3m)) over the margins m = 1, 1, 3, 1 (x3), under
    the identity's), so epoch 2 is kept over 1; the identity again at 3
    does not displace it, and a resume keeps it."""
    softplus = lambda t: np.log1p(np.exp(-t))  # noqa: E731
    margins = np.array([1.0, 1.0, 3.0, 1.0])
    loss_eye, loss_3eye = softplus(margins).mean(), softplus(3 * margins).mean()
    model, record = _fit_selected(tmp_path, 3, ["eye", "3eye", "eye", "eye"])
    assert record["history"]["val_accuracy"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(
        record["history"]["val_loss"], [loss_eye, loss_3eye, loss_eye], rtol=1e-5
    )
    assert record["selection"]["best_epoch"] == 2
    np.testing.assert_allclose(model.get_layer("out").kernel, 3 * np.eye(2))
    _, record = _fit_selected(tmp_path, 4, ["eye", "3eye", "eye", "eye"])
    assert record["resumed_from"] == [3] and record["selection"]["best_epoch"] == 2
    # A checkpoint saved before the tie-break has no loss beside its best:
    # it is read from the history, so epoch 2 still beats a tied, worse 5.
    state_file = tmp_path / "state.json"
    state = json.loads(state_file.read_text())
    del state["best"]["val_loss"]
    state_file.write_text(json.dumps(state))
    _, record = _fit_selected(tmp_path, 5, ["eye", "3eye", "eye", "eye", "eye"])
    assert record["resumed_from"] == [3, 4] and record["selection"]["best_epoch"] == 2


def test_no_validation_keeps_the_last_epoch(tmp_path):
    model = _select_model()
    record = fit_resumable(
        model, _val_data(), 2, tmp_path, verbose=0, log=lambda m: None,
        callbacks=[_ForceKernel(["eye", "neg"])], no_selection_reason="no labels",
    )  # fmt: skip
    assert record["selection"] == {
        "monitor": None, "best_epoch": 2, "reason": "no labels"
    }  # fmt: skip
    np.testing.assert_allclose(model.get_layer("out").kernel, -np.eye(2))


def test_run_config_and_params_agree():
    """One definition: RunConfig is ThumbNetParams with smoke applied; it
    declares no field of its own (same names, defaults, bounds, help), and
    a run's config.json reads back as the same RunConfig."""
    from thumbnet_keras.pipeline import RunConfig

    assert issubclass(RunConfig, ThumbNetParams)
    assert list(RunConfig.model_fields) == list(ThumbNetParams.model_fields)
    for name, field in RunConfig.model_fields.items():
        assert repr(field) == repr(ThumbNetParams.model_fields[name]), name
    config = ThumbNetParams(smoke=True, factors=[2, 4]).to_config()
    assert isinstance(config, RunConfig) and config.to_config() is config
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    # A config.json saved before (by the dataclass RunConfig) reads back as is.
    saved = json.loads((REPO / "docs/results/demo_metrics.json").read_text())
    # (It predates e_pretrain: it reads back without that stage.)
    assert RunConfig.from_json(saved["config"]).to_json() == saved["config"] | {
        "e_pretrain_epochs": 0,
        "e_pretrain_learning_rate": None,
    }
    config = ThumbNetParams(
        optimizer="sgd", teacher_learning_rate=0.1, learning_rate=0.01
    ).to_config()
    assert config.stage_learning_rate("teacher") == 0.1
    assert config.stage_learning_rate("fm_pretrain") == 0.01
    assert config.stage_learning_rate("e_pretrain") == 0.01
    assert config.downscaler_width is None and config.label_smoothing == 0.1
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="optimizer"):
        ThumbNetParams(optimizer="adam")


def test_equal_cost_size_is_the_smallest_side_that_costs_enough():
    from thumbnet_keras import count_flops
    from thumbnet_keras.layers.downscaler import build_downscaler
    from thumbnet_keras.models import backbones
    from thumbnet_keras.models.student import make_student
    from thumbnet_keras.pipeline.equal_cost import equal_cost_size, resize_downscaler

    teacher = backbones.build("tiny_cnn", (32, 32, 1), 3, widths=(8, 16))
    student = make_student(teacher, 2)
    target = count_flops(build_downscaler((32, 32, 1), 2, width=4)) + count_flops(
        student
    )
    found = equal_cost_size(teacher, 2, target, (0.0, 1.0))
    size = found["size"]
    assert found["reached"] and 16 < size <= 32 and found["macs"] >= target

    def macs(side):
        resize = resize_downscaler((32, 32, 1), side, (0.0, 1.0))
        return count_flops(resize) + count_flops(
            make_student(teacher, size=(side, side))
        )

    assert macs(size) == found["macs"] and macs(size - 1) < target
    # A target no size reaches: the full size, flagged.
    beyond = equal_cost_size(teacher, 2, 10 * count_flops(teacher))
    assert beyond["size"] == 32 and not beyond["reached"]


def test_auto_e_width_stays_under_the_next_thumbnail_side():
    """Fashion-MNIST's study teacher at f=2: S costs 3,321,472 MACs at 14x14
    and 3,606,304 at 15x15 (by hand below). E of width 24 fits the 15% share
    but costs more than that step, which pushed the equal-cost baseline to
    17x17 (1.64x E + S's MACs); the auto width now stays under the step, so
    the baseline is 15x15. At f=4 no width fits the step (S at 7 and 8 have
    the same feature-map sizes): the share rule alone decides, as before."""
    from thumbnet_keras import count_flops
    from thumbnet_keras.layers.downscaler import auto_downscaler_width
    from thumbnet_keras.models import backbones
    from thumbnet_keras.models.student import make_student
    from thumbnet_keras.pipeline.config import RunConfig
    from thumbnet_keras.pipeline.equal_cost import (
        equal_cost_size,
        resize_downscaler,
        thumbnail_step_macs,
    )
    from thumbnet_keras.pipeline.stages import build_run_downscaler

    teacher = backbones.build("tiny_cnn", (28, 28, 1), 10, widths=[32, 64, 128, 256])

    def s_macs(side):  # 3x3 convs, stride 1 then 2 ("same": ceil), + the head
        sides = [side, -(-side // 2), -(-side // 4), -(-side // 8)]
        chans = [1, 32, 64, 128, 256]
        convs = sum(n * n * 9 * chans[i] * chans[i + 1] for i, n in enumerate(sides))
        return convs + 256 * 10

    assert (s_macs(14), s_macs(15)) == (3_321_472, 3_606_304)
    assert count_flops(make_student(teacher, 2)) == s_macs(14)
    resize15 = count_flops(resize_downscaler((28, 28, 1), 15, (0.0, 1.0)))
    step = thumbnail_step_macs(teacher, 2, (0.0, 1.0))
    assert step == s_macs(15) + resize15 - s_macs(14)

    student = make_student(teacher, 2)
    assert auto_downscaler_width((28, 28, 1), 2, student) == 24  # share only
    assert auto_downscaler_width((28, 28, 1), 2, student, step_macs=step) == 16
    config = RunConfig(image_size=28, channels=1)
    e = build_run_downscaler(config, {"normalization": "unit"}, 2, student, teacher)
    assert count_flops(e) <= step
    found = equal_cost_size(teacher, 2, count_flops(e) + s_macs(14), (0.0, 1.0))
    assert found["size"] == 15
    # f=4: the step is a few thousand MACs, below any E: share rule (24 there too).
    student4 = make_student(teacher, 4)
    step4 = thumbnail_step_macs(teacher, 4, (0.0, 1.0))
    assert step4 == s_macs(8) + count_flops(
        resize_downscaler((28, 28, 1), 8, (0.0, 1.0))
    ) - s_macs(7)
    assert step4 < 10_000
    assert auto_downscaler_width(
        (28, 28, 1), 4, student4, step_macs=step4
    ) == auto_downscaler_width((28, 28, 1), 4, student4)
    with pytest.raises(ValueError, match="step_macs"):
        auto_downscaler_width((28, 28, 1), 2, student, step_macs=1.5)


def _small_run(tmp_path, **params) -> tuple[str, dict, str]:
    """A claimed run named "r" on the tiny two-class set (32 px, 8 images a
    class, batch 8, f = 2, a tiny_cnn [8, 16]) with its teacher trained for
    one epoch; `params` override. Returns (run_dir, prepared, manifest)."""
    manifest = tiny_dataset(tmp_path)
    settings = dict(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="r",
        image_size=32, limit_per_class=8, batch_size=8, teacher_epochs=1,
        factors=[2], backbone_options={"widths": [8, 16]},
    )  # fmt: skip
    run = pipeline.resolve_run(ThumbNetParams(**(settings | params)))
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    pipeline.get_teacher(run["run_dir"], prepared, verbose=0)
    return run["run_dir"], prepared, manifest


def test_a_resumed_run_keeps_the_e_width_it_started_with(tmp_path, monkeypatch):
    """The automatic E width is resolved once per factor and recorded: when
    the sizing rule changes between fm_pretrain and joint (as it did when the
    step budget came in), joint still loads fm_pretrain's weights into an E of
    the same width instead of failing on a weight-shape mismatch. A run from
    before the record reads the width from the E its finished stage saved."""
    from thumbnet_keras.layers import downscaler as downscaler_module
    from thumbnet_keras.pipeline import Run

    run_dir, _, _ = _small_run(tmp_path, fm_epochs=1, fm_weight=1.0, joint_epochs=1)
    monkeypatch.setattr(downscaler_module, "auto_downscaler_width", lambda *a, **k: 6)
    fm = pipeline.train_stage(run_dir, 2, "fm_pretrain", verbose=0)
    done = Run(run_dir)
    record = done.file("stages", "f2-downscaler.json")
    assert json.loads(record.read_text())["width"] == 6

    def width(path):
        e = keras.saving.load_model(path, compile=False)
        return e.get_layer("residual_conv").kernel.shape[2]

    assert width(fm["paths"]["downscaler"]) == 6
    # The rule changes; a run from before the record lost nothing either.
    monkeypatch.setattr(downscaler_module, "auto_downscaler_width", lambda *a, **k: 4)
    record.unlink()
    joint = pipeline.train_stage(run_dir, 2, "joint", verbose=0)
    assert width(joint["paths"]["downscaler"]) == 6
    assert json.loads(record.read_text()) == {
        "factor": 2,
        "width": 6,
        "source": "f2-fm_pretrain/downscaler.keras",
    }


def test_the_default_recipe_skips_fm_pretrain_and_joint_starts_from_the_teacher(
    tmp_path, monkeypatch
):
    """fm_epochs=0 (the default since validation chose CL + KD): fm_pretrain
    leaves no record, joint re-estimates S's BatchNorm (it starts from T)."""
    from thumbnet_keras.pipeline import Run

    manifest = tiny_dataset(tmp_path)
    params = ThumbNetParams(
        dataset=manifest, smoke=True, runs_dir=str(tmp_path / "runs"), run_name="r"
    )
    config = params.to_config()
    assert (config.fm_epochs, config.fm_weight) == (1, 1.0)  # smoke: every loss
    defaults = ThumbNetParams()
    assert (defaults.fm_epochs, defaults.fm_weight, defaults.mm_weight) == (0, 0, 0)
    run = pipeline.resolve_run(
        ThumbNetParams(**(params.model_dump() | {"smoke": False})).model_copy(
            update={
                "image_size": 32,
                "limit_per_class": 8,
                "batch_size": 8,
                "joint_epochs": 1,
                "teacher_epochs": 1,
                "backbone_options": {"widths": [8, 16]},
                "downscaler_width": 8,
                "factors": [2],
            }
        )  # fmt: skip
    )
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    pipeline.get_teacher(run["run_dir"], prepared, verbose=0)
    skipped = pipeline.train_stage(run["run_dir"], 2, "fm_pretrain", verbose=0)
    assert skipped["not_run"] == "fm_epochs=0"
    assert not Run(run["run_dir"]).is_done("f2-fm_pretrain")
    joint = pipeline.train_stage(run["run_dir"], 2, "joint", verbose=0)
    assert joint["epochs"] == 1 and joint["bn"]["layers"] > 0
    assert set(joint["history"]) >= {"cl_loss", "kd_loss"}

    # The equal-cost baseline is sized against the E this run trained, not
    # against E as the current sizing rule would build it.
    from thumbnet_keras import count_flops
    from thumbnet_keras.models.student import make_student
    from thumbnet_keras.pipeline import stages

    loaded, config = stages.load_run(run["run_dir"])
    teacher = keras.saving.load_model(loaded.teacher_keras, compile=False)
    trained_e = keras.saving.load_model(joint["paths"]["downscaler"], compile=False)
    s_macs = count_flops(make_student(teacher, 2))

    def other_e(*args, **kwargs):
        raise AssertionError("built E again although joint saved one")

    monkeypatch.setattr(stages, "build_run_downscaler", other_e)
    cost = stages._equal_cost(loaded, config, loaded.data(), 2, teacher)
    assert cost["target_macs"] == count_flops(trained_e) + s_macs
    with pytest.raises(ConfigError, match="would learn nothing"):
        pipeline.resolve_run(
            ThumbNetParams(
                dataset=manifest,
                runs_dir=str(tmp_path / "runs"),
                run_name="x",
                fm_epochs=2,
            )  # fmt: skip
        )


def test_e_pretrain_trains_e_alone_and_joint_starts_from_it(tmp_path):
    """e_pretrain trains E through the frozen teacher and saves it; joint
    (fm_epochs 0) starts from that E, not from a fresh one. With a peak
    rate of 1e-9 joint cannot move E, so its saved E is e_pretrain's."""
    from thumbnet_keras.pipeline import Run

    run_dir, _, _ = _small_run(
        tmp_path, e_pretrain_epochs=2, e_pretrain_learning_rate=1e-2,
        joint_epochs=1, joint_learning_rate=1e-9, downscaler_width=8,
    )  # fmt: skip
    teacher_bytes = Run(run_dir).teacher_keras.read_bytes()
    pre = pipeline.train_stage(run_dir, 2, "e_pretrain", verbose=0)
    assert pre["epochs"] == 2 and pre["health"]["status"] != "failed"
    assert {"kd_loss", "cl_loss", "val_accuracy"} <= set(pre["history"])
    assert Run(run_dir).teacher_keras.read_bytes() == teacher_bytes

    def residual(path):
        e = keras.saving.load_model(path, compile=False)
        return keras.ops.convert_to_numpy(e.get_layer("residual_conv").kernel)

    trained = residual(pre["paths"]["downscaler"])
    assert np.abs(trained).max() > 1e-3  # E left bicubic (a zero residual)
    joint = pipeline.train_stage(run_dir, 2, "joint", verbose=0)
    np.testing.assert_allclose(
        residual(joint["paths"]["downscaler"]), trained, atol=1e-6
    )
    # Rerun: done, skipped.
    again = pipeline.train_stage(run_dir, 2, "e_pretrain", verbose=0)
    assert again["epochs"] == 2 and again["history"] == pre["history"]


def test_e_pretrain_epochs_0_leaves_no_record(tmp_path):
    from thumbnet_keras.pipeline import Run

    run_dir, _, manifest = _small_run(tmp_path, e_pretrain_epochs=0)
    skipped = pipeline.train_stage(run_dir, 2, "e_pretrain", verbose=0)
    assert skipped["not_run"] == "e_pretrain_epochs=0"
    assert not Run(run_dir).is_done("f2-e_pretrain")
    with pytest.raises(ConfigError, match="would learn nothing"):
        pipeline.resolve_run(
            ThumbNetParams(
                dataset=manifest,
                runs_dir=str(tmp_path / "runs"),
                run_name="x",
                cl_weight=0.0,
                kd_weight=0.0,
            )  # fmt: skip
        )


def test_quarantined_files_are_named_in_one_log_line(tmp_path, caplog):
    """A broken image is left out of the run: the console says how many and
    why, and where the per-file list is (it used to be only in the file)."""
    manifest = tiny_dataset(tmp_path, per_class=6)
    broken = tmp_path / "brightness" / "dark" / "broken.png"
    broken.write_bytes(
        next((tmp_path / "brightness" / "dark").iterdir()).read_bytes()[:40]
    )
    with caplog.at_level("WARNING", logger="thumbnet_keras"):
        prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"))
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("data: 1 file(s) quarantined and left out (1 corrupt)")
    assert lines[0].endswith("quarantine.json")
    assert sum(prepared["splits"].values()) == 12  # 13 files, one left out


def test_a_run_is_not_resumed_on_files_changed_under_its_manifest(tmp_path):
    """A trial: images removed from (or added to) a class folder under the
    same manifest moved other images between train and test, and a rerun
    resumed the stages trained on the old split, then rewrote data.json and
    the report. Now the prepared index's fingerprint must match the run's."""
    run_dir, prepared, manifest = _small_run(tmp_path)
    assert prepared["fingerprint"]
    removed = tmp_path / "brightness" / "dark" / "003.png"
    kept = removed.read_bytes()
    removed.unlink()
    changed = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    assert changed["fingerprint"] != prepared["fingerprint"]
    before = snapshot(Path(run_dir))
    with pytest.raises(ConfigError, match="was started on other data") as refused:
        pipeline.get_teacher(run_dir, changed, verbose=0)
    assert "restore the files to resume" in str(refused.value)
    assert "classes" not in str(refused.value)  # the same classes
    # A class folder renamed: the counts are the same, the classes say what
    # changed (a trial read "then: train 160 ...; now: train 160 ...").
    renamed = changed | {"class_names": ["bright", "darker"]}
    with pytest.raises(ConfigError, match="was started on other data") as refused:
        pipeline.get_teacher(run_dir, renamed, verbose=0)
    assert "classes gone: 'dark', new: 'darker')" in str(refused.value)
    assert snapshot(Path(run_dir)) == before
    # Nor is it scored on them (`thumbnet evaluate --run` read the new splits).
    from thumbnet_keras.pipeline import Run

    with pytest.raises(ConfigError, match="was prepared again since"):
        Run(run_dir).data(require=True)
    # A run recorded by an older version has no fingerprint: its split sizes
    # and classes are compared (an upgrade trial: it resumed, and was scored,
    # on splits that had moved 4 training images into test and validation).
    data_json = Path(run_dir, "data.json")
    legacy = json.loads(data_json.read_text())
    del legacy["fingerprint"]
    other = legacy | {
        "splits": legacy["splits"] | {"test": legacy["splits"]["test"] + 1}
    }
    data_json.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="was started on other data"):
        pipeline.get_teacher(run_dir, changed, verbose=0)
    with pytest.raises(ConfigError, match="was prepared again since"):
        Run(run_dir).data(require=True)
    data_json.write_text(json.dumps(legacy))  # the same splits: resumed below
    # The files back as they were: the same index, and the run resumes.
    removed.write_bytes(kept)
    again = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    assert again["fingerprint"] == prepared["fingerprint"]
    assert pipeline.get_teacher(run_dir, again, verbose=0)["source"] == "trained"


def test_a_stage_whose_data_was_prepared_again_while_it_trained_is_not_finished(
    tmp_path, monkeypatch
):
    """A Prefect trial: run B re-prepared the shared data folder (files
    changed under the same manifest) while run A's baseline trained; A's
    stage had passed its start check, trained on B's split, and was recorded
    as finished, and a rerun on restored files skipped it and reported a
    model trained on some of its test images. The check is made again when a
    stage ends: the stage is not recorded, its checkpoints go, and a rerun on
    the restored files trains it from the start."""
    from thumbnet_keras.pipeline import Run, stages

    run_dir, prepared, manifest = _small_run(tmp_path)
    removed = tmp_path / "brightness" / "dark" / "003.png"
    kept = removed.read_bytes()
    fit = stages._fit

    def fit_then_other_run_prepares(*args, **kwargs):
        result = fit(*args, **kwargs)
        removed.unlink()  # ... and another run prepares the folder again.
        pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
        return result

    monkeypatch.setattr(stages, "_fit", fit_then_other_run_prepares)
    with pytest.raises(ConfigError, match="was prepared again since"):
        pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    run = Run(run_dir)
    assert not run.is_done("f2-bicubic_cl")
    assert not run.checkpoint_dir("f2-bicubic_cl").exists()
    assert not run.stage_dir("f2-bicubic_cl").exists()  # its unrecorded model
    # Files restored and prepared again: the stage trains, not skipped.
    monkeypatch.setattr(stages, "_fit", fit)
    removed.write_bytes(kept)
    again = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    assert again["fingerprint"] == prepared["fingerprint"]
    record = pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert not record.get("skipped") and record["epochs"] > 0
    assert record["resumed_from"] == []


def test_a_finished_stage_whose_model_file_is_gone_says_so(tmp_path):
    """A platform trial: with a finished stage's student.keras deleted, a
    rerun skipped the stage and failed in export with a traceback; with the
    stage deleted and trained again, the run kept its old evaluation.json,
    metrics and report. Now the skip names the missing file and what to do,
    and a stage trained again drops the run's evaluation."""
    run_dir, _, _ = _small_run(tmp_path)
    record = pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert record["outputs"] == ["student.keras"]
    assert record["replicas"] == 1  # no distribution
    student = Path(run_dir, "stages", "f2-bicubic_cl", "student.keras")
    kept = student.read_bytes()
    student.unlink()
    before = snapshot(Path(run_dir))
    with pytest.raises(ConfigError) as gone:
        pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert str(gone.value).endswith(
        "finished, but stages/f2-bicubic_cl/student.keras is gone. Restore it, or "
        "delete stages/f2-bicubic_cl.json in the run folder to train the stage "
        "again, and rerun."
    )
    assert snapshot(Path(run_dir)) == before
    student.write_bytes(kept)
    assert pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)["skipped"]
    # Trained again (its record deleted): the evaluation it would change goes.
    Path(run_dir, "evaluation.json").write_text("{}")
    Path(run_dir, "stages", "f2-bicubic_cl.json").unlink()
    pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert not Path(run_dir, "evaluation.json").exists()
    # The teacher's file too.
    Path(run_dir, "teacher.keras").unlink()
    with pytest.raises(
        ConfigError, match="its teacher, teacher.keras, is gone. .*start a new run"
    ):
        pipeline.train_stage(run_dir, 2, "bicubic_kd", verbose=0)


def test_a_finished_stage_whose_model_file_changed_says_so(tmp_path, monkeypatch):
    """A resume trial (2026-12-01): a truncated teacher.keras in a finished
    run shipped with rc 0, a truncated student.keras failed export with
    "File not found" for a file that was there (only existence was
    checked); a rerun killed between a retrained stage's record and the
    removal of evaluation.json reported the old model's scores; and a
    checkpoint left by a kill made a stage "trained again" resume from it.
    Now each stage records its files' sha256 and the skip checks them, the
    evaluation goes before the record, and a finished stage's leftover
    checkpoints go when it is skipped."""
    from thumbnet_keras.pipeline import Run, stages
    from thumbnet_keras.pipeline.rundir import DamagedFileError

    run_dir, prepared, _ = _small_run(tmp_path)
    record = pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    student = Path(run_dir, "stages", "f2-bicubic_cl", "student.keras")
    assert set(record["sha256"]) == {"student.keras"}
    kept = student.read_bytes()
    student.write_bytes(kept[: len(kept) // 2])
    before = snapshot(Path(run_dir))
    with pytest.raises(DamagedFileError) as changed:
        pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert str(changed.value).endswith(
        "finished, but stages/f2-bicubic_cl/student.keras changed since (damaged, "
        "or replaced): restore it from a copy, or delete stages/f2-bicubic_cl.json "
        "and stages/f2-bicubic_cl/ in the run folder to train the stage again."
    )
    assert snapshot(Path(run_dir)) == before
    # A record made by a version before the digests (an upgrade trial: the
    # truncated file was "File not found" in three tracebacks, at export).
    record_file = Path(run_dir, "stages", "f2-bicubic_cl.json")
    legacy = json.loads(record_file.read_text())
    del legacy["sha256"]
    record_file.write_text(json.dumps(legacy))
    with pytest.raises(DamagedFileError, match="student.keras changed since"):
        pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    student.write_bytes(kept)
    assert pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)["skipped"]
    teacher = Path(run_dir, "teacher.keras")
    good_teacher = teacher.read_bytes()
    teacher.write_bytes(good_teacher[:-100])
    with pytest.raises(DamagedFileError, match="teacher.keras changed since"):
        pipeline.get_teacher(run_dir, prepared, verbose=0)  # a rerun's first step
    teacher.write_bytes(good_teacher)
    # A leftover checkpoint of the finished stage goes when it is skipped.
    run = Run(run_dir)
    run.checkpoint_dir("f2-bicubic_cl").mkdir(parents=True)
    assert pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)["skipped"]
    assert not run.checkpoint_dir("f2-bicubic_cl").exists()
    # Killed after a retrained stage's record is written: the old evaluation
    # is already gone.
    Path(run_dir, "evaluation.json").write_text("{}")
    Path(run_dir, "stages", "f2-bicubic_cl.json").unlink()

    def killed(path, record):
        assert not Path(run_dir, "evaluation.json").exists()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stages, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_stage(run_dir, 2, "bicubic_cl", verbose=0)
    assert not Path(run_dir, "evaluation.json").exists()


def test_sync_batchnorm_without_data_parallel_is_no_difference():
    """A run saved with --sync-batchnorm and no --distribution (accepted
    then, refused now) resumes without the flag: it did nothing."""
    from thumbnet_keras.pipeline.rundir import config_differences

    saved = {"distribution": "none", "sync_batchnorm": True, "seed": 0}
    assert config_differences(saved, saved | {"sync_batchnorm": False}) == []
    parallel = saved | {"distribution": "data_parallel"}
    assert config_differences(parallel, parallel | {"sync_batchnorm": False}) == [
        "sync_batchnorm"
    ]


def test_a_copied_or_renamed_run_folder_resumes_under_its_new_name(tmp_path):
    """An MLOps trial: a run folder copied to another name (or renamed, or
    moved to another runs folder) was refused as "a different configuration
    (differs in: run_name)", so it could only be trained again from the
    start. The folder is the run: it resumes, its finished teacher is not
    trained again, and config.json takes the new name."""
    import shutil

    from thumbnet_keras.pipeline import Run

    run_dir, prepared, manifest = _small_run(tmp_path)
    teacher = Path(run_dir, "teacher.keras").read_bytes()
    copy = tmp_path / "elsewhere" / "r-copy"
    shutil.copytree(run_dir, copy)
    settings = dict(
        dataset=manifest, runs_dir=str(copy.parent), run_name="r-copy",
        image_size=32, limit_per_class=8, batch_size=8, teacher_epochs=1,
        factors=[2], backbone_options={"widths": [8, 16]},
    )  # fmt: skip
    resolved = pipeline.resolve_run(ThumbNetParams(**settings))
    assert resolved["resumed"] is True and resolved["run_dir"] == str(copy)
    assert Run(copy).config()["config"]["run_name"] == "r-copy"
    before = snapshot(copy / "stages")
    pipeline.get_teacher(str(copy), prepared, verbose=0)  # finished: skipped
    assert snapshot(copy / "stages") == before
    assert (copy / "teacher.keras").read_bytes() == teacher
    # Another setting still refuses it, naming that setting only.
    with pytest.raises(ConfigError, match=r"differs in: batch_size"):
        pipeline.resolve_run(ThumbNetParams(**(settings | {"batch_size": 4})))
    # The original is untouched and still resumes under its own name.
    assert Run(run_dir).config()["config"]["run_name"] == "r"


def test_export_agreement_without_a_validation_split_or_without_the_data(tmp_path):
    """The review of the export agreement: a run without a validation split
    (`validation_fraction: 0`) could no longer export (the empty split
    raised), and an export from a run folder whose prepared data is gone
    (copied to a deploy machine) failed after converting. The test split is
    used then; without data the row is written without an agreement."""
    import shutil

    from thumbnet_keras.pipeline.export import (
        _deployable,
        agreement,
        agreement_reference,
    )

    manifest = Path(tiny_dataset(tmp_path))
    text = manifest.read_text()
    manifest.write_text(
        text.replace(
            "{test_fraction: 0.25,", "{test_fraction: 0.25, validation_fraction: 0,"
        )
    )
    run = pipeline.resolve_run(
        ThumbNetParams(
            dataset=str(manifest), runs_dir=str(tmp_path / "runs"), run_name="r",
            image_size=32, limit_per_class=8, batch_size=8, teacher_epochs=1,
            factors=[2], backbone_options={"widths": [8, 16]},
        )
    )  # fmt: skip
    prepared = pipeline.prepare_dataset(str(manifest), str(tmp_path / "data"), 8)
    assert not prepared["splits"].get("validation")
    pipeline.get_teacher(run["run_dir"], prepared, verbose=0)
    model = str(Path(run["run_dir"], "teacher.keras"))
    found = agreement(model, agreement_reference(run["run_dir"], model))
    assert found == {
        "agreement": 1.0,
        "agreement_images": prepared["splits"]["test"],
        "agreement_split": "test",
    }
    shutil.move(tmp_path / "data", tmp_path / "elsewhere")
    reference = agreement_reference(run["run_dir"], model)
    assert reference is None
    row = _deployable(model, "keras", 2, 1, reference=reference)
    assert row["bytes"] > 0 and "agreement" not in row
