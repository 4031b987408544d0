"""Monitor metrics over training: the across-layer summary table and its figure.

Both start from the per-layer rows the :class:`~moescope.monitor.sinks.CSVSink` writes (one row
per report and MoE layer), so a figure can be redrawn from any run's CSV.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from moescope.monitor.metrics import LAYER_METRICS, SUMMARY_STATS, summarise

#: Metrics drawn by :func:`plot_training`, with their axis labels.
PLOTTED = {
    "load_cv": "load CV (std/mean of counts)",
    "max_vio": "MaxVio (max/mean - 1)",
    "gini": "Gini of expert counts",
    "dead_experts": "dead experts (share < dead_share)",
    "entropy_norm": "router entropy / log2 E",
    "aux_loss": "aux loss (balanced = k)",
}


def summary_table(rows: pl.DataFrame) -> pl.DataFrame:
    """``step, metric`` and the across-layer stats of :data:`SUMMARY_STATS`, from per-layer rows."""
    out = []
    for (step,), g in rows.sort("step", "layer").group_by("step", maintain_order=True):
        for metric in LAYER_METRICS:
            if metric not in g.columns:
                continue
            s = summarise(g[metric].cast(pl.Float64).fill_null(np.nan).to_numpy())
            if s:
                out.append({"step": int(step), "metric": metric, **s})
    return pl.DataFrame(
        out, schema={"step": pl.Int64, "metric": pl.String, **dict.fromkeys(SUMMARY_STATS, pl.Float64)}
    )


def plot_training(summary: pl.DataFrame, title: str = "Routing over training"):
    """One panel per metric of :data:`PLOTTED`: across-layer mean, p10-p90 band, min and max."""
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOTTED if m in set(summary["metric"].to_list())]
    cols = 3
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.7 * rows), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        g = summary.filter(pl.col("metric") == metric).sort("step")
        x = g["step"].to_numpy()
        ax.fill_between(x, g["p10"].to_numpy(), g["p90"].to_numpy(), alpha=0.25, label="p10-p90 of layers")
        ax.plot(x, g["mean"].to_numpy(), "-", lw=1.6, label="mean of layers")
        ax.plot(x, g["min"].to_numpy(), ":", lw=1, color="gray", label="min / max")
        ax.plot(x, g["max"].to_numpy(), ":", lw=1, color="gray")
        ax.set_title(PLOTTED[metric], fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("training step", fontsize=8)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
