"""The steps of the `thumbnet` and `generalize` runs, as plain functions.

Each function is one step (one Prefect task in `flows/`), takes and returns
small JSON-able values (paths, metrics), reads its inputs from the run folder,
and can run without Prefect:

    from thumbnet_keras import pipeline

    run = pipeline.resolve_run(pipeline.ThumbNetParams(dataset="elpv", smoke=True))
    cfg = run["config"]
    data = pipeline.prepare_dataset(cfg["dataset"], cfg["data_dir"] or "runs/_data",
                                    cfg["limit_per_class"])
    pipeline.get_teacher(run["run_dir"], data)
    for factor in cfg["factors"]:
        for stage in pipeline.STAGES:
            pipeline.train_stage(run["run_dir"], factor, stage)
    pipeline.evaluate_run(run["run_dir"])
    pipeline.export_run(run["run_dir"])
    pipeline.write_report(run["run_dir"])

`run_thumbnet` does exactly that.
"""

# The parameter models are cheap (pydantic only) and imported now; every
# step is imported on first use (PEP 562), so the CLI can check a run's
# parameters before Keras, TensorFlow or Prefect start.
from thumbnet_keras.pipeline.config import (
    ConfigError,
    GeneralizeConfig,
    GeneralizeParams,
    RunConfig,
    ThumbNetParams,
)

_LAZY = {
    "reestimate_batchnorm": "bn_recalibrate",
    "prepare_dataset": "datasets",
    "prepared_dir": "datasets",
    "evaluate_run": "evaluate",
    "export_model": "export",
    "export_run": "export",
    "resolve_generalize": "generalize",
    "train_generalize_arm": "generalize",
    "write_generalize_report": "generalize",
    "write_report": "report",
    "resolve_run": "resolve",
    "Run": "rundir",
    "STAGES": "stages",
    "get_teacher": "stages",
    "train_stage": "stages",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "STAGES",
    "ConfigError",
    "GeneralizeConfig",
    "GeneralizeParams",
    "Run",
    "RunConfig",
    "ThumbNetParams",
    "evaluate_run",
    "export_model",
    "export_run",
    "get_teacher",
    "prepare_dataset",
    "prepared_dir",
    "reestimate_batchnorm",
    "resolve_generalize",
    "resolve_run",
    "run_thumbnet",
    "train_generalize_arm",
    "train_stage",
    "write_generalize_report",
    "write_report",
]


def run_thumbnet(params, verbose="auto") -> dict:
    """Runs every step of a `thumbnet` run in this process, without Prefect."""
    import os

    from thumbnet_keras.pipeline.datasets import prepare_dataset
    from thumbnet_keras.pipeline.evaluate import evaluate_run
    from thumbnet_keras.pipeline.export import export_run
    from thumbnet_keras.pipeline.report import write_report
    from thumbnet_keras.pipeline.resolve import resolve_run
    from thumbnet_keras.pipeline.stages import STAGES, get_teacher, train_stage

    run = resolve_run(params)
    cfg = run["config"]
    data_dir = cfg["data_dir"] or os.path.join(cfg["runs_dir"], "_data")
    data = prepare_dataset(cfg["dataset"], data_dir, cfg["limit_per_class"])
    get_teacher(run["run_dir"], data, verbose=verbose)
    for factor in cfg["factors"]:
        for stage in STAGES:
            train_stage(run["run_dir"], factor, stage, verbose=verbose)
    evaluate_run(run["run_dir"])
    exported = export_run(run["run_dir"])
    report = write_report(run["run_dir"])
    return {"run_dir": run["run_dir"], **exported, "report_html": report["report_html"]}
