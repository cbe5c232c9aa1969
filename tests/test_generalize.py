"""The `generalize` run without Prefect: its configuration, the pure report,
the notes on when E cannot help, and fresh students trained with the recipe,
per seed, on a source run whose E is still the bicubic thumbnail."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from pipeline_fixtures import tiny_dataset

from thumbnet_keras import pipeline
from thumbnet_keras.pipeline import (
    ConfigError,
    GeneralizeConfig,
    GeneralizeParams,
    ThumbNetParams,
)
from thumbnet_keras.pipeline.datasets import split_batches
from thumbnet_keras.pipeline.generalize import (
    arm_id,
    arm_inputs,
    input_notes,
    resolve_generalize,
    train_generalize_arm,
    write_generalize_report,
)
from thumbnet_keras.pipeline.generalize_report import (
    generalize_markdown,
    mean_std,
    summarize_generalize,
)
from thumbnet_keras.pipeline.resolve import generalize_inputs
from thumbnet_keras.pipeline.rundir import Run


def test_recipe_fields_are_the_runs_own():
    """The recipe's defaults, bounds and help are ThumbNetParams' / RunConfig's."""
    for name in GeneralizeParams.RECIPE_FIELDS:
        mine, theirs = (
            GeneralizeParams.model_fields[name],
            ThumbNetParams.model_fields[name],
        )
        assert mine.default == theirs.default, name
        assert mine.metadata == theirs.metadata and mine.annotation == theirs.annotation
        assert getattr(GeneralizeConfig, name) == theirs.default, name
    assert set(GeneralizeParams.model_fields) == {
        f.name for f in dataclasses.fields(GeneralizeConfig)
    }
    config = GeneralizeParams(source_run="r", learning_rate=0.05).to_config()
    assert config.seeds == (0, 1, 2) and config.stage_learning_rate("x") == 0.05
    assert GeneralizeConfig.from_json(config.to_json()) == config
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="distinct"):
        GeneralizeParams(source_run="r", seeds=[1, 1])
    with pytest.raises(ValidationError, match="optimizer"):
        GeneralizeParams(source_run="r", optimizer="adam")
    # Not required by the schema (a deployment run's partial `params` takes
    # the deployment's), but by the check every run goes through.
    assert "source_run" not in GeneralizeParams.model_json_schema().get("required", [])
    from thumbnet_keras.pipeline import ConfigError
    from thumbnet_keras.pipeline.preflight import check_generalize

    with pytest.raises(ConfigError, match="^--source-run is required"):
        check_generalize({"epochs": 1})


def test_mean_std_golden():
    assert mean_std([2.0, -1.0, 5.0]) == (2.0, 3.0)  # var = (0 + 9 + 9) / 2
    assert mean_std([4.0]) == (4.0, None)
    with pytest.raises(ValueError):
        mean_std([])


def _record(experiment, seed, arm, top1, val):
    return {"experiment": experiment, "seed": seed, "arm": arm, "top1": top1,
            "val_top1": val}  # fmt: skip


def test_summary_pairs_arms_per_seed_golden():
    experiments = [
        {"dataset": "a", "backbone": "tiny_cnn", "notes": ["no detail"]},
        # A manifest given by its path: reports call it by its name.
        {"dataset": "/d/b.yaml", "name": "b", "backbone": "resnet18", "notes": []},
    ]
    # Experiment 0: test differences +2, -1, +5 points; val +1, +1, +1.
    records = [
        _record(0, 0, "learned", 0.52, 0.41), _record(0, 0, "bicubic", 0.50, 0.40),
        _record(0, 1, "learned", 0.60, 0.51), _record(0, 1, "bicubic", 0.61, 0.50),
        _record(0, 2, "learned", 0.75, 0.61), _record(0, 2, "bicubic", 0.70, 0.60),
        # Experiment 1: one complete seed (no validation), one bicubic alone.
        _record(1, 0, "learned", 0.30, None), _record(1, 0, "bicubic", 0.40, None),
        _record(1, 1, "bicubic", 0.40, None),
    ]  # fmt: skip
    first, second = summarize_generalize(experiments, records)
    assert first["seeds"] == [0, 1, 2]
    assert [round(s["diff"], 6) for s in first["per_seed"]] == [2.0, -1.0, 5.0]
    assert first["diff"]["mean"] == pytest.approx(2.0)
    assert first["diff"]["std"] == pytest.approx(3.0)
    assert first["val_diff"]["mean"] == pytest.approx(1.0)
    assert first["val_diff"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert first["learned"]["mean"] == pytest.approx(62.333333)
    assert first["sign"] == "mixed"
    assert second["seeds"] == [0] and second["diff"]["std"] is None
    assert second["val_diff"] is None and second["sign"] == "one seed"
    markdown, table, per_seed = generalize_markdown("T", "intro", [first, second])
    assert table[0]["difference (points)"] == "+2.00 ± 3.00"
    assert table[0]["per seed"] == "s0 +2.00, s1 -1.00, s2 +5.00"
    assert table[1]["difference (points)"] == "-10.00"
    assert table[1]["val difference (points)"] == "n/a"
    assert len(per_seed) == 4 and per_seed[3]["difference test (points)"] == "-10.00"
    assert "**a / tiny_cnn**: no detail" in markdown and "## Per seed" in markdown
    assert table[1]["dataset"] == "b" and "/d/b.yaml" not in markdown
    # Every seed on one side: said so.
    flipped = [dict(r, top1=r["top1"] + (0.1 if r["arm"] == "learned" else 0))
               for r in records[:6]]  # fmt: skip
    assert summarize_generalize(experiments, flipped)[0]["sign"] == (
        "E better on every seed (no paired interval on 3 of 3)"  # older records
    )


def _hits(right: int, n: int = 1000, offset: int = 0) -> str:
    """Per-image hits: images offset .. offset + right - 1 right."""
    return "".join("1" if offset <= i < offset + right else "0" for i in range(n))


def test_the_verdict_reads_each_seeds_paired_interval():
    """A trial (2026-11-30) read "bicubic better on every seed" for -0.5,
    -0.1 and -0.6 points on 1,000 test images (-0.1 is one image). Each seed
    is now compared on the same images, and the verdict says on how many
    seeds the test set cannot tell the arms apart."""
    experiments = [{"dataset": "a", "backbone": "tiny_cnn", "notes": []}]

    def pair(seed, learned, bicubic):
        common = {"examples": 1000, "test_majority": 0.25}
        return [
            {**_record(0, seed, "learned", learned.count("1") / 1000, None),
             "test_correct": learned, "flops": 605_632, **common},
            {**_record(0, seed, "bicubic", bicubic.count("1") / 1000, None),
             "test_correct": bicubic, "flops": 553_888, **common},
        ]  # fmt: skip

    # Learned gets 5, 1 and 6 fewer of 1,000 right: 20 images only bicubic
    # gets right, 15, 19 and 14 only learned.
    close = [
        r
        for seed, d in enumerate((5, 1, 6))
        for r in pair(seed, _hits(500 - d, offset=20), _hits(500))
    ]
    (row,) = summarize_generalize(experiments, close)
    assert [s["diff"] for s in row["per_seed"]] == [-0.5, -0.1, -0.6]
    assert row["sign"] == "bicubic better on every seed, within chance on 3 of 3"
    p = row["per_seed"][1]["paired"]
    assert (p["a_only"], p["b_only"], p["examples"]) == (19, 20, 1000)
    assert p["ci95"][0] < 0 < p["ci95"][1] and p["difference"] == -0.1
    assert row["test_examples"] == 1000 and row["test_majority"] == 25.0
    _, table, _ = generalize_markdown("T", "intro", [row])
    assert table[0]["test images"] == 1000 and table[0]["largest class %"] == "25.00"
    assert table[0]["MACs learned / bicubic"] == "605.63K / 553.89K"
    assert table[0]["per seed"].startswith("s0 -0.50 (")
    # 60 more right on every seed: each interval excludes 0.
    clear = [r for seed in range(3) for r in pair(seed, _hits(560), _hits(500))]
    assert (
        summarize_generalize(experiments, clear)[0]["sign"] == "E better on every seed"
    )
    # Signs that differ, each within chance.
    mixed = pair(0, _hits(501), _hits(500)) + pair(1, _hits(499), _hits(500))
    assert summarize_generalize(experiments, mixed)[0]["sign"] == (
        "no clear difference on any seed"
    )


def test_models_at_the_largest_class_rate_are_named():
    """A report reader's trial: 5 of 6 models always answered one class
    (top-1 exactly the largest class's share); the report printed "+0.00
    (+0.00 to +0.00)", a certain zero, and no warning. Such models are named
    first, and two models that never disagree say so."""
    from thumbnet_keras.pipeline.generalize_report import generalize_summary_text

    experiments = [{"dataset": "stripes", "backbone": "tiny_cnn", "notes": []}]
    one_class = _hits(20, n=60)  # 20 of 60 right: the largest class's share
    records = []
    for seed, learned in ((0, one_class), (1, _hits(30, n=60))):
        for arm, hits in (("learned", learned), ("bicubic", one_class)):
            records.append(
                {**_record(0, seed, arm, hits.count("1") / 60, None),
                 "test_correct": hits, "examples": 60, "test_majority": 1 / 3}
            )  # fmt: skip
    (row,) = summarize_generalize(experiments, records)
    assert row["at_majority"] == ["learned s0", "bicubic s0", "bicubic s1"]
    markdown, table, _ = generalize_markdown("T", "intro", [row])
    assert table[0]["per seed"].startswith("s0 +0.00 (no disagreement), s1 +16.67 (")
    warning = (
        "models at or below the largest-class rate** (always answering the "
        "largest class scores as much"
    )
    assert warning in markdown
    assert markdown.index(warning) < markdown.index("| dataset")  # first
    assert "stripes / tiny_cnn: learned s0, bicubic s0, bicubic s1." in markdown
    assert "stripes / tiny_cnn: learned s0" in generalize_summary_text([row])
    clean = [dict(r, top1=0.5) for r in records]
    assert summarize_generalize(experiments, clean)[0]["at_majority"] == []


ELPV = {"name": "elpv", "image_shape": [300, 300, 1], "normalization": "unit"}


def test_input_notes_say_when_e_cannot_help():
    assert input_notes(ELPV, ELPV, 64, 1, 2) == []
    fashion = {"name": "fm", "image_shape": [28, 28, 1], "normalization": "unit"}
    (note,) = input_notes(ELPV, fashion, 64, 1, 2)
    assert "28x28, no larger than the 32x32 thumbnail" in note
    # At f = 4 (16x16 thumbnails) the 28x28 images keep detail E can recover,
    # but they are upsampled to E's 64x64 input.
    (note,) = input_notes(ELPV, fashion, 64, 1, 4)
    assert "upsampled" in note
    rgb = {"name": "rgb", "image_shape": [None, None, 3], "normalization": "imagenet"}
    channels, normalization = input_notes(ELPV, rgb, 64, 1, 2)
    assert "converted to gray" in channels
    assert "'imagenet'" in normalization and "E's range ('unit')" in normalization


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A thumbnet run folder whose E (f = 2) is untrained: E = bicubic."""
    import keras

    from thumbnet_keras.layers.downscaler import build_downscaler

    root = tmp_path_factory.mktemp("gen")
    manifest = tiny_dataset(root)
    run = pipeline.resolve_run(
        ThumbNetParams(
            dataset=manifest, smoke=True, runs_dir=str(root / "runs"), run_name="src"
        )
    )
    prepared = pipeline.prepare_dataset(manifest, str(root / "data"), 8)
    Path(run["run_dir"], "data.json").write_text(json.dumps(prepared))
    folder = Path(run["run_dir"], "f2")
    folder.mkdir()
    keras.utils.set_random_seed(5)
    downscaler = build_downscaler((32, 32, 1), 2, width=4, value_range=(0.0, 1.0))
    downscaler.save(folder / "downscaler.keras")
    # The same images, but a manifest that normalizes them to [-1, 1].
    symmetric = root / "symmetric.yaml"
    symmetric.write_text(
        Path(manifest).read_text().replace("name: tiny_brightness", "name: tiny_sym")
        + "normalization: symmetric\n"
    )
    return root, run["run_dir"], str(symmetric)


def test_fresh_students_per_seed_with_recipe(source_run, caplog):
    """Each arm trains a fresh S per seed with the recipe, keeps its best
    validation epoch and evaluates once. The target's manifest normalizes to
    [-1, 1], E's source to [0, 1]: both arms must read E's range (before, the
    learned arm fed [-1, 1] images to an E that clips to [0, 1]), and an
    untrained E must give both arms the same thumbnails."""
    root, source, symmetric = source_run
    config = GeneralizeConfig(
        source_run=source,
        experiments=((symmetric, None),),
        epochs=2,
        seeds=(0, 1),
        batch_size=8,
        learning_rate=3e-3,
        limit_per_class=8,
        runs_dir=str(root / "runs"),
        data_dir=str(root / "data"),
        run_name="gen",
        throughput_batches=1,
    )
    resolved = resolve_generalize(config)
    (experiment,) = resolved["experiments"]
    assert resolved["normalization"] == "unit"
    assert any("normalizes 'symmetric'" in n for n in experiment["notes"])
    prepared = pipeline.prepare_dataset(symmetric, str(root / "data"), 8)
    assert prepared["normalization"] == "symmetric" and prepared["splits"]["validation"]

    # What S reads, per arm: E's range, and the same thumbnails.
    read = {}
    for arm in ("learned", "bicubic"):
        downscaler, data = arm_inputs(resolved["run_dir"], arm, prepared)
        assert data["normalization"] == "unit" and not downscaler.trainable
        images = np.concatenate(
            [
                x
                for x, _ in split_batches(
                    data, "validation", 32, 1, 8
                ).as_numpy_iterator()
            ]
        )
        read[arm] = images, np.asarray(downscaler(images))
    images = read["learned"][0]
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, read["bicubic"][0])
    np.testing.assert_allclose(read["learned"][1], read["bicubic"][1], atol=1e-6)
    (symmetric_images, _), *_ = split_batches(
        prepared, "validation", 32, 1, 8
    ).as_numpy_iterator()
    # The manifest's own range, [-1, 1], is not what S reads.
    np.testing.assert_allclose(symmetric_images, 2 * images - 1, atol=1e-6)
    with pytest.raises(ConfigError, match="Unknown arm"):
        arm_inputs(resolved["run_dir"], "nearest", prepared)

    # An earlier run in this process may have turned op determinism on. In a
    # default_seed_scope, so Keras' default seeds are its own again after.
    from thumbnet_keras.pipeline.health import (
        configure_determinism,
        default_seed_scope,
    )

    with default_seed_scope():
        configure_determinism(0, deterministic=False)
    caplog.set_level(logging.INFO, logger="thumbnet_keras.progress")
    records = {}
    for seed in config.seeds:
        for arm in ("learned", "bicubic"):
            record = train_generalize_arm(
                resolved["run_dir"], 0, arm, prepared, seed=seed, verbose=0
            )
            assert record["id"] == arm_id(0, seed, arm)
            assert record["normalization"] == "unit"
            selection = record["selection"]
            assert selection["monitor"] == "val_accuracy"
            val = record["history"]["val_accuracy"]
            assert len(val) == len(record["history"]["loss"]) == config.epochs
            assert np.isfinite(record["history"]["loss"]).all()
            best = val[selection["best_epoch"] - 1]
            assert selection["best_value"] == max(val) == best
            assert record["val_top1"] == pytest.approx(selection["best_value"])
            records[seed, arm] = record
    if keras.backend.backend() == "tensorflow":  # The arms turned it on again.
        from tensorflow.python.framework import config as tf_config

        assert tf_config.is_op_determinism_enabled()
    # One progress line per epoch, as the train stages log them.
    epochs = [
        r.getMessage()
        for r in caplog.records
        if r.name == "thumbnet_keras.progress" and " epoch " in r.getMessage()
    ]
    assert len(epochs) == 2 * 2 * config.epochs, epochs
    assert epochs[1].startswith("[exp0-s0-learned] epoch 2/2:  loss "), epochs
    # The seed changes S's start: the two seeds' first-epoch losses differ.
    assert records[0, "bicubic"]["history"]["loss"][0] != pytest.approx(
        records[1, "bicubic"]["history"]["loss"][0], rel=1e-6
    )
    # Done arms are skipped on a rerun; the report pairs them per seed.
    again = train_generalize_arm(
        resolved["run_dir"], 0, "learned", prepared, seed=0, verbose=0
    )
    assert again["skipped"] is True
    run_dir = Path(resolved["run_dir"])
    assert not (run_dir / "checkpoints").exists()  # Every arm's, and the folder.
    report = write_generalize_report(resolved["run_dir"])
    (summary,) = report["summary"]
    assert summary["seeds"] == [0, 1]
    diffs = [
        100 * (records[seed, "learned"]["top1"] - records[seed, "bicubic"]["top1"])
        for seed in config.seeds
    ]
    mean, std = mean_std(diffs)
    diff = summary["diff"]
    assert diff == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    assert f"{diff['mean']:+.2f} ± {diff['std']:.2f}" in report["markdown"]
    metrics = json.loads(Path(report["metrics_json"]).read_text())
    assert len(metrics["results"]) == 4 and metrics["summary"] == report["summary"]


def _config(root: Path, source: str, run_name: str, *experiments) -> GeneralizeConfig:
    return GeneralizeConfig(
        source_run=source,
        experiments=tuple(experiments),
        epochs=1,
        seeds=(0,),
        batch_size=8,
        limit_per_class=8,
        runs_dir=str(root / "runs"),
        data_dir=str(root / "data"),
        run_name=run_name,
        throughput_batches=1,
    )


def test_a_generalize_run_checks_what_it_reuses(source_run):
    """A researcher's trial (2026-12-01), each silent before:

    * experiments naming one (dataset, backbone) twice were trained and
      reported twice;
    * a source run replaced by another resumed with the other E, its seeds
      pooled with the first E's in one row;
    * a target whose files changed resumed, seeds on two datasets pooled;
    * test images of the target among E's training images (another
      --limit-per-class splits ELPV otherwise) were scored;
    * a folder's image size never reached the notes (its manifest has none);
    * a "raw" source's bicubic arm was not clipped to [0, 255] as E is.
    """
    root, source, symmetric = source_run
    with pytest.raises(ConfigError, match="given more than once"):
        resolve_generalize(_config(root, source, "dup", (None, None), (symmetric, None),
                                   ("", "tiny_cnn")))  # fmt: skip
    # One manifest file spelled two ways is one experiment too.
    respelled = f"{Path(symmetric).parent}/./{Path(symmetric).name}"
    with pytest.raises(ConfigError, match="given more than once"):
        resolve_generalize(_config(root, source, "dup2", (symmetric, None),
                                   (respelled, None)))  # fmt: skip
    resolved = resolve_generalize(_config(root, source, "checks", (symmetric, None)))
    run_dir = resolved["run_dir"]
    prepared = pipeline.prepare_dataset(symmetric, str(root / "data"), 8)

    # The target's own images: a copy of the source's files under another
    # split seed, so some of its test images were E's train images.
    copy = root / "copy.yaml"
    copy.write_text(
        Path(symmetric).read_text().replace("name: tiny_sym", "name: tiny_copy")
        .replace("seed: 0", "seed: 3")
    )  # fmt: skip
    copied = pipeline.prepare_dataset(str(copy), str(root / "data"), 8)
    with pytest.raises(
        ConfigError, match=r"test image\(s\) of 'tiny_copy' are images E"
    ):
        pipeline.generalize.check_target(run_dir, 0, copied)
    pipeline.generalize.check_target(run_dir, 0, prepared)  # the same split: fine

    # Notes from the prepared images, not only the manifest's size.
    small = prepared | {"image_shape": [8, 8, 1]}
    pipeline.generalize._update_notes(Run(run_dir), 0, small)
    notes = json.loads(Path(run_dir, "source.json").read_text())["experiments"][0]
    assert any("no larger than the 16x16 thumbnail" in n for n in notes["notes"])

    # A target record alone leaves the run unstarted: a run refused there
    # reruns with corrected settings under its name (a review).
    from thumbnet_keras.pipeline.rundir import is_unstarted

    assert Path(run_dir, "target-0.json").is_file() and is_unstarted(run_dir)

    # Other files on resume, once an arm of the experiment started (killed
    # mid-way: its checkpoints) or finished.
    changed = prepared | {"fingerprint": "0" * 64, "splits": {"train": 1}}
    Path(run_dir, "checkpoints", f"{arm_id(0, 0, 'learned')}").mkdir(parents=True)
    with pytest.raises(ConfigError, match="changed since its first arms trained"):
        pipeline.generalize.check_target(run_dir, 0, changed)
    Path(run_dir, "checkpoints", f"{arm_id(0, 0, 'learned')}").rmdir()
    Path(run_dir, "stages").mkdir(exist_ok=True)
    Path(run_dir, "stages", f"{arm_id(0, 0, 'learned')}.json").write_text("{}")
    with pytest.raises(ConfigError, match="changed since its first arms trained"):
        pipeline.generalize.check_target(run_dir, 0, changed)

    # The command's and the flow's preflight resume it (it hashed E too; a
    # review: every resume of a new run was refused there).
    from thumbnet_keras.pipeline import preflight

    values = {
        "source_run": source, "experiments": [{"dataset": symmetric}], "epochs": 1,
        "seeds": [0], "batch_size": 8, "limit_per_class": 8,
        "runs_dir": str(root / "runs"), "data_dir": str(root / "data"),
        "run_name": "checks", "throughput_batches": 1,
    }  # fmt: skip
    assert preflight.check_generalize(values).run_name == "checks"

    # A raw source: the bicubic arm clips to [0, 255], as E does.
    info = json.loads(Path(run_dir, "source.json").read_text())
    Path(run_dir, "source.json").write_text(json.dumps(info | {"normalization": "raw"}))
    bicubic, data = arm_inputs(run_dir, "bicubic", prepared)
    edge = np.zeros((1, 32, 32, 1), "float32")
    edge[:, :, 16:] = 255.0
    out = np.asarray(bicubic(edge))
    assert data["normalization"] == "raw" and out.min() >= 0.0 and out.max() <= 255.0
    Path(run_dir, "source.json").write_text(json.dumps(info))

    # Another E under the same source run: refused on resume, nothing pooled.
    import keras

    from thumbnet_keras.layers.downscaler import build_downscaler

    path = Path(source, "f2", "downscaler.keras")
    kept = path.read_bytes()
    keras.utils.set_random_seed(6)
    build_downscaler((32, 32, 1), 2, width=8, value_range=(0.0, 1.0)).save(path)
    try:
        with pytest.raises(
            ConfigError, match=r"the source run's downscaler \(f<factor"
        ):
            resolve_generalize(_config(root, source, "checks", (symmetric, None)))
        with pytest.raises(ConfigError, match="the source run's downscaler"):
            preflight.check_generalize(values)
    finally:
        path.write_bytes(kept)
    assert resolve_generalize(_config(root, source, "checks", (symmetric, None)))[
        "resumed"
    ]


def test_a_no_op_rerun_of_the_source_keeps_e_and_its_digest(tmp_path):
    """An upgrade trial (2026-12-01): rerunning a finished source run's
    command (nothing trained) saved f<f>/downscaler.keras again, with a new
    `date_saved` and so a new sha256, and every generalize run made from it
    was refused as "the source run's downscaler changed". A model saved
    again unchanged keeps its file's bytes; a changed one does not."""
    import time

    from thumbnet_keras.layers.downscaler import build_downscaler
    from thumbnet_keras.pipeline.rundir import save_keras

    source = Run(str(tmp_path / "src"))
    stage = tmp_path / "src" / "stages" / "f2-joint" / "downscaler.keras"
    save_keras(build_downscaler((16, 16, 1), 2, width=4), stage)
    path = source.factor_dir(2) / "downscaler.keras"

    def export():  # what export_run does: the joint stage's E loaded, saved
        downscaler = keras.saving.load_model(stage)
        save_keras(downscaler, path)
        return downscaler

    downscaler = export()
    before = generalize_inputs(source, 2)
    time.sleep(1.1)  # Keras dates a save to the second
    export()
    assert generalize_inputs(source, 2) == before
    kernel = downscaler.trainable_weights[0]
    kernel.assign(kernel + 1.0)
    save_keras(downscaler, path)
    assert generalize_inputs(source, 2) != before
