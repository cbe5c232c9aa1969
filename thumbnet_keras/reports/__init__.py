"""Pure report rendering: metrics in, markdown / self-contained HTML / PNG out."""

from thumbnet_keras.reports.charts import (
    accuracy_vs_flops_figure,
    accuracy_vs_flops_png,
    gallery_figure,
    gallery_png,
    training_curves_png,
    validation_curves_figure,
    validation_curves_png,
)
from thumbnet_keras.reports.render import (
    IMAGES,
    arms_table,
    deployables_table,
    headline,
    health_warnings,
    paired_table,
    render_html,
    render_markdown,
    report_images,
)

__all__ = [
    "IMAGES",
    "accuracy_vs_flops_figure",
    "accuracy_vs_flops_png",
    "arms_table",
    "deployables_table",
    "gallery_figure",
    "gallery_png",
    "headline",
    "health_warnings",
    "paired_table",
    "render_html",
    "render_markdown",
    "report_images",
    "training_curves_png",
    "validation_curves_figure",
    "validation_curves_png",
]
