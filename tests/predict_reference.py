"""Reference metric computations the tests check :func:`moescope.predict.metrics.score_metrics` against.

They live with the tests because nothing in the library uses them: ``query_metrics`` scores ranked
ids, ``score_metrics_numpy`` scores raw scores in plain NumPy (no compiled kernel).
"""

from __future__ import annotations

import numpy as np


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


def query_metrics(
    ids: np.ndarray, actual: np.ndarray, num_experts: int, missing: int, budgets: list[int]
) -> np.ndarray:
    """``(n, X)`` per-query metric values in :func:`~moescope.predict.metrics.metric_names` order (``ids`` must have ``max(budgets)`` columns)."""
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


def score_metrics_numpy(
    scores: np.ndarray, actual: np.ndarray, num_experts: int, missing: int, budgets: list[int]
) -> np.ndarray:
    """:func:`~moescope.predict.metrics.score_metrics` in plain NumPy (the reference the compiled kernel is tested against).

    The top-``j`` set is every expert scoring above the ``j``-th largest score plus, among those
    equal to it, the lowest ids (the tie rule of :func:`~moescope.predict.base.rank`).
    """
    _n, E = scores.shape
    k = actual.shape[1]
    nan = np.isnan(scores)
    answered = ~nan.all(axis=1)
    s = (
        np.where(nan, -np.inf, scores).astype(np.float32)
        if nan.any()
        else scores.astype(np.float32, copy=False)
    )
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
