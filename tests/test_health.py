"""Training health (issue 12): non-finite losses stop a stage and name the
cause; a model whose predictions do not depend on its input, or that is no
better than the majority class, is flagged. Golden values by hand; real
Keras models and `fit_resumable`, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from pipeline_fixtures import REPO, subprocess_env, tiny_dataset

from thumbnet_keras.pipeline.checkpoint import fit_resumable, load_checkpoint
from thumbnet_keras.pipeline.health import (
    TrainingDivergedError,
    check_logits,
    check_predictions,
    run_health,
)


def test_constant_logits_fail():
    logits = np.tile([[1.0, 2.0, 3.0]], (12, 1))
    labels = np.array([0, 1, 2] * 4)
    health = check_logits(logits, labels, 3)
    assert health["status"] == "failed"
    assert health["logit_spread"] == 0.0
    assert "do not depend on the input" in health["problems"][0]
    # Also: always class 2, top-1 4/12 = majority 4/12 (at, not below).
    assert health["top1"] == pytest.approx(1 / 3)
    assert health["majority_rate"] == pytest.approx(1 / 3)
    assert any("majority-class rate 33.33%" in p for p in health["problems"])
    assert any("class 2 predicted for all 12 images" in p for p in health["problems"])


def test_healthy_logits_pass():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])
    logits = 5.0 * np.eye(3)[labels]
    logits[0] = [0.0, 5.0, 0.0]  # one mistake: 11/12 > majority 5/12
    health = check_logits(logits, labels, 3)
    assert health == health | {"status": "ok", "problems": []}
    assert health["top1"] == pytest.approx(11 / 12)
    assert health["majority_rate"] == pytest.approx(5 / 12)


def test_majority_rate_degrades():
    # Varying logits (input-dependent) but always class 0: top-1 = 8/12 =
    # the majority rate.
    labels = np.array([0] * 8 + [1] * 4)
    logits = np.stack([np.linspace(1, 2, 12), np.zeros(12)], axis=1)
    health = check_logits(logits, labels, 2)
    assert health["status"] == "degraded"
    assert health["top1"] == health["majority_rate"] == pytest.approx(8 / 12)
    assert health["problems"] == [
        "top-1 66.67% is at or below the majority-class rate 66.67% (12 images)",
        "class 0 predicted for all 12 images",
    ]


def test_small_sets_judge_only_constancy():
    # 3 images: the majority rate is not judged; constancy still is.
    labels = np.array([0, 0, 1])
    varied = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert check_logits(varied, labels, 2)["status"] == "ok"
    assert check_logits(np.ones((3, 2)), labels, 2)["status"] == "failed"


def test_nonfinite_logits_fail():
    logits = np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 0.0]])
    health = check_logits(logits, np.array([1, 0, 0]), 2)
    assert health["status"] == "failed"
    assert health["problems"] == ["non-finite predictions for 1 of 3 images"]


def test_run_health_worst_status_and_problems():
    records = {
        "teacher": {"health": {"status": "ok", "problems": []}},
        "f2-joint": {"health": {"status": "failed", "problems": ["a", "b"]}},
        "f2-bicubic_cl": {"health": {"status": "degraded", "problems": ["c"]}},
        "f2-fm_pretrain": {},  # a record from before health checks
    }
    health = run_health(records)
    assert health["status"] == "failed"
    assert health["problems"] == ["f2-joint: a", "f2-joint: b", "f2-bicubic_cl: c"]
    assert set(health["stages"]) == {"f2-joint", "f2-bicubic_cl"}


def _batches(n=16, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    y = np.arange(n) % classes
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def test_constant_keras_model_is_flagged():
    """A real network whose output does not depend on its input (a zero
    kernel: logits = bias) fails the check; the same network with a random
    kernel passes the constancy check."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, outputs)
    dense = model.get_layer("logits")
    dense.set_weights([np.zeros((36, 2), "float32"), np.array([0.3, -0.2], "float32")])
    health = check_predictions(model, _batches(), 2)
    assert health["status"] == "failed", health
    assert health["images"] == 16 and health["logit_spread"] == 0.0
    kernel = np.random.default_rng(1).normal(size=(36, 2)).astype("float32")
    dense.set_weights([kernel, np.zeros(2, "float32")])
    health = check_predictions(model, _batches(), 2, judge_accuracy=False)
    assert health["status"] == "ok" and health["logit_spread"] > 0.1


def _diverging_model(learning_rate: float) -> keras.Model:
    # w <- w - lr * d(w^2)/dw = (1 - 2 lr) w: with lr = 10, w grows 19x a step
    # and w^2 overflows float32 after about 15 steps (4 steps an epoch).
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _regression():
    import tensorflow as tf

    x = np.ones((4, 1), "float32")
    return tf.data.Dataset.from_tensor_slices((x, np.zeros((4, 1), "float32"))).batch(1)


def test_nonfinite_loss_stops_restores_and_names_the_cause(tmp_path):
    model = _diverging_model(10.0)
    logs = []
    with pytest.raises(TrainingDivergedError) as err:
        fit_resumable(model, _regression(), 10, tmp_path, verbose=0,
                      log=logs.append, stage="f2-joint", learning_rate=10.0)  # fmt: skip
    message = str(err.value)
    state = load_checkpoint(tmp_path)
    last_good = state["epoch"]
    # Step k's loss is w_k^2 = 19^(2k): epoch 4's last (k = 15) is 19^30 =
    # 2.3e38, finite; epoch 5's first, 19^32 = 8e40, overflows.
    assert last_good == 4
    assert "[f2-joint] training diverged" in message
    assert f"epoch {last_good + 1}/10" in message
    assert f"weights of epoch {last_good} were restored" in message
    assert "learning rate is too high" in message and "10" in message
    assert "--on-nonfinite continue" in message
    w = float(keras.ops.convert_to_numpy(model.weights[0])[0, 0])
    assert np.isfinite(w) and w == pytest.approx(19.0**16, rel=1e-5)
    assert all(np.isfinite(v) for v in state["history"]["loss"])


def test_nonfinite_loss_first_epoch_restores_initial_weights(tmp_path):
    model = _diverging_model(1e20)  # inf after the first step
    with pytest.raises(TrainingDivergedError, match="epoch 1/3.*starting weights"):
        fit_resumable(model, _regression(), 3, tmp_path, verbose=0, log=lambda m: None)
    assert float(keras.ops.convert_to_numpy(model.weights[0])[0, 0]) == 1.0
    assert load_checkpoint(tmp_path) is None


def test_on_nonfinite_continue_records_and_trains_on(tmp_path):
    model = _diverging_model(10.0)
    record = fit_resumable(model, _regression(), 6, tmp_path, verbose=0,
                           log=lambda m: None, on_nonfinite="continue")  # fmt: skip
    assert [e["epoch"] for e in record["nonfinite"]] == [5, 6]
    assert len(record["history"]["loss"]) == 6
    state = json.loads((tmp_path / "state.json").read_text())
    assert [e["epoch"] for e in state["nonfinite"]] == [5, 6]


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="one backend is enough for the CLI path (subprocess, TF)",
)
def test_cli_diverging_learning_rate_fails_with_the_cause(tmp_path):
    manifest = tiny_dataset(tmp_path)
    command = [
        sys.executable, "-m", "thumbnet_keras.cli", "train", "--dataset", manifest,
        "--runs-dir", str(tmp_path / "runs"), "--run-name", "lr",
        "--image-size", "32", "--limit-per-class", "8", "--batch-size", "1",
        "--backbone-options", '{"widths": [8, 16]}', "--teacher-epochs", "10",
        # lr x decoupled weight decay > 2: kernels grow |1 - lr wd| (up to
        # 9x) a step and overflow float32 around epoch 4 (44 steps).
        "--learning-rate", "10", "--weight-decay", "1", "--warmup-epochs", "0",
    ]  # fmt: skip
    env = subprocess_env() | {"KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "thumbnet: error: [teacher] training diverged: non-finite" in output
    assert "learning rate is too high for this stage (peak learning rate 10)" in output
    assert "restored" in output
    run = tmp_path / "runs" / "lr"
    assert not (run / "thumbnet.keras").exists()
    assert not (run / "stages" / "teacher.json").exists()
    assert os.path.isdir(run)


def test_cli_options_reach_the_params():
    from thumbnet_keras.cli import _parser, _train_values
    from thumbnet_keras.pipeline import ThumbNetParams

    args = _parser().parse_args(
        ["train", "--on-nonfinite", "continue", "--no-deterministic", "--seed", "3"]
    )
    config = ThumbNetParams(**_train_values(args)).to_config()
    assert (config.on_nonfinite, config.deterministic, config.seed) == (
        "continue",
        False,
        3,
    )
    default = ThumbNetParams(**_train_values(_parser().parse_args(["train"])))
    assert (default.on_nonfinite, default.deterministic) == ("fail", True)


def test_constant_teacher_stops_the_run_and_its_rerun(tmp_path):
    """A given teacher whose output ignores its input fails stage 0 with the
    cause, and a rerun of the same run fails the same way (the finished
    record is not a pass)."""
    from thumbnet_keras import pipeline
    from thumbnet_keras.pipeline.config import TrainingHealthError
    from thumbnet_keras.pipeline.stages import get_teacher

    manifest = tiny_dataset(tmp_path)
    inputs = keras.Input((32, 32, 1), name="image")
    logits = keras.layers.Dense(2, kernel_initializer="zeros", name="logits")(
        keras.layers.GlobalAveragePooling2D()(_feature_map(inputs))
    )
    path = tmp_path / "constant.keras"
    keras.Model(inputs, logits).save(path)
    params = pipeline.ThumbNetParams(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="c",
        teacher=str(path), image_size=32, limit_per_class=8,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"), 8)
    for _ in range(2):
        with pytest.raises(TrainingHealthError, match="teacher.*do not depend"):
            get_teacher(run["run_dir"], prepared, verbose=0)
    record = json.loads(
        (tmp_path / "runs" / "c" / "stages" / "teacher.json").read_text()
    )
    assert record["health"]["status"] == "failed"
    assert record["health"]["logit_spread"] == 0.0


def _feature_map(inputs):
    """A 1x1 convolution that passes a gray image on unchanged: the feature
    map ThumbNet needs (a teacher without one is refused)."""
    return keras.layers.Conv2D(
        1, 1, kernel_initializer="ones", bias_initializer="zeros", name="features"
    )(inputs)


def _sign_teacher(path, threshold=0.0):
    """Class 0 ("bright") when the image's mean is above `threshold`: right
    on [-1, 1] images (threshold 0), always class 0 on [0, 1] ones."""
    inputs = keras.Input((32, 32, 1), name="image")
    logits = keras.layers.Dense(
        2,
        kernel_initializer=keras.initializers.Constant([[1.0, -1.0]]),
        bias_initializer=keras.initializers.Constant([-threshold, threshold]),
        name="logits",
    )(keras.layers.GlobalAveragePooling2D()(_feature_map(inputs)))
    keras.Model(inputs, logits).save(path)
    return str(path)


@pytest.mark.parametrize("threshold,warned", [(0.0, True), (0.5, False)])
def test_a_teacher_fed_other_values_than_it_was_trained_on_is_reported(
    tmp_path, threshold, warned
):
    """The manifest says `unit` (the default) and the teacher was trained on
    [-1, 1] (threshold 0): on [0, 1] images it calls every image bright (50%),
    on [-1, 1] ones it is right (100%). Its health names the manifest
    setting to change (a practitioner's MobileNetV2 lost 18 points this way
    without a word). A teacher trained on [0, 1] (threshold 0.5) is not."""
    from thumbnet_keras import pipeline
    from thumbnet_keras.pipeline.config import TrainingHealthError
    from thumbnet_keras.pipeline.stages import get_teacher

    manifest = tiny_dataset(tmp_path, per_class=20)
    params = pipeline.ThumbNetParams(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="v",
        teacher=_sign_teacher(tmp_path / "t.keras", threshold), image_size=32,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"))
    if warned:
        # 50 points better on [-1, 1] (>= VALUE_RANGE_FAIL): the run stops at
        # the teacher, naming the manifest line to change.
        with pytest.raises(TrainingHealthError, match="set `normalization: symmetric`"):
            get_teacher(run["run_dir"], prepared, verbose=0)
        record = json.loads(Path(run["run_dir"], "stages", "teacher.json").read_text())
        health = record["health"]
        assert health["images"] >= 10
        assert health["value_ranges"]["unit"] == pytest.approx(0.5)
        assert health["value_ranges"]["symmetric"] == 1.0
        assert health["status"] == "failed"
    else:
        record = get_teacher(run["run_dir"], prepared, verbose=0)
        health = record["health"]
        assert health["value_ranges"]["unit"] == 1.0
        assert health["status"] == "ok", health["problems"]


def _swapped_teacher(path):
    """`_sign_teacher` on [0, 1] with its two classes swapped; saved to `path`."""
    inputs = keras.Input((32, 32, 1), name="image")
    logits = keras.layers.Dense(
        2,
        kernel_initializer=keras.initializers.Constant([[-1.0, 1.0]]),
        bias_initializer=keras.initializers.Constant([0.5, -0.5]),
        name="logits",
    )(keras.layers.GlobalAveragePooling2D()(_feature_map(inputs)))
    keras.Model(inputs, logits).save(path)
    return path


def test_a_teacher_no_value_range_fits_is_not_told_to_change_it(tmp_path):
    """An edge deployer's trial (2026-11-30): a teacher whose outputs were in
    another class order scored 0% and was told to set `normalization: raw`,
    where it scored the majority-class rate. An alternative that only
    reaches what answering the most frequent class scores is no evidence of
    a value range: the problem says to check the class order."""
    from thumbnet_keras import pipeline
    from thumbnet_keras.pipeline.config import TrainingHealthError
    from thumbnet_keras.pipeline.stages import get_teacher

    manifest = tiny_dataset(tmp_path, per_class=20)
    path = _swapped_teacher(tmp_path / "swapped.keras")
    params = pipeline.ThumbNetParams(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="s",
        teacher=str(path), image_size=32,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"))
    with pytest.raises(TrainingHealthError) as info:  # 50 points from its best
        get_teacher(run["run_dir"], prepared, verbose=0)
    message = str(info.value)
    record = json.loads(Path(run["run_dir"], "stages", "teacher.json").read_text())
    ranges = record["health"]["value_ranges"]
    assert ranges["unit"] == 0.0, ranges
    assert max(ranges.values()) <= record["health"]["majority_rate"] + 0.1, ranges
    assert "set `normalization" not in message
    # Its outputs in the other order are all right: that order is named (a
    # later trial's teacher, whose other value range scored 67% against the
    # order's 33%, was still told to change the normalization).
    assert record["health"]["matched_order_top1"] == 1.0
    names = prepared["class_names"]
    listed = f"{names[1]}, {names[0]}"
    assert f"manifest's class order ({names[0]}, {names[1]})" in message
    assert f"`classes: [{listed}]`" in message
    # `thumbnet export`/`evaluate` on it: a rerun would stop there again.
    from thumbnet_keras.pipeline import preflight
    from thumbnet_keras.pipeline.config import ConfigError
    from thumbnet_keras.pipeline.rundir import unlock_run

    unlock_run(run["run_dir"])
    for check in (
        lambda: preflight.check_export(run["run_dir"], None, "onnx"),
        lambda: preflight.check_finished_run(run["run_dir"]),
    ):
        with pytest.raises(ConfigError, match="stopped at its teacher.*--run-name"):
            check()


def test_teacher_checks_too_few_images_to_run_say_so(tmp_path, caplog):
    """A trial: a teacher trained on its classes in another order scored 42%
    on 10 validation images (4 classes; the order check needs 4 a class) and
    the run went on with status "ok" and no word. The checks that did not
    run are now named, as a warning and in the health record."""
    import logging

    from thumbnet_keras import pipeline
    from thumbnet_keras.pipeline.stages import get_teacher

    manifest = tiny_dataset(tmp_path, per_class=12)
    path = _swapped_teacher(tmp_path / "swapped.keras")
    params = pipeline.ThumbNetParams(
        dataset=manifest, runs_dir=str(tmp_path / "runs"), run_name="few",
        teacher=str(path), image_size=32,
    )  # fmt: skip
    run = pipeline.resolve_run(params)
    prepared = pipeline.prepare_dataset(manifest, str(tmp_path / "data"))
    assert prepared["splits"]["validation"] < 10
    with caplog.at_level(logging.WARNING, logger="thumbnet_keras.pipeline.stages"):
        record = get_teacher(run["run_dir"], prepared, verbose=0)
    health = record["health"]
    assert health["status"] == "ok" and "value_ranges" not in health
    (note,) = health["skipped"]
    assert note.startswith("the value-range and class-order checks need 10 held-out")
    split = health["split"]
    assert f"the {split} split has {prepared['splits'][split]}," in note
    assert any(note in r.getMessage() for r in caplog.records), caplog.text


def test_matched_classes_finds_the_order_a_teacher_was_trained_in():
    """Golden values by hand. Outputs 0, 1, 2 stand for classes 2, 0, 1: the
    confusion counts (true x predicted) are [[0, 3, 0], [0, 0, 2], [3, 0,
    1]]; matched greedily, 3 + 3 + 2 = 8 of 9 right against 1 in the given
    order (the one class-2 image predicted 2). The identity stays itself."""
    from thumbnet_keras.pipeline.health import matched_classes

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([1, 1, 1, 2, 2, 0, 0, 0, 2])
    assert np.mean(predicted == labels) == pytest.approx(1 / 9)
    top1, order = matched_classes(predicted, labels, 3)
    assert top1 == pytest.approx(8 / 9)
    assert order == [2, 0, 1]
    assert matched_classes(labels, labels, 3) == (1.0, [0, 1, 2])


def test_held_out_matching_finds_real_orders_not_noise():
    """A review (2026-11-30): fitted and scored on the same 512 images, the
    matching told a right-order 1000-class teacher to reorder its classes
    (every row of the confusion counts holds 0-1 images, so a wrong answer
    is "matched" for free). Held out, it gains nothing on noise and keeps
    a real order's accuracy; with under 4 images a class it is not tried."""
    from thumbnet_keras.pipeline.health import held_out_matching

    labels = np.repeat([0, 1, 2], 6)  # 18 images, a trial's test split
    swapped = np.array([2, 1, 0])[labels]  # right answers, outputs reordered
    assert held_out_matching(swapped, labels, 3) == (1.0, [2, 1, 0])
    # Too few images a class to say: not tried.
    rng = np.random.default_rng(0)
    many = rng.integers(0, 1000, 512)
    assert held_out_matching(many, many, 1000) == (None, list(range(1000)))
    # Guessing at random: matched on the same images, a 128-class guesser
    # on 512 images "gains" 0.2 or more (an order found in noise); held
    # out, never 0.10.
    for classes, images in ((128, 512), (20, 200)):
        for seed in range(10):
            rng = np.random.default_rng(seed)
            labels = rng.integers(0, classes, images)
            guess = rng.integers(0, classes, images)
            top1, _ = held_out_matching(guess, labels, classes)
            assert top1 - np.mean(guess == labels) < 0.10, (classes, seed)


def test_the_share_of_the_most_predicted_class_is_recorded():
    """`_value_range_check` tells a value range (varied answers) from a
    teacher that fits no range (one answer) by this share."""
    labels = np.array([0, 0, 0, 1, 1, 2] * 2)
    logits = np.eye(3)[[0, 0, 1, 1, 1, 1] * 2] + 0.01 * np.arange(12)[:, None]
    health = check_logits(logits, labels, 3)
    assert health["top_class_share"] == pytest.approx(8 / 12)
    assert health["majority_rate"] == pytest.approx(6 / 12)


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    """A resume trial (2026-12-01): a truncated epoch file ended in two
    tracebacks and h5py's "truncated file: eof = 70676 ...", naming no file."""
    from thumbnet_keras.pipeline.rundir import DamagedFileError

    fit_resumable(_diverging_model(0.01), _regression(), 2, tmp_path, verbose=0,
                  log=lambda m: None)  # fmt: skip
    weights = Path(load_checkpoint(tmp_path)["weights"])
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DamagedFileError) as err:
        fit_resumable(_diverging_model(0.01), _regression(), 4, tmp_path, verbose=0,
                      log=lambda m: None)  # fmt: skip
    assert str(err.value).startswith(f"Checkpoint {str(weights)!r} is damaged (")
    assert str(err.value).endswith(
        f"Delete {str(tmp_path)!r} to train the stage again from its start, and rerun."
    )


def test_a_stage_resumed_on_other_replicas_says_so_and_records_it(tmp_path, caplog):
    """A trial (2026-12-01): a run started on 2 devices, killed, resumed on 1,
    said nothing, and its record said `replicas: 1`."""
    import logging

    fit_resumable(_diverging_model(0.01), _regression(), 2, tmp_path, verbose=0,
                  log=lambda m: None)  # fmt: skip
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["replicas_by_attempt"] == [1]
    state["replicas_by_attempt"] = [2]  # as a 2-device process left it
    (tmp_path / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="thumbnet_keras.pipeline.checkpoint"):
        record = fit_resumable(_diverging_model(0.01), _regression(), 4, tmp_path,
                               verbose=0, log=lambda m: None, stage="f2-joint")  # fmt: skip
    assert record["replicas_by_attempt"] == [2, 1]
    assert "[f2-joint] the checkpoint's epochs trained on 2 replica(s); this " in (
        caplog.text
    )
    # The same devices: nothing said, nothing extra recorded.
    caplog.clear()
    fresh = tmp_path / "fresh"
    fit_resumable(_diverging_model(0.01), _regression(), 2, fresh, verbose=0,
                  log=lambda m: None)  # fmt: skip
    record = fit_resumable(_diverging_model(0.01), _regression(), 3, fresh, verbose=0,
                           log=lambda m: None)  # fmt: skip
    assert "replicas_by_attempt" not in record and "replica(s)" not in caplog.text
    # Killed after its last epoch on 2 devices, rerun on 1: nothing trains,
    # so no attempt is added (a review: it read [2, 1]).
    done = tmp_path / "done"
    fit_resumable(_diverging_model(0.01), _regression(), 2, done, verbose=0,
                  log=lambda m: None)  # fmt: skip
    state = json.loads((done / "state.json").read_text())
    (done / "state.json").write_text(json.dumps(state | {"replicas_by_attempt": [2]}))
    record = fit_resumable(_diverging_model(0.01), _regression(), 2, done, verbose=0,
                           log=lambda m: None)  # fmt: skip
    assert "replicas_by_attempt" not in record
