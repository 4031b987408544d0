"""Metrics against plain brute-force definitions, analytic random baselines and bootstrap coverage."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest

from moescope.predict.base import rank
from moescope.predict.metrics import (
    bootstrap_ratio_ci,
    metric_names,
    query_metrics,
    random_baselines,
    score_metrics,
)

MISSING = 255


def brute_force(scores: np.ndarray, actual: np.ndarray, budgets: list[int]) -> np.ndarray:
    """The metric definitions written plainly, one query at a time."""
    out = []
    for s, a in zip(scores, actual, strict=True):
        if np.isnan(s).all():
            out.append([0.0] * (3 + 2 * len(budgets)) + [0.0])
            continue
        order = sorted(range(len(s)), key=lambda e: (-(s[e] if not np.isnan(s[e]) else -np.inf), e))
        truth = {int(x) for x in a}
        k = len(a)
        row = [
            len(set(order[:k]) & truth) / k,
            float(order[0] in truth),
            float(set(order[:k]) == truth),
        ]
        row += [len(set(order[:m]) & truth) / k for m in budgets]
        row += [len(set(order[:m]) & truth) / m for m in budgets]
        row.append(1.0)
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize(("E", "k"), [(8, 2), (64, 6)])
def test_metrics_match_brute_force_with_ties_and_abstentions(E: int, k: int) -> None:
    rng = np.random.default_rng(E)
    n = 300
    scores = rng.integers(0, 3, (n, E)).astype(np.float32)  # many ties
    scores[:7] = np.nan  # abstentions
    actual = np.stack([rng.permutation(E)[:k] for _ in range(n)]).astype(np.uint8)
    budgets = [k, 2 * k]
    want = brute_force(scores, actual, budgets)
    np.testing.assert_allclose(score_metrics(scores, actual, E, MISSING, budgets), want)
    ids, top = rank(scores, max(budgets))
    np.testing.assert_allclose(query_metrics(ids, actual, E, MISSING, budgets), want)
    assert (ids[:7] == -1).all() and np.isnan(top[:7]).all()
    assert len(metric_names(budgets)) == want.shape[1]


def test_rank_orders_by_score_then_lower_id() -> None:
    s = np.array([[0.1, 0.5, 0.5, 0.9, np.nan]], np.float32)
    ids, top = rank(s, 4)
    assert ids.tolist() == [[3, 1, 2, 0]]
    np.testing.assert_allclose(top, [[0.9, 0.5, 0.5, 0.1]])


def test_random_baselines_are_the_exact_expectations() -> None:
    """Average every metric over all C(E, k) actual sets for a fixed ranking: that is the expectation
    of a uniformly random ranking against any fixed truth."""
    E, k, budgets = 6, 2, [2, 4]
    ranking = np.arange(E)[::-1].astype(np.float32)[None, :]  # any fixed ranking
    sets = np.array(list(combinations(range(E), k)), np.uint8)
    vals = score_metrics(np.repeat(ranking, len(sets), 0), sets, E, MISSING, budgets).mean(0)
    rb = random_baselines(E, k, budgets)
    for name, v in zip(metric_names(budgets), vals, strict=True):
        assert v == pytest.approx(rb[name]), name
    assert rb["exact"] == 1 / comb(E, k)


def test_missing_actual_ids_are_ignored() -> None:
    s = np.array([[3, 2, 1, 0]], np.float32)
    a = np.array([[0, MISSING]], np.uint8)
    v = score_metrics(s, a, 4, MISSING, [2])
    assert v[0, 1] == 1.0  # top-1 in the known part of the set


def test_bootstrap_interval_covers_and_has_binomial_width() -> None:
    rng = np.random.default_rng(0)
    p, U = 0.3, 2000
    hits = (rng.random(U) < p).astype(float)[:, None]
    lo, hi = bootstrap_ratio_ci(hits, np.ones(U), n_boot=2000, seed=1)
    assert lo[0] < hits.mean() < hi[0]
    se = np.sqrt(p * (1 - p) / U)
    assert (hi[0] - lo[0]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    # same seed, same interval
    lo2, hi2 = bootstrap_ratio_ci(hits, np.ones(U), n_boot=2000, seed=1)
    assert lo2[0] == lo[0] and hi2[0] == hi[0]
