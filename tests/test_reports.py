"""Pure report rendering: golden formatting, self-contained HTML, real PNGs."""

from __future__ import annotations

import base64
import re

import numpy as np

from thumbnet_keras.reports import (
    accuracy_vs_flops_png,
    arms_table,
    deployables_table,
    gallery_png,
    render_html,
    render_markdown,
    training_curves_png,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(top5: bool = False) -> dict:
    arms = [
        {
            "name": "teacher",
            "label": "Teacher (full size)",
            "factor": None,
            "input_size": 64,
            "top1": 0.8765,
            "val_top1": 0.9,
            "flops": 12_345_678,
            "params": 1234567,
            "images_per_second": 812.4,
        },
        {
            "name": "thumbnet",
            "label": "ThumbNet (E + S)",
            "factor": 2,
            "input_size": 32,
            "top1": 0.5,
            "val_top1": None,
            "flops": 3_500,
            "params": 99,
            "images_per_second": 2000.6,
        },
    ]
    if top5:
        arms[0]["top5"] = 0.99
        arms[1]["top5"] = 1.0
    return {
        "run_name": "demo <script>alert(1)</script>",
        "dataset": {
            "name": "elpv",
            "num_classes": 4,
            "license": "CC BY-NC-SA 4.0",
            "splits": {"train": 1968, "test": 656},
        },
        "arms": arms,
        "stages": {
            "teacher": {
                "history": {"loss": [1.0, 0.5], "accuracy": [0.5, 0.75]},
                "epochs": 2,
                "seconds": 3.25,
                "resumed_from": [1],
                "selection": {
                    "monitor": "val_accuracy",
                    "best_epoch": 1,
                    "best_value": 0.625,
                },  # fmt: skip
            },
            "f2-joint": {
                "history": {"loss": [2.0], "cl_loss": [1.0]},
                "epochs": 1,
                "seconds": 1.0,
                "resumed_from": [],
                "selection": {"monitor": None, "best_epoch": 1, "reason": "x"},
            },
        },
        "config": {"dataset": "elpv", "factors": [2]},
        "environment": {"backend": "jax", "device": "CPU"},
        "outputs": {"thumbnet.keras": "runs/x/thumbnet.keras"},
    }


def test_arms_table_golden():
    rows = arms_table(_metrics())
    assert rows[0] == {
        "model": "Teacher (full size)",
        "factor": 1,
        "input": "64x64",
        "val top-1 %": "90.00",
        "test top-1 %": "87.65",
        "MACs": "12.35M",
        "params": "1,234,567",
        "images/s": "812",
    }
    assert rows[1]["MACs"] == "3.50K" and rows[1]["images/s"] == "2001"
    assert rows[1]["val top-1 %"] == ""  # no validation split
    assert "test top-5 %" not in rows[0]
    assert arms_table(_metrics(top5=True))[1]["test top-5 %"] == "100.00"


def test_markdown_has_tables_config_and_environment():
    md = render_markdown(_metrics())
    assert (
        "| Teacher (full size) | 1 | 64x64 | 90.00 | 87.65 | 12.35M | 1,234,567 | 812 |"
        in md
    )
    assert "| model | factor | input | val top-1 % | test top-1 % |" in md
    assert "| teacher | 2 | 1 (val 62.50%) | 0.5000 | 75.00 | 3.2 | 1 |" in md
    assert "| f2-joint | 1 | 1 | 2.0000 |" in md
    assert '"factors": [\n    2\n  ]' in md
    assert '"backend": "jax"' in md
    assert "CC BY-NC-SA 4.0" in md
    # The fixture has no validation split: the note must not claim selection.
    assert "No validation split: every model kept its last epoch" in md
    assert "best validation top-1" not in md
    with_val = _metrics()
    with_val["dataset"]["splits"] = {"train": 1771, "validation": 197, "test": 656}
    assert "best validation top-1" in render_markdown(with_val)


def test_html_is_self_contained_and_escaped():
    gallery = {
        "original": [np.full((8, 8, 1), 0.5, np.float32)] * 2,
        "bicubic f=2": [np.zeros((4, 4, 1), np.float32)] * 2,
        "learned f=2": [np.linspace(-1, 2, 48, dtype=np.float32).reshape(4, 4, 3)] * 2,
    }
    page = render_html(_metrics(), gallery)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # accuracy-vs-FLOPs, gallery, training curves
    for data in images:
        assert base64.b64decode(data).startswith(PNG)
    # Nothing loaded from elsewhere: no external src/href, no script.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_html_without_gallery_or_arms():
    metrics = _metrics() | {"arms": []}
    page = render_html(metrics)
    assert len(re.findall(r"data:image/png;base64", page)) == 1  # curves only
    assert "(nothing)" in page


def test_charts_are_pngs():
    assert accuracy_vs_flops_png(_metrics()["arms"]).startswith(PNG)
    assert training_curves_png({}).startswith(PNG)
    assert gallery_png({"a": [np.ones((4, 4, 3))]}).startswith(PNG)


def test_deployables_table_golden():
    metrics = _metrics()
    assert "Deployable models" not in render_markdown(metrics)
    metrics["deployables"] = [
        {"file": "/r/thumbnet_int8.tflite", "format": "litert_int8", "bytes": 2560,
         "images_per_second": 1234.56, "batch_size": 32},
    ]  # fmt: skip
    assert deployables_table(metrics) == [
        {"file": "thumbnet_int8.tflite", "format": "litert_int8", "size KB": "2.5",
         "images/s": "1235", "batch": 32},
    ]  # fmt: skip
    assert (
        "| thumbnet_int8.tflite | litert_int8 | 2.5 | 1235 | 32 |"
        in render_markdown(metrics)
    )
    assert "<h2>Deployable models</h2>" in render_html(metrics)
