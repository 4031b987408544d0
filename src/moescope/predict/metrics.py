"""Prediction metrics, their random baselines, and cluster-bootstrap confidence intervals.

Conventions (FIELD-NOTES section 4), per query = one (token, layer) with recorded routing:

- ``slot_recall``: ``|top-k predicted ∩ actual| / k``;
- ``top1``: the highest-ranked prediction is in the actual set (the seed notes' "top-1");
- ``exact``: the top-k predicted set equals the actual set;
- ``recall@m``: ``|top-m ∩ actual| / k`` for a prefetch budget ``m >= k``;
- ``precision@m``: ``|top-m ∩ actual| / m``, the share of prefetched experts that get used;
- ``coverage``: share of queries the predictor answered (an abstention scores 0 on every metric).

A predictor ranking experts uniformly at random scores ``k/E`` slot recall and top-1,
``1/C(E, k)`` exact-set, ``m/E`` recall@m and ``k/E`` precision@m; these are reported beside every
number. Tokens of one document are correlated, so intervals resample whole documents (or blocks of
consecutive tokens when a trace has fewer than ``min_docs`` documents).
"""

from __future__ import annotations

from math import comb

import numpy as np


def metric_names(budgets: list[int]) -> list[str]:
    """Metric column names for these prefetch budgets, in report order."""
    return ["slot_recall", "top1", "exact"] + [f"recall@{m}" for m in budgets] + [
        f"precision@{m}" for m in budgets
    ] + ["coverage"]


def hit_matrix(ids: np.ndarray, actual: np.ndarray, num_experts: int, missing: int) -> np.ndarray:
    """``(n, M)`` bool: ranked prediction ``ids[i, j]`` is in the actual set of query ``i``.

    ``ids`` is ``(n, M)`` (-1 = abstain), ``actual`` ``(n, k)`` (``missing`` ignored).
    """
    n = len(ids)
    member = np.zeros((n, num_experts + 1), bool)
    safe = np.where(actual == missing, num_experts, actual).astype(np.int64)
    np.put_along_axis(member, safe, True, axis=1)
    member[:, num_experts] = False
    pred = np.where(ids < 0, num_experts, ids).astype(np.int64)
    return np.take_along_axis(member, pred, axis=1)


def query_metrics(ids: np.ndarray, actual: np.ndarray, num_experts: int, missing: int, budgets: list[int]) -> np.ndarray:
    """``(n, X)`` per-query metric values in :func:`metric_names` order (``ids`` must have ``max(budgets)`` columns)."""
    k = actual.shape[1]
    hits = hit_matrix(ids, actual, num_experts, missing)  # (n, M)
    cum = np.cumsum(hits, axis=1, dtype=np.int32)  # hits within the top j+1
    kk = min(k, hits.shape[1])
    at_k = cum[:, kk - 1]
    cols = [at_k / k, hits[:, 0].astype(np.float64), (at_k == k).astype(np.float64)]
    for m in budgets:
        c = cum[:, min(m, hits.shape[1]) - 1]
        cols.append(c / k)
    for m in budgets:
        cols.append(cum[:, min(m, hits.shape[1]) - 1] / m)
    cols.append((ids[:, 0] >= 0).astype(np.float64))
    return np.stack(cols, axis=1)


def random_baselines(num_experts: int, top_k: int, budgets: list[int]) -> dict[str, float]:
    """Expected value of each metric for a uniformly random ranking (analytic)."""
    E, k = num_experts, top_k
    out = {"slot_recall": k / E, "top1": k / E, "exact": 1.0 / comb(E, k)}
    for m in budgets:
        out[f"recall@{m}"] = min(m, E) / E
    for m in budgets:
        out[f"precision@{m}"] = k / E
    out["coverage"] = 1.0
    return out


def bootstrap_ratio_ci(
    num: np.ndarray, den: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of ``sum(num) / sum(den)`` resampling units (rows) with replacement.

    ``num`` is ``(U, X)`` per-unit sums of X statistics, ``den`` ``(U,)`` or ``(U, X)`` counts.
    Returns ``(lo, hi)`` each ``(X,)``. Resampling is done with multinomial unit weights, so all
    statistics share the same resamples.
    """
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    if den.ndim == 1:
        den = den[:, None]
    U = len(num)
    if U == 0:
        nan = np.full(num.shape[1] if num.ndim == 2 else 1, np.nan)
        return nan, nan
    rng = np.random.default_rng(seed)
    w = rng.multinomial(U, np.full(U, 1.0 / U), size=n_boot).astype(np.float64)  # (B, U)
    ratio = (w @ num) / np.maximum(w @ den, 1e-300)  # (B, X)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ratio, [alpha, 1 - alpha], axis=0)
    return lo, hi


def score_metrics(
    scores: np.ndarray, actual: np.ndarray, num_experts: int, missing: int, budgets: list[int]
) -> np.ndarray:
    """Same as :func:`query_metrics` on ``rank(scores)``, computed from scores without sorting.

    The top-``j`` set is every expert scoring above the ``j``-th largest score plus, among those
    equal to it, the lowest ids (the tie rule of :func:`~moescope.predict.base.rank`). Thresholds
    come from one ``np.partition`` of the values, several times faster than ranking ids, which is
    what lets table predictors be scored at over a million queries per second.
    """
    _n, E = scores.shape
    k = actual.shape[1]
    nan = np.isnan(scores)
    answered = ~nan.all(axis=1)
    s = np.where(nan, -np.inf, scores).astype(np.float32) if nan.any() else scores.astype(np.float32, copy=False)
    known = actual != missing
    a = np.where(known, actual, 0).astype(np.int64)
    sa = np.take_along_axis(s, a, 1)  # (n, k) scores of the actual experts
    js = sorted({min(j, E) for j in [k, *budgets]})
    thr = np.sort(s, axis=1)  # (n, E) ascending; one SIMD sort beats a multi-kth partition

    hits_at: dict[int, np.ndarray] = {}
    for j in js:
        t = thr[:, E - j : E - j + 1]  # (n, 1) the j-th largest score
        tied = (sa == t) & known
        h = ((sa > t) & known).sum(1)
        rows = np.nonzero(tied.any(1))[0]
        if len(rows):
            sr, tr = s[rows], t[rows]
            need = j - (sr > tr).sum(1)  # how many tied experts fill the top-j
            tie_mask = sr == tr  # (r, E)
            before = np.cumsum(tie_mask, axis=1) - tie_mask  # tied experts with a lower id
            order = np.take_along_axis(before, a[rows], 1)  # (r, k)
            h[rows] += (tied[rows] & (order < need[:, None])).sum(1)
        hits_at[j] = np.where(answered, h, 0)
    top = np.argmax(s, axis=1)
    top1 = ((a == top[:, None]) & known).any(1) & answered
    cols = [hits_at[min(k, E)] / k, top1.astype(np.float64), (hits_at[min(k, E)] == k).astype(np.float64)]
    cols += [hits_at[min(m, E)] / k for m in budgets]
    cols += [hits_at[min(m, E)] / m for m in budgets]
    cols.append(answered.astype(np.float64))
    return np.stack(cols, axis=1)
