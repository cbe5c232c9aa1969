"""The `thumbnet` command line: help, and errors that name the problem."""

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


def test_unknown_dataset_exits_2_with_message(tmp_path, capsys):
    code = main(
        ["train", "--dataset", "no_such_set", "--runs-dir", str(tmp_path / "runs")]
    )
    assert code == 2
    assert "Unknown or invalid dataset 'no_such_set'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # failed before writing anything


def test_export_of_missing_run(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "onnx"]) == 2
    assert "thumbnet.keras not found" in capsys.readouterr().err


def test_bad_format_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--run", "x", "--format", "pickle"])
    assert "invalid choice: 'pickle'" in capsys.readouterr().err
