"""Evaluate a model on tasks under routing strategies: scores, CIs, active experts, params, FLOPs.

For every (task, strategy) pair: the task's metrics with a percentile bootstrap CI over samples, the
mean experts per token (overall and per MoE layer), the active parameters and FLOPs per token that
follow from them (:func:`moescope.models.params.count_parameters`: the routed experts a token does
not use are left out; FLOPs = 2 x the parameters multiplied per token, attention's sequence-length
term left out), and the per-sample loss. Outputs: ``results.json``, ``summary.csv``,
``layers.csv``, ``samples/<task>__<n>.csv`` and ``pareto.png`` with ``pareto.csv``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.evaluate.calibrate import calibration_logits, match_k
from moescope.evaluate.scorer import Scorer
from moescope.evaluate.tasks import Task, bootstrap_ci
from moescope.strategies import parse_strategy


@dataclass
class EvalRow:
    """One (task, strategy) result."""

    task: str
    strategy: str
    primary: str
    score: float
    score_lo: float
    score_hi: float
    higher_is_better: bool
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    mean_active: float
    active_per_layer: list[float]
    active_params: float
    flops_per_token: float
    n_samples: int
    seconds: float


@dataclass
class EvalReport:
    """Every row, the per-sample columns behind them, and the settings."""

    model: str
    rows: list[EvalRow]
    samples: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "results": [asdict(r) for r in self.rows]}


def calibration_text(task: Task, doc: dict) -> str:
    """The text a calibration pass feeds for one document of ``task``."""
    for key in ("text", "page", "query"):
        if key in doc:
            return str(doc[key])
    if "ctx_a" in doc:
        return f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b']}"
    raise ConfigError(f"task {task.label}: no text to calibrate on")


def active_cost(model: Any, moe_layers: Sequence[int], per_layer: np.ndarray) -> tuple[float, float]:
    """``(active parameters, FLOPs)`` per token with ``per_layer`` mean experts at each MoE layer."""
    from moescope.models.params import count_parameters

    pc = count_parameters(
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    if list(pc.moe_layers) != list(moe_layers):
        raise ConfigError(
            f"parameter count sees MoE layers {list(pc.moe_layers)}, the model {list(moe_layers)}"
        )
    routed = float(np.sum(per_layer)) * pc.expert_params
    own = len(pc.moe_layers) * pc.top_k * pc.expert_params
    return float(pc.active - own + routed), float(2 * (pc.active_compute - own + routed))


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    strategies: Sequence[str],
    *,
    model_name: str = "",
    batch_size: int = 8,
    limit: int | None = None,
    match: float | None = None,
    calibration: float = 0.2,
    n_boot: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
) -> EvalReport:
    """Run every task under every strategy; see the module docstring for what is measured.

    ``calibration`` (a fraction < 1, or a count) of each task's documents is held apart when a
    strategy needs calibration (``--match-k``, or ``pvalue`` without a density file); then every
    strategy is scored on the remaining documents only, so all compare on the same samples.
    """
    log = log or (lambda _m: None)
    specs = list(strategies) or ["baseline"]
    plans = [parse_strategy(s) for s in specs]
    need_cal = match is not None or any(p.needs_calibration() for p in plans)
    loaded = [(t, t.load(limit)) for t in tasks]
    cal_texts: list[str] = []
    split: list[tuple[Task, list[dict]]] = []
    for task, data in loaded:
        docs = data.docs
        if need_cal:
            n_cal = int(calibration) if calibration >= 1 else max(1, math.ceil(calibration * len(docs)))
            if n_cal >= len(docs):
                raise ConfigError(
                    f"task {task.label}: --calibration {calibration} leaves no document to evaluate ({len(docs)} loaded)"
                )
            cal_texts += [calibration_text(task, d) for d in docs[:n_cal]]
            docs = docs[n_cal:]
        split.append((task, docs))
    samples = calibration_logits(model, tokenizer, cal_texts, seed=seed) if need_cal else None
    if match is not None:
        calibrated = []
        for spec, plan in zip(specs, plans, strict=True):
            if plan.is_baseline or plan.items[0][0].name not in ("topp", "threshold", "pvalue", "skip"):
                calibrated.append(spec)
                continue
            text, k = match_k(
                model, tokenizer, spec, match, cal_texts, samples=samples, batch_size=batch_size
            )
            log(f"--match-k {match}: {spec} -> {text} (mean k {k:.3f} on the calibration split)")
            calibrated.append(text)
        specs = calibrated
    rows: list[EvalRow] = []
    report = EvalReport(model_name, rows)
    for spec in specs:
        scorer = Scorer(model, tokenizer, spec, batch_size=batch_size, samples=samples)
        layers = scorer.router.spec.moe_layers
        for task, docs in split:
            scorer.reset_counter()
            t0 = time.perf_counter()
            bar = progress(f"{task.label} [{scorer.strategy}]", task.n_requests(docs)) if progress else None
            cols = task.score(scorer, docs, bar)
            seconds = time.perf_counter() - t0
            metrics = task.aggregate(cols)
            ci = bootstrap_ci(task, cols, n_boot=n_boot, seed=seed)
            per_layer = scorer.counter.mean()
            params, flops = active_cost(model, layers, per_layer)
            lo, hi = ci.get(task.primary, (float("nan"), float("nan")))
            rows.append(
                EvalRow(
                    task=task.label,
                    strategy=scorer.strategy,
                    primary=task.primary,
                    score=metrics[task.primary],
                    score_lo=lo,
                    score_hi=hi,
                    higher_is_better=task.higher_is_better,
                    metrics=metrics,
                    ci=ci,
                    mean_active=float(per_layer.mean()),
                    active_per_layer=[float(x) for x in per_layer],
                    active_params=params,
                    flops_per_token=flops,
                    n_samples=len(docs),
                    seconds=seconds,
                )
            )
            report.samples[(task.label, scorer.strategy)] = cols
            log(
                f"{task.label} [{scorer.strategy}]: {task.primary}={metrics[task.primary]:.4f} mean k={per_layer.mean():.3f}"
            )
    report.settings = {
        "batch_size": batch_size,
        "limit": limit,
        "match_k": match,
        "calibration": calibration if need_cal else None,
        "n_boot": n_boot,
        "seed": seed,
        "moe_layers": list(layers) if rows else [],
    }
    return report


def summary_table(report: EvalReport):
    """One row per (task, strategy): score, CI, mean k, active params, FLOPs (a polars frame)."""
    import polars as pl

    return pl.DataFrame(
        [
            {
                "task": r.task,
                "strategy": r.strategy,
                "metric": r.primary,
                "score": r.score,
                "ci_low": r.score_lo,
                "ci_high": r.score_hi,
                "mean_active_experts": r.mean_active,
                "active_params": r.active_params,
                "flops_per_token": r.flops_per_token,
                "n_samples": r.n_samples,
                "seconds": r.seconds,
            }
            for r in report.rows
        ]
    )


def write_outputs(report: EvalReport, out: Path, *, figures: bool = True) -> dict[str, Any]:
    """Write results.json, summary.csv, layers.csv, per-sample CSVs and the Pareto figure."""
    import polars as pl

    from moescope.core.figures import save_figure, save_table
    from moescope.trace.atomic import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", report.to_dict())
    table = summary_table(report)
    save_table(table, out / "summary.csv")
    layers = report.settings.get("moe_layers", [])
    save_table(
        pl.DataFrame(
            [
                {"task": r.task, "strategy": r.strategy, "layer": layer, "mean_active_experts": v}
                for r in report.rows
                for layer, v in zip(layers, r.active_per_layer, strict=True)
            ]
        ),
        out / "layers.csv",
    )
    names = {s: i for i, s in enumerate(dict.fromkeys(r.strategy for r in report.rows))}
    for (task, strategy), cols in report.samples.items():
        df = pl.DataFrame({k: v for k, v in cols.items()}).with_row_index("sample_id")
        df = df.with_columns(pl.lit(strategy).alias("strategy"))
        save_table(df, out / "samples" / f"{task}__{names[strategy]}.csv")
    files = ["results.json", "summary.csv", "layers.csv", "samples/"]
    if figures and report.rows:
        fig = pareto_figure(report)
        save_figure(fig, pareto_frame(report), out / "pareto")
        files += ["pareto.png", "pareto.csv"]
    return {"output": str(out), "files": files, "table": table.to_dicts()}


def pareto_frame(report: EvalReport):
    """Score against active parameters per (task, strategy), with a Pareto-optimal flag per task."""
    import polars as pl

    rows = []
    for r in report.rows:
        peers = [p for p in report.rows if p.task == r.task]
        better = (lambda a, b: a > b) if r.higher_is_better else (lambda a, b: a < b)
        dominated = any(
            p is not r
            and p.active_params <= r.active_params
            and not better(r.score, p.score)
            and (p.active_params < r.active_params or better(p.score, r.score))
            for p in peers
        )
        rows.append(
            {
                "task": r.task,
                "strategy": r.strategy,
                "metric": r.primary,
                "active_params": r.active_params,
                "mean_active_experts": r.mean_active,
                "score": r.score,
                "ci_low": r.score_lo,
                "ci_high": r.score_hi,
                "pareto": not dominated,
            }
        )
    return pl.DataFrame(rows)


def pareto_figure(report: EvalReport):
    """One panel per task: score (with CI) against active parameters per token, one point per strategy."""
    from moescope.core.figures import subplot_grid

    df = pareto_frame(report)
    tasks = list(dict.fromkeys(df["task"].to_list()))
    fig, axes = subplot_grid(len(tasks), width=3.6, height=2.8)
    for ax, task in zip(axes, tasks, strict=True):
        sub = df.filter(df["task"] == task).sort("active_params")
        x, y = sub["active_params"].to_numpy() / 1e6, sub["score"].to_numpy()
        err = np.abs(np.vstack([y - sub["ci_low"].to_numpy(), sub["ci_high"].to_numpy() - y]))
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2)
        front = sub.filter(sub["pareto"])
        ax.plot(front["active_params"].to_numpy() / 1e6, front["score"].to_numpy(), "-", lw=1, alpha=0.6)
        for xi, yi, s in zip(x, y, sub["strategy"].to_list(), strict=True):
            ax.annotate(s, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("active params per token (M)", fontsize=8)
        ax.set_ylabel(sub["metric"][0], fontsize=8)
    return fig


def format_table(report: EvalReport) -> str:
    """A plain-text table of the summary."""
    lines = [
        f"{'task':<10} {'strategy':<34} {'metric':<16} {'score':>9} {'95% CI':>19} {'mean k':>7} {'active M':>9}"
    ]
    for r in report.rows:
        ci = f"[{r.score_lo:.4f}, {r.score_hi:.4f}]"
        lines.append(
            f"{r.task:<10} {r.strategy[:34]:<34} {r.primary:<16} {r.score:>9.4f} {ci:>19} {r.mean_active:>7.3f}"
            f" {r.active_params / 1e6:>9.3f}"
        )
    return "\n".join(lines)
