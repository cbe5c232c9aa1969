"""Pure rendering of a run's metrics into `report.md` and a self-contained
`report.html` (charts inline as base64 PNG; no external file or URL).

`metrics` is the dict written to `metrics.json`:

    run_name, primary_factor
    dataset: {name, license, num_classes, class_names, splits}
    arms: [{name, label, factor, input_size, top1 (test), val_top1, [top5],
            flops, params, images_per_second, examples}]
    stages: {stage id: {history, epochs, seconds, resumed_from, selection,
             ...}}
    config: the resolved RunConfig
    environment: {backend, device, python, platform, versions}
    outputs: {name: path}
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from thumbnet_keras.reports.charts import (
    accuracy_vs_flops_png,
    gallery_png,
    training_curves_png,
)

__all__ = ["arms_table", "deployables_table", "render_html", "render_markdown"]


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _flops(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def arms_table(metrics: Mapping) -> list[dict]:
    """One row per evaluated model, ready for a table (strings and numbers).

    Columns: model, factor, input, val top-1 % (validation split; the
    trained arms' epochs were selected on it), test top-1 %, test top-5 %
    (when measured), MACs, params, images/s.
    """
    arms = metrics.get("arms", [])
    with_top5 = any("top5" in a for a in arms)
    rows = []
    for arm in arms:
        row = {
            "model": arm["label"],
            "factor": arm.get("factor") or 1,
            "input": f"{arm['input_size']}x{arm['input_size']}",
            "val top-1 %": _pct(arm.get("val_top1")),
            "test top-1 %": _pct(arm["top1"]),
        }
        if with_top5:
            row["test top-5 %"] = _pct(arm.get("top5"))
        row.update(
            {
                "MACs": _flops(int(arm["flops"])),
                "params": f"{int(arm['params']):,}",
                "images/s": f"{arm['images_per_second']:.0f}",
            }
        )
        rows.append(row)
    return rows


def _md_table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return "_(nothing evaluated)_\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in head) + " |")
    return "\n".join(lines) + "\n"


def _stage_rows(metrics: Mapping) -> list[dict]:
    rows = []
    for sid, stage in metrics.get("stages", {}).items():
        history = stage.get("history") or {}
        last = {k: v[-1] for k, v in history.items() if v}
        selection = stage.get("selection") or {}
        kept = selection.get("best_epoch")
        if selection.get("best_value") is not None:
            kept = f"{kept} (val {_pct(selection['best_value'])}%)"
        rows.append(
            {
                "stage": sid,
                "epochs": stage.get("epochs", 0),
                "kept epoch": "" if kept is None else str(kept),
                "final loss": f"{last['loss']:.4f}" if "loss" in last else "",
                "train acc %": _pct(last.get("accuracy")) if "accuracy" in last else "",
                "seconds": f"{stage.get('seconds', 0):.1f}",
                "resumed at epoch": ", ".join(map(str, stage.get("resumed_from", []))),
            }
        )
    return rows


def deployables_table(metrics: Mapping) -> list[dict]:
    """One row per exported file (`export.json`): format, size, images/s."""
    return [
        {
            "file": os.path.basename(d["file"]),
            "format": d["format"],
            "size KB": f"{d['bytes'] / 1024:.1f}",
            "images/s": f"{d['images_per_second']:.0f}",
            "batch": d["batch_size"],
        }
        for d in metrics.get("deployables", [])
    ]


_DEPLOY_NOTE = (
    "thumbnet.keras and its exports (docs/deploy.md); images/s: measured on "
    "this machine at the batch size shown, each in its own runtime (Keras, "
    "ONNX Runtime, LiteRT)."
)


def _summary(metrics: Mapping) -> str:
    dataset = metrics.get("dataset", {})
    env = metrics.get("environment", {})
    splits = ", ".join(f"{k} {v}" for k, v in dataset.get("splits", {}).items())
    return (
        f"Dataset **{dataset.get('name', '?')}** ({dataset.get('num_classes', '?')} "
        f"classes; {splits}; licence: {dataset.get('license', '?')}). "
        f"Keras backend **{env.get('backend', '?')}** on {env.get('device', '?')}."
    )


_COST_NOTE = (
    "MACs: multiply-adds per image of the whole inference model (the "
    "downscaler included); images/s: measured on this machine."
)


def _results_note(metrics: Mapping) -> str:
    """What the table's numbers are, from how the stages were selected."""
    splits = metrics.get("dataset", {}).get("splits", {})
    if splits.get("validation"):
        selection = (
            "Each model trained with labels kept the epoch of its best "
            "validation top-1 (FM pre-training, which has no labels, its last "
            "epoch); the test split was evaluated once, at the end."
        )
    else:
        selection = (
            "No validation split: every model kept its last epoch; the test "
            "split was evaluated once, at the end."
        )
    return f"{selection} {_COST_NOTE}"


def render_markdown(metrics: Mapping) -> str:
    """`report.md`: the tables and the resolved config (no images)."""
    parts = [
        f"# ThumbNet report: {metrics.get('run_name', '')}\n",
        _summary(metrics) + "\n",
        "## Results\n",
        _results_note(metrics) + "\n",
        _md_table(arms_table(metrics)),
        "## Training stages\n",
        _md_table(_stage_rows(metrics)),
        "## Outputs\n",
        "\n".join(f"- {k}: `{v}`" for k, v in metrics.get("outputs", {}).items())
        + "\n",
        *(
            [
                "## Deployable models\n",
                _DEPLOY_NOTE + "\n",
                _md_table(deployables_table(metrics)),
            ]
            if metrics.get("deployables")
            else []
        ),
        "## Resolved config\n",
        "```json\n" + json.dumps(metrics.get("config", {}), indent=2) + "\n```\n",
        "## Environment\n",
        "```json\n" + json.dumps(metrics.get("environment", {}), indent=2) + "\n```\n",
    ]
    return "\n".join(parts)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return "<p><em>(nothing)</em></p>"
    head = list(rows[0])
    out = ["<table><thead><tr>"]
    out += [f"<th>{html.escape(str(h))}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(
            "<tr>"
            + "".join(f"<td>{html.escape(str(row[k]))}</td>" for k in head)
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
"""


def render_html(
    metrics: Mapping, gallery: Mapping[str, Sequence[np.ndarray]] | None = None
) -> str:
    """`report.html`: self-contained (inline CSS and base64 PNG charts).

    Args:
        metrics: see the module docstring.
        gallery: row title -> list of images (original, bicubic, learned
            thumbnails); None or empty: no gallery section.
    """
    title = f"ThumbNet report: {metrics.get('run_name', '')}"
    summary = html.escape(_summary(metrics)).replace("**", "")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{summary}</p>",
        "<h2>Results</h2>",
        f"<p>{html.escape(_results_note(metrics))}</p>",
        _html_table(arms_table(metrics)),
    ]
    if metrics.get("arms"):
        sections.append(
            _img(accuracy_vs_flops_png(metrics["arms"]), "accuracy vs FLOPs")
        )
    if gallery:
        sections += [
            "<h2>Thumbnails</h2>",
            "<p>Test images: the original, the bicubic thumbnail and the learned "
            "thumbnail of E, for every factor.</p>",
            _img(gallery_png(gallery), "thumbnail gallery"),
        ]
    sections += [
        "<h2>Training</h2>",
        _html_table(_stage_rows(metrics)),
        _img(training_curves_png(metrics.get("stages", {})), "training curves"),
        "<h2>Outputs</h2><ul>",
        *(
            f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>"
            for k, v in metrics.get("outputs", {}).items()
        ),
        "</ul>",
        *(
            [
                "<h2>Deployable models</h2>",
                f"<p>{html.escape(_DEPLOY_NOTE)}</p>",
                _html_table(deployables_table(metrics)),
            ]
            if metrics.get("deployables")
            else []
        ),
        "<h2>Resolved config</h2>",
        f"<pre>{html.escape(json.dumps(metrics.get('config', {}), indent=2))}</pre>",
        "<h2>Environment</h2>",
        f"<pre>{html.escape(json.dumps(metrics.get('environment', {}), indent=2))}</pre>",
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
