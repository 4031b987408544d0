"""Figures of prediction accuracy by layer and by distance, each PNG beside a CSV of its numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.core.figures import save_figure
from moescope.predict.evaluate import EvalResult


def accuracy_rows(results: dict[str, EvalResult], metric: str) -> list[dict[str, Any]]:
    """Long rows (predictor, mode, distance, layer, value, ci_lo, ci_hi, random) for ``metric``."""
    rows = []
    for name, r in results.items():
        for row in r.table:
            if row["metric"] == metric:
                rows.append(
                    {
                        "predictor": name,
                        **{
                            k: row[k]
                            for k in (
                                "mode",
                                "distance",
                                "layer",
                                "value",
                                "ci_lo",
                                "ci_hi",
                                "random",
                                "queries",
                            )
                        },
                    }
                )
    return rows


def plot_by_layer(
    results: dict[str, EvalResult], out_dir: str | Path, metric: str = "slot_recall"
) -> list[Path]:
    """One panel per mode: ``metric`` against MoE layer for every predictor, random baseline dashed."""
    import matplotlib.pyplot as plt

    rows = [r for r in accuracy_rows(results, metric) if r["layer"] >= 0]
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (m == "temporal", m))
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(5 * max(len(modes), 1), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=False):
        for name in results:
            pts = sorted(
                (r["layer"], r["value"]) for r in rows if r["predictor"] == name and r["mode"] == mode
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        rnd = [r["random"] for r in rows if r["mode"] == mode]
        if rnd:
            ax.axhline(rnd[0], color="grey", linestyle="--", linewidth=1, label="random")
        ax.set_title(f"{metric} by layer, {mode}")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_figure(
        fig,
        rows,
        Path(out_dir) / f"predict_{metric}_by_layer",
        {"metric": metric, "predictors": list(results)},
        dpi=120,
    )


def plot_by_distance(
    results: dict[str, EvalResult], out_dir: str | Path, metric: str = "slot_recall"
) -> list[Path]:
    """``metric`` over all layers against spatial distance, one line per predictor (temporal apart)."""
    import matplotlib.pyplot as plt

    rows = [r for r in accuracy_rows(results, metric) if r["layer"] == -1]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in results:
        pts = sorted(
            (r["distance"], r["value"]) for r in rows if r["predictor"] == name and r["distance"] > 0
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("prediction distance (layers ahead)")
    ax.set_ylabel(f"{metric}, all layers")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{metric} by distance")
    if rows:
        ax.axhline(rows[0]["random"], color="grey", linestyle="--", linewidth=1, label="random")
    ax.legend(fontsize=7)
    return save_figure(
        fig,
        rows,
        Path(out_dir) / f"predict_{metric}_by_distance",
        {"metric": metric, "predictors": list(results)},
        dpi=120,
    )
