"""Rankings, load-versus-impact, figures and files of an ablation run.

Seed 001 asks whether an expert that is rarely used is *under-used but critical* or *truly
redundant*. Each single-expert condition gets a usage class (load share below or above the
uniform ``n_disabled / E``) and an effect class from its bootstrap interval of harm:
``critical`` (the whole interval above 0), ``helps when off`` (below 0) or ``redundant``
(the interval contains 0). Impact is harm in the ``rank_by`` metric: the fall in accuracy
or top-5 accuracy, the rise in mean NLL (nats) or perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from moescope.ablate.measure import HARM_SIGN
from moescope.ablate.sweep import ALL, AblationResult

#: Units the change of each metric is plotted in (accuracy-like metrics in percentage points).
_PLOT_UNIT = {"accuracy": ("pp", 100.0), "top5": ("pp", 100.0), "nll": ("nats", 1.0), "perplexity": ("", 1.0)}


def _unit(metric: str) -> tuple[str, str, float]:
    """Column suffix, axis label and scale factor for plotting a change in ``metric``."""
    unit, scale = _PLOT_UNIT[metric]
    return (f"_{unit}" if unit else ""), (f" ({unit})" if unit else ""), scale


def ranking(results: pl.DataFrame, num_experts: int) -> pl.DataFrame:
    """Conditions of each layer ranked by overall impact (1 = most harmful), with usage and effect."""
    df = results.filter(pl.col("domain") == ALL)
    df = df.sort(["layer", "impact"], descending=[False, True], nulls_last=True)
    df = df.with_columns(pl.int_range(1, pl.len() + 1).over("layer").alias("rank"))
    effect = (
        pl.when(pl.col("impact_lo") > 0)
        .then(pl.lit("critical"))
        .when(pl.col("impact_hi") < 0)
        .then(pl.lit("helps when off"))
        .otherwise(pl.lit("redundant"))
    )
    usage = (
        pl.when(pl.col("load_share") < pl.col("n_disabled") / num_experts)
        .then(pl.lit("under-used"))
        .otherwise(pl.lit("busy"))
    )
    return df.with_columns(effect.alias("effect"), usage.alias("usage"))


def load_vs_impact(results: pl.DataFrame, num_experts: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Single-expert conditions: load share against impact; and per layer Spearman's rho with its p-value."""
    from scipy.stats import spearmanr

    df = ranking(results, num_experts)
    df = df.filter(pl.col("n_disabled") == 1).select(
        "layer",
        "moe_layer",
        pl.col("experts").cast(pl.Int64).alias("expert"),
        "load_share",
        "direct_share",
        "impact",
        "impact_lo",
        "impact_hi",
        "rank",
        "usage",
        "effect",
    )
    corr = []
    for (layer,), g in df.group_by(["layer"], maintain_order=True):
        x, y = g["load_share"].to_numpy(), g["impact"].to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
            r = spearmanr(x[ok], y[ok])
            rho, p = float(r.statistic), float(r.pvalue)
        else:
            rho = p = float("nan")
        corr.append(
            {
                "layer": layer,
                "experts": int(ok.sum()),
                "spearman_rho": rho,
                "p_value": p,
                "critical": int((g["effect"] == "critical").sum()),
                "under_used_critical": int(
                    ((g["effect"] == "critical") & (g["usage"] == "under-used")).sum()
                ),
                "under_used_redundant": int(
                    ((g["effect"] == "redundant") & (g["usage"] == "under-used")).sum()
                ),
            }
        )
    schema = {
        "layer": pl.Int64,
        "experts": pl.Int64,
        "spearman_rho": pl.Float64,
        "p_value": pl.Float64,
        "critical": pl.Int64,
        "under_used_critical": pl.Int64,
        "under_used_redundant": pl.Int64,
    }
    return df, pl.DataFrame(corr, schema=schema)


def impact_frame(df: pl.DataFrame, metric: str) -> pl.DataFrame:
    """``df`` with its impact columns in plot units, named with the unit (``impact_pp``, ...)."""
    suffix, _, scale = _unit(metric)
    return df.with_columns(
        (pl.col(c) * scale).alias(c.replace("impact", f"impact{suffix}"))
        for c in ("impact", "impact_lo", "impact_hi")
    ).drop(["impact", "impact_lo", "impact_hi"] if suffix else [])


def heatmap_table(results: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Long table (layer, experts, domain, change of ``metric`` in plot units): the heatmap's numbers."""
    suffix, _, scale = _unit(metric)
    return results.select(
        "layer", "experts", "domain", (pl.col(f"delta_{metric}") * scale).alias(f"delta_{metric}{suffix}")
    )


def plot_heatmap(table: pl.DataFrame, metric: str, domains: list[str], title: str):
    """One panel per layer: rows = disabled experts, columns = domains then 'all' (seed 001's figure)."""
    from moescope.core.figures import heatmap, subplot_grid

    suffix, label, _ = _unit(metric)
    col = f"delta_{metric}{suffix}"
    layers = table["layer"].unique(maintain_order=True).to_list()
    fig, axes = subplot_grid(len(layers), width=1.2 + 0.9 * (len(domains) + 1), height=3.2, max_cols=3)
    cols = [*domains, ALL]
    for ax, layer in zip(axes, layers, strict=True):
        g = table.filter(pl.col("layer") == layer)
        rows = g["experts"].unique(maintain_order=True).to_list()
        m = np.full((len(rows), len(cols)), np.nan)
        for r in g.iter_rows(named=True):
            m[rows.index(r["experts"]), cols.index(r["domain"])] = r[col]
        # symmetric around 0, harm in red: a fall for accuracies, a rise for NLL and perplexity
        cmap = "RdBu" if HARM_SIGN[metric] < 0 else "RdBu_r"
        heatmap(
            m,
            xlabel="domain",
            ylabel="disabled expert",
            title=f"layer {layer}: change in {metric}{label}",
            cbar=f"ablated - baseline{label}",
            xticklabels=cols,
            yticklabels=rows,
            cmap=cmap,
            ax=ax,
        )
        vmax = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        ax.images[-1].set_clim(-vmax or -1e-12, vmax or 1e-12)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_ranking(rank: pl.DataFrame, metric: str, title: str):
    """Horizontal bars of impact with bootstrap intervals, most harmful on top, one panel per layer.

    ``rank`` holds the impact columns in plot units (:func:`impact_frame`).
    """
    from moescope.core.figures import subplot_grid

    suffix, label, _ = _unit(metric)
    col = f"impact{suffix}"
    layers = rank["layer"].unique(maintain_order=True).to_list()
    n = max(len(rank.filter(pl.col("layer") == layer)) for layer in layers)
    fig, axes = subplot_grid(len(layers), width=4.2, height=1.0 + 0.22 * n, max_cols=3)
    for ax, layer in zip(axes, layers, strict=True):
        g = rank.filter(pl.col("layer") == layer).sort("rank", descending=True)
        y = np.arange(len(g))
        v = g[col].to_numpy()
        err = np.vstack([v - g[f"{col}_lo"].to_numpy(), g[f"{col}_hi"].to_numpy() - v])
        colors = ["#c0392b" if e == "critical" else "#7f8c8d" for e in g["effect"].to_list()]
        ax.barh(y, v, xerr=np.clip(err, 0, None), color=colors, capsize=2)
        ax.set_yticks(y, labels=g["experts"].to_list(), fontsize=7)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_xlabel(f"impact: harm in {metric}{label}")
        ax.set_ylabel("disabled expert")
        ax.set_title(f"layer {layer}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_load_impact(df: pl.DataFrame, metric: str, num_experts: int, title: str):
    """Scatter of load share (baseline) against impact with intervals, one colour per layer.

    ``df`` holds the impact columns in plot units (:func:`impact_frame`).
    """
    import matplotlib.pyplot as plt

    suffix, label, _ = _unit(metric)
    col = f"impact{suffix}"
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for layer in df["layer"].unique(maintain_order=True).to_list():
        g = df.filter(pl.col("layer") == layer)
        x, v = g["load_share"].to_numpy(), g[col].to_numpy()
        err = np.vstack([v - g[f"{col}_lo"].to_numpy(), g[f"{col}_hi"].to_numpy() - v])
        ax.errorbar(x, v, yerr=np.clip(err, 0, None), fmt="o", ms=4, capsize=2, label=f"layer {layer}")
        if len(g) <= 16:
            for xi, vi, e in zip(x, v, g["expert"].to_list(), strict=True):
                ax.annotate(str(e), (xi, vi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(1.0 / num_experts, color="grey", ls="--", lw=0.8, label="uniform 1/E")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("load share of the expert (baseline, c_e / kT)")
    ax.set_ylabel(f"impact: harm in {metric}{label}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.set_layout_engine("constrained")
    return fig


def write_outputs(
    result: AblationResult, out: str | Path, *, figures: bool = True, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write every table (CSV), figure (PNG beside its CSV) and ``summary.json``; return the summary."""
    from moescope.core.figures import save_figure, save_table
    from moescope.trace.atomic import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = result.info
    metric, E = info["rank_by"], int(info["num_experts"])
    files: list[str] = []

    def table(df: pl.DataFrame, name: str) -> None:
        files.append(str(save_table(df, out / f"{name}.csv")))

    table(result.results, "ablation")
    table(result.baseline, "baseline")
    table(result.load, "load")
    table(result.routing_change, "routing_change")
    rank = ranking(result.results, E)
    scatter, corr = load_vs_impact(result.results, E)
    fig_params = {
        **(params or {}),
        "mode": info["mode"],
        "rank_by": metric,
        "bootstrap": info["bootstrap"],
        "confidence": info["confidence"],
        "seed": info["seed"],
        "resampling": info["resampling"],
    }
    tag = f"{info['family']}, {info['mode']}, {info['tokens']} tokens"
    rank_cols = [
        "layer",
        "experts",
        "rank",
        "impact",
        "impact_lo",
        "impact_hi",
        "load_share",
        "usage",
        "effect",
    ]
    heat = heatmap_table(result.results, metric)
    rank_plot = impact_frame(rank.select(rank_cols), metric)
    scatter_plot = impact_frame(scatter, metric)
    if figures:
        files += map(
            str,
            save_figure(
                plot_heatmap(heat, metric, info["domains"], f"Expert ablation ({tag})"),
                heat,
                out / "heatmap",
                fig_params,
            ),
        )
        files += map(
            str,
            save_figure(
                plot_ranking(rank_plot, metric, f"Experts ranked by impact ({tag})"),
                rank_plot,
                out / "ranking",
                fig_params,
            ),
        )
        if not scatter.is_empty():
            files += map(
                str,
                save_figure(
                    plot_load_impact(scatter_plot, metric, E, f"Load share vs impact ({tag})"),
                    scatter_plot,
                    out / "load_vs_impact",
                    fig_params,
                ),
            )
    else:
        table(heat, "heatmap")
        table(rank_plot, "ranking")
        if not scatter.is_empty():
            table(scatter_plot, "load_vs_impact")
    table(corr, "load_vs_impact_correlation")

    base_all = result.baseline.filter(pl.col("domain") == ALL).row(0, named=True)
    layers = []
    for (layer,), g in rank.group_by(["layer"], maintain_order=True):
        top, bottom = g.row(0, named=True), g.row(len(g) - 1, named=True)
        c = corr.filter(pl.col("layer") == layer)
        layers.append(
            {
                "layer": layer,
                "most_harmful": {
                    "experts": top["experts"],
                    "impact": top["impact"],
                    "interval": [top["impact_lo"], top["impact_hi"]],
                    "load_share": top["load_share"],
                },
                "least_harmful": {
                    "experts": bottom["experts"],
                    "impact": bottom["impact"],
                    "interval": [bottom["impact_lo"], bottom["impact_hi"]],
                    "load_share": bottom["load_share"],
                },
                "critical": int((g["effect"] == "critical").sum()),
                "conditions": len(g),
                "spearman_load_impact": c["spearman_rho"][0] if len(c) else None,
                "spearman_p_value": c["p_value"][0] if len(c) else None,
                "mean_routing_changed_share": float(g["routing_changed_share"].mean()),
            }
        )
    summary = {
        **info,
        **(params or {}),
        "output": str(out),
        "baseline": {m: base_all[m] for m in ("accuracy", "top5", "nll", "perplexity")},
        "layers": layers,
        "files": [*sorted(files), str(out / "summary.json")],
    }
    atomic_write_json(out / "summary.json", _clean(summary))
    return _clean(summary)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and inf become None, NumPy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_text(s: dict[str, Any]) -> str:
    """A few lines for the terminal: baseline and, per layer, the extremes of the ranking."""
    b = s["baseline"]
    lines = [
        f"{s['family']}: {s['tokens']} tokens, {s['documents']} documents, {len(s['domains'])} domains;"
        f" {s['conditions']} conditions ({s['mode']}), ranked by {s['rank_by']}",
        f"baseline: accuracy {b['accuracy']:.4f}, top-5 {b['top5']:.4f}, perplexity {b['perplexity']:.2f}",
    ]
    for lay in s["layers"]:
        t, w = lay["most_harmful"], lay["least_harmful"]
        rho = lay["spearman_load_impact"]
        lines.append(
            f"layer {lay['layer']}: most harmful expert {t['experts']} (impact {_f(t['impact'])},"
            f" load {_f(t['load_share'])}), least {w['experts']} (impact {_f(w['impact'])});"
            f" {lay['critical']}/{lay['conditions']} critical; Spearman(load, impact) = {_f(rho)}"
        )
    lines.append(f"files in {s['output']}")
    return "\n".join(lines)


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


__all__ = ["load_vs_impact", "ranking", "summary_text", "write_outputs"]
