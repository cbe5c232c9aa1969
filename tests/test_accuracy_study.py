"""The accuracy study (benchmarks/accuracy_study.py) end to end in --quick mode."""

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


def _load_study():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "accuracy_study", REPO / "benchmarks" / "accuracy_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_study"] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


# CI sets THUMBNET_REQUIRE_DATASETS=1: there a missing package fails the test.
@pytest.mark.skipif(
    not FASHION_MNIST.is_dir() and not os.environ.get("THUMBNET_REQUIRE_DATASETS"),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist).",
)
def test_quick_study_end_to_end(tmp_path):
    study = _load_study()
    results = tmp_path / "results"
    # One arm of each code path (pipeline baseline stage, trainer ablation,
    # both ThumbNet stages); bicubic_kd, es_kd and es_kd_mm differ from them
    # only in loss weights. All eight arms: ~2x the time.
    arms = ("teacher", "teacher_bicubic", "bicubic_cl", "es_cl", "thumbnet")
    code = study.main(
        [
            "--quick",
            "--seeds",
            "0",
            "1",
            "--arms",
            *arms,
            "--work-dir",
            str(tmp_path / "work"),
            "--results-dir",
            str(results),
            "--markdown",
            str(tmp_path / "tables.md"),
            "--verbose",
            "0",
        ]
    )
    assert code == 0

    records = [json.loads(p.read_text()) for p in sorted(results.glob("*-seed*.json"))]
    assert [(r["dataset"], r["seed"]) for r in records] == [
        ("fashion_mnist", 0),
        ("fashion_mnist", 1),
    ]
    for record in records:
        assert record["schema_version"] == study.SCHEMA_VERSION
        assert record["environment"]["backend"] == keras.backend.backend()
        # The validation split is carved out of train; test is separate.
        assert record["splits"] == {"train": 540, "validation": 60, "test": 600}
        found = {(r["arm"], r["factor"]) for r in record["results"]}
        assert found == {("teacher", None)} | {(a, 4) for a in arms[1:]}
        by_arm = {r["arm"]: r for r in record["results"]}
        for r in record["results"]:
            assert 0.0 <= r["test_top1"] <= 1.0 and 0.0 <= r["validation_top1"] <= 1.0
            assert r["test_examples"] == 600 and r["validation_examples"] == 60
            assert r["input_size"] == (28 if r["arm"] == "teacher" else 7)
        # Trained arms all get the same epoch budget (fm + joint epochs).
        budget = {by_arm[a]["epochs"] for a in arms[2:]}
        assert budget == {2}
        # The teacher learned something from 540 images: a collapsed model
        # scores 10%, and chance has a standard deviation of 1.2 points here.
        assert by_arm["teacher"]["test_top1"] > 0.15
        # FLOPs: thumbnails are cheaper; E costs something on top of S.
        flops = {a: r["flops"] for a, r in by_arm.items()}
        assert flops["bicubic_cl"] < flops["teacher"] / 4
        assert flops["thumbnet"] > flops["bicubic_cl"]
        assert flops["es_cl"] == flops["thumbnet"]

    summary = json.loads((results / "summary.json").read_text())
    rows = summary["fashion_mnist"]["arms"]
    assert sorted(r["arm"] for r in rows) == sorted(arms)
    assert all(r["seeds"] == [0, 1] for r in rows)
    assert (results / "accuracy_vs_flops.png").stat().st_size > 1000
    assert "ThumbNet" in (tmp_path / "tables.md").read_text()
