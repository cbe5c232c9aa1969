"""The `thumbnet` command line: help, options, and errors that name the
problem (every user error, as a real process: tests/test_cli_errors.py)."""

from __future__ import annotations

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


def test_bad_format_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--run", "x", "--format", "pickle"])
    assert "invalid choice: 'pickle'" in capsys.readouterr().err


def test_zero_valued_options_are_kept():
    import argparse

    from thumbnet_keras.cli import _given

    args = argparse.Namespace(fm_epochs=0, teacher=None, smoke=False, factors=[2])
    assert _given(args, ("fm_epochs", "teacher", "smoke", "factors")) == {
        "fm_epochs": 0,
        "factors": [2],
    }


def test_recipe_options_reach_the_params():
    from thumbnet_keras.cli import _COMMON, _TRAIN, _given, _parser
    from thumbnet_keras.pipeline import ThumbNetParams

    args = _parser().parse_args(
        ["train", "--optimizer", "sgd", "--weight-decay", "5e-4",
         "--warmup-epochs", "0", "--label-smoothing", "0",
         "--joint-learning-rate", "0.05", "--bn-batches", "0"]
    )  # fmt: skip
    config = ThumbNetParams(**_given(args, _COMMON + _TRAIN)).to_config()
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
