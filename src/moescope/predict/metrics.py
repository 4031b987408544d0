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
from numba import njit

_NEG_INF_BITS = -8388608  # int32 bits of float32 -inf


def metric_names(budgets: list[int]) -> list[str]:
    """Metric column names for these prefetch budgets, in report order."""
    return (
        ["slot_recall", "top1", "exact"]
        + [f"recall@{m}" for m in budgets]
        + [f"precision@{m}" for m in budgets]
        + ["coverage"]
    )


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


def random_baselines_by_count(num_experts: int, counts: np.ndarray, budgets: list[int]) -> dict[str, float]:
    """:func:`random_baselines` of a variable-k trace: each query's value at its own k, averaged.

    ``counts`` is the histogram of the queries' expert counts (``counts[c]`` queries use c experts).
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    out: dict[str, float] = {}
    for c in np.flatnonzero(counts):
        for key, value in random_baselines(num_experts, int(c), budgets).items():
            out[key] = out.get(key, 0.0) + counts[c] / total * value
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
    scores: np.ndarray,
    actual: np.ndarray,
    num_experts: int,
    missing: int,
    budgets: list[int],
    variable_k: bool = False,
) -> np.ndarray:
    """Per-query metric values (``(n, X)`` in :func:`metric_names` order) of ``rank(scores)``, without ranking ids.

    Ranking follows :func:`~moescope.predict.base.rank`: descending score, ties to the lower id, NaN
    counted as ``-inf`` and an all-NaN row an abstention (0 on every metric). Each actual expert's
    rank is the number of experts ahead of it under that order, so it is in the top ``j`` exactly when
    its rank is below ``j``. One compiled pass per row (:func:`_score_kernel`) makes this the cheap
    part of a table prediction; ``tests/predict_reference.py`` holds the plain-NumPy reference.
    Scores are compared in float32 (as predictors return them); actual ids other than ``missing``
    must lie in ``[0, num_experts)``, and each slot counts once (a repeated id twice).

    ``variable_k`` (a strategy trace, whose rows are padded with ``missing``): each query's k is its
    own number of experts c, so slot recall is ``|top-c ∩ actual| / c``, exact compares the top-c
    set, recall@m divides by c; padding slots are no expert.
    """
    s = np.ascontiguousarray(scores, dtype=np.float32)
    a = np.ascontiguousarray(actual)
    n, E = s.shape
    if E != num_experts:
        raise ValueError(f"scores have {E} columns, expected num_experts={num_experts}")
    k = a.shape[1]
    js = np.array([min(j, E) for j in [k, *budgets]], np.int64)
    out = np.empty((n, 4 + 2 * len(budgets)), np.float64)
    if n:
        _score_kernel(s, a, np.int64(missing), js, np.asarray(budgets, np.int64), out, variable_k)
    return out


@njit(cache=True, nogil=True)
def _score_kernel(
    s: np.ndarray,
    actual: np.ndarray,
    missing: int,
    js: np.ndarray,
    budgets: np.ndarray,
    out: np.ndarray,
    variable_k: bool,
) -> None:
    """Fill ``out`` (:func:`metric_names` order) row by row; ``js`` = top-``j`` sizes for k and each budget.

    Each expert gets a unique int64 key, its order-preserving float bits above ``E - 1 - id``, so
    "score higher, or equal with a lower id" is one integer comparison that vectorises; NaN becomes
    ``-inf`` and ``-0.0`` becomes ``+0.0`` first, as float comparison treats them.
    """
    n, E = s.shape
    k = actual.shape[1]
    nb = budgets.shape[0]
    shift = 1
    while (1 << shift) < E:
        shift += 1
    bits = s.view(np.int32)
    key = np.empty(E, np.int64)
    rank = np.empty(k, np.int64)
    for i in range(n):
        nan = 0
        for e in range(E):
            b = np.int64(bits[i, e])
            isnan = (b & 0x7FFFFFFF) > 0x7F800000
            nan += isnan
            b = _NEG_INF_BITS if isnan else b
            b ^= (b >> 31) & 0x7FFFFFFF  # negative floats: reverse their order
            b = 0 if b == -1 else b  # -0.0 == +0.0
            key[e] = (b << shift) | (E - 1 - e)
        if nan == E:
            out[i, :] = 0.0
            continue
        for j in range(k):
            a = np.int64(actual[i, j])
            if a == missing:
                rank[j] = E  # never in a top-j set
                continue
            if a < 0 or a >= E:
                raise ValueError(
                    "actual expert id out of range [0, num_experts) and not the missing sentinel"
                )
            ka = key[a]
            r = 0
            for e in range(E):
                r += key[e] > ka
            rank[j] = r
        kk = k  # the query's own k: its used slots in a variable-k trace
        j0 = js[0]
        if variable_k:
            kk = 0
            for j in range(k):
                kk += actual[i, j] != missing
            if kk == 0:
                out[i, :] = 0.0
                continue
            j0 = min(kk, E)
        h = 0
        top1 = 0.0
        for j in range(k):
            h += rank[j] < j0
            top1 = 1.0 if rank[j] == 0 else top1
        out[i, 0] = h / kk
        out[i, 1] = top1
        out[i, 2] = 1.0 if h == kk else 0.0
        for t in range(nb):
            h = 0
            for j in range(k):
                h += rank[j] < js[t + 1]
            out[i, 3 + t] = h / kk
            out[i, 3 + nb + t] = h / budgets[t]
        out[i, 3 + 2 * nb] = 1.0
