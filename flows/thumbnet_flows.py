"""The `thumbnet` and `generalize` Prefect flows.

Thin shells: each task calls one `thumbnet_keras.pipeline` function and
returns its small JSON-able result (paths, metrics). Policy:

* `retries` only on I/O tasks (data preparation, export, report); a user
  error inside any task ends the flow run in one line, without tracebacks;
* data preparation is cached on the manifest's content (plus the limit, the
  cache folder and the prepared index's hash, so a deleted or changed cache
  is rebuilt), so every run of the same dataset reuses one prepared index;
* the report is published as keyed artifacts (markdown, table, image), so
  versions accumulate per dataset in the Prefect UI.

Resume does not rely on Prefect state: each training step checkpoints every
epoch in the run folder and skips itself once done, so rerunning the same
command (or deployment run) after a crash continues where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import warnings

from thumbnet_keras.pipeline.environment import import_backend_quietly, quiet_frameworks

# As the command line does, before Prefect (its ephemeral server's telemetry
# fails offline with an ERROR line) and Keras (TensorFlow's C++ start-up
# lines) are imported; a switch already set in the environment is kept.
quiet_frameworks()
import_backend_quietly()

from prefect import flow, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Failed

from thumbnet_keras import pipeline
from thumbnet_keras.pipeline import GeneralizeParams, ThumbNetParams, interrupt
from thumbnet_keras.pipeline.config import TrainingHealthError
from thumbnet_keras.pipeline.datasets import (
    is_prepared,
    prepared_fingerprint,
    report_data_notices,
)
from thumbnet_keras.pipeline.generalize import ARMS as GENERALIZE_ARMS
from thumbnet_keras.pipeline.generalize import check_target
from thumbnet_keras.pipeline.preflight import check_generalize, check_thumbnet
from thumbnet_keras.pipeline.resolve import load_manifest_checked
from thumbnet_keras.pipeline.rundir import discard_unstarted

__all__ = ["generalize", "thumbnet"]


def _capture_library_logs() -> None:
    """The library logs through `logging` (`thumbnet_keras.*`): its INFO
    records go to the flow run's logs too, as Prefect does for the loggers in
    PREFECT_LOGGING_EXTRA_LOGGERS (deployments need no setting)."""
    library = logging.getLogger("thumbnet_keras")
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in library.handlers:
            library.addHandler(handler)


_capture_library_logs()


def _artifact_key(*parts: str) -> str:
    """Lowercase letters, digits and dashes only (Prefect's rule)."""
    text = "-".join(parts).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")


def _prepare_cache_key(context, parameters: dict) -> str | None:
    """The manifest's content + its source files' names, sizes and times
    (`data.source_stamp`: a file replaced, added or removed under an
    unchanged manifest is prepared again) + the limit + the prepared folder.

    (The flow also refreshes this cache when the prepared folder is gone,
    see `_prepare`.)
    """
    from thumbnet_keras.data.sources import source_stamp

    try:
        manifest = load_manifest_checked(parameters["dataset"])
        folder = pipeline.prepared_dir(
            parameters["dataset"], parameters["data_dir"], parameters["limit_per_class"]
        )
        stamp = source_stamp(manifest)
    except Exception:  # An invalid dataset: no caching; the task reports it.
        return None
    blob = "|".join(
        [
            manifest.content_hash(),
            stamp,
            str(parameters["limit_per_class"]),
            os.path.abspath(folder),
        ]
    )
    return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()


def _data_errors() -> tuple[type[Exception], ...]:
    """Errors of data the user has to fix, found while preparing it."""
    from thumbnet_keras import data

    return (data.PrepareError, data.ManifestError, data.DataSourceError)


@contextlib.contextmanager
def _warnings_to_run_log():
    """Inside a task: a `UserWarning` (what the library tells the user: a
    class missing from a split, an E costing more than its share of S, ...)
    goes to the flow run's log as it is raised; as a Python warning it
    reached only the worker's stderr, never the UI (two trials). Other
    warnings are shown as Python shows them."""
    logger = get_run_logger()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def to_log(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning):
                logger.warning("%s", message)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = to_log
        yield


def _logs_warnings(function):
    """A task body run under `_warnings_to_run_log`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _warnings_to_run_log():
            return function(*args, **kwargs)

    return wrapper


def _retry_unless_bad_data(task, task_run, state) -> bool:
    """Retry I/O hiccups, not data the user has to fix (a retry would fail
    the same way, 5 s later)."""
    try:
        state.result()
    except (*_data_errors(), *_user_errors()):
        return False
    except Exception:
        return True
    return True


def _never_retried(task, task_run, state) -> bool:
    """A training or evaluation step is not retried: a crash there (a full
    disk, out of memory) would repeat hours of work before failing again,
    and on several hosts one process retrying alone falls out of step."""
    return False


# retries=1 with a retry condition: a task whose condition says no fails at
# once without Prefect logging its traceback. A user error (a teacher Keras
# cannot build, files changed under a resumed run) is then the flow's one
# line (`_refused`; a deployment's run used to log two tracebacks, 146
# lines, for it: a Prefect trial); a crash's traceback is logged once, by
# the flow. `_CHECKED`: I/O hiccups are retried, user errors are not;
# `_STEP` (training, evaluation): nothing is retried.
_CHECKED = dict(
    cache_policy=NO_CACHE, retries=1, retry_condition_fn=_retry_unless_bad_data
)
_IO_STEP = _CHECKED | {"retry_delay_seconds": 2}
_STEP = _CHECKED | {"retry_condition_fn": _never_retried}


@task(name="resolve-run", **_CHECKED)
def resolve_run_task(params: dict) -> dict:
    """Validates every input and claims the run folder (fails first on bad input)."""
    return pipeline.resolve_run(params)


@task(
    name="prepare-data",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_bad_data,
    cache_key_fn=_prepare_cache_key,
)
def prepare_data_task(dataset: str, data_dir: str, limit_per_class: int | None) -> dict:
    """Validates, splits and indexes the dataset (cached on manifest content)."""
    # What preparing found (classes missing from a split, duplicates) goes to
    # the run's log: as Python warnings it reached only the worker's stderr,
    # never the UI (a trial).
    with _warnings_to_run_log():
        result = pipeline.prepare_dataset(dataset, data_dir, limit_per_class)
    print(
        f"[prepare-data] {result['name']}: {result['splits']} in {result['prepared_dir']}"
    )
    return result


def _prepare(dataset: str, data_dir: str, limit_per_class: int | None) -> dict:
    """The cached prepare-data task, refreshed when its folder was deleted or
    no longer holds the index the cached result describes. A cached result
    says again what the data's preparation warned of (quarantined files,
    duplicates), which the task body said the first time.

    The folder is one per manifest: files added to an image folder, then
    removed again, give back an earlier cache key (the files' stamp) while
    the folder holds the index made in between; every run then failed on a
    file that index names."""
    task_ = prepare_data_task.with_options(
        refresh_cache=not is_prepared(dataset, data_dir, limit_per_class)
    )
    state = task_(dataset, data_dir, limit_per_class, return_state=True)
    result = state.result()  # raises the task's error, as a plain call does
    if state.name == "Cached" and result.get("fingerprint") != prepared_fingerprint(
        result["prepared_dir"]
    ):
        task_ = prepare_data_task.with_options(refresh_cache=True)
        state = task_(dataset, data_dir, limit_per_class, return_state=True)
        result = state.result()
    if state.name == "Cached":
        report_data_notices(result["prepared_dir"])
    return result


@task(name="teacher", **_STEP)
@_logs_warnings
def teacher_task(run_dir: str, prepared: dict, verbose: int) -> dict:
    """Stage 0: load, build or train the teacher."""
    return _small(pipeline.get_teacher(run_dir, prepared, verbose=verbose))


@task(name="train-stage", task_run_name="{stage}-f{factor}", **_STEP)
@_logs_warnings
def train_stage_task(run_dir: str, factor: int, stage: str, verbose: int) -> dict:
    """One stage of `pipeline.STAGES` (teacher_bicubic_bn, e_pretrain,
    fm_pretrain, joint, bicubic_cl, bicubic_kd, bicubic_kd_equal) for one
    factor."""
    return _small(pipeline.train_stage(run_dir, factor, stage, verbose=verbose))


@task(name="evaluate", **_STEP)
@_logs_warnings
def evaluate_task(run_dir: str) -> dict:
    """Every arm on the validation and test splits."""
    interrupt.check()  # A Ctrl-C that something swallowed.
    return pipeline.evaluate_run(run_dir)


@task(name="health", **_STEP)
def health_task(run_dir: str) -> dict:
    """The run's health (`health.json`) from its stages' sanity checks."""
    interrupt.check()  # A Ctrl-C that something swallowed.
    from thumbnet_keras.pipeline.health import write_run_health

    return write_run_health(run_dir)


@task(name="export", **_IO_STEP)
@_logs_warnings
def export_task(run_dir: str) -> dict:
    """thumbnet.keras, the thumbnail-only model, the downscalers, extra formats."""
    interrupt.check()  # A Ctrl-C that something swallowed.
    return pipeline.export_run(run_dir)


@task(name="report", **_IO_STEP)
def report_task(run_dir: str, dataset_name: str) -> dict:
    """metrics.json, report.md, report.html, and the keyed artifacts."""
    interrupt.check()  # A Ctrl-C that something swallowed.
    report = pipeline.write_report(run_dir)
    _publish(dataset_name, "thumbnet", report, "ThumbNet results")
    return {k: report[k] for k in ("metrics_json", "report_md", "report_html")}


def _artifact_name(prepared: dict, config: dict) -> str:
    """What a run's artifacts are keyed by: the dataset, and `smoke` for a
    smoke run (its 8-image report became the latest `thumbnet-elpv-report`
    over a real run's; a trial). A generalize run's: its source run's name,
    and `smoke` the same way."""
    return prepared["name"] + ("-smoke" if config.get("smoke") else "")


def _publish(dataset_name: str, kind: str, report: dict, title: str) -> None:
    key = _artifact_key(kind, dataset_name)
    create_markdown_artifact(report["markdown"], key=f"{key}-report", description=title)
    if report["table"]:
        create_table_artifact(report["table"], key=f"{key}-results", description=title)
    chart = report.get("accuracy_vs_flops_png_base64")
    if chart:
        create_image_artifact(
            f"data:image/png;base64,{chart}",
            key=f"{key}-accuracy-vs-flops",
            description="Top-1 accuracy vs. multiply-adds per image",
        )


def _say_what_smoke_replaced(params) -> None:
    from thumbnet_keras.pipeline.config import smoke_replaced

    replaced = smoke_replaced(params)
    if replaced:
        # Not "leave them out": they may be the deployment's own values,
        # which a run's --param cannot remove (a Prefect trial).
        get_run_logger().warning(
            "smoke=True replaces %s, given by this run or its deployment (a run "
            "shrunk to a plumbing check; smoke false keeps them).",
            ", ".join(replaced),
        )


def _say_run_folder(run: dict) -> None:
    """The run folder, at the start: a deployment's run without `run_name`
    gets a generated one (it carries the start time), and resuming a
    cancelled or crashed run needs it (its name appeared only with the
    outputs, so a run stopped earlier never said it; a trial)."""
    get_run_logger().info(
        "run folder: %s (%s; run_name %r resumes it)",
        os.path.abspath(run["run_dir"]),
        "resumed" if run["resumed"] else "new",
        os.path.basename(run["run_dir"]),
    )


def _with_deployment_params(params):
    """A deployment run's `params`, field by field over the deployment's own.

    Prefect merges a run's parameters into its deployment's by top-level
    name only, so `prefect deployment run thumbnet/train-imagenet --params
    '{"params": {"batch_size": 64}}'` would hand the flow a `params` of
    defaults (the ELPV demo) with batch 64. Here the fields the run names
    replace the deployment's and the rest keep the deployment's values, as a
    user changing one setting expects. Outside a deployment, or when the run
    gives no `params` of its own, `params` is returned as it came.

    Raises:
        ConfigError: the merged parameters are not valid together.
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    from thumbnet_keras.pipeline.preflight import validate_params

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is None or flow_run.deployment_id is None:
        return params
    given = (flow_run.parameters or {}).get("params")
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(flow_run.deployment_id)
    except Exception as err:  # Deleted meanwhile, or the API is unreachable.
        get_run_logger().warning(
            "params: the deployment's own could not be read (%s); this run's "
            "params are used as given.",
            err,
        )
        return params
    base = (deployment.parameters or {}).get("params")
    if given is None and isinstance(base, dict):
        # `--params '{"params": null}'`: Prefect accepts it (the flow's
        # `params` may be None) and the flow would have run the library's
        # defaults, a full ELPV run, instead of the deployment (a trial).
        get_run_logger().info(
            "params: null in this run, so deployment %r's own are used.",
            deployment.name,
        )
        return validate_params(type(params), base)
    if not isinstance(given, dict) or not isinstance(base, dict) or given == base:
        return params
    get_run_logger().info(
        "params: %s from this run, every other field from deployment %r.",
        ", ".join(sorted(given)) or "nothing",
        deployment.name,
    )
    return validate_params(type(params), {**base, **given})


def _refused(err: Exception) -> Failed:
    """A user error (bad parameters, data found bad while preparing it, a
    run folder that cannot go on, a training that failed its checks):
    the flow run ends Failed at once, the message (no traceback) in its log
    and as its state message, in `params` field names for a deployment's
    run (`in_params_terms`). Calling the flow raises `err` itself, which the
    command line prints as one line."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    message = str(err)
    if context and context.flow_run and context.flow_run.deployment_id:
        model = GeneralizeParams if context.flow.name == "generalize" else None
        message = in_params_terms(message, model or ThumbNetParams)
    get_run_logger().error("thumbnet: error: %s", message)
    err._thumbnet_refused = True  # For `_RefusedWithoutTraceback`.
    return Failed(message=message, data=err)


def in_params_terms(text: str, model=ThumbNetParams) -> str:
    """A message's command-line options as the `params` fields they set,
    for a deployment's run: `--factor 3 does not fit --image-size 32` ->
    `factors 3 does not fit image_size 32` (a Prefect operator's trial read
    option names it had no way to pass). Only options that are fields of
    the parameters change: `thumbnet export --run ...` stays a command."""
    from thumbnet_keras.pipeline.options import SPELLINGS

    fields = set(model.model_fields)  # `--epochs`: generalize's own `epochs`
    spelled = {option: f for f, option in SPELLINGS.items() if f in fields}

    def field(match: re.Match) -> str:
        option = match.group(0)
        name = spelled.get(option, option[2:].replace("-", "_"))
        return name if name in fields else option

    text = re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", field, text)
    # An experiment is `{dataset, backbone}` in params, DATASET:BACKBONE on
    # the command line (a Prefect trial read the command line's form).
    text = text.replace(
        "experiments takes DATASET:BACKBONE, DATASET ",
        'experiments takes items {"dataset": ..., "backbone": ...}, dataset ',
    )
    text = re.sub(r"experiments :([\w-]+)", r'experiments [{"backbone": "\1"}]', text)
    # "joint_epochs (--epochs; saved 3, now 4)" named both: keep one.
    text = re.sub(r"\b(\w+) \(\1; ", r"\1 (", text)
    return re.sub(r"\b(\w+) \(\1\)", r"\1", text)


class _RefusedWithoutTraceback(logging.Filter):
    """A deployment's run that `_refused` ended: Prefect's engine logs the
    raised error with its traceback ("Engine execution exited with
    unexpected exception", ~50 lines of checks and engine frames) after the
    one error line. This drops the traceback and says what happened instead
    ("unexpected" it was not); any other error keeps both."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if getattr(error, "_thumbnet_refused", False):
            record.exc_info = record.exc_text = None
            record.msg, record.args = "Flow run refused: the error above.", ()
        return True


logging.getLogger("prefect.flow_runs").addFilter(_RefusedWithoutTraceback())


def _user_errors() -> tuple[type[Exception], ...]:
    """What the user has to act on, said in one line: bad input, a run folder
    in use, a training that failed its health checks (the CLI's own list)."""
    from thumbnet_keras.pipeline.rundir import RunLockedError

    return (pipeline.ConfigError, RunLockedError, TrainingHealthError)


def _small(record: dict) -> dict:
    """A stage record without its per-epoch history and per-image hits (kept
    in the run folder)."""
    return {k: v for k, v in record.items() if k not in ("history", "test_correct")}


@flow(name="thumbnet", log_prints=True)
def thumbnet(params: ThumbNetParams | None = None, verbose: int = 2) -> dict:
    """Prepare data, teacher (stage 0), then per factor the BN-re-estimated
    teacher, e_pretrain, fm_pretrain, joint and the bicubic baselines (equal-size CL and
    CL + KD, equal-cost CL + KD), evaluate, export, report. Outputs in
    `runs/<run-name>/`.

    Args:
        params: the run's parameters (`ThumbNetParams`); default: the ELPV demo.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 a line per epoch).
    """
    try:  # Every check that needs no framework, before any task.
        params = _with_deployment_params(params or ThumbNetParams())
        _say_what_smoke_replaced(params)
        params = check_thumbnet(params.model_dump())
    except _user_errors() as err:
        return _refused(err)
    try:  # The checks that need Keras (a teacher it builds or loads).
        run = resolve_run_task(params.model_dump())
    except _user_errors() as err:
        return _refused(err)
    config, run_dir = run["config"], run["run_dir"]
    _say_run_folder(run)
    data_dir = config["data_dir"] or os.path.join(config["runs_dir"], "_data")
    try:
        prepared = _prepare(config["dataset"], data_dir, config["limit_per_class"])
    except (*_data_errors(), *_user_errors()) as err:  # e.g. no test split
        if not run["resumed"]:  # A folder saying only that it was tried: gone.
            discard_unstarted(run_dir)
        return _refused(err)
    try:
        teacher_task(run_dir, prepared, verbose)
        for factor in config["factors"]:
            for stage in pipeline.STAGES:
                train_stage_task(run_dir, factor, stage, verbose)
        evaluation = evaluate_task(run_dir)
        health = health_task(run_dir)
        if health["status"] == "failed":  # Report it; export nothing.
            from thumbnet_keras.pipeline.health import failed_message

            report = report_task(run_dir, _artifact_name(prepared, config))
            raise TrainingHealthError(failed_message(health, report["report_html"]))
        exported = export_task(run_dir)
        report = report_task(run_dir, _artifact_name(prepared, config))
    except (*_data_errors(), *_user_errors()) as err:
        return _refused(err)
    # Absolute: a deployment's run prints them from a worker's folder.
    print(f"thumbnet.keras: {os.path.abspath(exported['thumbnet'])}")
    print(f"report: {os.path.abspath(report['report_html'])}")
    return {
        "run_dir": run_dir,
        "thumbnet": exported["thumbnet"],
        "thumbnail_model": exported["thumbnail_model"],
        "report_html": report["report_html"],
        "report_md": report["report_md"],
        "metrics_json": report["metrics_json"],
        "health": health,
        "top1": {
            f"{a['name']}" + (f"-f{a['factor']}" if a["factor"] else ""): a["top1"]
            for a in evaluation["arms"]
        },
    }


@task(name="resolve-generalize", **_CHECKED)
def resolve_generalize_task(params: dict) -> dict:
    """Validates the source run, datasets and backbones; claims the run folder."""
    return pipeline.resolve_generalize(params)


@task(name="train-fresh-student", task_run_name="exp{index}-s{seed}-{arm}", **_STEP)
@_logs_warnings
def generalize_arm_task(
    run_dir: str, index: int, arm: str, prepared: dict, seed: int, verbose: int
) -> dict:
    """A fresh S on E's (or bicubic) thumbnails for one seed, trained (best
    validation epoch kept) and evaluated on validation and test."""
    return _small(
        pipeline.train_generalize_arm(
            run_dir, index, arm, prepared, seed=seed, verbose=verbose
        )
    )


@task(name="generalize-report", **_IO_STEP)
def generalize_report_task(run_dir: str, source_name: str) -> dict:
    """metrics.json, report.md, report.html, and the keyed artifacts."""
    interrupt.check()  # A Ctrl-C that something swallowed.
    report = pipeline.write_generalize_report(run_dir)
    _publish(source_name, "generalize", report, "Frozen E vs. bicubic thumbnails")
    return {k: report[k] for k in ("metrics_json", "report_md", "report_html")}


@flow(name="generalize", log_prints=True)
def generalize(params: GeneralizeParams, verbose: int = 2) -> dict:
    """Reuse a trained E, frozen: per (dataset, backbone) and per seed, a fresh
    S on E's thumbnails vs. bicubic thumbnails, same recipe and budget; the
    report gives the difference's mean and spread over seeds.

    Args:
        params: `GeneralizeParams` (source run, factor, experiments, seeds,
            epochs, recipe).
        verbose: Keras progress output.
    """
    try:
        params = _with_deployment_params(params)
        _say_what_smoke_replaced(params)
        params = check_generalize(params.model_dump())
    except _user_errors() as err:
        return _refused(err)
    try:
        run = resolve_generalize_task(params.model_dump())
    except _user_errors() as err:
        return _refused(err)
    config, run_dir = run["config"], run["run_dir"]
    _say_run_folder(run)
    data_dir = config["data_dir"] or os.path.join(config["runs_dir"], "_data")
    results = []
    try:  # A user error in any step: the flow's one line (`_refused`).
        # Every experiment's data first, each checked against E's source
        # (`check_target`): a refusal of the second came after the first's
        # arms had trained, its fix then refused for that run name (a review).
        prepared_all = [
            _prepare(experiment["dataset"], data_dir, config["limit_per_class"])
            for experiment in run["experiments"]
        ]
        for index, prepared in enumerate(prepared_all):
            check_target(run_dir, index, prepared)
        for index, prepared in enumerate(prepared_all):
            for seed in config["seeds"]:
                for arm in GENERALIZE_ARMS:
                    results.append(
                        generalize_arm_task(
                            run_dir, index, arm, prepared, seed, verbose
                        )
                    )
        source = os.path.basename(run["source_run"])
        report = generalize_report_task(
            run_dir, source + ("-smoke" if config.get("smoke") else "")
        )
    except (*_data_errors(), *_user_errors()) as err:
        return _refused(err)
    print(f"report: {os.path.abspath(report['report_html'])}")
    return {
        "run_dir": run_dir,
        **report,
        "top1": {r["id"]: r["top1"] for r in results},
        "val_top1": {r["id"]: r["val_top1"] for r in results},
    }
