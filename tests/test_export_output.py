"""Where an export may be written: never over what is not an earlier export.

A trial (2026-11-30) ran `thumbnet export --format saved_model --output .`
from a project folder: the converter removed every file in it, then failed.
`--output runs/<run>` deleted the run; `--output runs/<run>/f2` replaced its
models; an ONNX export onto a folder replaced the folder. Pure path logic:
one backend runs it."""

from __future__ import annotations

import json

import keras
import pytest

from thumbnet_keras import deploy
from thumbnet_keras.deploy.convert import check_output
from thumbnet_keras.pipeline import ConfigError
from thumbnet_keras.pipeline.preflight import check_export

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="path checks only; they do not depend on the backend",
)


def _tree(root) -> dict:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def run(tmp_path):
    """A run folder as `thumbnet export` reads it, and a user's project."""
    run = tmp_path / "runs" / "r1"
    (run / "f2").mkdir(parents=True)
    config = {"kind": "thumbnet", "config": {"factors": [2]}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "thumbnet.keras").write_bytes(b"model")
    (run / "f2" / "thumbnet.keras").write_bytes(b"model f2")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "README").write_text("mine\n")
    return run, project


@pytest.mark.parametrize(
    "fmt, where, message",
    [
        ("saved_model", "project", "not a SavedModel"),
        ("saved_model", "run", "holds the model being converted"),
        ("saved_model", "run/f2", "not a SavedModel"),
        ("saved_model", "project/README", "is a file"),
        ("onnx", "project", "is a folder; a onnx export is one file"),
        ("litert", "project/src", "is a folder"),
    ],
)
def test_refused_and_nothing_touched(run, fmt, where, message):
    run_dir, project = run
    root = run_dir.parent.parent
    output = {"project": project, "run": run_dir}.get(where.split("/")[0])
    output = output.joinpath(*where.split("/")[1:])
    before = _tree(root)
    with pytest.raises(ValueError, match=message):
        check_output(str(output), fmt, str(run_dir / "thumbnet.keras"))
    with pytest.raises(ValueError, match=message):  # before any conversion
        deploy.export_model(run_dir / "thumbnet.keras", fmt, output)
    assert _tree(root) == before


def test_the_model_itself_is_never_the_output(run):
    run_dir, _ = run
    model = run_dir / "thumbnet.keras"
    with pytest.raises(ValueError, match="is the model being converted"):
        check_output(str(model), "onnx", str(model))


def test_an_earlier_saved_model_may_be_replaced_but_not_one_holding_more(tmp_path):
    model = tmp_path / "m.keras"
    model.write_bytes(b"model")
    earlier = tmp_path / "sm"
    (earlier / "variables").mkdir(parents=True)
    (earlier / "saved_model.pb").write_bytes(b"pb")
    (earlier / "fingerprint.pb").write_bytes(b"fp")
    check_output(str(earlier), "saved_model", str(model))  # no error
    check_output(str(tmp_path / "new"), "saved_model", str(model))
    check_output(str(tmp_path / "old.onnx"), "onnx", str(model))
    # What Finder or a user copying the sidecar leaves there is replaceable.
    (earlier / ".DS_Store").write_bytes(b"Bud1")
    (earlier / "thumbnet_model.json").write_text("{}")
    check_output(str(earlier), "saved_model", str(model))
    check_output(str(earlier) + "/", "saved_model", str(model))  # tab completion
    (tmp_path / "empty").mkdir()
    check_output(str(tmp_path / "empty"), "saved_model", str(model))
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt' besides a SavedModel"):
        check_output(str(earlier), "saved_model", str(model))
    (tmp_path / "link").symlink_to(earlier)
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_output(str(tmp_path / "link"), "saved_model", str(model))


def test_cli_export_refuses_before_starting(run):
    run_dir, project = run
    # No --output: beside the model, where a folder of the user's took the name.
    (run_dir / "thumbnet_saved_model").mkdir()
    (run_dir / "thumbnet_saved_model" / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match="thumbnet_saved_model' is a folder that"):
        check_export(str(run_dir), None, "saved_model")
    with pytest.raises(ConfigError, match="--output .*not a SavedModel"):
        check_export(str(run_dir), None, "saved_model", str(project))
    with pytest.raises(ConfigError, match="--output .*holds the model"):
        check_export(str(run_dir), 2, "saved_model", str(run_dir))


def test_a_model_of_any_input_size_that_fails_to_convert_is_told_the_fix(tmp_path):
    """A trial: a teacher built on `Input((None, None, 3))` with a pooling
    failed inside TensorFlow's converter (traced at 1x1: "could not create a
    descriptor for a pooling forward propagation primitive"), with nothing
    on what to do. The error now names a wrapper that gives it a size, and
    that wrapper exports; a model of any size that converts still does."""
    image = keras.Input((None, None, 3))
    x = keras.layers.MaxPooling2D()(keras.layers.Conv2D(4, 3)(image))
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(image, logits)
    path = tmp_path / "flexible.keras"
    model.save(path)
    with pytest.raises(
        RuntimeError, match=r"takes images of any size \(None, None, 3\)"
    ):
        deploy.export_model(path, "saved_model", tmp_path / "out" / "saved")
    fixed = tmp_path / "fixed.keras"
    keras.Sequential([keras.Input((16, 16, 3)), model]).save(fixed)
    assert deploy.export_model(fixed, "saved_model", tmp_path / "out" / "fixed")
    same = keras.layers.Conv2D(4, 3, padding="same")(image)
    pooled = keras.layers.GlobalAveragePooling2D()(same)
    keras.Model(image, keras.layers.Dense(2)(pooled)).save(tmp_path / "same.keras")
    assert deploy.export_model(tmp_path / "same.keras", "saved_model", tmp_path / "s")
