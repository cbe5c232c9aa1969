"""Charts of a run as PNG bytes (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["accuracy_vs_flops_png", "gallery_png", "training_curves_png"]

_MARKERS = {
    "teacher": "*",
    "teacher_bicubic": "x",
    "teacher_bicubic_bn": "+",
    "bicubic_cl": "s",
    "bicubic_kd": "D",
    "bicubic_kd_equal": "d",
    "thumbnet": "o",
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
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def accuracy_vs_flops_png(arms: Sequence[Mapping]) -> bytes:
    """Top-1 accuracy against multiply-adds (log scale), one point per arm.

    Args:
        arms: dicts with `name`, `label`, `factor`, `top1`, `flops`.
    """
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for arm in arms:
        label = arm["label"] + (f" f={arm['factor']}" if arm.get("factor") else "")
        ax.scatter(
            max(arm["flops"], 1),
            100 * arm["top1"],
            marker=_MARKERS.get(arm["name"], "o"),
            s=60,
            label=label,
        )
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("multiply-adds per image (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs. FLOPs on the test split")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def training_curves_png(stages: Mapping[str, Mapping]) -> bytes:
    """Per-epoch training loss of every stage (one panel per stage).

    Args:
        stages: stage id -> record with `history` (metric -> list per epoch).
    """
    items = [(sid, s) for sid, s in stages.items() if s.get("history")]
    count = max(len(items), 1)
    cols = min(count, 3)
    rows = (count + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.8 * rows)
    for i, (sid, stage) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, values in sorted(stage["history"].items()):
            if key.endswith("loss") and values:
                ax.plot(range(1, len(values) + 1), values, marker=".", label=key)
        ax.set_title(sid, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    if not items:
        fig.add_subplot().text(0.5, 0.5, "no training in this run", ha="center")
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


def gallery_png(rows: Mapping[str, Sequence[np.ndarray]]) -> bytes:
    """A grid of images: one row per named version (original, bicubic f=2,
    learned f=2, ...), one column per example, each shown at its own size.

    Args:
        rows: row title -> list of `(H, W, C)` float images (same count per row).
    """
    titles = list(rows)
    count = max((len(v) for v in rows.values()), default=0)
    fig = _figure(1.6 * max(count, 1) + 1.0, 1.7 * max(len(titles), 1))
    for r, title in enumerate(titles):
        for c, image in enumerate(rows[title]):
            ax = fig.add_subplot(len(titles), count, r * count + c + 1)
            shown = _display(image)
            ax.imshow(
                shown,
                cmap="gray" if shown.ndim == 2 else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                h, w = shown.shape[:2]
                ax.set_ylabel(f"{title}\n{h}x{w}", fontsize=7)
    fig.tight_layout()
    return _png(fig)
