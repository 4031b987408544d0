"""Honest evaluation: fit on some documents, score on others, per layer, per mode and overall.

:func:`split_documents` splits a trace by document (never by token); :func:`evaluate_many` streams
the test trace once, asks every predictor the same :class:`~moescope.predict.queries.Queries`, and
returns for each predictor a long table (mode, layer, metric, value, CI, random baseline, queries)
and a JSON-ready summary. Queries whose routing was not recorded are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.core.estimator import plain_params
from moescope.errors import ConfigError, DataError
from moescope.predict.base import BasePredictor
from moescope.predict.metrics import (
    bootstrap_ratio_ci,
    metric_names,
    random_baselines,
    random_baselines_by_count,
    score_metrics,
)
from moescope.predict.queries import iter_contexts, mode_name
from moescope.trace.reader import Trace
from moescope.trace.split import split_documents as split_documents  # re-exported: predict.split_documents

BLOCK = 32  # tokens per bootstrap block when a trace has too few documents
WARM_ROWS = 64  # queries per (layer, mode) of the first block scored untimed before timing


@dataclass
class EvalResult:
    """Evaluation of one predictor: ``table`` rows (dicts) and a JSON-ready ``summary``."""

    name: str
    table: list[dict[str, Any]]
    summary: dict[str, Any]
    predict_seconds: float = 0.0
    predictions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_polars(self):
        import polars as pl

        return pl.DataFrame(self.table)

    def value(self, metric: str, mode: int | str = 1, layer: int | None = None) -> float:
        """One number: ``metric`` for ``mode`` (distance, 0 = temporal) over all layers or at ``layer``."""
        mname = mode if isinstance(mode, str) else mode_name(mode)
        for row in self.table:
            if (
                row["mode"] == mname
                and row["metric"] == metric
                and row["layer"] == (-1 if layer is None else layer)
            ):
                return float(row["value"])
        raise KeyError(f"no {metric} for mode {mname} layer {layer}")


def _default_modes(preds: dict[str, BasePredictor]) -> list[int]:
    modes: list[int] | None = None
    for p in preds.values():
        pm = p.modes()
        if pm:
            modes = sorted(set(pm) if modes is None else set(modes) & set(pm))
    return modes if modes else [1]


def evaluate_many(
    predictors: dict[str, BasePredictor],
    trace: Trace,
    *,
    modes: list[int] | None = None,
    budgets: list[int] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_docs: int = 20,
    batch_size: int = 65536,
) -> dict[str, EvalResult]:
    """Evaluate every predictor on ``trace`` (already restricted to test documents).

    ``modes``: spatial distances >= 1 and/or 0 (temporal); default: the modes all predictors were
    fitted for. ``budgets``: prefetch budgets m >= k (default ``[k, 2k]``).
    """
    if not predictors:
        raise ConfigError("no predictor to evaluate")
    for name, p in predictors.items():
        p.check_is_fitted()
        if p.num_experts_ != trace.num_experts or p.num_layers_ != trace.num_layers:
            raise ConfigError(
                f"predictor {name!r} was fitted on E={p.num_experts_}, L={p.num_layers_}; trace {trace.path} has "
                f"E={trace.num_experts}, L={trace.num_layers}"
            )
    modes = list(modes) if modes is not None else _default_modes(predictors)
    for name, p in predictors.items():
        pm = p.modes()
        bad = [m for m in modes if pm and m not in pm]
        if bad:
            raise ConfigError(
                f"predictor {name!r} was not fitted for mode(s) {[mode_name(m) for m in bad]}; "
                f"it answers {[mode_name(m) for m in pm]}"
            )
    k, E, L = trace.top_k, trace.num_experts, trace.num_layers
    capture = trace.manifest.get("capture", {})
    variable = bool(capture.get("variable_k"))  # a strategy trace: each query scored at its own k
    if variable:  # budgets start from the model's own k, not the storage width
        mk = min(int(capture.get("model_top_k") or k), k)
        budgets = sorted(set(budgets or [mk, min(2 * mk, E)]))
        if budgets[0] < 1 or budgets[-1] > E:
            raise ConfigError(f"budget values must be in [1, E={E}] for a variable-k trace, got {budgets}")
    else:
        budgets = sorted(set(budgets or [k, min(2 * k, E)]))
        if budgets[0] < k or budgets[-1] > E:
            raise ConfigError(f"budget values must be in [k={k}, E={E}], got {budgets}")
    sizes = np.zeros(k + 1, np.int64)  # variable k: queries by their number of experts
    names = metric_names(budgets)
    X = len(names)
    window = max(p.history_window() for p in predictors.values())
    # per predictor: lists of (mode_idx, layer, unit_code, count, sums (X,))
    acc: dict[str, list[tuple[np.ndarray, ...]]] = {n: [] for n in predictors}
    timing = {n: 0.0 for n in predictors}
    count = {n: 0 for n in predictors}
    look = any(
        p.name in ("lookahead", "combined") or getattr(p, "use_lookahead", False) for p in predictors.values()
    )
    ndocs_seen: set[int] = set()
    first = True  # warm up on the first block: compiling or loading kernels is not throughput
    for ctx in iter_contexts(trace, window=window, lookahead=look, batch_size=batch_size):
        pos = ctx.position.astype(np.int64) if ctx.position is not None else _positions(ctx)
        unit = ctx.doc_id.astype(np.int64) * (1 << 20) + pos // BLOCK
        ndocs_seen.update(np.unique(ctx.doc_id).tolist())
        for layer in range(L):
            actual = ctx.actual[:, layer]
            pad = actual == ctx.missing
            valid = ~pad.all(axis=1) if variable else ~pad.any(axis=1)  # variable k: padding masked
            if not valid.any():
                continue
            rows = np.nonzero(valid)[0]
            act = actual[rows]
            if variable:
                sizes += np.bincount((~pad[rows]).sum(1), minlength=k + 1)
            uniq, inv = np.unique(unit[rows], return_inverse=True)
            cnt = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
            codes = (inv[:, None] * X + np.arange(X)).reshape(-1)  # (unit, metric) per value
            for mi, d in enumerate(modes):
                q = ctx.queries(layer, d, rows=rows)
                if first:
                    _warm_up(
                        predictors,
                        ctx.queries(layer, d, rows=rows[:WARM_ROWS]),
                        act[:WARM_ROWS],
                        E,
                        ctx.missing,
                        budgets,
                        variable,
                    )
                for name, p in predictors.items():
                    t0 = time.perf_counter()
                    vals = score_metrics(p.predict_scores(q), act, E, ctx.missing, budgets, variable)
                    timing[name] += time.perf_counter() - t0
                    count[name] += len(q)
                    sums = np.bincount(codes, weights=vals.reshape(-1), minlength=len(uniq) * X).reshape(
                        -1, X
                    )
                    acc[name].append((np.full(len(uniq), mi), np.full(len(uniq), layer), uniq, cnt, sums))
        first = False
    by_doc = len(ndocs_seen) >= min_docs
    rand = random_baselines_by_count(E, sizes, budgets) if variable else random_baselines(E, k, budgets)
    results = {}
    for name, p in predictors.items():
        parts = acc[name]
        if not parts:
            raise DataError(f"{trace.path}: no (token, layer) with recorded routing to evaluate on")
        mi = np.concatenate([a[0] for a in parts])
        li = np.concatenate([a[1] for a in parts])
        un = np.concatenate([a[2] for a in parts])
        ct = np.concatenate([a[3] for a in parts])
        sm = np.concatenate([a[4] for a in parts])
        if by_doc:
            un = un >> 20
        table, summary = _aggregate(mi, li, un, ct, sm, modes, L, names, rand, n_boot, level, seed)
        summary.update(
            {
                "predictor": p.name,
                "params": plain_params(p),
                "trace": str(trace.path),
                "num_experts": E,
                "top_k": k,
                "variable_k": variable,
                "budgets": budgets,
                "ci": {
                    "level": level,
                    "n_boot": n_boot,
                    "unit": "document" if by_doc else f"block of {BLOCK} tokens",
                },
                "predict_seconds": timing[name],
                "predictions_per_second": count[name] / timing[name] if timing[name] > 0 else None,
            }
        )
        results[name] = EvalResult(name, table, summary, timing[name], count[name])
    return results


def evaluate(predictor: BasePredictor, trace: Trace, **kwargs: Any) -> EvalResult:
    """Evaluate one predictor; see :func:`evaluate_many`."""
    return evaluate_many({predictor.name: predictor}, trace, **kwargs)[predictor.name]


def _warm_up(
    predictors: dict[str, BasePredictor],
    q: Any,
    actual: np.ndarray,
    E: int,
    missing: int,
    budgets: list[int],
    variable: bool = False,
) -> None:
    """Score a few queries untimed, so the timed calls do not pay for compiling or loading kernels."""
    for p in predictors.values():
        score_metrics(p.predict_scores(q), actual, E, missing, budgets, variable)


def _positions(ctx: Any) -> np.ndarray:
    """Position of each row within its document block (rows are in document order)."""
    doc = ctx.doc_id
    n = len(doc)
    start = np.ones(n, bool)
    start[1:] = doc[1:] != doc[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return np.arange(n) - first


def _aggregate(
    mi: np.ndarray,
    li: np.ndarray,
    un: np.ndarray,
    ct: np.ndarray,
    sm: np.ndarray,
    modes: list[int],
    L: int,
    names: list[str],
    rand: dict[str, float],
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Group per-unit sums into per-(mode, layer) and per-mode values with bootstrap intervals."""
    X = len(names)
    units, uinv = np.unique(un, return_inverse=True)
    U = len(units)
    G = len(modes) * (L + 1)  # column L = all layers pooled
    num = np.zeros((U, G, X))
    den = np.zeros((U, G))
    g = mi * (L + 1) + li
    np.add.at(num, (uinv, g), sm)
    np.add.at(den, (uinv, g), ct)
    for m in range(len(modes)):
        num[:, m * (L + 1) + L] = num[:, m * (L + 1) : m * (L + 1) + L].sum(1)
        den[:, m * (L + 1) + L] = den[:, m * (L + 1) : m * (L + 1) + L].sum(1)
    tot_num = num.sum(0)  # (G, X)
    tot_den = den.sum(0)  # (G,)
    lo, hi = bootstrap_ratio_ci(
        num.reshape(U, G * X), np.repeat(den, X, axis=1), n_boot=n_boot, level=level, seed=seed
    )
    lo, hi = lo.reshape(G, X), hi.reshape(G, X)
    table: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"random": rand, "modes": {}}
    for m, d in enumerate(modes):
        mname = mode_name(d)
        entry: dict[str, Any] = {"overall": {}, "layers": []}
        for layer in [*range(L), -1]:
            gi = m * (L + 1) + (L if layer == -1 else layer)
            n = tot_den[gi]
            row_vals = {}
            for x, metric in enumerate(names):
                value = tot_num[gi, x] / n if n else float("nan")
                table.append(
                    {
                        "mode": mname,
                        "distance": d,
                        "layer": layer,
                        "metric": metric,
                        "value": float(value),
                        "ci_lo": float(lo[gi, x]) if n else float("nan"),
                        "ci_hi": float(hi[gi, x]) if n else float("nan"),
                        "random": rand[metric],
                        "queries": int(n),
                    }
                )
                row_vals[metric] = float(value)
                if layer == -1:
                    entry["overall"][metric] = {
                        "value": float(value),
                        "ci": [float(lo[gi, x]), float(hi[gi, x])],
                        "random": rand[metric],
                    }
            if layer == -1:
                entry["queries"] = int(n)
            else:
                entry["layers"].append({"layer": layer, "queries": int(n), **row_vals})
        summary["modes"][mname] = entry
    return table, summary
