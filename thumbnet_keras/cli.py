"""`thumbnet`: the command line.

    thumbnet demo                       # the whole flow on ELPV, f = 2 and 4
    thumbnet train --dataset elpv --backbone resnet18 --factor 2 --run-name r1
    thumbnet generalize --source-run runs/r1 --experiment fashion_mnist: --experiment :resnet18
    thumbnet evaluate --run runs/r1     # re-evaluate every arm
    thumbnet report --run runs/r1       # rewrite metrics.json and the reports
    thumbnet export --run runs/r1 --format onnx   # or litert, litert_int8
    thumbnet predict --model runs/r1/thumbnet.onnx photos/ --top-k 3

`demo`, `train` and `generalize` run the Prefect flows in this process, with no
server (Prefect's ephemeral mode): a log line per task, Keras progress per
stage. Rerunning the same command after an interruption resumes the run.
`evaluate`, `report` and `export` call the library directly.

Every input is checked before Prefect, Keras or a backend starts
(`thumbnet_keras.pipeline.preflight`): a user error is one line,
`thumbnet: error: ...`, exit status 2, and nothing is written. One process
works in a run folder at a time (its `.lock`). Quiet by default: `-v` shows
the frameworks' warnings, `-vv` everything, `--debug` the traceback of a user
error too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _flags() -> argparse.ArgumentParser:
    """-v and --debug, accepted before or after the command."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="-v: the frameworks' warnings; -vv: all their logs",
    )
    flags.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a user error too",
    )
    return flags


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs-dir", default="runs", help="parent of run folders (default: runs)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="prepared-data cache (default: <runs-dir>/_data)",
    )
    p.add_argument(
        "--run-name",
        default=None,
        help="run folder name; rerun the same name to resume",
    )
    p.add_argument(
        "--limit-per-class", type=int, default=None, help="cap examples per class"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--smoke", action="store_true", help="shrink the run to seconds (tests)"
    )


# The training recipe's options: names, types, choices and help come from
# `ThumbNetParams` (one definition of a run's parameters).
_RECIPE = (
    "optimizer",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "learning_rate",
    "teacher_learning_rate",
    "fm_learning_rate",
    "joint_learning_rate",
    "baseline_learning_rate",
)


def _generalize_recipe() -> tuple[str, ...]:
    """`generalize`'s recipe options (one stage, the fresh S: no per-stage rates)."""
    from thumbnet_keras.pipeline import GeneralizeParams

    return GeneralizeParams.RECIPE_FIELDS


def _field_help(name: str) -> str:
    from thumbnet_keras.pipeline import ThumbNetParams

    field = ThumbNetParams.model_fields[name]
    return f"{field.description} (default: {field.default})"


def _param_option(parser: argparse.ArgumentParser, name: str) -> None:
    """`--name` for a `ThumbNetParams` field: float, or a Literal's choices."""
    import typing

    from thumbnet_keras.pipeline import ThumbNetParams

    field = ThumbNetParams.model_fields[name]
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        kind = {"type": str, "choices": choices}
    else:
        kind = {"type": float}
    parser.add_argument(
        "--" + name.replace("_", "-"), default=None, help=_field_help(name), **kind
    )


def _parser() -> argparse.ArgumentParser:
    flags = _flags()
    parser = argparse.ArgumentParser(
        prog="thumbnet", description=__doc__.split("\n")[0], parents=[flags]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", parents=[flags], help="the whole thumbnet flow on ELPV (f = 2 and 4)"
    )
    _common(demo)

    train = sub.add_parser(
        "train", parents=[flags], help="the thumbnet flow on any dataset"
    )
    _common(train)
    train.add_argument("--dataset", default="elpv", help="manifest name or YAML path")
    train.add_argument("--backbone", default="tiny_cnn")
    train.add_argument(
        "--backbone-options", default=None, help="JSON, e.g. '{\"widths\": [32, 64]}'"
    )
    train.add_argument(
        "--teacher",
        default=None,
        help="a trained teacher .keras file, 'pretrained:elpv', "
        "'applications:<Name>[:imagenet|<weights file>]' or "
        "'keras_hub:<preset or saved folder>' (preprocessing inside)",
    )
    train.add_argument(
        "--backbone-weights", default=None, help="local weights file or 'imagenet'"
    )
    train.add_argument(
        "--factor",
        type=int,
        action="append",
        dest="factors",
        help="repeatable; default 2",
    )
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--epochs", type=int, default=None, help="joint-stage epochs")
    train.add_argument("--fm-epochs", type=int, default=None)
    train.add_argument("--teacher-epochs", type=int, default=None)
    for name in _RECIPE:
        _param_option(train, name)
    train.add_argument("--bn-batches", type=int, default=None,
                       help=_field_help("bn_batches"))  # fmt: skip
    train.add_argument(
        "--downscaler-width",
        type=int,
        default=None,
        help=_field_help("downscaler_width"),
    )
    train.add_argument(
        "--downscaler-variant",
        choices=("space_to_depth", "strided"),
        default=None,
        help=_field_help("downscaler_variant"),
    )
    train.add_argument("--seed", type=int, default=None, help=_field_help("seed"))
    for name in ("precision", "distribution", "jit_compile"):
        _param_option(train, name)
    train.add_argument("--sync-batchnorm", action="store_true",
                       help=_field_help("sync_batchnorm"))  # fmt: skip
    _param_option(train, "on_nonfinite")
    train.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=_field_help("deterministic"),
    )
    train.add_argument(
        "--export-format",
        action="append",
        dest="export_formats",
        choices=("saved_model", "onnx", "litert", "litert_int8"),
    )

    gen = sub.add_parser(
        "generalize", parents=[flags], help="reuse a trained E, frozen, elsewhere"
    )
    _common(gen)
    gen.add_argument(
        "--source-run", required=True, help="a finished thumbnet run folder"
    )
    gen.add_argument("--factor", type=int, default=2)
    gen.add_argument(
        "--experiment",
        action="append",
        default=None,
        help="DATASET:BACKBONE, either side empty for the source run's; repeatable",
    )
    gen.add_argument("--epochs", type=int, default=None, help="epochs per fresh S")
    gen.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seeds",
        help="repeatable; default 0 1 2 (both arms trained per seed)",
    )
    for name in _generalize_recipe():
        _param_option(gen, name)

    ev = sub.add_parser(
        "evaluate", parents=[flags], help="re-evaluate every arm of a run"
    )
    ev.add_argument("--run", required=True, help="the run folder")
    rep = sub.add_parser(
        "report", parents=[flags], help="rewrite metrics.json, report.md, report.html"
    )
    rep.add_argument("--run", required=True)
    exp = sub.add_parser(
        "export", parents=[flags], help="export thumbnet.keras to another format"
    )
    exp.add_argument("--run", required=True)
    exp.add_argument(
        "--format",
        required=True,
        choices=("saved_model", "onnx", "litert", "litert_int8"),
        help="litert_int8: full-integer, calibrated on the run's train images",
    )
    exp.add_argument(
        "--factor", type=int, default=None, help="default: the primary factor"
    )
    exp.add_argument("--output", default=None)
    pred = sub.add_parser(
        "predict", parents=[flags], help="classify images with an exported model"
    )
    pred.add_argument("--model", required=True, help=".keras, .onnx or .tflite")
    pred.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--output", default=None, help="preds.csv or preds.json")
    return parser


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {
        n: getattr(args, n)
        for n in names
        # `is not`: 0 is a real value (e.g. --fm-epochs 0), False means unset.
        if getattr(args, n, None) is not None and getattr(args, n) is not False
    }


_COMMON = ("runs_dir", "data_dir", "run_name", "limit_per_class", "batch_size", "smoke")


_TRAIN = (
    "dataset",
    "backbone",
    "teacher",
    "backbone_weights",
    "factors",
    "image_size",
    "fm_epochs",
    "teacher_epochs",
    "export_formats",
    "bn_batches",
    "downscaler_width",
    "downscaler_variant",
    "seed",
    "precision",
    "distribution",
    "jit_compile",
    "sync_batchnorm",
    "on_nonfinite",
    *_RECIPE,
)


def _generalize_values(args: argparse.Namespace) -> dict:
    """`GeneralizeParams` fields from `thumbnet generalize`'s options."""
    names = _COMMON + ("source_run", "factor", "epochs", "seeds")
    values = _given(args, names + _generalize_recipe())
    if args.experiment:
        values["experiments"] = [
            {"dataset": d or None, "backbone": b or None}
            for d, _, b in (e.partition(":") for e in args.experiment)
        ]
    return values


def _run_thumbnet(params) -> int:
    from flows.thumbnet_flows import thumbnet

    result = thumbnet(params, verbose=_verbose())
    from thumbnet_keras.pipeline.progress import run_summary

    # Health warnings first (health.json), the headline, the results table
    # and the output paths (which factor thumbnet.keras is).
    print()
    print(run_summary(result["run_dir"]))
    return 0


def _die_with_parent() -> None:
    """Runs in the Prefect server child between fork and exec: the kernel
    sends it SIGTERM when this process ends, however it ends (kill -9
    included). Linux only (prctl)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # The parent died before prctl took effect.
        os._exit(1)


def _start_prefect_server() -> None:
    """Starts Prefect's temporary API server (what a flow starts when no
    `PREFECT_API_URL` is set) from this thread, as a child that cannot
    outlive this process. Prefect reuses it for the flow (one instance per
    process); it stops it at exit, and the kernel kills it if this process is
    killed."""
    # Its first start creates the database: slow on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    if not sys.platform.startswith("linux"):
        return
    import subprocess

    from prefect.server.api import server

    popen = subprocess.Popen

    def child_popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return popen(*args, **kwargs)

    instance = server.SubprocessASGIServer()
    if instance.running:
        return
    server.subprocess.Popen = child_popen
    try:
        instance.start()
    finally:
        server.subprocess.Popen = popen


def _in_run_folder(run_dir: str, work, *, fresh: bool):
    """Runs `work()` holding the run folder's lock; a run (`fresh`) that
    fails before its first stage leaves no folder behind."""
    from thumbnet_keras.pipeline.rundir import discard_unstarted, lock_run, unlock_run

    lock_run(run_dir)
    done = False
    try:
        result = work()
        done = True
        return result
    finally:
        if fresh and not done:
            discard_unstarted(run_dir)
        unlock_run(run_dir)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(verbosity: int, flow: bool) -> None:
    """The library logs through `logging` (`thumbnet_keras.*`): INFO shows
    (DEBUG with -vv). A flow command leaves the handlers to Prefect, which
    also sends the records to the run's logs."""
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    logger = logging.getLogger("thumbnet_keras")
    logger.setLevel(level)
    if flow:
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "thumbnet_keras")
    elif not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _train_values(args: argparse.Namespace) -> dict:
    from thumbnet_keras.pipeline.preflight import parse_json_option

    values = _given(args, _COMMON + _TRAIN)
    if args.epochs is not None:
        values["joint_epochs"] = args.epochs
    if args.deterministic is not None:  # --no-deterministic is False.
        values["deterministic"] = args.deterministic
    if args.backbone_options:
        values["backbone_options"] = parse_json_option(
            args.backbone_options, "--backbone-options"
        )
    return values


def _start_frameworks(args: argparse.Namespace, server: bool = False) -> None:
    """After every input was checked: Prefect's server (flows), Keras and its
    backend (quietly, unless -v), and a multi-host run's join."""
    from thumbnet_keras.pipeline.environment import import_backend_quietly

    if server:
        _start_prefect_server()  # Forked before Keras fills this process.
    import_backend_quietly(quiet=not getattr(args, "verbose", 0))
    from thumbnet_keras.pipeline.compute import initialize_multi_host

    initialize_multi_host()  # A multi-host run's processes join first.


def _dispatch(args: argparse.Namespace) -> int:
    from thumbnet_keras.pipeline import preflight

    if args.command in ("demo", "train"):
        if args.command == "demo":
            from thumbnet_keras.pipeline.presets import demo

            values = demo() | _given(args, _COMMON)
        else:
            values = _train_values(args)
        params = preflight.check_thumbnet(values)
        run_dir = os.path.join(params.runs_dir, params.run_name)
        _start_frameworks(args, server=True)
        return _in_run_folder(run_dir, lambda: _run_thumbnet(params), fresh=True)
    if args.command == "generalize":
        params = preflight.check_generalize(_generalize_values(args))
        run_dir = os.path.join(params.runs_dir, params.run_name)

        def work() -> int:
            from flows.thumbnet_flows import generalize

            result = generalize(params, verbose=_verbose())
            print(f"\nreport: {result['report_html']}")
            return 0

        _start_frameworks(args, server=True)
        return _in_run_folder(run_dir, work, fresh=True)
    if args.command in ("evaluate", "report"):
        preflight.check_finished_run(args.run)
        _start_frameworks(args)
        from thumbnet_keras import pipeline

        if args.command == "evaluate":

            def work() -> int:
                result = pipeline.evaluate_run(args.run, force=True)
                for arm in result["arms"]:
                    factor = f" f={arm['factor']}" if arm["factor"] else ""
                    print(f"{arm['label']}{factor}: top-1 {100 * arm['top1']:.2f}%")
                return 0

        else:

            def work() -> int:
                result = pipeline.write_report(args.run)
                print(f"report: {result['report_html']}\n        {result['report_md']}")
                return 0

        return _in_run_folder(args.run, work, fresh=False)
    if args.command == "export":
        source = preflight.check_export(args.run, args.factor, args.format)
        _start_frameworks(args)
        from thumbnet_keras import pipeline

        def work() -> int:
            try:
                print(
                    pipeline.export_model(
                        source, args.format, args.output, run_dir=args.run
                    )
                )
            except RuntimeError as err:  # The exporter's message names the cause.
                print(f"thumbnet: error: {err}", file=sys.stderr)
                return 1
            return 0

        return _in_run_folder(args.run, work, fresh=False)
    raise AssertionError(args.command)  # pragma: no cover


def _predict(args: argparse.Namespace) -> int:
    from thumbnet_keras.predict import predict, write_predictions

    try:
        result = predict(args.model, args.inputs, top_k=args.top_k)
        if args.output:
            write_predictions(result, args.output)
    except ValueError as err:  # A bad model, sidecar or option.
        print(f"thumbnet: error: {err}", file=sys.stderr)
        return 2
    for row in result["skipped"]:
        print(f"skipped {row['file']}: {row['reason']}", file=sys.stderr)
    if not args.output:
        for row in result["predictions"]:
            top = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in row["top"])
            print(f"{row['file']}\t{top}")
    done, skipped = len(result["predictions"]), len(result["skipped"])
    summary = f"{done} classified, {skipped} of {done + skipped} files skipped"
    if args.output:
        summary += f"; written to {args.output}"
    print(summary, file=sys.stderr)
    return 0 if done else 1


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message names a problem the user can fix: shown as one
    line, exit status 2 (the traceback only with --debug)."""
    from thumbnet_keras.pipeline import ConfigError
    from thumbnet_keras.pipeline.rundir import RunLockedError

    errors: tuple = (ConfigError, RunLockedError)
    if "thumbnet_keras.data" in sys.modules:  # Data errors found while preparing.
        from thumbnet_keras.data import DataSourceError, ManifestError, PrepareError

        errors += (DataSourceError, ManifestError, PrepareError)
    return errors


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `thumbnet` console script."""
    args = _parser().parse_args(argv)
    verbosity = getattr(args, "verbose", 0)
    from thumbnet_keras.pipeline.environment import quiet_frameworks

    quiet_frameworks(verbosity)  # Before Keras, a backend or Prefect import.
    _configure_logging(verbosity, args.command in ("demo", "train", "generalize"))
    from thumbnet_keras.pipeline.config import TrainingHealthError

    try:
        if args.command == "predict":
            return _predict(args)
        return _dispatch(args)
    except TrainingHealthError as err:  # Finished, but a stage is broken.
        print(f"thumbnet: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(
            "\nthumbnet: interrupted; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise  # A bug: its traceback.
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"thumbnet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
