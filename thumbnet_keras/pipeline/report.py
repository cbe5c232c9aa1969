"""`write_report`: `metrics.json`, `report.md`, `report.html` and the
report's images (`report_images/*.png`, linked from `report.md`) of a run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from thumbnet_keras.pipeline.rundir import read_json, write_json
from thumbnet_keras.pipeline.stages import STAGES, load_run, stage_id

__all__ = [
    "class_shares",
    "collect_metrics",
    "save_report",
    "thumbnail_gallery",
    "write_report",
]

logger = logging.getLogger(__name__)

IMAGES_DIR = "report_images"
_GALLERY_MODELS = {  # row kind -> the arms that classify that row's images
    "bicubic": ("teacher_bicubic_bn", "bicubic_cl", "bicubic_kd"),
}


def class_shares(prepared_dir: str) -> dict[str, list[int]]:
    """Examples per class of every split of a prepared dataset: `{split:
    [count of class 0, ...]}` (from its index; {} when it cannot be read)."""
    try:
        from thumbnet_keras.data import PreparedDataset

        prepared = PreparedDataset.load(prepared_dir)
        table = prepared.read_index(["split", "label", "status"]).to_pydict()
    except Exception:  # A report never fails on this optional figure.
        return {}
    counts: dict[str, list[int]] = {}
    for split, label, status in zip(table["split"], table["label"], table["status"]):
        if status != "ok" or not split:
            continue
        row = counts.setdefault(split, [0] * prepared.num_classes)
        row[int(label)] += 1
    return counts


def majority_shares(prepared_dir: str) -> dict[str, float]:
    """The share of the most frequent class per split (what always answering
    that class scores)."""
    return {
        split: max(row) / sum(row)
        for split, row in class_shares(prepared_dir).items()
        if sum(row)
    }


def _health(run, stages: dict) -> dict | None:
    """The run's health (`health.json`, written by `pipeline.health`), or,
    without one, the problems its stage records report; None when neither
    says anything."""
    path = run.file("health.json")
    if path.is_file():
        try:
            return read_json(path)
        except ValueError:  # Unreadable: fall back on the stage records.
            pass
    problems, worst = [], "ok"
    for sid, stage in stages.items():
        entry = stage.get("health")
        if isinstance(entry, dict) and entry.get("status") not in (None, "ok"):
            worst = "failed" if "failed" in (worst, entry["status"]) else "degraded"
            for text in entry.get("problems") or [entry["status"]]:
                problems.append(f"{sid}: {text}")
    return {"status": worst, "problems": problems} if problems else None


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
            for key in (
                "bn",
                "input_size",
                "equal_cost",
                "unavailable",
                "health",
                "replicas",
            ):
                if key in record:
                    stages[sid][key] = record[key]
            if sid == "teacher":
                stages[sid]["source"] = record.get("source")
                stages[sid]["backbone"] = record.get("backbone")
    evaluation = run.file("evaluation.json")
    arms = read_json(evaluation)["arms"] if evaluation.is_file() else []
    exported = run.file("export.json")
    deployables = read_json(exported)["deployables"] if exported.is_file() else []
    models = {
        "thumbnet.keras": run.file("thumbnet.keras"),
        "thumbnail_model.keras": run.file("thumbnail_model.keras"),
        "teacher.keras": run.teacher_keras,
        **{
            f"f{f}/thumbnet.keras": run.factor_dir(f) / "thumbnet.keras"
            for f in config.factors
        },
    }
    outputs = {
        # Only models that exist (a failed run exports none).
        **{k: str(p) for k, p in models.items() if p.is_file()},
        "report.html": str(run.file("report.html")),
        "report.md": str(run.file("report.md")),
        "metrics.json": str(run.metrics_json),
    }
    dataset = {
        k: data.get(k)
        for k in ("name", "license", "num_classes", "class_names", "splits")
    }
    dataset["majority"] = majority_shares(data.get("prepared_dir", ""))
    metrics = {
        "run_name": run.name,
        "run_dir": str(run.path),
        "primary_factor": config.factors[0],
        "dataset": dataset,
        "arms": arms,
        "stages": stages,
        "config": saved["config"],
        "environment": saved["environment"],
        "outputs": outputs,
        "deployables": deployables,
    }
    health = _health(run, stages)
    if health:
        metrics["health"] = health
    return metrics


def _pick_examples(batches, count: int, num_classes: int):
    """Up to `count` test images, one per class first (in test order), then
    the next ones: `(images, labels)`."""
    chosen, rest, seen = [], [], set()
    for images, labels in batches.as_numpy_iterator():
        for image, label in zip(images, labels):
            label = int(label)
            if label not in seen and len(chosen) < count:
                seen.add(label)
                chosen.append((image, label))
            elif len(rest) < count:
                rest.append((image, label))
        if len(chosen) >= min(count, num_classes):
            break
    chosen += rest[: count - len(chosen)]
    return np.stack([c[0] for c in chosen]), [c[1] for c in chosen]


def thumbnail_gallery(run_dir: str, count: int = 4) -> dict:
    """Test images (one per class where possible), their bicubic and learned
    thumbnails, the true labels and every model's prediction.

    Returns:
        `{"rows": {"original": [...], "bicubic f=2": [...], "learned f=2":
        [...], ...}, "truth": [class name per image], "predictions": {row:
        {model: [predicted class name per image]}}}` (see
        `reports.charts.gallery_figure`).
    """
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler
    from thumbnet_keras.pipeline.datasets import test_batches
    from thumbnet_keras.reports.render import SHORT_LABELS

    run, config = load_run(run_dir)
    prepared = run.data()
    names = list(prepared["class_names"])
    batches = test_batches(
        prepared, config.image_size, config.channels, config.batch_size
    )
    images, labels = _pick_examples(
        batches, max(count, 1), int(prepared["num_classes"])
    )

    def load(path):
        return keras.saving.load_model(str(path), compile=False)

    def classes(model, inputs) -> list[str]:
        logits = np.asarray(model.predict_on_batch(inputs))
        return [names[int(i)] for i in logits.argmax(axis=-1)]

    rows = {"original": list(images)}
    predictions = {"original": {"Teacher": classes(load(run.teacher_keras), images)}}
    shape = (config.image_size, config.image_size, config.channels)
    value_range = (0.0, 1.0) if prepared.get("normalization") == "unit" else None
    for factor in config.factors:
        title = f"bicubic f={factor}"
        bicubic = bicubic_downscaler(shape, factor, value_range=value_range)
        thumbs = np.asarray(bicubic.predict_on_batch(images))
        rows[title] = list(thumbs)
        predictions[title] = {}
        for stage in _GALLERY_MODELS["bicubic"]:
            path = run.stage_dir(stage_id(factor, stage)) / "student.keras"
            if path.is_file():
                predictions[title][SHORT_LABELS[stage]] = classes(load(path), thumbs)
        joint = run.stage_dir(stage_id(factor, "joint"))
        if (joint / "downscaler.keras").is_file():
            learned = np.asarray(
                load(joint / "downscaler.keras").predict_on_batch(images)
            )
            rows[f"learned f={factor}"] = list(learned)
            if (joint / "student.keras").is_file():
                student = load(joint / "student.keras")
                predictions[f"learned f={factor}"] = {
                    SHORT_LABELS["thumbnet"]: classes(student, learned)
                }
    return {
        "rows": rows,
        "truth": [names[label] for label in labels],
        "predictions": predictions,
    }


def save_report(folder: str, metrics: dict, gallery: dict | None = None) -> dict:
    """Writes `metrics.json`, the report's images (`report_images/*.png`),
    `report.md` (linking them) and `report.html` (embedding them) into
    `folder`, each atomically.

    Args:
        folder: the run folder.
        metrics: see `reports.render`.
        gallery: see `reports.render.report_images`, or None.

    Returns:
        `{"metrics_json", "report_md", "report_html", "images": {key: path},
        "markdown", "table", "accuracy_vs_flops_png_base64"}`, the last three
        for Prefect artifacts ("markdown": `report.md` without its image
        links, which a Prefect UI cannot follow).
    """
    import base64

    from thumbnet_keras.pipeline.rundir import Run, atomic_write
    from thumbnet_keras.reports import (
        IMAGES,
        arms_table,
        render_html,
        render_markdown,
        report_images,
    )

    run = Run(folder)
    write_json(run.metrics_json, metrics)
    pngs = report_images(metrics, gallery)
    links, paths = {}, {}
    for key, png in pngs.items():
        relative = f"{IMAGES_DIR}/{IMAGES[key][0]}"
        atomic_write(run.file(relative), lambda tmp, b=png: Path(tmp).write_bytes(b))
        links[key], paths[key] = relative, str(run.file(relative))
    markdown = render_markdown(metrics, links)
    page = render_html(metrics, images=pngs)
    for name, text in (("report.md", markdown), ("report.html", page)):
        atomic_write(run.file(name), lambda tmp, t=text: Path(tmp).write_text(t))
    chart = pngs.get("accuracy_vs_macs", b"")
    return {
        "metrics_json": str(run.metrics_json),
        "report_md": str(run.file("report.md")),
        "report_html": str(run.file("report.html")),
        "images": paths,
        # The Prefect artifact: no links to files the UI cannot reach (the
        # accuracy chart is published as its own image artifact).
        "markdown": render_markdown(metrics),
        "table": arms_table(metrics),
        "accuracy_vs_flops_png_base64": base64.b64encode(chart).decode("ascii"),
    }


def write_report(run_dir: str) -> dict:
    """`save_report` of the run's `collect_metrics` and `thumbnail_gallery`.

    Returns:
        See `save_report`.
    """
    run, _ = load_run(run_dir)
    try:
        gallery = thumbnail_gallery(run_dir)
    except Exception as err:  # noqa: BLE001 - the report must still be written
        # (a failed run may lack a stage's models); say what is missing.
        logger.warning("[report] thumbnail gallery left out: %s", err)
        gallery = None
    report = save_report(str(run.path), collect_metrics(run_dir), gallery)
    logger.info("[report] %s", report["report_html"])
    return report
