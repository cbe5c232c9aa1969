"""Pure report rendering: metrics in, markdown / self-contained HTML / PNG out."""

from thumbnet_keras.reports.charts import (
    accuracy_vs_flops_png,
    gallery_png,
    training_curves_png,
)
from thumbnet_keras.reports.render import (
    arms_table,
    deployables_table,
    render_html,
    render_markdown,
)

__all__ = [
    "accuracy_vs_flops_png",
    "arms_table",
    "deployables_table",
    "gallery_png",
    "render_html",
    "render_markdown",
    "training_curves_png",
]
