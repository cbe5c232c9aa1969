"""Charts of a run as PNG bytes (matplotlib, Agg backend, no display needed).

Each chart has a `*_figure` function returning the matplotlib `Figure` (what
the tests inspect) and a `*_png` function returning its PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "accuracy_vs_flops_figure",
    "accuracy_vs_flops_png",
    "gallery_figure",
    "gallery_png",
    "has_training_curves",
    "has_validation_curves",
    "training_curves_png",
    "validation_curves_figure",
    "validation_curves_png",
]

# method -> (marker, colour, legend label, point tag); the order is the legend's.
_STYLE = {
    "teacher": ("*", "black", "Teacher (full size)", "Teacher"),
    "teacher_bicubic": ("x", "tab:gray", "Teacher on bicubic", "T bicubic"),
    "teacher_bicubic_bn": ("+", "tab:brown", "Teacher on bicubic + BN", "T+BN"),
    "bicubic_cl": ("s", "tab:blue", "Bicubic + CL", "CL"),
    "bicubic_kd": ("D", "tab:orange", "Bicubic + KD", "KD"),
    "bicubic_kd_equal": (
        "d",
        "tab:purple",
        "Bicubic + KD, larger thumbnail",
        "KD larger",
    ),
    "thumbnet": ("o", "tab:red", "ThumbNet (E + S)", "ThumbNet"),
}
# Stage -> colour in the curves (the arm it trains).
_STAGE_COLOUR = {
    "teacher": "black",
    "e_pretrain": "tab:olive",
    "fm_pretrain": "tab:pink",
    "joint": "tab:red",
    "bicubic_cl": "tab:blue",
    "bicubic_kd": "tab:orange",
    "bicubic_kd_equal": "tab:purple",
}


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot): no global state, safe in threads and tests.
    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _style(name: str) -> tuple[str, str, str, str]:
    return _STYLE.get(name, ("o", "tab:green", name, name))


def point_label(arm: Mapping) -> str:
    """`KD f=2: 67.1%`: the text beside an arm's point (the legend names the
    method of each tag)."""
    factor = f" f={arm['factor']}" if arm.get("factor") else ""
    return f"{_style(arm['name'])[3]}{factor}: {100 * arm['top1']:.1f}%"


def _clusters(arms: Sequence[Mapping], ratio: float) -> list[list[Mapping]]:
    """Arms grouped by cost: consecutive costs within `ratio` of each other
    share a group (their labels would collide)."""
    groups: list[list[Mapping]] = []
    for arm in sorted(arms, key=lambda a: a["flops"]):
        if groups and max(arm["flops"], 1) <= max(groups[-1][-1]["flops"], 1) * ratio:
            groups[-1].append(arm)
        else:
            groups.append([arm])
    return groups


def _cost_ticks(arms: Sequence[Mapping], ratio: float = 1.5) -> list[int]:
    """Tick positions at the arms' costs, the teacher's and ThumbNet's first,
    none within `ratio` of another (their labels would overlap)."""
    first = ("teacher", "thumbnet")
    ranked = sorted(arms, key=lambda a: (a["name"] not in first, a["flops"]))
    ticks: list[int] = []
    for arm in ranked:
        cost = max(int(arm["flops"]), 1)
        if all(max(cost, t) / min(cost, t) >= ratio for t in ticks):
            ticks.append(cost)
    return sorted(ticks)


def _spread(values: list[float], gap: float) -> list[float]:
    """`values` (sorted) moved apart to at least `gap`, centred on the originals."""
    out = list(values)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    shift = (sum(values) - sum(out)) / max(len(out), 1)
    return [v + shift for v in out]


def accuracy_vs_flops_figure(arms: Sequence[Mapping], majority: float | None = None):
    """Test top-1 against multiply-adds per image (log scale).

    One labelled point per arm (method, factor); a method's points at its
    factors are joined by a line; the majority-class rate (the accuracy of
    always answering the most frequent test class) as a dashed line; the
    legend outside the axes. Each point's label
    is a text whose `gid` is `"<name>@<factor>"` (`@-` for the teacher),
    joined to its point by a thin leader line.

    Args:
        arms: dicts with `name`, `factor`, `top1`, `flops` (and `label`).
        majority: the majority-class share of the test split, or None.
    """
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    methods: dict[str, list[Mapping]] = {}
    for arm in arms:
        methods.setdefault(arm["name"], []).append(arm)
    order = [m for m in _STYLE if m in methods] + [
        m for m in methods if m not in _STYLE
    ]
    for name in order:
        points = sorted(methods[name], key=lambda a: a["flops"])
        marker, colour, label, _ = _style(name)
        ax.plot(
            [max(a["flops"], 1) for a in points],
            [100 * a["top1"] for a in points],
            marker=marker,
            color=colour,
            markersize=8 if marker != "*" else 12,
            linestyle="-" if len(points) > 1 else "none",
            linewidth=1.2,
            label=label,
        )
    if majority is not None:
        ax.axhline(
            100 * majority,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"majority class ({100 * majority:.1f}%)",
        )
    # Labels: points of similar cost (the bicubic arms of one factor share S)
    # would collide; each group's labels sit in a column right of its
    # rightmost point, spread vertically, with a leader line to each point.
    tops = [100 * a["top1"] for a in arms] + ([100 * majority] if majority else [])
    low, high = (min(tops), max(tops)) if tops else (0.0, 100.0)
    gap = max(high - low, 2.0) * 0.07
    placed = []  # every label's height: the axes must hold them all
    for group in _clusters(arms, ratio=2.0):
        group = sorted(group, key=lambda a: a["top1"])
        ys = _spread([100 * a["top1"] for a in group], gap)
        placed += list(ys)
        column = max(max(a["flops"], 1) for a in group) * 1.25
        for arm, y in zip(group, ys):
            x, top = max(arm["flops"], 1), 100 * arm["top1"]
            ax.plot([x, column], [top, y], color="0.75", linewidth=0.5,
                    label="_leader", zorder=1)  # fmt: skip
            ax.text(
                column * 1.03,
                y,
                point_label(arm),
                fontsize=7,
                va="center",
                color=_style(arm["name"])[1],
                bbox={
                    "facecolor": "white",
                    "edgecolor": "none",
                    "alpha": 0.85,
                    "pad": 0.5,
                },  # readable over the lines it crosses
                gid=f"{arm['name']}@{arm.get('factor') or '-'}",
            )
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    costs = sorted({max(int(a["flops"]), 1) for a in arms})
    ax.xaxis.set_major_locator(FixedLocator(_cost_ticks(arms)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    if costs:  # Room on the right for the labels, on the left for the point.
        ax.set_xlim(costs[0] / 1.6, costs[-1] * 5.0)
    # Labels spread apart can sit above the highest point or below the
    # lowest; inside the axes they cannot run into the title.
    ax.set_ylim(min([low, *placed]) - 2 * gap, max([high, *placed]) + 2 * gap)
    ax.set_xlabel("multiply-adds per image, whole inference model (log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Accuracy vs. cost (test split)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig


def accuracy_vs_flops_png(
    arms: Sequence[Mapping], majority: float | None = None
) -> bytes:
    """`accuracy_vs_flops_figure` as PNG bytes."""
    return _png(accuracy_vs_flops_figure(arms, majority))


def _split_sid(sid: str) -> tuple[int | None, str]:
    head, sep, stage = sid.partition("-")
    if sep and head[:1] == "f" and head[1:].isdigit():
        return int(head[1:]), stage
    return None, sid


def _val_series(stages: Mapping[str, Mapping]) -> dict[int | None, list]:
    panels: dict[int | None, list] = {}
    for sid, stage in stages.items():
        values = (stage.get("history") or {}).get("val_accuracy") or []
        if values:
            factor, name = _split_sid(sid)
            panels.setdefault(factor, []).append((name, values, stage))
    # A panel of single-epoch stages shows no curve: left out.
    return {
        k: series
        for k, series in panels.items()
        if any(len(v) > 1 for _, v, _ in series)
    }


def has_validation_curves(stages: Mapping[str, Mapping]) -> bool:
    """Whether a stage logged validation top-1 for 2 or more epochs."""
    return bool(_val_series(stages))


def validation_curves_figure(stages: Mapping[str, Mapping]):
    """Validation top-1 per epoch: one panel for the teacher (when trained)
    and one per factor, one line per stage, its kept epoch circled; a panel
    whose stages all ran a single epoch is left out.

    Args:
        stages: stage id -> record with `history` (`val_accuracy` per epoch)
            and `selection` (`best_epoch`).
    """
    from matplotlib.ticker import MaxNLocator

    panels = _val_series(stages)
    keys = sorted(panels, key=lambda f: (f is not None, f or 0))
    cols = max(len(keys), 1)
    fig = _figure(4.2 * cols, 3.2)
    for i, factor in enumerate(keys):
        ax = fig.add_subplot(1, cols, i + 1)
        for name, values, stage in panels[factor]:
            epochs = range(1, len(values) + 1)
            colour = _STAGE_COLOUR.get(name, None)
            ax.plot(epochs, [100 * v for v in values], marker=".", color=colour,
                    label=name)  # fmt: skip
            best = (stage.get("selection") or {}).get("best_epoch")
            if best and 1 <= best <= len(values):
                ax.plot([best], [100 * values[best - 1]], marker="o", markersize=9,
                        markerfacecolor="none", color=colour)  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("teacher" if factor is None else f"f={factor}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation top-1 (%)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    if not keys:
        fig.add_subplot().text(0.5, 0.5, "no validation split", ha="center")
    fig.tight_layout()
    return fig


def validation_curves_png(stages: Mapping[str, Mapping]) -> bytes:
    """`validation_curves_figure` as PNG bytes."""
    return _png(validation_curves_figure(stages))


def _changes(values: Sequence[float]) -> bool:
    if len(values) < 2:
        return False
    low, high = min(values), max(values)
    return high - low > 1e-6 * max(1.0, abs(high))


def _loss_panels(stages: Mapping[str, Mapping]) -> list[tuple[str, dict]]:
    panels = []
    for sid, stage in stages.items():
        series = {
            key: values
            for key, values in sorted((stage.get("history") or {}).items())
            if key.endswith("loss") and not key.startswith("val_") and _changes(values)
        }
        if series:
            panels.append((sid, series))
    return panels


def has_training_curves(stages: Mapping[str, Mapping]) -> bool:
    """Whether any stage has a training loss that changes over 2+ epochs."""
    return bool(_loss_panels(stages))


def training_curves_png(stages: Mapping[str, Mapping]) -> bytes:
    """Per-epoch training losses, one panel per stage; constant terms (e.g. MM
    at 0) and stages of fewer than 2 epochs are left out.

    Args:
        stages: stage id -> record with `history` (metric -> list per epoch).
    """
    from matplotlib.ticker import MaxNLocator

    items = _loss_panels(stages)
    count = max(len(items), 1)
    cols = min(count, 3)
    rows = (count + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.8 * rows)
    for i, (sid, series) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, values in series.items():
            ax.plot(range(1, len(values) + 1), values, marker=".", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(sid, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    if not items:
        fig.add_subplot().text(0.5, 0.5, "no training curve to show", ha="center")
    fig.tight_layout()
    return _png(fig)


def _display(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:  # Not in [0, 1]: stretch for display.
        image = (image - low) / max(high - low, 1e-8)
    return np.clip(image, 0.0, 1.0)


_CORRECT, _WRONG = "tab:green", "tab:red"


def gallery_figure(
    rows: Mapping[str, Sequence[np.ndarray]],
    truth: Sequence[str] | None = None,
    predictions: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
):
    """A grid of images: one row per version (original, bicubic f=2, learned
    f=2, ...), one column per example, each shown at its own size. With
    `truth`, each column is titled with its true label; with `predictions`,
    each image has one line per model that classifies it, `model: class`,
    green when it equals the true label, red when not.

    Args:
        rows: row title -> list of `(H, W, C)` float images (same count per row).
        truth: the true class name of each column.
        predictions: row title -> {model name -> predicted class per column}.
    """
    titles = list(rows)
    predictions = predictions or {}
    count = max((len(v) for v in rows.values()), default=0)
    count = max(count, 1)
    image_h, line_h, head_h = 1.35, 0.15, 0.3 if truth is not None else 0.05
    text_h = [0.08 + line_h * len(predictions.get(t, {})) for t in titles]
    # Columns as wide as their longest caption (6.5 pt: about 0.047 in. a
    # character): long class names ran into the next column's (a trial's
    # "Teacher on bicubic + BN: green_checks").
    longest = max(
        (len(f"{model}: {name}") for models in predictions.values()
         for model, names in models.items() for name in names),
        default=0,
    )  # fmt: skip
    left, col_w = 1.1, max(1.5, 0.047 * longest + 0.2)
    width = left + col_w * count + 0.1
    height = head_h + sum(image_h + h for h in text_h) + 0.1
    fig = _figure(width, height)
    top = height - head_h
    for r, title in enumerate(titles):
        models = predictions.get(title, {})
        for c, image in enumerate(rows[title]):
            box = [
                (left + c * col_w + 0.05) / width,
                (top - image_h) / height,
                (col_w - 0.1) / width,
                (image_h - 0.05) / height,
            ]
            ax = fig.add_axes(box)
            shown = _display(image)
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1,
                      interpolation="nearest", aspect="equal")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and truth is not None and c < len(truth):
                ax.set_title(f"true: {truth[c]}", fontsize=8, fontweight="bold")
            if c == 0:
                h, w = shown.shape[:2]
                ax.set_ylabel(f"{title}\n{h}x{w}", fontsize=7)
            for k, (model, classes) in enumerate(models.items()):
                if c >= len(classes):
                    continue
                right = truth is not None and c < len(truth) and classes[c] == truth[c]
                colour = "black" if truth is None else (_CORRECT if right else _WRONG)
                fig.text(
                    (left + (c + 0.5) * col_w) / width,
                    (top - image_h - 0.04 - k * line_h) / height,
                    f"{model}: {classes[c]}",
                    ha="center",
                    va="top",
                    fontsize=6.5,
                    color=colour,
                )
        top -= image_h + text_h[r]
    return fig


def gallery_png(
    rows: Mapping[str, Sequence[np.ndarray]],
    truth: Sequence[str] | None = None,
    predictions: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> bytes:
    """`gallery_figure` as PNG bytes."""
    return _png(gallery_figure(rows, truth, predictions))
