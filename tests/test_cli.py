"""The `thumbnet` command line: help, options, and errors that name the
problem (every user error, as a real process: tests/test_cli_errors.py)."""

from __future__ import annotations

import os

import pytest

from thumbnet_keras.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "generalize", "evaluate", "report", "export"):
        assert command in out


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    # A bug is not a user error: it propagates (Python prints its traceback).
    from thumbnet_keras.pipeline import preflight

    def broken(values):
        raise RuntimeError("a bug")

    monkeypatch.setattr(preflight, "check_thumbnet", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train"])


def test_verbose_and_debug_go_before_or_after_the_command():
    from thumbnet_keras.cli import _parser

    args = _parser().parse_args(["train", "-vv", "--debug"])
    assert (args.verbose, args.debug) == (2, True)
    args = _parser().parse_args(["-v", "report", "--run", "r"])
    assert args.verbose == 1 and not hasattr(args, "debug")


def test_export_of_missing_run(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "onnx"]) == 2
    assert "is not a thumbnet run folder" in capsys.readouterr().err


def test_export_format_takes_the_hyphenated_spelling_too():
    from thumbnet_keras.cli import _parser

    for spelled in ("litert-int8", "litert_int8"):
        args = _parser().parse_args(["export", "--run", "r", "--format", spelled])
        assert args.format == "litert_int8"
    args = _parser().parse_args(["export", "--run", "r", "--format", "saved-model"])
    assert args.format == "saved_model"


def test_bad_format_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--run", "x", "--format", "pickle"])
    assert "invalid choice: 'pickle'" in capsys.readouterr().err


def test_zero_and_false_options_are_kept_and_left_out_ones_are_not():
    from thumbnet_keras.cli import _parser, _train_values

    args = _parser().parse_args(
        ["train", "--fm-epochs", "0", "--factor", "2", "--no-deterministic"]
    )
    assert _train_values(args) == {
        "fm_epochs": 0, "factors": [2], "deterministic": False
    }  # fmt: skip
    assert _train_values(_parser().parse_args(["train"])) == {}


def test_recipe_options_reach_the_params():
    from thumbnet_keras.cli import _parser, _train_values
    from thumbnet_keras.pipeline import ThumbNetParams

    args = _parser().parse_args(
        ["train", "--optimizer", "sgd", "--weight-decay", "5e-4",
         "--warmup-epochs", "0", "--label-smoothing", "0",
         "--joint-learning-rate", "0.05", "--bn-batches", "0"]
    )  # fmt: skip
    config = ThumbNetParams(**_train_values(args)).to_config()
    assert (config.optimizer, config.weight_decay, config.warmup_epochs) == (
        "sgd", 5e-4, 0.0
    )  # fmt: skip
    assert config.label_smoothing == 0.0 and config.bn_batches == 0
    assert config.stage_learning_rate("joint") == 0.05
    assert config.stage_learning_rate("teacher") == config.learning_rate
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--optimizer", "adam"])


def test_generalize_options_reach_the_params():
    from thumbnet_keras.cli import _generalize_values, _parser
    from thumbnet_keras.pipeline import GeneralizeParams

    args = _parser().parse_args(
        ["generalize", "--source-run", "runs/r1", "--experiment", "fashion_mnist:",
         "--seed", "3", "--seed", "7", "--optimizer", "sgd", "--learning-rate",
         "0.05", "--warmup-epochs", "0", "--label-smoothing", "0"]
    )  # fmt: skip
    config = GeneralizeParams(**_generalize_values(args)).to_config()
    assert config.seeds == (3, 7) and config.experiments == (("fashion_mnist", None),)
    assert (config.optimizer, config.learning_rate, config.warmup_epochs) == (
        "sgd", 0.05, 0.0
    )  # fmt: skip
    assert config.label_smoothing == 0.0 and config.weight_decay == 1e-4
    default = GeneralizeParams(
        **_generalize_values(_parser().parse_args(["generalize", "--source-run", "r"]))
    )
    assert default.seeds == [0, 1, 2]


# One definition: `thumbnet train`'s options are ThumbNetParams' fields and
# `thumbnet generalize`'s are GeneralizeParams' (pipeline.options).


def _command(command: str):
    """(the subcommand's parser, {field: its argparse action})."""
    import argparse

    from thumbnet_keras.cli import _parser

    subparsers = next(
        a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    parser = subparsers.choices[command]
    actions = {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "verbose", "debug")
    }
    return parser, actions


def _models():
    from thumbnet_keras.pipeline import GeneralizeParams, ThumbNetParams

    return [("train", ThumbNetParams, {}), ("generalize", GeneralizeParams,
            {"source_run": "runs/r1"})]  # fmt: skip


@pytest.mark.parametrize(
    "command,model,required", _models(), ids=["train", "generalize"]
)
def test_every_field_is_an_option_with_the_models_help(command, model, required):
    import argparse

    from thumbnet_keras.pipeline.options import option_name

    _, actions = _command(command)
    assert set(actions) == set(model.model_fields)
    for name, field in model.model_fields.items():
        action = actions[name]
        assert action.option_strings[0] == option_name(name), name
        # The model's description, its field names spelled as options.
        assert action.help.startswith(field.description.split("`")[0]), name
        assert "`" not in action.help, name
        assert action.default is argparse.SUPPRESS  # left out: the model's default
        assert action.required == field.is_required(), name


@pytest.mark.parametrize(
    "command,model,required", _models(), ids=["train", "generalize"]
)
def test_the_defaults_the_help_shows_are_the_models(command, model, required):
    """Each option's "(default: X)", given back on the command line, gives
    the model's default: the help's default, the option's type and the
    model agree."""
    import argparse
    import re

    from thumbnet_keras.cli import _generalize_values, _train_values

    values = _train_values if command == "train" else _generalize_values
    parser, actions = _command(command)
    given = [f"--{k.replace('_', '-')}={v}" for k, v in required.items()]
    shown = 0
    for name, field in model.model_fields.items():
        action, default = actions[name], field.get_default(call_default_factory=True)
        match = re.search(r"\(default: (.*)\)$", " ".join(action.help.split()))
        if match is None:  # Nothing to show: unset, empty, off, or described.
            assert default in (None, (), [], {}, False) or name in (
                "experiments",  # its description says what the default is
                "source_run",  # required
            )
            continue
        text, option = match.group(1), action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv = [option if text == "on" else action.option_strings[1]]
        elif isinstance(action, argparse._AppendAction):
            argv = [a for item in text.split() for a in (option, item)]
        else:
            argv = [option, text]
        args = parser.parse_args(given + argv)
        got = values(args)
        assert set(got) == {name, *required}, name
        assert getattr(model(**got), name) == default, name
        shown += 1
    assert shown >= (25 if command == "train" else 10)


def _violations(field):
    """(value, message) pairs just outside each bound of a numeric field."""
    import annotated_types as at

    kind = int if "int" in str(field.annotation) else float
    for bound in field.metadata:
        for attr, op, step in (("ge", ">=", -1), ("gt", ">", 0), ("le", "<=", 1),
                               ("lt", "<", 0)):  # fmt: skip
            limit = getattr(bound, attr, None)
            if isinstance(bound, (at.Ge, at.Gt, at.Le, at.Lt)) and limit is not None:
                yield kind(limit + step), f"must be {op} {kind(limit)}"


def test_a_bad_value_gets_the_models_message_with_the_option(capsys):
    """Every bound of ThumbNetParams, broken on the command line: exit 2 and
    the model's bound, named by the option (not the field)."""
    from thumbnet_keras.pipeline import ThumbNetParams
    from thumbnet_keras.pipeline.options import option_name

    checked = 0
    for name, field in ThumbNetParams.model_fields.items():
        for value, message in _violations(field):
            option = option_name(name)
            assert main(["train", option, str(value)]) == 2, (name, value)
            err = capsys.readouterr().err.strip()
            assert err == f"thumbnet: error: {option} {value!r}: {message}.", err
            checked += 1
    assert checked >= 30
    assert main(["generalize", "--source-run", "r", "--epochs", "0"]) == 2
    assert "--epochs 0: must be >= 1" in capsys.readouterr().err


def test_demo_options_show_and_keep_the_preset():
    from thumbnet_keras.cli import _DEMO
    from thumbnet_keras.pipeline import ThumbNetParams
    from thumbnet_keras.pipeline.options import option_values
    from thumbnet_keras.pipeline.presets import demo

    parser, actions = _command("demo")
    assert set(actions) == set(_DEMO)
    assert actions["run_name"].help.endswith("(default: elpv-demo)")
    assert "Default:" not in actions["run_name"].help  # not the model's default
    args = parser.parse_args(["--runs-dir", "elsewhere"])
    values = demo() | option_values(args, ThumbNetParams, _DEMO)
    assert values == demo() | {"runs_dir": "elsewhere"}


def test_nothing_below_the_command_line_imports_it():
    """Layering: flows/ and the library read presets and parameters from
    thumbnet_keras.pipeline, never from the CLI module."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [*repo.glob("flows/*.py"), *repo.glob("thumbnet_keras/**/*.py")]
    assert len(files) > 20
    for path in files:
        if path == repo / "thumbnet_keras" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("thumbnet_keras.cli") for n in names), path


def test_a_data_file_deleted_after_prepare_is_named_in_one_line(tmp_path):
    """tf.data's own error for an indexed image that is gone (a practitioner
    deleted one after training; evaluate ended in a TensorFlow traceback):
    the command turns it into one line naming the file."""
    from data_fixtures import folder_manifest, make_image_folder

    from thumbnet_keras import data
    from thumbnet_keras.cli import _missing_input_file

    make_image_folder(tmp_path / "src")
    prepared = data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "out")
    rows = [r for r in prepared.read_index().to_pylist() if r["split"] == "test"]
    gone = prepared.image_path(
        next(r for r in rows if r["status"] == "ok")["image_uri"]
    )
    os.remove(gone)
    with pytest.raises(Exception) as caught:
        for _ in data.make_dataset(prepared, "test", 8, 4, False):
            pass
    assert _missing_input_file(caught.value) == gone
    assert _missing_input_file(ValueError(f"{gone}; No such file or directory")) is None
