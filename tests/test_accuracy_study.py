"""The accuracy study (benchmarks/accuracy_study.py): its selection and target
checks on hand-made numbers, and the whole protocol end to end in --quick mode."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import keras
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        name, REPO / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _row(arm, factor, test, val=None):
    """A final record's arm with one top-1 per seed (fractions)."""
    return {"arm": arm, "factor": factor, "input_size": 14, "flops": 1000, "params": 10,
            "test_top1": test, "val_top1": test if val is None else val}  # fmt: skip


def _records(per_seed: dict) -> list[dict]:
    """`{(arm, factor): [top-1 of seed 0, 1, 2]}` -> three final records."""
    return [
        {"kind": "final", "dataset": "toy", "seed": seed,
         "arms": [_row(a, f, v[seed]) for (a, f), v in per_seed.items()]}
        for seed in range(3)
    ]  # fmt: skip


def test_targets_on_hand_made_numbers():
    report = _load("accuracy_report")
    numbers = {
        ("teacher", None): [0.910, 0.910, 0.910],
        # f = 2: ThumbNet 90.5 +- 0.1, 0.5 below T; baselines far below but
        # bicubic_kd_equal only 0.2 below with a spread of 0.3: missed.
        ("thumbnet", 2): [0.904, 0.905, 0.906],
        ("bicubic_cl", 2): [0.880, 0.880, 0.880],
        ("bicubic_kd_equal", 2): [0.900, 0.903, 0.906],
        # f = 4: best baseline 85, teacher 91, ThumbNet 89: 4 / 6 = 67% closed.
        ("thumbnet", 4): [0.890, 0.890, 0.890],
        ("bicubic_kd", 4): [0.850, 0.850, 0.850],
        ("teacher_bicubic", 4): [0.500, 0.500, 0.500],
    }
    table = report.aggregate(_records(numbers))
    checks = {c["factor"]: c for c in report.targets(table["toy"], [2, 4])}
    two, four = checks[2], checks[4]
    assert two["thumbnet"] == pytest.approx(90.5)
    assert two["baselines"]["bicubic_kd_equal"]["margin"] == pytest.approx(0.2)
    assert two["baselines"]["bicubic_kd_equal"]["spread"] == pytest.approx(0.3)
    assert two["met"] is False  # Above every baseline, but not by the spread.
    assert four["best_baseline"] == "bicubic_kd"
    assert four["gap_closed"] == pytest.approx(4 / 6)
    assert four["met"] is True
    # The same f = 2 numbers with bicubic_kd_equal 1 point lower: met.
    numbers[("bicubic_kd_equal", 2)] = [0.890, 0.893, 0.896]
    table = report.aggregate(_records(numbers))
    assert report.targets(table["toy"], [2])[0]["met"] is True
    # f = 2 ThumbNet 1.5 points below the teacher: missed whatever the margins.
    numbers[("thumbnet", 2)] = [0.894, 0.895, 0.896]
    table = report.aggregate(_records(numbers))
    assert report.targets(table["toy"], [2])[0]["met"] is False
    assert "**missed**" in report.markdown(table)


def test_each_factor_is_judged_against_its_own_teacher():
    """f = 2 and f = 4 run in separate files, the teacher retrained between
    them with other numbers (92.58 and 92.17 in fashion_mnist_long): the
    table shows both teachers and each factor's target uses its own (the f =
    2 line used to be judged against the f = 4 runs' teacher, the file read
    first). One teacher for all factors keeps one row."""
    report = _load("accuracy_report")
    f2 = _records({("teacher", None): [0.926] * 3, ("es_kd", 2): [0.920] * 3,
                   ("bicubic_kd", 2): [0.910] * 3})  # fmt: skip
    f4 = _records({("teacher", None): [0.922] * 3, ("es_kd", 4): [0.895] * 3,
                   ("bicubic_kd", 4): [0.880] * 3})  # fmt: skip
    table = report.aggregate(f4 + f2)
    rows = table["toy"]
    assert ("teacher", None) not in rows
    assert rows[("teacher", 2)]["test_mean_std"][0] == pytest.approx(92.6)
    assert rows[("teacher", 4)]["test_mean_std"][0] == pytest.approx(92.2)
    checks = {c["factor"]: c for c in report.targets(rows, [2, 4], "es_kd")}
    assert checks[2]["teacher"] == pytest.approx(92.6)
    assert checks[4]["teacher"] == pytest.approx(92.2)
    assert "(the f = 4 runs' teacher)" in report.markdown(table)
    same = _records({("teacher", None): [0.926] * 3, ("es_kd", 4): [0.895] * 3})
    rows = report.aggregate(f2 + same)["toy"]
    assert [k for k in rows if k[0] == "teacher"] == [("teacher", None)]


def test_choose_picks_best_validation_per_family_and_refuses_test():
    report = _load("accuracy_report")

    def variant(lr, thumb, base):
        arms = [{"arm": "thumbnet", "factor": f, "val_top1": thumb} for f in (2, 4)]
        arms += [{"arm": a, "factor": 2, "val_top1": base}
                 for a in ("bicubic_cl", "bicubic_kd")]  # fmt: skip
        arms += [{"arm": "es_kd", "factor": 2, "val_top1": 0.5}]
        return {"value": lr, "arms": arms}

    record = {
        "seed": 100,
        "variants": [variant(1e-3, 0.8, 0.7), variant(3e-3, 0.9, 0.6)],
    }
    chosen = report.choose([record])
    assert chosen["main"] == {"fm_learning_rate": 3e-3, "joint_learning_rate": 3e-3,
                              "baseline_learning_rate": 1e-3}  # fmt: skip
    assert chosen["es_kd"] == {"joint_learning_rate": 1e-3}  # a tie: the first value
    assert chosen["search_seeds"] == [100]
    record["variants"][0]["arms"][0]["test_top1"] = 0.8
    with pytest.raises(ValueError, match="test"):
        report.choose([record])


# CI sets THUMBNET_REQUIRE_DATASETS=1: there a missing package fails the test.
@pytest.mark.skipif(
    not FASHION_MNIST.is_dir() and not os.environ.get("THUMBNET_REQUIRE_DATASETS"),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist).",
)
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="The study driver's logic, run once, under the backend the study is "
    "measured on (TensorFlow; 2.5 min a backend): the pipeline it drives is "
    "tested on every backend (test_pipeline, test_flows).",
)
def test_quick_study_end_to_end(tmp_path):
    study = _load("accuracy_study")
    common = ["--quick", "--work-dir", str(tmp_path / "work"),
              "--results-dir", str(tmp_path / "results"), "--verbose", "0"]  # fmt: skip
    assert study.main([*common, "--search"]) == 0
    assert (
        study.main([*common, "--seeds", "0", "--markdown", str(tmp_path / "t.md")]) == 0
    )
    results = tmp_path / "results"

    search = json.loads((results / "search-fashion_mnist-seed100.json").read_text())
    assert search["kind"] == "search" and search["seed"] == 100
    searched = {a["arm"] for v in search["variants"] for a in v["arms"]}
    assert {
        "thumbnet",
        "bicubic_cl",
        "bicubic_kd",
        "es_kd",
        "es_kd_mm",
        "es_kd_fm",
        "es_full",
    } <= searched
    # No test number anywhere in the search record: only validation was read.
    text = json.dumps(search)
    assert '"top1"' not in text and "test_top1" not in text
    chosen = json.loads((results / "chosen.json").read_text())["fashion_mnist"]
    assert chosen["main"]["baseline_learning_rate"] == study.SEARCH_GRID[0]

    record = json.loads((results / "fashion_mnist-seed0.json").read_text())
    assert record["kind"] == "final" and record["chosen"] == chosen
    assert record["environment"]["backend"] == keras.backend.backend()
    arms = {r["arm"]: r for r in record["arms"]}
    assert set(arms) == set(study.ARM_LABELS), sorted(arms)
    for r in record["arms"]:
        assert 0.0 <= r["val_top1"] <= 1.0 and 0.0 <= r["test_top1"] <= 1.0
        assert r["factor"] == (None if r["arm"] == "teacher" else 4)
    # Every trained arm has the same epoch budget (fm + joint epochs).
    trained = ("bicubic_cl", "bicubic_kd", "es_kd", "es_kd_mm", "es_kd_fm", "es_full",
               "thumbnet")  # fmt: skip
    assert {arms[a]["epochs"] for a in trained} == {2}
    # Thumbnails are cheaper; E costs something on top of S.
    assert arms["bicubic_cl"]["flops"] < arms["teacher"]["flops"] / 4
    assert arms["thumbnet"]["flops"] > arms["bicubic_cl"]["flops"]
    assert arms["es_kd"]["flops"] == arms["thumbnet"]["flops"]

    summary = json.loads((results / "summary.json").read_text())["fashion_mnist"]
    assert {r["arm"] for r in summary["arms"]} == set(arms)
    assert (results / "accuracy_vs_flops.png").stat().st_size > 1000
    assert "ThumbNet" in (tmp_path / "t.md").read_text()


def test_run_names_follow_the_teacher_file_content(tmp_path):
    """A new teacher at the same path gives the arms new runs (no stale reuse
    of arms trained against the old one); the same bytes keep the name."""
    study = _load("accuracy_study")
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"old teacher")
    settings = {"dataset": "elpv", "teacher": str(teacher), "seed": 0}
    old = study.run_name(settings, "elpv-final-seed0-main")
    assert old.startswith("elpv-final-seed0-main-") and len(old.rsplit("-", 1)[1]) == 8
    assert study.run_name(dict(settings), "elpv-final-seed0-main") == old
    teacher.write_bytes(b"new teacher")
    assert study.run_name(settings, "elpv-final-seed0-main") != old
    teacher.write_bytes(b"old teacher")
    assert study.run_name(settings, "elpv-final-seed0-main") == old
    assert study.run_name(settings | {"seed": 1}, "elpv-final-seed0-main") != old


def test_default_recipe_study_shares_the_teacher_and_trains_no_fm_stage():
    """`fashion_mnist_long` (the default recipe, 12 epochs) reuses
    `fashion_mnist_full`'s teacher run and its main run has no FM pre-train
    (quick mode included), so its joint arm is the default recipe."""
    from thumbnet_keras.pipeline import ThumbNetParams

    study = _load("accuracy_study")
    names = {}
    for dataset in ("fashion_mnist_full", "fashion_mnist_long"):
        settings, teacher = study.base_settings(dataset, quick=False)
        own = {k: v for k, v in settings.items() if k in study.TEACHER_FIELDS}
        names[dataset] = study.run_name(
            own | teacher | {"seed": study.TEACHER_SEED, "factors": [2]},
            f"{study.TEACHER_FROM.get(dataset, dataset)}-teacher",
        )
    assert names["fashion_mnist_long"] == names["fashion_mnist_full"]
    for quick in (False, True):
        settings, _ = study.base_settings("fashion_mnist_long", quick=quick)
        params = ThumbNetParams(**(study.PAPER_WEIGHTS | settings))
        assert params.fm_epochs == 0 and params.fm_weight == params.mm_weight == 0
    assert (
        study.base_settings("fashion_mnist_long", quick=False)[0]["joint_epochs"] == 12
    )
