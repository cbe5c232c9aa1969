"""`thumbnet`: the command line.

    thumbnet demo                       # the whole flow on ELPV, f = 2 and 4
    thumbnet train --dataset elpv --backbone resnet18 --factor 2 --run-name r1
    thumbnet generalize --source-run runs/r1 --experiment fashion_mnist: --experiment :resnet18
    thumbnet evaluate --run runs/r1     # re-evaluate every arm (evaluation.json)
    thumbnet report --run runs/r1       # rewrite the reports; print the results
    thumbnet export --run runs/r1 --format onnx   # or litert, litert_int8
    thumbnet predict --model runs/r1/thumbnet.onnx photos/ --top-k 3

`demo`, `train` and `generalize` run the Prefect flows in this process, with no
server (Prefect's ephemeral mode): a log line per task, Keras progress per
stage. Rerunning the same command after an interruption resumes the run.
`evaluate`, `report` and `export` call the library directly.

The options of `demo`, `train` and `generalize` are made from the fields of
`ThumbNetParams` and `GeneralizeParams` (`pipeline.options`): the same
parameters, defaults, bounds and help as a flow's or a deployment's.

Every input is checked before Prefect, Keras or a backend starts
(`thumbnet_keras.pipeline.preflight`): a user error is one line,
`thumbnet: error: ...`, exit status 2, and nothing is written (argparse's
own errors too: one line, with the option a typo meant). One process works
in a run folder at a time: its `.lock`, taken before Prefect and Keras start,
so a second process is refused at once. Quiet by default: `-v` shows
the frameworks' warnings, `-vv` everything, `--debug` the traceback of a user
error too.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import logging
import os
import re
import sys
import typing
import warnings
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An option error is one line, as every other user error: the problem,
    the option meant by a typo, and where the help is (argparse prints the
    whole usage first: 33 lines for `thumbnet train`)."""

    def error(self, message: str) -> typing.NoReturn:
        self._fail(self.prog, message)

    def _fail(self, prog: str, message: str) -> typing.NoReturn:
        self.exit(2, f"{prog}: error: {message}. See: {prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, an unknown option named with the command's own
        option it most resembles (`--batchsize` -> `--batch-size`)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if not extras:
            return namespace
        command = getattr(namespace, "command", None)
        parser = self._commands().get(command, self)
        hints = []
        for word in extras:
            option = word.split("=")[0]
            if not option.startswith("--"):
                continue
            close = difflib.get_close_matches(option, parser._option_string_actions, 1)
            others = [  # `thumbnet demo --backbone`: an option of `train`.
                p.prog
                for p in self._commands().values()
                if p is not parser and option in p._option_string_actions
            ]
            if close:
                hints.append(f"{option}: did you mean {close[0]}?")
            elif others:
                hints.append(f"{option} is an option of {others[0]}")
        message = f"unrecognized arguments: {' '.join(extras)}"
        if hints:
            message += f" ({'; '.join(hints)})"
        self._fail(parser.prog, message)

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _flags() -> argparse.ArgumentParser:
    """-v and --debug, accepted before or after the command."""
    flags = _Parser(add_help=False)
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


# `thumbnet demo`'s options (the rest is the preset, `pipeline.presets.demo`).
_DEMO = ("runs_dir", "data_dir", "run_name", "limit_per_class", "batch_size", "smoke")
# Options whose text the command parses itself: (metavar, how to write it).
_FORMS = {
    "experiments": (
        "DATASET:BACKBONE",
        "Write DATASET:BACKBONE, either side empty for the source run's.",
    )
}


def _experiments(texts: list[str]) -> list[dict]:
    """`--experiment DATASET:BACKBONE` values as `GeneralizeParams.experiments`."""
    return [
        {"dataset": d or None, "backbone": b or None}
        for d, _, b in (text.partition(":") for text in texts)
    ]


def _export_format(text: str) -> str:
    """`--format`'s value, `-` read as `_` (litert-int8 = litert_int8); an
    unknown one is echoed as typed."""
    from thumbnet_keras.pipeline.config import EXPORT_FORMATS

    name = text.replace("-", "_")
    if name not in EXPORT_FORMATS:
        choices = ", ".join(map(repr, EXPORT_FORMATS))
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {choices})"
        )
    return name


def _parser() -> argparse.ArgumentParser:
    flags = _flags()
    parser = _Parser(
        prog="thumbnet", description=__doc__.split("\n")[0], parents=[flags]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # Every run option is a field of ThumbNetParams / GeneralizeParams: name,
    # type, choices, help and default come from the model (pipeline.options).
    from thumbnet_keras.pipeline import GeneralizeParams, ThumbNetParams
    from thumbnet_keras.pipeline.config import EXPORT_FORMATS
    from thumbnet_keras.pipeline.options import add_options
    from thumbnet_keras.pipeline.presets import demo as demo_preset

    demo = sub.add_parser(
        "demo", parents=[flags], help="the whole thumbnet flow on ELPV (f = 2 and 4)"
    )
    add_options(demo, ThumbNetParams, _DEMO, shown=demo_preset())
    train = sub.add_parser(
        "train", parents=[flags], help="the thumbnet flow on any dataset"
    )
    add_options(train, ThumbNetParams)
    gen = sub.add_parser(
        "generalize", parents=[flags], help="reuse a trained E, frozen, elsewhere"
    )
    add_options(gen, GeneralizeParams, forms=_FORMS)

    ev = sub.add_parser(
        "evaluate",
        parents=[flags],
        help="re-evaluate every arm of a run (evaluation.json; `thumbnet report` "
        "then refreshes metrics.json and the reports)",
    )
    ev.add_argument("--run", required=True, help="the run folder")
    rep = sub.add_parser(
        "report",
        parents=[flags],
        help="rewrite metrics.json, report.md, report.html; print the results",
    )
    rep.add_argument("--run", required=True, help="the run folder")
    exp = sub.add_parser(
        "export", parents=[flags], help="export thumbnet.keras to another format"
    )
    exp.add_argument(
        "--run", required=True, help="the run folder (its thumbnet.keras is exported)"
    )
    exp.add_argument(
        "--format",
        required=True,
        type=_export_format,
        metavar="{" + ",".join(EXPORT_FORMATS) + "}",
        help="litert_int8: full-integer, calibrated on the run's train images",
    )
    exp.add_argument(
        "--factor", type=int, default=None, help="default: the primary factor"
    )
    exp.add_argument(
        "--output",
        default=None,
        help="the file (or SavedModel folder) to write; default: beside the "
        "model, e.g. runs/<run>/thumbnet.onnx",
    )
    pred = sub.add_parser(
        "predict", parents=[flags], help="classify images with an exported model"
    )
    pred.add_argument("--model", required=True, help=".keras, .onnx or .tflite")
    pred.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--output", default=None, help="preds.csv or preds.json")
    pred.add_argument(
        "--sidecar",
        default=None,
        help="the model's thumbnet_model.json (classes, input), for a renamed or "
        "moved model (default: the one beside --model)",
    )
    return parser


def _train_values(args: argparse.Namespace) -> dict:
    """`ThumbNetParams` fields from `thumbnet train`'s options (those given)."""
    from thumbnet_keras.pipeline import ThumbNetParams
    from thumbnet_keras.pipeline.options import option_values

    return option_values(args, ThumbNetParams)


def _check_smoke(given: dict, generalize: bool = False) -> None:
    """`--smoke` sets the fields of `config.SMOKE` (`GENERALIZE_SMOKE` for
    generalize): refuses one of them given too (it used to be replaced
    without a word: `--smoke --image-size 48` trained at 32)."""
    if not given.get("smoke"):
        return
    from thumbnet_keras.pipeline.config import ConfigError, smoke_values
    from thumbnet_keras.pipeline.options import option_name

    sets = smoke_values(given, generalize=generalize)
    clash = [option_name(k) for k in sets if k in given]
    if clash:
        raise ConfigError(
            f"--smoke sets {', '.join(clash)} (a run shrunk to a plumbing check): leave "
            f"{'it' if len(clash) == 1 else 'them'} out, or drop --smoke."
        )


def _generalize_values(args: argparse.Namespace) -> dict:
    """`GeneralizeParams` fields from `thumbnet generalize`'s options."""
    from thumbnet_keras.pipeline import GeneralizeParams
    from thumbnet_keras.pipeline.options import option_values

    return option_values(args, GeneralizeParams, parse={"experiments": _experiments})


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
        # Its own session: a terminal's Ctrl-C (SIGINT to the whole
        # foreground process group) reaches this process only. The server
        # stays up while the flow records the interrupt, then stops at exit;
        # when it got the SIGINT too, the flow retried the dead server for
        # ~150 s and printed connection tracebacks before exiting 1.
        kwargs.setdefault("start_new_session", True)
        log = _server_log()
        if log is None:
            return popen(*args, **kwargs)
        # Its own output goes to a file: stopped at exit with a request in
        # flight, it logged SQLAlchemy's "Exception during reset" traceback
        # (CancelledError) after the command's one-line error.
        with log:
            kwargs.setdefault("stdout", log)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            return popen(*args, **kwargs)

    instance = server.SubprocessASGIServer()
    if instance.running:
        return
    server.subprocess.Popen = child_popen
    try:
        instance.start()
    except RuntimeError as err:  # "Timed out while attempting to connect ..."
        raise RuntimeError(f"{err} (its output: {_server_log_path()})") from err
    finally:
        server.subprocess.Popen = popen


def _server_log_path() -> Path:
    """Where the temporary server's own output goes."""
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "thumbnet-temporary-server.log"


def _server_log():
    """`_server_log_path()` open for appending (started afresh past 1 MB),
    or None when it cannot be."""
    try:
        path = _server_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        big = path.is_file() and path.stat().st_size > 2**20
        return open(path, "wb" if big else "ab")
    except OSError:
        return None


def _in_run_folder(
    run_dir: str, work, args: argparse.Namespace, *, fresh: bool, server: bool = False
):
    """Takes the run folder's lock, then starts the frameworks and runs
    `work()` (a second process on the folder is refused at once, not after
    Prefect and Keras started); a run (`fresh`) that fails before its first
    stage leaves no folder behind."""
    from thumbnet_keras.pipeline.rundir import discard_unstarted, lock_run, unlock_run

    parent = os.path.dirname(os.path.abspath(run_dir))
    made_parent = not os.path.exists(parent)  # `runs/` made by this command.
    from thumbnet_keras.pipeline import interrupt

    lock_run(run_dir)
    done = False
    try:
        # A flow: Ctrl-C stops it even where a library drops the interrupt.
        with interrupt.handled() if server else contextlib.nullcontext():
            _start_frameworks(args, server=server)
            result = work()
        done = True
        return result
    finally:
        # The flow may have discarded it already (a data error, under this
        # process's lock): then `runs/`, if this command made it, goes too.
        if fresh and not done:
            discarded = discard_unstarted(run_dir) or not os.path.exists(run_dir)
            if discarded and made_parent:
                with contextlib.suppress(OSError):  # Left if anything else is in it.
                    os.rmdir(parent)
        unlock_run(run_dir)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The library's own warnings as one `thumbnet: warning:` line (without
    the source line Python prints); other packages' warnings unchanged."""
    own = os.sep + "thumbnet_keras" + os.sep in str(filename)
    if not own:
        return _python_show_warning(message, category, filename, lineno, file, line)
    print(f"thumbnet: warning: {message}", file=file or sys.stderr)


_python_show_warning = warnings.showwarning


def _configure_logging(verbosity: int, flow: bool) -> None:
    """The library logs through `logging` (`thumbnet_keras.*`): INFO shows
    (DEBUG with -vv). A flow command leaves the handlers to Prefect, which
    also sends the records to the run's logs."""
    if verbosity < 2:
        warnings.showwarning = _show_warning
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    logger = logging.getLogger("thumbnet_keras")
    logger.setLevel(level)
    if flow:
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "thumbnet_keras")
    elif not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _NoUserErrorTraceback(logging.Filter):
    """Drops the traceback Prefect logs with a task or flow run that failed
    on a user error (a `ConfigError` found once the data is prepared, a
    teacher that fails its health checks) and the flow's own copy of the
    error line, and shortens Prefect's lines that repeat the error's text
    ("... failed with exception ...", "Finished in state Failed(...)") to
    "(error below)": the command prints the error as its last line, and the
    stack says nothing the user can act on. A bug keeps its traceback;
    `--debug` and `-v` keep every line."""

    # The messages of the user errors logged so far (task and flow loggers
    # each have a filter; the flow's "Finished in state Failed(...)" line
    # repeats the task's error text without its class).
    seen: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        from thumbnet_keras.pipeline.config import TrainingHealthError

        if str(record.msg).startswith("thumbnet: error:"):  # Printed at the end.
            return False
        user_errors = (*_user_errors(), TrainingHealthError)
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, user_errors):
            record.exc_info = record.exc_text = None
            _NoUserErrorTraceback.seen.append(str(error)[:100])
            record.msg, record.args = (
                f"failed: {type(error).__name__} (error below)",
                (),
            )
        message = record.getMessage()
        for cls in user_errors:  # A task's state: "... exception ConfigError: <text>".
            marker = f"exception {cls.__name__}: "
            if marker in message:
                _NoUserErrorTraceback.seen.append(message.split(marker, 1)[1][:100])
        if "Finished in state Failed" in message and any(
            text and text in message for text in self.seen
        ):
            # The error itself is the command's last line: say it once.
            record.msg, record.args = "Finished in state Failed (error below)", ()
        return True


def _start_frameworks(args: argparse.Namespace, server: bool = False) -> None:
    """After every input was checked: Prefect's server (flows), then Keras and
    its backend (quietly, unless -v)."""
    from thumbnet_keras.pipeline.environment import import_backend_quietly

    if server:
        _start_prefect_server()  # Forked before Keras fills this process.
        if not (getattr(args, "debug", False) or getattr(args, "verbose", 0)):
            for name in ("prefect.flow_runs", "prefect.task_runs"):
                logger = logging.getLogger(name)
                if not any(
                    isinstance(f, _NoUserErrorTraceback) for f in logger.filters
                ):
                    logger.addFilter(_NoUserErrorTraceback())
    import_backend_quietly(quiet=not getattr(args, "verbose", 0))


def _demo_values(args: argparse.Namespace) -> dict:
    """`ThumbNetParams` fields of `thumbnet demo`: the preset and the
    options given. With --smoke, the preset's fields that smoke sets are
    left to it (they are not the user's, so the flow names none)."""
    from thumbnet_keras.pipeline import ThumbNetParams
    from thumbnet_keras.pipeline.config import smoke_overrides
    from thumbnet_keras.pipeline.options import option_values
    from thumbnet_keras.pipeline.presets import demo

    given = option_values(args, ThumbNetParams, _DEMO)
    _check_smoke(given)
    preset = demo()
    if given.get("smoke"):
        for key in smoke_overrides(preset | given):
            preset.pop(key, None)
    return preset | given


def _name_generated_run(args: argparse.Namespace, values: dict, run_name: str):
    """Without --run-name the run's name carries the time it started, so
    "the same command" would start a new run: say the name to resume with,
    now and when interrupted (`main`)."""
    if values.get("run_name"):
        return
    args.resume_hint = f"the same command with --run-name {run_name}"
    print(  # stdout: stderr stays one line when a check fails after this
        f"thumbnet: run {run_name!r}; to resume it after an interruption, "
        f"rerun {args.resume_hint}."
    )


def _dispatch(args: argparse.Namespace) -> int:
    from thumbnet_keras.pipeline import preflight

    preflight.check_backend()
    if args.command in ("demo", "train"):
        if args.command == "demo":
            values = _demo_values(args)
        else:
            values = _train_values(args)
            _check_smoke(values)
        params = preflight.check_thumbnet(values)
        run_dir = os.path.join(params.runs_dir, params.run_name)
        _name_generated_run(args, values, params.run_name)
        work = functools.partial(_run_thumbnet, params)
        return _in_run_folder(run_dir, work, args, fresh=True, server=True)
    if args.command == "generalize":
        values = _generalize_values(args)
        _check_smoke(values, generalize=True)
        params = preflight.check_generalize(values)
        run_dir = os.path.join(params.runs_dir, params.run_name)
        _name_generated_run(args, values, params.run_name)

        def work() -> int:
            from flows.thumbnet_flows import generalize
            from thumbnet_keras.pipeline.generalize_report import (
                generalize_summary_text,
            )
            from thumbnet_keras.pipeline.rundir import read_json

            result = generalize(params, verbose=_verbose())
            summary = read_json(result["metrics_json"])["summary"]
            print(f"\n{generalize_summary_text(summary)}")
            print(f"\nreport: {result['report_html']}")
            return 0

        return _in_run_folder(run_dir, work, args, fresh=True, server=True)
    if args.command == "evaluate":
        preflight.check_finished_run(args.run)

        def work() -> int:
            from thumbnet_keras import pipeline

            result = pipeline.evaluate_run(args.run, force=True)
            for arm in result["arms"]:
                factor = f" f={arm['factor']}" if arm["factor"] else ""
                print(f"{arm['label']}{factor}: top-1 {100 * arm['top1']:.2f}%")
            return 0

        return _in_run_folder(args.run, work, args, fresh=False)
    if args.command == "report":
        preflight.check_finished_run(args.run, exported=True)

        def work() -> int:
            from thumbnet_keras import pipeline
            from thumbnet_keras.pipeline.progress import run_summary

            pipeline.write_report(args.run)
            # The report's headline, the results table, then the paths.
            print(run_summary(args.run))
            return 0

        return _in_run_folder(args.run, work, args, fresh=False)
    if args.command == "export":
        source = preflight.check_export(args.run, args.factor, args.format, args.output)

        def work() -> int:
            from thumbnet_keras import pipeline

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

        return _in_run_folder(args.run, work, args, fresh=False)
    raise AssertionError(args.command)  # pragma: no cover


def _predict(args: argparse.Namespace) -> int:
    from thumbnet_keras.pipeline import preflight
    from thumbnet_keras.pipeline.environment import import_backend_quietly
    from thumbnet_keras.predict import predict, write_predictions

    try:
        preflight.check_backend()
        preflight.check_predict(
            args.model, args.inputs, args.top_k, args.output, args.sidecar
        )
        import_backend_quietly(quiet=not getattr(args, "verbose", 0))
        result = predict(
            args.model, args.inputs, top_k=args.top_k, sidecar=args.sidecar
        )
        if args.output:
            write_predictions(result, args.output)
    except (ValueError, OSError) as err:  # A bad model, sidecar, option or output.
        print(f"thumbnet: error: {err}", file=sys.stderr)
        return 2
    # Each skipped file was reported once, as it was met (`predict` logs
    # "skipped <file>: <reason>" to stderr).
    if not args.output:
        for row in result["predictions"]:
            top = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in row["top"])
            # A file name's undecodable bytes as \udcNN (as the CSV and JSON
            # write them): a strict UTF-8 stdout would refuse them.
            name = row["file"].encode("utf-8", "backslashreplace").decode("utf-8")
            print(f"{name}\t{top}")
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


def _missing_input_file(err: BaseException) -> str | None:
    """The image file tf.data found missing (TensorFlow's `NotFoundError`
    while a stage trains or a run is evaluated: the data changed after it was
    prepared), or None for any other error."""
    if type(err).__name__ != "NotFoundError":
        return None
    match = re.search(r"(\S+); No such file or directory", str(err))
    return match.group(1) if match else None


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
        hint = getattr(args, "resume_hint", "the same command")
        print(f"\nthumbnet: interrupted; rerun {hint} to resume.", file=sys.stderr)
        return 130
    except Exception as err:
        missing = _missing_input_file(err)
        if missing and not getattr(args, "debug", False):
            print(
                f"thumbnet: error: {missing}: no such file. The run's prepared "
                "index names it, so the data changed after it was prepared: "
                "restore the file, or train a new run (another --run-name) on "
                "the data as it is now.",
                file=sys.stderr,
            )
            return 2
        if not isinstance(err, _user_errors()):
            raise  # A bug: its traceback.
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"thumbnet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
