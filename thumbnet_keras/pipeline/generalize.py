"""The `generalize` run: is a trained downscaler E a generic one?

ThumbNet claims E transfers: frozen, it should serve (a) another dataset and
(b) another backbone. For each experiment `(dataset, backbone)`, a fresh S of
`backbone` at thumbnail size (random init, the same seed for both arms) is
trained with CL on

* `learned`: E's thumbnails (E frozen), and
* `bicubic`: antialiased bicubic thumbnails,

for the same number of epochs, and both are evaluated on the test split. The
report shows what was measured, whichever way it comes out.
"""

from __future__ import annotations

import dataclasses

from thumbnet_keras.pipeline.checkpoint import fit_resumable
from thumbnet_keras.pipeline.config import (
    ConfigError,
    GeneralizeConfig,
    GeneralizeParams,
)
from thumbnet_keras.pipeline.rundir import (
    Run,
    atomic_write,
    check_writable,
    claim,
    default_run_name,
    read_json,
    write_json,
)

__all__ = [
    "ARMS",
    "resolve_generalize",
    "train_generalize_arm",
    "write_generalize_report",
]

ARMS = ("learned", "bicubic")


def _source(config: GeneralizeConfig) -> tuple[Run, dict]:
    source = Run(config.source_run)
    if not source.config_json.is_file():
        raise ConfigError(
            f"Source run {config.source_run!r} is not a thumbnet run folder "
            "(no config.json)."
        )
    saved = source.config()["config"]
    downscaler = source.factor_dir(config.factor) / "downscaler.keras"
    if not downscaler.is_file():
        raise ConfigError(
            f"Source run {config.source_run!r} has no downscaler for factor "
            f"{config.factor} ({downscaler} missing); its factors: {saved['factors']}."
        )
    return source, saved


def resolve_generalize(params: GeneralizeParams | GeneralizeConfig | dict) -> dict:
    """Validates a `generalize` run and claims its folder.

    Returns:
        `{"run_dir", "run_name", "resumed", "config", "experiments":
        [{"dataset", "backbone"}], "image_size", "channels", "downscaler"}`.
    """
    from thumbnet_keras.pipeline.resolve import check_backbone, load_manifest_checked

    if isinstance(params, dict):
        params = GeneralizeParams.model_validate(params)
    config = params.to_config() if isinstance(params, GeneralizeParams) else params
    source, saved = _source(config)
    experiments = []
    for dataset, backbone in config.experiments:
        dataset = dataset or saved["dataset"]
        backbone = backbone or saved["backbone"]
        load_manifest_checked(dataset)
        check_backbone(backbone)
        experiments.append({"dataset": dataset, "backbone": backbone})
    resolved = tuple((e["dataset"], e["backbone"]) for e in experiments)
    config = dataclasses.replace(config, experiments=resolved)
    if config.run_name is None:
        config = dataclasses.replace(
            config, run_name=default_run_name(f"generalize-{source.name}")
        )
    check_writable(config.runs_dir)
    run, resumed = claim(config.run_path, config.to_json(), kind="generalize")
    info = {
        "experiments": experiments,
        "image_size": saved["image_size"],
        "channels": saved["channels"],
        "downscaler": str(source.factor_dir(config.factor) / "downscaler.keras"),
        "source_run": str(source.path),
    }
    write_json(run.file("source.json"), info)
    return {
        "run_dir": str(run.path),
        "run_name": run.name,
        "resumed": resumed,
        "config": config.to_json(),
        **info,
    }


def train_generalize_arm(
    run_dir: str, index: int, arm: str, prepared: dict, verbose: int | str = "auto"
) -> dict:
    """Trains and evaluates a fresh S of experiment `index` on `arm` thumbnails.

    Returns:
        The arm's record: experiment, arm, top1 (top5), flops, params,
        images_per_second, history, seconds.
    """
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.models import backbones
    from thumbnet_keras.pipeline.datasets import run_datasets
    from thumbnet_keras.pipeline.evaluate import compose, evaluate_model

    if arm not in ARMS:
        raise ConfigError(f"Unknown arm {arm!r}; arms: {', '.join(ARMS)}.")
    run = Run(run_dir)
    config = GeneralizeConfig.from_json(run.config()["config"])
    info = read_json(run.file("source.json"))
    experiment = info["experiments"][index]
    sid = f"exp{index}-{arm}"
    if run.is_done(sid):
        print(f"[{sid}] already finished, skipped", flush=True)
        return read_json(run.stage_record(sid)) | {"skipped": True}
    size, channels = info["image_size"], info["channels"]
    shape = (size, size, channels)
    if arm == "learned":
        downscaler = keras.saving.load_model(info["downscaler"], compile=False)
        if tuple(downscaler.inputs[0].shape[1:]) != shape:
            raise ConfigError(
                f"The downscaler takes {downscaler.inputs[0].shape[1:]}, not {shape}."
            )
    else:
        value_range = (0.0, 1.0) if prepared["normalization"] == "unit" else None
        downscaler = bicubic_downscaler(shape, config.factor, value_range=value_range)
    downscaler.trainable = False
    thumb = tuple(downscaler.outputs[0].shape[1:])
    keras.utils.set_random_seed(config.seed + index)
    student = backbones.build(experiment["backbone"], thumb, prepared["num_classes"])
    model = compose(downscaler, student, f"{arm}_student")
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(
        f"[{sid}] {experiment['backbone']} on {experiment['dataset']}, {arm} thumbnails",
        flush=True,
    )
    train, test = run_datasets(prepared, size, channels, config.batch_size, config.seed)
    fit = fit_resumable(
        model, train, config.epochs, run.checkpoint_dir(sid), verbose=verbose
    )
    result = evaluate_model(
        model,
        test,
        prepared["num_classes"],
        config.batch_size,
        config.throughput_batches,
    )
    record = {
        "id": sid,
        "arm": arm,
        **experiment,
        "factor": config.factor,
        **result,
        **fit,
    }
    write_json(run.stage_record(sid), record)
    return record


def write_generalize_report(run_dir: str) -> dict:
    """Writes `metrics.json` and `report.md` / `report.html` of a generalize run.

    Returns:
        `{"report_md", "report_html", "metrics_json", "markdown", "table"}`.
    """
    import html
    from pathlib import Path

    from thumbnet_keras.reports.render import _CSS, _html_table, _md_table

    run = Run(run_dir)
    saved = run.config()
    info = read_json(run.file("source.json"))
    rows, records = [], []
    for index, experiment in enumerate(info["experiments"]):
        result = {}
        for arm in ARMS:
            path = run.stage_record(f"exp{index}-{arm}")
            if path.is_file():
                result[arm] = read_json(path)
                records.append(result[arm])
        if len(result) < len(ARMS):
            continue
        learned, bicubic = result["learned"]["top1"], result["bicubic"]["top1"]
        rows.append(
            {
                "dataset": experiment["dataset"],
                "backbone": experiment["backbone"],
                "learned E top-1 %": f"{100 * learned:.2f}",
                "bicubic top-1 %": f"{100 * bicubic:.2f}",
                "difference (points)": f"{100 * (learned - bicubic):+.2f}",
                "epochs": result["learned"]["epochs"],
            }
        )
    metrics = {
        "run_name": run.name,
        "source_run": info["source_run"],
        "downscaler": info["downscaler"],
        "results": records,
        "config": saved["config"],
        "environment": saved["environment"],
    }
    write_json(run.metrics_json, metrics)
    title = f"ThumbNet generalization: {run.name}"
    intro = (
        f"A frozen downscaler E from `{info['source_run']}` (factor "
        f"{saved['config']['factor']}) against bicubic thumbnails: a fresh S "
        "(random init, same seed) trained with CL on each, same budget, "
        "evaluated on the test split."
    )
    markdown = f"# {title}\n\n{intro}\n\n{_md_table(rows)}"
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(intro)}</p>{_html_table(rows)}</body></html>\n"
    )
    for name, text in (("report.md", markdown), ("report.html", page)):
        atomic_write(run.file(name), lambda tmp, t=text: Path(tmp).write_text(t))
    return {
        "metrics_json": str(run.metrics_json),
        "report_md": str(run.file("report.md")),
        "report_html": str(run.file("report.html")),
        "markdown": markdown,
        "table": rows,
    }
