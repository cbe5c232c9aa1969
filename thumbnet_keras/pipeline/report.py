"""`write_report`: `metrics.json`, `report.md` and `report.html` of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from thumbnet_keras.pipeline.rundir import read_json, write_json
from thumbnet_keras.pipeline.stages import STAGES, load_run, stage_id

__all__ = ["collect_metrics", "thumbnail_gallery", "write_report"]


def collect_metrics(run_dir: str) -> dict:
    """Everything a report shows, from the run folder's files."""
    run, config = load_run(run_dir)
    saved = run.config()
    data = run.data()
    stages = {}
    ids = ["teacher"] + [stage_id(f, s) for f in config.factors for s in STAGES]
    for sid in ids:
        if run.is_done(sid):
            record = read_json(run.stage_record(sid))
            stages[sid] = {
                k: record.get(k)
                for k in ("history", "epochs", "seconds", "resumed_from", "selection")
            }
            for key in ("bn", "input_size", "equal_cost", "unavailable"):
                if key in record:
                    stages[sid][key] = record[key]
            if sid == "teacher":
                stages[sid]["source"] = record.get("source")
    evaluation = run.file("evaluation.json")
    arms = read_json(evaluation)["arms"] if evaluation.is_file() else []
    exported = run.file("export.json")
    deployables = read_json(exported)["deployables"] if exported.is_file() else []
    outputs = {
        "thumbnet.keras": str(run.file("thumbnet.keras")),
        "thumbnail_model.keras": str(run.file("thumbnail_model.keras")),
        "teacher.keras": str(run.teacher_keras),
        **{
            f"f{f}/thumbnet.keras": str(run.factor_dir(f) / "thumbnet.keras")
            for f in config.factors
        },
        "report.html": str(run.file("report.html")),
        "report.md": str(run.file("report.md")),
    }
    return {
        "run_name": run.name,
        "run_dir": str(run.path),
        "primary_factor": config.factors[0],
        "dataset": {
            k: data.get(k)
            for k in ("name", "license", "num_classes", "class_names", "splits")
        },
        "arms": arms,
        "stages": stages,
        "config": saved["config"],
        "environment": saved["environment"],
        "outputs": outputs,
        "deployables": deployables,
    }


def thumbnail_gallery(run_dir: str, count: int = 4) -> dict[str, list[np.ndarray]]:
    """The first `count` test images, their bicubic and learned thumbnails."""
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.pipeline.datasets import test_batches

    run, config = load_run(run_dir)
    prepared = run.data()
    batches = test_batches(prepared, config.image_size, config.channels, count)
    images, _ = next(iter(batches.as_numpy_iterator()))
    rows = {"original": list(images)}
    shape = (config.image_size, config.image_size, config.channels)
    for factor in config.factors:
        bicubic = bicubic_downscaler(shape, factor)
        rows[f"bicubic f={factor}"] = list(np.asarray(bicubic.predict_on_batch(images)))
        path = run.stage_dir(stage_id(factor, "joint")) / "downscaler.keras"
        if path.is_file():
            learned = keras.saving.load_model(str(path), compile=False)
            rows[f"learned f={factor}"] = list(
                np.asarray(learned.predict_on_batch(images))
            )
    return rows


def write_report(run_dir: str) -> dict:
    """Writes `metrics.json`, `report.md` and `report.html`.

    Returns:
        `{"metrics_json", "report_md", "report_html", "markdown", "table",
        "accuracy_vs_flops_png_base64"}`, the last three for Prefect artifacts.
    """
    import base64

    from thumbnet_keras.pipeline.rundir import atomic_write
    from thumbnet_keras.reports import (
        accuracy_vs_flops_png,
        arms_table,
        render_html,
        render_markdown,
    )

    run, _ = load_run(run_dir)
    metrics = collect_metrics(run_dir)
    write_json(run.metrics_json, metrics)
    markdown = render_markdown(metrics)
    page = render_html(metrics, thumbnail_gallery(run_dir))
    for name, text in (("report.md", markdown), ("report.html", page)):
        atomic_write(run.file(name), lambda tmp, t=text: Path(tmp).write_text(t))
    chart = accuracy_vs_flops_png(metrics["arms"]) if metrics["arms"] else b""
    print(f"[report] {run.file('report.html')}", flush=True)
    return {
        "metrics_json": str(run.metrics_json),
        "report_md": str(run.file("report.md")),
        "report_html": str(run.file("report.html")),
        "markdown": markdown,
        "table": arms_table(metrics),
        "accuracy_vs_flops_png_base64": base64.b64encode(chart).decode("ascii"),
    }
