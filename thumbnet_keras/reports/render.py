"""Pure rendering of a run's metrics into `report.md` and a self-contained
`report.html` (charts inline as base64 PNG; no external file or URL).

`metrics` is the dict written to `metrics.json`:

    run_name, primary_factor (the factor of the top-level thumbnet.keras)
    dataset: {name, license, num_classes, class_names, splits,
              [majority: {split: the most frequent class's share}]}
    arms: [{name, label, factor, input_size, top1 (test), val_top1, [top5],
            flops, params, images_per_second, examples}]
    stages: {stage id: {history, epochs, seconds, resumed_from, selection,
             ...}}
    config: the resolved RunConfig
    environment: {backend, device, python, platform, versions}
    outputs: {name: path}
    [health]: {status: "ok" | "degraded" | "failed", problems: [...]}, from
              the run's health checks when it has them (`health_warnings`)

The report opens with the health warnings (if any) and `headline`, one
sentence of what the run produced.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence

from thumbnet_keras.reports.charts import (
    accuracy_vs_flops_png,
    gallery_png,
    training_curves_png,
    validation_curves_png,
)

__all__ = [
    "IMAGES",
    "arms_table",
    "caveats",
    "deployables_table",
    "headline",
    "health_warnings",
    "paired_table",
    "render_html",
    "render_markdown",
    "report_images",
]

# Arms that classify a bicubic thumbnail (the baselines ThumbNet must beat).
BICUBIC_ARMS = (
    "teacher_bicubic",
    "teacher_bicubic_bn",
    "bicubic_cl",
    "bicubic_kd",
    "bicubic_kd_equal",
)
SHORT_LABELS = {
    "teacher": "Teacher",
    "teacher_bicubic": "Teacher on bicubic",
    "teacher_bicubic_bn": "Teacher on bicubic + BN",
    "bicubic_cl": "Bicubic + CL",
    "bicubic_kd": "Bicubic + KD",
    "bicubic_kd_equal": "Bicubic + KD, larger thumbnail",
    "thumbnet": "ThumbNet",
}


def cost_ratio(arm: Mapping, arms: Sequence[Mapping]) -> float | None:
    """The equal-cost arm's MACs over ThumbNet's at its factor (the smallest
    larger thumbnail costing at least E + S can cost much more where S's
    maps round up: 9x9 at 2.3x on a 28x28 tiny CNN at f = 4); None for any
    other arm or without ThumbNet's MACs."""
    if arm.get("name") != "bicubic_kd_equal":
        return None
    ours = next(
        (a for a in arms if a["name"] == "thumbnet" and a["factor"] == arm["factor"]),
        None,
    )
    if not ours or not ours.get("flops") or not arm.get("flops"):
        return None
    return arm["flops"] / ours["flops"]


def arm_label(arm: Mapping, arms: Sequence[Mapping]) -> str:
    """`arm`'s short name for a sentence or the paired table (SHORT_LABELS;
    its own label when absent); the equal-cost arm's says what it costs:
    "Bicubic + KD, larger thumbnail at 1.02x ThumbNet's MACs"."""
    label = SHORT_LABELS.get(arm["name"], arm.get("label", arm["name"]))
    ratio = cost_ratio(arm, arms)
    return label if ratio is None else f"{label} at {ratio:.2f}x ThumbNet's MACs"


THROUGHPUT_NOTE = (
    "images/s: this machine, the run's batch size, every model timed side "
    "by side (the median of its calls); small models at small batches are "
    "bound by per-call overhead, so MACs are the better guide there."
)


def _pct1(value: float) -> str:
    return f"{100 * value:.1f}%"


def _best_baseline(baselines: Sequence[Mapping]) -> tuple[Mapping, str]:
    """The bicubic arm ThumbNet is compared with, and the split it was
    chosen on: the highest validation top-1, as a user would pick one
    without seeing test (picking the best of five on test, then giving the
    paired interval as if it had been fixed, says "behind" about twice as
    often as a 95% interval should: a trial's simulation, 4.7% vs 1.9%).
    Test only when some arm has no validation score (a run without a
    validation split). Ties: a trained arm before the teacher's own
    weights, then the cheaper, then the later recipe of `BICUBIC_ARMS`, so
    the arm named never depends on the table's order."""
    split = "validation"
    if any(a.get("val_top1") is None for a in baselines):
        split = "test"

    def rank(arm: Mapping) -> tuple:
        score = arm["val_top1"] if split == "validation" else arm["top1"]
        untrained = arm["name"] in ("teacher_bicubic", "teacher_bicubic_bn")
        order = BICUBIC_ARMS.index(arm["name"]) if arm["name"] in BICUBIC_ARMS else -1
        return (score, not untrained, -(arm.get("flops") or 0), order)

    return max(baselines, key=rank), split


def headline(metrics: Mapping) -> str:
    """One sentence of what the run produced, primary factor first:

    "ThumbNet f=2: 68.8% test top-1 at 3.9× fewer MACs; teacher 72.4%, best
    bicubic baseline 67.1% (Bicubic + KD; the best on validation)." and, per
    other factor, "ThumbNet f=4: ... at ...× fewer MACs; best bicubic
    baseline ...". "Best" is the bicubic arm of that factor with the highest
    validation top-1 (`_best_baseline`: chosen without test, so the paired
    interval below is a 95% interval). When the run has
    paired comparisons (`evaluate_run`), each factor's sentence adds
    ThumbNet's difference to that baseline on the same test images, its 95%
    interval and whether ThumbNet is "ahead", "behind" or shows "no clear
    difference" (the interval holds 0).
    """
    arms = metrics.get("arms", [])
    teacher = next((a for a in arms if a["name"] == "teacher"), None)
    thumbnets = {a["factor"]: a for a in arms if a["name"] == "thumbnet"}
    if not thumbnets:
        if teacher is not None:
            return (
                f"Teacher {_pct1(teacher['top1'])} test top-1; no ThumbNet evaluated."
            )
        return "Nothing evaluated yet."
    primary = metrics.get("primary_factor")
    factors = sorted(thumbnets, key=lambda f: (f != primary, f))
    sentences = []
    for i, factor in enumerate(factors):
        arm = thumbnets[factor]
        text = f"ThumbNet f={factor}: {_pct1(arm['top1'])} test top-1"
        if teacher is not None and arm["flops"]:
            ratio = teacher["flops"] / arm["flops"]
            if ratio >= 1:
                text += f" at {ratio:.1f}× fewer MACs"
            else:  # E + S costs more than T (a tiny teacher, a large E).
                text += f" at {1 / ratio:.1f}× more MACs than the teacher"
        extra = []
        if i == 0 and teacher is not None:
            extra.append(f"teacher {_pct1(teacher['top1'])}")
        baselines = [
            a for a in arms if a["name"] in BICUBIC_ARMS and a["factor"] == factor
        ]
        paired = ""
        if baselines:
            best, split = _best_baseline(baselines)
            chosen = (
                "the best on validation"
                if split == "validation"
                else "the best on test: no validation scores"
            )
            extra.append(
                f"best bicubic baseline {_pct1(best['top1'])} "
                f"({arm_label(best, arms)}; {chosen})"
            )
            paired = _paired_clause(arm, best["name"])
        sentences.append(
            text + ("; " + ", ".join(extra) if extra else "") + paired + "."
        )
    return " ".join(sentences)


def caveats(metrics: Mapping) -> list[str]:
    """What the reader must know before trusting the comparison, as
    sentences; [] when nothing: a teacher no better than the largest class
    on test, or a teacher its own students beat on the same test images
    (paired interval above 0). Students start from the
    teacher's weights and train further, so that teacher is under-trained,
    and ThumbNet's gain over it says nothing about the method."""
    arms = metrics.get("arms", [])
    teacher = next((a for a in arms if a["name"] == "teacher"), None)
    if teacher is None:
        return []
    majority = _majority(metrics)
    if majority is not None and teacher["top1"] <= majority + 1e-9:
        # Health reads validation; a teacher that passed there can still be
        # no better than always answering one class on test (a report
        # reader's trial: 21.7% against 25%, and no word of it).
        return [
            f"The teacher scores {_pct1(teacher['top1'])} test top-1, no more than "
            f"always answering the largest class ({_pct1(majority)}): it has not "
            "learned the task, so nothing here says what ThumbNet does. "
            + _teacher_fix(metrics, "")
        ]
    from thumbnet_keras.evaluation.paired import verdict

    ahead = [
        (arm["factor"], p)
        for arm in arms
        if arm["name"] == "thumbnet"
        for p in arm.get("paired") or []
        if p.get("versus") == "teacher" and verdict(p) == "ahead"
    ]
    if not ahead:
        return []
    which = "; ".join(
        f"f={f} by {_points(p['difference'])} points (95% CI "
        f"{_points(p['ci95'][0])} to {_points(p['ci95'][1])})"
        for f, p in ahead
    )
    return [
        f"ThumbNet beats its own teacher ({_pct1(teacher['top1'])} test top-1) "
        f"on the same test images: {which}. Students start from the teacher's "
        "weights and train further, so this teacher is under-trained. "
        + _teacher_fix(metrics, " before reading the comparison")
        + " Distilling a weak teacher caps what ThumbNet learns."
    ]


def _teacher_fix(metrics: Mapping, when: str) -> str:
    """What to do about a weak teacher: train it longer when the run trained
    it; a teacher brought in is more often fed other images than it learned
    on (a keras-hub task scored 25% without its converter, and the note
    said --teacher-epochs, which does nothing then)."""
    teacher = metrics.get("stages", {}).get("teacher") or {}
    if teacher.get("source") in (None, "trained"):
        return f"Train it longer (--teacher-epochs) or bring a stronger one{when}."
    return (
        "It was given, not trained here: check that it is fed the images it "
        "was trained on (the manifest's `normalization`, channels, class "
        f"order), or bring a stronger one{when}."
    )


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _paired_clause(arm: Mapping, versus: str) -> str:
    """ ": ThumbNet +1.2 points (95% CI -0.9 to +3.3) on 656 test images, no
    clear difference" for `arm`'s paired comparison with `versus`; "" when
    the run was evaluated before paired comparisons existed."""
    from thumbnet_keras.evaluation.paired import verdict

    found = [p for p in arm.get("paired") or [] if p.get("versus") == versus]
    if not found:
        return ""
    p = found[0]
    if p["a_only"] == p["b_only"] == 0:
        return f": the two get exactly the same of {p['examples']} test images right"
    low, high = p["ci95"]
    # The interval is conditional on the disagreements (`evaluation.paired`):
    # from a handful it reads tighter than the evidence is (a trial's "-2.0
    # points (95% CI -2.0 to +1.9)" came from one image), so say how many.
    disagree = p["a_only"] + p["b_only"]
    few = (
        f", from only {disagree} image{'s' if disagree > 1 else ''} the two disagree on"
        if disagree < FEW_DISAGREEMENTS
        else ""
    )
    return (
        f": ThumbNet {_points(p['difference'])} points "
        f"(95% CI {_points(low)} to {_points(high)}{few}) on {p['examples']} test "
        f"images, {verdict(p)}"
    )


# Below this many images on which two models disagree, the headline says how
# many its interval rests on.
FEW_DISAGREEMENTS = 20


_HEALTHY = ("ok", "healthy", "passed", None)


def health_warnings(metrics: Mapping) -> list[str]:
    """What the run's health checks found, as sentences; [] when the run is
    healthy or was not checked.

    Reads `metrics["health"]`: `{"status": ..., "problems" | "messages" |
    "warnings" | "checks": [str or {"message": ...}]}`, or a status string.
    """
    health = metrics.get("health")
    if not health:
        return []
    if isinstance(health, str):
        status, items = health, []
    else:
        status = health.get("status")
        items = []
        for key in ("problems", "messages", "warnings", "checks"):
            items += list(health.get(key) or [])
    texts = []
    for item in items:
        if isinstance(item, Mapping):
            if item.get("ok") is True or item.get("status") in ("ok", "passed"):
                continue
            item = item.get("message") or json.dumps(dict(item), sort_keys=True)
        texts.append(str(item))
    if status in _HEALTHY and not texts:
        return []
    head = (
        f"This run is marked {str(status).upper()} by its health checks"
        if status not in _HEALTHY
        else "The run's health checks reported problems"
    )
    return [head + (":" if texts else "."), *texts]


def _full_size_note(metrics: Mapping) -> str:
    size = (metrics.get("config") or {}).get("image_size")
    primary = metrics.get("primary_factor")
    parts = []
    if size:
        parts.append(
            f'"Full size" is this run\'s `image_size`, {size}x{size} (every '
            "image's central square is resized to it; the teacher's input); "
            "a factor f gives "
            f"thumbnails of {size}/f."
        )
    if primary:
        parts.append(
            f"The top-level `thumbnet.keras` is the model of f={primary} "
            "(the first factor); every factor's is in `f<factor>/`."
        )
    return " ".join(parts)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _flops(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


_PAIRED_NOTE = (
    "ThumbNet against each model on the same test images: the difference in "
    "test top-1 (points), its 95% interval, the images only one of the two "
    "gets right, and McNemar's exact p. An interval that holds 0 means the "
    "test set cannot tell the two apart; it says nothing of another training "
    "seed, with which the gap between two models changes too."
)


def paired_table(metrics: Mapping) -> list[dict]:
    """One row per (ThumbNet factor, other model) from the ThumbNet arms'
    `paired` comparisons (`pipeline.evaluate.paired_comparisons`); [] for a
    run evaluated before they existed."""
    from thumbnet_keras.evaluation.paired import verdict

    arms = metrics.get("arms", [])
    rows = []
    for arm in arms:
        for p in arm.get("paired") or []:
            low, high = p["ci95"]
            other = next(
                (
                    a
                    for a in arms
                    if a["name"] == p["versus"] and a["factor"] in (None, arm["factor"])
                ),
                {"name": p["versus"]},
            )
            rows.append(
                {
                    "factor": arm["factor"],
                    "ThumbNet vs": arm_label(other, arms),
                    "difference (points)": _points(p["difference"]),
                    "95% CI": f"{_points(low)} to {_points(high)}",
                    "only ThumbNet right": p["a_only"],
                    "only the other right": p["b_only"],
                    "McNemar p": f"{p['p_value']:.3g}",
                    "verdict": verdict(p),
                }
            )
    return rows


def arms_table(metrics: Mapping) -> list[dict]:
    """One row per evaluated model, ready for a table (strings and numbers).

    Columns: model, factor, thumbnail (the side S classifies; every model
    takes the full-size image), val top-1 % (validation split; the trained
    arms' epochs were selected on it), test top-1 %, test top-5 % (when
    measured), MACs, fewer MACs (the teacher's over the model's), params,
    images/s.
    """
    arms = metrics.get("arms", [])
    with_top5 = any("top5" in a for a in arms)
    teacher = next((a for a in arms if a["name"] == "teacher"), None)
    rows = []
    for arm in arms:
        side = f"{arm['input_size']}x{arm['input_size']}"
        row = {
            "model": arm["label"],  # MACs and the ratio: their own columns
            "factor": arm.get("factor") or 1,
            "thumbnail": f"none ({side})" if arm["name"] == "teacher" else side,
            "val top-1 %": _pct(arm.get("val_top1")),
            "test top-1 %": _pct(arm["top1"]),
        }
        if with_top5:
            row["test top-5 %"] = _pct(arm.get("top5"))
        row.update(
            {
                "MACs": _flops(int(arm["flops"])),
                "fewer MACs": (
                    f"{teacher['flops'] / arm['flops']:.1f}x"
                    if teacher and arm["flops"]
                    else ""
                ),
                "params": f"{int(arm['params']):,}",
                "images/s": _rate(arm.get("images_per_second")),
            }
        )
        rows.append(row)
    return rows


def _rate(value) -> str:
    return "" if not value else f"{value:.0f}"


def _md_table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return "_(nothing evaluated)_\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in head) + " |")
    return "\n".join(lines) + "\n"


_E_PRETRAIN_NOTE = (
    "e_pretrain trains E alone: its validation top-1 is the teacher's, on "
    "E's thumbnails scaled back up to full size (what E keeps for the "
    "teacher), not a model's that is deployed. Its epochs come on top of "
    "S's, which are those of every bicubic baseline."
)


def _has_e_pretrain(metrics: Mapping) -> bool:
    return any(sid.endswith("-e_pretrain") for sid in metrics.get("stages", {}))


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
    """One row per exported file (`export.json`): format, size, images/s,
    and for a conversion how often it gives thumbnet.keras's top-1 class on
    the run's validation images."""
    run_dir = metrics.get("run_dir")

    def shown(path: str) -> str:
        # Relative to the run: f4/thumbnet.onnx and thumbnet.onnx (the review
        # saw two "thumbnet.onnx" rows after `thumbnet export --factor 4`).
        relative = os.path.relpath(path, run_dir) if run_dir else ".."
        return os.path.basename(path) if relative.startswith("..") else relative

    return [
        {
            "file": shown(d["file"]),
            "format": d["format"],
            "size KB": f"{d['bytes'] / 1024:.1f}",
            "images/s": f"{d['images_per_second']:.0f}",
            "batch": d["batch_size"],
            "top-1 as .keras": (
                f"{100 * d['agreement']:.1f}% of {d['agreement_images']}"
                if "agreement" in d
                else "-"
            ),
        }
        for d in metrics.get("deployables", [])
    ]


_DEPLOY_NOTE = (
    "thumbnet.keras and its exports (docs/deploy.md); images/s: measured on "
    "this machine at the batch size shown, each in its own runtime (Keras, "
    "ONNX Runtime, LiteRT); thumbnet.keras is timed here as the saved file, "
    "its input normalization included, so its figure is not the Results "
    "table's (the trained model timed beside the others); top-1 as .keras: "
    "how often the export gives thumbnet.keras's top-1 class on the run's "
    "validation images."
)


def _summary(metrics: Mapping) -> str:
    dataset = metrics.get("dataset", {})
    env = metrics.get("environment", {})
    splits = ", ".join(f"{k} {v}" for k, v in dataset.get("splits", {}).items())
    return (
        f"Dataset **{dataset.get('name', '?')}** ({dataset.get('num_classes', '?')} "
        f"classes; {splits}; licence: {dataset.get('license', '?')}). "
        + _teacher_note(metrics)
        + f"Keras backend **{env.get('backend', '?')}** on {env.get('device', '?')}"
        + _compute_note(metrics)
        + "."
    )


def _compute_note(metrics: Mapping) -> str:
    """ ", precision mixed_bfloat16, data parallel over 2 devices": what the
    run's precision and devices were, when not float32 on one device (they
    were only in the config dump and the stage records)."""
    precision = metrics.get("config", {}).get("precision") or "float32"
    replicas = max(
        (s.get("replicas") or 1 for s in metrics.get("stages", {}).values()),
        default=1,
    )
    note = f", precision {precision}" if precision != "float32" else ""
    if replicas > 1:
        note += f", data parallel over {replicas} devices"
    return note


_SOURCES = {
    "file": "given as a .keras file",
    "pretrained": "shipped with the package",  # a "file" source named pretrained:
    "applications": "keras.applications",
    "keras_hub": "keras-hub",
    "weights": "built here with the given weights",
    "trained": "trained in this run",
}


def _teacher_note(metrics: Mapping) -> str:
    """ "Teacher **MobileNetV3Small** (given as a .keras file; S is its
    architecture at thumbnail size). " from the teacher stage's record: with
    a given teacher the config's `backbone` field is unused."""
    teacher = metrics.get("stages", {}).get("teacher") or {}
    name = teacher.get("backbone")
    if not name:
        return ""
    config = metrics.get("config", {})
    given = config.get("teacher")
    source = _SOURCES.get(teacher.get("source"), teacher.get("source") or "")
    if str(given).startswith("pretrained:"):
        source = _SOURCES["pretrained"]
    where = (
        f"{source}: `{given}`"
        if given and teacher.get("source") != "trained"
        else source
    )
    return f"Teacher **{name}** ({where}; S is its architecture at thumbnail size). "


_COST_NOTE = (
    'Every model takes the full-size image; "thumbnail" is the side its S '
    "classifies. MACs: multiply-adds per image of the whole inference model "
    "(the downscaler included), the machine-independent cost. " + THROUGHPUT_NOTE
)


def _results_note(metrics: Mapping) -> str:
    """What the table's numbers are, from how the stages were selected."""
    splits = metrics.get("dataset", {}).get("splits", {})
    unselected = sorted(
        sid
        for sid, stage in (metrics.get("stages") or {}).items()
        if isinstance(stage, Mapping)
        and (stage.get("selection") or {}).get("reason") == "no val_accuracy logged"
    )
    if splits.get("validation"):
        selection = (
            "Each model trained with labels kept the epoch of its best "
            "validation top-1 (FM pre-training, which has no labels, its last "
            "epoch); the test split was evaluated once, at the end."
        )
        if unselected:
            # A trial: 2 validation images over 4 data-parallel devices left
            # every validation batch empty, and the note still said this.
            selection += (
                f" Except {', '.join(unselected)}: no validation top-1 was "
                "logged (every validation batch empty), so they kept their "
                "last epoch."
            )
    else:
        selection = (
            "No validation split: every model kept its last epoch; the test "
            "split was evaluated once, at the end."
        )
    return f"{selection} {_COST_NOTE}"


# The report's images: key -> (file name under `report_images/`, alt text).
IMAGES = {
    "accuracy_vs_macs": ("accuracy_vs_macs.png", "Test top-1 vs. MACs per image"),
    "gallery": ("gallery.png", "Test images, thumbnails, true labels and predictions"),
    "validation_curves": ("validation_curves.png", "Validation top-1 per epoch"),
    "training_curves": ("training_curves.png", "Training losses per epoch"),
}
_GALLERY_NOTE = (
    "Test images (one per class where possible): the original with the "
    "teacher's prediction, and per factor the bicubic thumbnail with the "
    "bicubic baselines' predictions and the learned thumbnail of E with "
    "ThumbNet's. Green: correct; red: wrong."
)
_CURVES_NOTE = (
    "Validation top-1 after every epoch of each stage that has labels (the "
    "kept epoch circled); below, the training losses that change (constant "
    "terms and single-epoch stages left out)."
)


def _health_md(metrics: Mapping) -> list[str]:
    warnings = health_warnings(metrics)
    if not warnings:
        return []
    lines = [f"> **Warning: {warnings[0]}**"] + [f"> - {w}" for w in warnings[1:]]
    return ["\n".join(lines) + "\n"]


def _outputs_md(metrics: Mapping) -> str:
    primary = metrics.get("primary_factor")
    lines = []
    for key, value in metrics.get("outputs", {}).items():
        top_level = key in ("thumbnet.keras", "thumbnail_model.keras")
        note = f" (f={primary}, the first factor)" if top_level else ""
        note = note if primary else ""
        lines.append(f"- {key}: `{value}`{note}")
    return "\n".join(lines) + "\n"


def render_markdown(metrics: Mapping, images: Mapping[str, str] | None = None) -> str:
    """`report.md`: health warnings, the headline, the tables, links to the
    report's images and the resolved config.

    Args:
        metrics: see the module docstring.
        images: image key (`IMAGES`) -> path relative to `report.md`; a key
            left out (or None) links no image.
    """
    images = images or {}

    def image(key: str) -> list[str]:
        if key not in images:
            return []
        return [f"![{IMAGES[key][1]}]({images[key]})\n"]

    paired = paired_table(metrics)
    parts = [
        f"# ThumbNet report: {metrics.get('run_name', '')}\n",
        *_health_md(metrics),
        f"**{headline(metrics)}**\n",
        *(f"> Note: {text}\n" for text in caveats(metrics)),
        _summary(metrics) + " " + _full_size_note(metrics) + "\n",
        "## Results\n",
        _results_note(metrics) + "\n",
        _md_table(arms_table(metrics)),
        *([_PAIRED_NOTE + "\n", _md_table(paired)] if paired else []),
        *image("accuracy_vs_macs"),
        *(["## Thumbnails\n", _GALLERY_NOTE + "\n"] if "gallery" in images else []),
        *image("gallery"),
        "## Training stages\n",
        _md_table(_stage_rows(metrics)),
        *([_E_PRETRAIN_NOTE + "\n"] if _has_e_pretrain(metrics) else []),
        *([_CURVES_NOTE + "\n"] if "validation_curves" in images else []),
        *image("validation_curves"),
        *image("training_curves"),
        "## Outputs\n",
        _outputs_md(metrics),
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
.headline{font-size:1.2em;font-weight:600}
.health{background:#fff3cd;border:1px solid #e0b000;padding:.5em 1em;margin:1em 0}
"""


def report_images(metrics: Mapping, gallery: Mapping | None = None) -> dict[str, bytes]:
    """The report's PNG images (keys of `IMAGES`): the accuracy-vs-MACs plot
    when models were evaluated, the gallery when given, the validation curves
    when a stage logged validation top-1, the training losses when any loss
    changes.

    Args:
        metrics: see the module docstring.
        gallery: `{"rows": {title: [images]}, "truth": [class names],
            "predictions": {title: {model: [class names]}}}`, or a plain
            `{title: [images]}`; None: no gallery.
    """
    from thumbnet_keras.reports.charts import has_training_curves, has_validation_curves

    stages = metrics.get("stages", {})
    out = {}
    if metrics.get("arms"):
        out["accuracy_vs_macs"] = accuracy_vs_flops_png(
            metrics["arms"], majority=_majority(metrics)
        )
    if gallery:
        if "rows" in gallery:
            out["gallery"] = gallery_png(
                gallery["rows"], gallery.get("truth"), gallery.get("predictions")
            )
        else:
            out["gallery"] = gallery_png(gallery)
    if has_validation_curves(stages):
        out["validation_curves"] = validation_curves_png(stages)
    if has_training_curves(stages):
        out["training_curves"] = training_curves_png(stages)
    return out


def _majority(metrics: Mapping) -> float | None:
    return (metrics.get("dataset", {}).get("majority") or {}).get("test")


def render_html(
    metrics: Mapping,
    gallery: Mapping | None = None,
    images: Mapping[str, bytes] | None = None,
) -> str:
    """`report.html`: self-contained (inline CSS and base64 PNG charts).

    Args:
        metrics: see the module docstring.
        gallery: see `report_images`; None or empty: no gallery section.
        images: the PNGs already rendered (`report_images`); None: rendered
            here from `metrics` and `gallery`.
    """
    if images is None:
        images = report_images(metrics, gallery)
    title = f"ThumbNet report: {metrics.get('run_name', '')}"
    summary = html.escape(_summary(metrics) + " " + _full_size_note(metrics))
    summary = summary.replace("**", "").replace("`", "")

    def image(key: str) -> list[str]:
        return [_img(images[key], IMAGES[key][1])] if key in images else []

    warnings = health_warnings(metrics)
    paired = paired_table(metrics)
    sections = [f"<h1>{html.escape(title)}</h1>"]
    if warnings:
        sections.append(
            '<div class="health"><strong>Warning: '
            + html.escape(warnings[0])
            + "</strong><ul>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in warnings[1:])
            + "</ul></div>"
        )
    sections += [
        f'<p class="headline">{html.escape(headline(metrics))}</p>',
        *(
            f'<p class="caveat"><strong>Note:</strong> {html.escape(t)}</p>'
            for t in caveats(metrics)
        ),
        f"<p>{summary}</p>",
        "<h2>Results</h2>",
        f"<p>{html.escape(_results_note(metrics))}</p>",
        _html_table(arms_table(metrics)),
        *(
            [f"<p>{html.escape(_PAIRED_NOTE)}</p>", _html_table(paired)]
            if paired
            else []
        ),
        *image("accuracy_vs_macs"),
    ]
    if "gallery" in images:
        sections += [
            "<h2>Thumbnails</h2>",
            f"<p>{html.escape(_GALLERY_NOTE)}</p>",
            *image("gallery"),
        ]
    sections += [
        "<h2>Training</h2>",
        _html_table(_stage_rows(metrics)),
        *(
            [f"<p>{html.escape(_E_PRETRAIN_NOTE)}</p>"]
            if _has_e_pretrain(metrics)
            else []
        ),
        *(
            [f"<p>{html.escape(_CURVES_NOTE)}</p>"]
            if "validation_curves" in images
            else []
        ),
        *image("validation_curves"),
        *image("training_curves"),
        "<h2>Outputs</h2>",
        "<ul>",
        *(
            f"<li>{html.escape(line[2:])}</li>"
            for line in _outputs_md(metrics).replace("`", "").splitlines()
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
