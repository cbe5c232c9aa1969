"""Progress lines and the end-of-run summary: golden strings from hand-made inputs."""

from __future__ import annotations

import logging

import keras
import numpy as np

from thumbnet_keras.pipeline import progress
from thumbnet_keras.pipeline.progress import (
    EpochProgress,
    format_duration,
    format_summary,
    keras_verbose,
    stage_label,
    summary_rows,
)


def _arm(name, factor, top1, flops, val=None, size=None):
    return {"name": name, "label": name, "factor": factor, "top1": top1,
            "val_top1": val, "flops": flops, "params": 1, "images_per_second": 1.0,
            "input_size": size or (128 if factor is None else 128 // factor)}  # fmt: skip


def metrics() -> dict:
    """Two factors, every arm; teacher 40M MACs, ThumbNet f=2 10.25M, f=4 2.7M."""
    return {
        "run_name": "demo",
        "primary_factor": 2,
        "config": {"factors": [2, 4], "image_size": 128},
        "arms": [
            _arm("thumbnet", 4, 0.66, 2_700_000, 0.65),
            _arm("bicubic_cl", 4, 0.65, 2_000_000, 0.64),
            _arm("teacher", None, 0.724, 40_000_000, 0.75),
            _arm("teacher_bicubic", 2, 0.40, 10_000_000, 0.41),
            _arm("teacher_bicubic_bn", 2, 0.60, 10_000_000, 0.61),
            _arm("bicubic_cl", 2, 0.65, 10_000_000, 0.66),
            _arm("bicubic_kd", 2, 0.671, 10_000_000, 0.68),
            _arm("bicubic_kd_equal", 2, 0.66, 10_500_000, 0.67, size=66),
            _arm("thumbnet", 2, 0.688, 10_250_000, 0.70),
        ],
        "outputs": {
            "thumbnet.keras": "runs/demo/thumbnet.keras",
            "f2/thumbnet.keras": "runs/demo/f2/thumbnet.keras",
            "f4/thumbnet.keras": "runs/demo/f4/thumbnet.keras",
            "report.html": "runs/demo/report.html",
            "report.md": "runs/demo/report.md",
        },
    }


def test_stage_label_counts_the_runs_stages():
    # teacher + 7 stages per factor, two factors: 15 stages.
    assert stage_label([2, 4], "teacher") == "[1/15] teacher"
    assert stage_label([2, 4], "f2-e_pretrain") == "[3/15] e_pretrain f=2"
    assert stage_label([2, 4], "f2-fm_pretrain") == "[4/15] fm_pretrain f=2"
    assert stage_label([2, 4], "f2-joint") == "[5/15] joint f=2"
    assert stage_label([2, 4], "f4-bicubic_kd_equal") == "[15/15] bicubic_kd_equal f=4"
    assert stage_label([2], "f2-joint") == "[5/8] joint f=2"
    assert stage_label([2], "f8-joint") == "[joint f=8]"  # not in this run
    # fm_epochs=0 (the default recipe): fm_pretrain is not a stage of the run.
    skip = {"fm_pretrain"}
    assert stage_label([2, 4], "f2-joint", skip) == "[4/13] joint f=2"
    assert stage_label([2, 4], "f2-fm_pretrain", skip) == "[fm_pretrain f=2]"
    # Neither pre-training stage: 11 stages.
    skip = {"fm_pretrain", "e_pretrain"}
    assert stage_label([2, 4], "f2-joint", skip) == "[3/11] joint f=2"
    assert stage_label([2, 4], "f4-bicubic_kd_equal", skip) == (
        "[11/11] bicubic_kd_equal f=4"
    )
    assert stage_label([2, 4], "f2-e_pretrain", skip) == "[e_pretrain f=2]"


def test_skipped_stages_reads_a_config_or_a_saved_dict():
    from thumbnet_keras.pipeline import ThumbNetParams
    from thumbnet_keras.pipeline.config import skipped_stages

    config = ThumbNetParams().to_config()  # defaults: e_pretrain on, FM off
    assert skipped_stages(config) == {"fm_pretrain"}
    assert skipped_stages(config.to_json()) == {"fm_pretrain"}
    off = ThumbNetParams(e_pretrain_epochs=0, fm_epochs=2, fm_weight=1.0)
    assert skipped_stages(off.to_config()) == {"e_pretrain"}
    # A run saved before e_pretrain existed has neither field set to it.
    assert skipped_stages({"fm_epochs": 0}) == {"fm_pretrain", "e_pretrain"}
    assert skipped_stages({}) == {"e_pretrain"}


def test_format_duration_and_keras_verbose():
    assert [format_duration(s) for s in (0, 48.4, 60, 185, 3725)] == [
        "0s", "48s", "1m00s", "3m05s", "1h02m",
    ]  # fmt: skip
    # Piped (2) or silent (0): Keras says nothing, EpochProgress logs a line.
    assert (keras_verbose(1), keras_verbose(2), keras_verbose(0)) == (1, 0, 0)


def test_epoch_line_golden_with_eta_and_best():
    cb = EpochProgress("f2-joint", 4, [2])
    first = cb.format_epoch(
        0, {"loss": 1.84891, "accuracy": 0.25, "val_accuracy": 0.5}, 10.0
    )
    assert first == (
        "[5/8] joint f=2 epoch 1/4:  loss 1.8489  train top-1 25.0%  "
        "val top-1 50.0% (best)  (10s, ETA 30s)"
    )
    # The ETA uses the mean epoch time, without the first (tracing) epoch
    # once another is timed: 4 s x 2 epochs left.
    second = cb.format_epoch(1, {"loss": 1.5, "val_accuracy": 0.4}, 4.0)
    assert second.endswith("val top-1 40.0%  (4s, ETA 8s)")
    third = cb.format_epoch(2, {"loss": 1.3, "val_accuracy": 0.5}, 6.0)
    assert third.endswith("(6s, ETA 5s)")  # (4 + 6) / 2 x 1 epoch left
    last = cb.format_epoch(3, {"loss": 1.2, "val_accuracy": 0.6}, 12.0)
    assert last.endswith("val top-1 60.0% (best)  (12s)")  # nothing left
    # A stage without labels (fm_pretrain): the loss only.
    fm = EpochProgress("f2-fm_pretrain", 1, [2]).format_epoch(0, {"loss": 0.5}, 3)
    assert fm == "[4/8] fm_pretrain f=2 epoch 1/1:  loss 0.5000  (3s)"


def test_epoch_progress_logs_one_line_per_epoch_from_a_real_fit(caplog):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])  # fmt: skip
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.array([0, 1] * 4)
    with caplog.at_level(logging.INFO, logger=progress.logger.name):
        model.fit(x, y, epochs=2, batch_size=4, validation_data=(x, y), verbose=0,
                  callbacks=[EpochProgress("teacher", 2, [2])])  # fmt: skip
    # Only the progress logger's lines: Keras/TF may log retracing warnings
    # into the same capture when earlier tests traced functions.
    lines = [r.getMessage() for r in caplog.records if r.name == progress.logger.name]
    assert len(lines) == 2
    assert lines[0].startswith("[1/8] teacher epoch 1/2:  loss ")
    assert "val top-1 " in lines[0] and "ETA " in lines[0]
    assert lines[1].startswith("[1/8] teacher epoch 2/2:") and "ETA" not in lines[1]


def test_a_resumed_stage_marks_best_only_past_the_checkpoints_best(tmp_path):
    # After a resume the progress line marked "(best)" on an epoch that only
    # equalled the best before the interruption: EpochProgress started empty.
    import tensorflow as tf

    from thumbnet_keras.pipeline.checkpoint import fit_resumable

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])  # fmt: skip
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.array([0, 1] * 4))).batch(4)
    first = fit_resumable(model, data, 2, tmp_path, verbose=0,
                          validation_data=data, log=lambda m: None)  # fmt: skip
    cb = EpochProgress("teacher", 3, [2])
    fit_resumable(model, data, 3, tmp_path, verbose=0, validation_data=data,
                  callbacks=[cb], log=lambda m: None)  # fmt: skip
    best = first["selection"]["best_value"]
    assert cb.best is not None and cb.best["value"] >= best
    restored = EpochProgress("teacher", 3, [2])
    restored.restore_best({"value": best})
    again = restored.format_epoch(2, {"val_accuracy": best}, 1.0)
    assert "(best)" not in again
    assert "(best)" in restored.format_epoch(2, {"val_accuracy": best + 0.1}, 1.0)


def test_summary_rows_golden():
    rows = summary_rows(metrics())
    assert [(r["model"], r["f"]) for r in rows] == [
        ("Teacher", "-"),
        ("Teacher on bicubic (no retraining)", "2"),
        ("Teacher on bicubic, BN re-estimated", "2"),
        ("Bicubic + CL", "2"),
        ("Bicubic + KD", "2"),
        ("Bicubic + KD, larger thumbnail", "2"),
        ("ThumbNet (E + S)", "2"),
        ("Bicubic + CL", "4"),
        ("ThumbNet (E + S)", "4"),
    ]
    assert rows[0] == {"model": "Teacher", "f": "-", "thumbnail": "none",
                       "val top-1": "75.00%", "test top-1": "72.40%",
                       "MACs": "40.00M", "fewer MACs": "1.0x",
                       "images/s": "1"}  # fmt: skip
    assert rows[6]["fewer MACs"] == "3.9x" and rows[6]["MACs"] == "10.25M"
    assert rows[5]["thumbnail"] == "66x66"
    assert rows[8]["fewer MACs"] == "14.8x" and rows[8]["test top-1"] == "66.00%"
    # Measured throughput, thousands separated; not measured: left blank.
    m = metrics()
    by_name = {(a["name"], a["factor"]): a for a in m["arms"]}
    by_name[("teacher", None)]["images_per_second"] = 1234.6
    by_name[("teacher_bicubic", 2)].pop("images_per_second")
    rows = summary_rows(m)
    assert rows[0]["images/s"] == "1,235" and rows[1]["images/s"] == ""


def test_format_summary_golden():
    text = format_summary(metrics())
    lines = text.splitlines()
    assert lines[0] == (
        "Run demo: ThumbNet f=2: 68.8% test top-1 at 3.9× fewer MACs; teacher "
        "72.4%, best bicubic baseline 67.1% (Bicubic + KD; the best on validation). "
        "ThumbNet f=4: 66.0% test top-1 at 14.8× fewer MACs; best bicubic baseline "
        "65.0% (Bicubic + CL; the best on validation)."
    )
    assert lines[2].split() == ["model", "f", "thumbnail", "val", "top-1", "test",
                                "top-1", "MACs", "fewer", "MACs", "images/s"]  # fmt: skip
    rows = [" ".join(line.split()) for line in lines]
    assert "ThumbNet (E + S) 2 64x64 70.00% 68.80% 10.25M 3.9x 1" in rows
    assert "Teacher - none 75.00% 72.40% 40.00M 1.0x 1" in rows
    assert lines[13].startswith("images/s: this machine, the run's batch size")
    assert "thumbnet.keras: runs/demo/thumbnet.keras  (f=2, the first factor)" in lines
    assert "  f=4:      runs/demo/f4/thumbnet.keras" in lines
    assert "report.html:    runs/demo/report.html" in lines


def test_format_summary_puts_health_warnings_first():
    m = metrics() | {"health": {"status": "degraded",
                                "problems": ["f2-joint: at the majority-class rate"]}}  # fmt: skip
    lines = format_summary(m).splitlines()
    assert lines[0] == "WARNING: This run is marked DEGRADED by its health checks:"
    assert lines[1] == "  - f2-joint: at the majority-class rate"
    assert lines[2].startswith("Run demo: ThumbNet f=2")
    assert not format_summary(metrics()).startswith("WARNING")


def test_stage_done_logs_the_stages_wall_time(caplog, monkeypatch):
    """A trial (2026-11-30): `[1/7] teacher: done in 0s` after 2.6 s (a
    loaded teacher trains for 0 s; its loading and checks took the time).
    The line gives the time since the stage started in this process, and the
    record's training time when it did not start here."""

    class FakeRun:
        def config(self):
            return {"config": {"factors": [2], "e_pretrain_epochs": 0, "fm_epochs": 0}}

    monkeypatch.setattr(progress, "_STARTED", {})  # Whatever ran before.
    clock = iter([100.0, 102.6])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock, 102.6))
    caplog.set_level(logging.INFO, logger="thumbnet_keras.progress")
    progress.stage_started([2], "teacher", ("e_pretrain", "fm_pretrain"))
    progress.stage_done(FakeRun(), "teacher", {"seconds": 0.0})
    assert caplog.messages[-1] == "[1/6] teacher: done in 3s"
    # Not started in this process: the record's own seconds.
    progress.stage_done(FakeRun(), "f2-joint", {"seconds": 61.0})
    assert caplog.messages[-1] == "[3/6] joint f=2: done in 1m01s"
