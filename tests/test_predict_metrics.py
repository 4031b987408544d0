"""Metrics against plain brute-force definitions, analytic random baselines and bootstrap coverage."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest

from moescope.predict.base import rank
from moescope.predict.metrics import bootstrap_ratio_ci, metric_names, random_baselines, score_metrics
from predict_reference import query_metrics, score_metrics_numpy

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


# values that stress the tie rule: signed zeros, a denormal, infinities and NaN (= -inf)
HARD = np.array([-np.inf, -2.0, -1e-45, -0.0, 0.0, 1e-45, 0.5, 0.5, 3.0, np.inf, np.nan], np.float32)


@pytest.mark.parametrize(
    ("E", "k", "budgets", "dtype", "missing"),
    [
        (8, 2, [2, 4, 8], np.uint8, MISSING),
        (64, 6, [6, 12], np.uint8, MISSING),
        (13, 3, [3, 5, 13], np.int16, -1),
        (300, 4, [4, 9], np.int64, 1000),  # more than 256 experts: wider id field in the sort key
    ],
)
def test_score_metrics_equal_brute_force_on_hard_values(
    E: int, k: int, budgets: list, dtype, missing: int
) -> None:
    """Ties, signed zeros, infinities, partial and whole NaN rows, missing actual slots: the compiled
    kernel, the NumPy path and the plain per-row definition agree exactly."""

    rng = np.random.default_rng(E + k)
    n = 400
    scores = rng.choice(HARD, (n, E))
    scores[:20] = np.nan  # abstentions
    scores[20:40] = rng.integers(0, 2, (20, E))  # mostly ties
    scores[40:45] = 0.0  # one big tie: ids decide
    scores[45:50] = -0.0
    actual = np.stack([rng.permutation(E)[:k] for _ in range(n)]).astype(dtype)
    drop = rng.random((n, k)) < 0.15
    drop[:, 0] &= rng.random(n) < 0.5
    actual[drop] = missing  # unrecorded slots count in k but never hit
    want = brute_force(scores, np.where(actual == missing, -1, actual), budgets)
    got = score_metrics(scores, actual, E, missing, budgets)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(score_metrics_numpy(scores, actual, E, missing, budgets), got)
    ids, _ = rank(scores, max(budgets))
    np.testing.assert_allclose(query_metrics(ids, actual, E, missing, budgets), want, rtol=0, atol=1e-15)


def test_score_metrics_compare_in_float32_and_break_ties_by_lower_id() -> None:
    """float64 scores equal in float32 tie (the lower id wins); ``-0.0`` ties with ``+0.0``."""
    s64 = np.array([[1.0, 1.0 + 1e-12, 0.0], [0.0, -0.0, -1.0], [-0.0, 0.0, -1.0]])
    a = np.array([[1], [1], [1]], np.uint8)
    v = score_metrics(s64, a, 3, MISSING, [2])
    assert v[:, 1].tolist() == [0.0, 0.0, 0.0]  # id 0 ranks first in every row
    assert v[:, 3].tolist() == [1.0, 1.0, 1.0]  # and id 1 second
    np.testing.assert_array_equal(v, brute_force(s64.astype(np.float32), a, [2]))


def test_score_metrics_rejects_out_of_range_ids() -> None:
    s = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        score_metrics(s, np.array([[0, 1], [2, 4]], np.uint8), 4, MISSING, [2])
    with pytest.raises(ValueError, match="columns"):
        score_metrics(s, np.array([[0, 1], [2, 3]], np.uint8), 5, MISSING, [2])
    assert score_metrics(s[:0], np.zeros((0, 2), np.uint8), 4, MISSING, [2, 3]).shape == (0, 8)
