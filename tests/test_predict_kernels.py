"""The compiled scoring kernels of the table predictors against their plain NumPy formulas.

Each reference below is the vectorised NumPy code the predictor used before its kernel; the kernels
must give bit-identical scores (same float32 rounding, same treatment of missing ids), on queries
built from a trace and on hand-made queries full of missing sentinels.
"""

from __future__ import annotations

import numpy as np
import pytest

from moescope.predict import iter_contexts, make_predictor
from moescope.predict.queries import Queries, scatter_counts
from moescope.predict.rules import fill_rows
from moescope.trace import Trace

L, E, K, W = 4, 8, 2, 4


@pytest.fixture(scope="module")
def trace(synthetic) -> Trace:
    return synthetic(
        n_tokens=40 * 64, num_layers=L, num_experts=E, top_k=K, noise=0.3, doc_len=64, vocab_size=50, seed=7
    )


def _queries(trace: Trace) -> list[Queries]:
    """Trace queries (documents start without history) and random ones with many missing ids."""
    out = []
    for ctx in iter_contexts(trace, window=W, lookahead=False):
        for layer in range(L):
            for d in (1, 2, 0):
                out.append(ctx.queries(layer, d))
        break
    rng = np.random.default_rng(0)
    miss = trace.missing_id
    n = 300
    for layer in range(L):
        for d in (1, 0):
            V = 0 if d == 0 else max(layer - d + 1, 0)

            def ids(shape: tuple[int, ...]) -> np.ndarray:
                a = rng.integers(0, E, shape).astype(np.uint8)
                a[rng.random(shape) < 0.3] = miss
                return a

            out.append(
                Queries(
                    layer=layer,
                    distance=d,
                    own=ids((n, V, K)),
                    prev=ids((n, W, L, K)),
                    token_id=np.where(rng.random(n) < 0.2, -1, rng.integers(0, 50, n)).astype(np.int32),
                    prev_token_id=rng.integers(-1, 50, (n, W)).astype(np.int32),
                    num_experts=E,
                    missing=miss,
                    same_token=None if d == 0 else ids((n, L, K)),
                )
            )
    return out


def ref_frequency(p, q: Queries) -> np.ndarray:
    n = len(q)
    pop = p.popularity_[q.layer].astype(np.float32)
    scores = np.broadcast_to(pop * 1e-3, (n, E)).copy()
    if p.strategy == "most_frequent":
        return scores
    if p.strategy == "same_token":
        if q.same_token is not None:
            scores += scatter_counts(q.same_token[:, q.layer], E, q.missing)
        return scores
    w = min(1 if p.strategy == "previous_token" else p.window, q.prev.shape[1])
    if w == 0:
        return scores
    hist = q.prev[:, :w, q.layer]
    recency = (1.0 + 1e-2 * (w - np.arange(w, dtype=np.float32)) / w)[None, :, None]
    scores += scatter_counts(
        hist.reshape(n, -1), E, q.missing, np.broadcast_to(recency, hist.shape).reshape(n, -1)
    )
    return scores


def ref_cooccurrence(p, q: Queries) -> np.ndarray:
    mi = int(np.searchsorted(p.modes_, q.distance))
    marg = np.clip(p._marginal(mi, q.layer), 1e-6, 1 - 1e-6)
    cond = np.clip(p.conditional(q.distance, q.layer), 1e-6, 1 - 1e-6)
    src = q.chain(1)[:, 0, :].astype(np.int64)
    known = src < E
    safe = np.where(known, src, 0)
    slot = np.arange(src.shape[1]) if p.ordered_ else np.zeros(src.shape[1], np.int64)
    n = len(q)
    if p.combine == "naive_bayes":
        table = np.log(cond) - np.log(marg)
        scores = np.broadcast_to(np.log(marg), (n, E)).astype(np.float32).copy()
        for j in range(src.shape[1]):
            scores += np.where(known[:, j : j + 1], table[slot[j]][safe[:, j]], 0.0)
        return scores
    total = np.zeros((n, E), np.float32)
    cnt = known.sum(1, keepdims=True).astype(np.float32)
    for j in range(src.shape[1]):
        total += np.where(known[:, j : j + 1], cond[slot[j]][safe[:, j]], 0.0)
    return np.where(cnt > 0, total / np.maximum(cnt, 1), marg[None, :]).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("popularity", {}),
        ("previous", {}),
        ("window", {}),
        ("window", {"window": 3}),
        ("same-token", {}),
    ],
)
def test_frequency_kernels_match_numpy(name: str, params: dict, trace: Trace) -> None:
    p = make_predictor(name, **params).fit(trace)
    for q in _queries(trace):
        got = p.predict_scores(q)
        assert got.dtype == np.float32 and got.shape == (len(q), E)
        np.testing.assert_array_equal(got, ref_frequency(p, q))


@pytest.mark.parametrize("combine", ["naive_bayes", "mean"])
@pytest.mark.parametrize("slots", ["ordered", "set"])
def test_cooccurrence_kernel_matches_numpy(combine: str, slots: str, trace: Trace) -> None:
    p = make_predictor("cooccurrence", distances=(1, 2, 0), combine=combine, slots=slots).fit(trace)
    for q in _queries(trace):
        got = p.predict_scores(q)
        assert got.dtype == np.float32 and got.shape == (len(q), E)
        np.testing.assert_array_equal(got, ref_cooccurrence(p, q))


def ref_fill_rows(out, rows, pos, indptr, experts, values) -> None:
    out[rows] = 0.0
    start = indptr[pos]
    cnt = indptr[pos + 1] - start
    total = int(cnt.sum())
    if total:
        offs = np.arange(total) + np.repeat(start - (np.cumsum(cnt) - cnt), cnt)
        out.reshape(-1)[np.repeat(rows * out.shape[1], cnt) + experts[offs]] = values[offs]


def test_fill_rows_kernel_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, 40)  # candidates per CSR entry, some empty
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    experts = np.concatenate([rng.permutation(E)[:c] for c in counts]).astype(np.int16)
    values = rng.random(len(experts)).astype(np.float32)
    for fill in (np.nan, 1.5):
        rows = rng.permutation(100)[:60]
        pos = rng.integers(0, 40, 60)
        got = np.full((100, E), fill, np.float32)
        want = got.copy()
        fill_rows(got, rows, pos, indptr, experts, values)
        ref_fill_rows(want, rows, pos, indptr, experts, values)
        np.testing.assert_array_equal(got, want)
    fill_rows(got, rows[:0], pos[:0], indptr, experts, values)  # nothing to fill
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["rules-level1", "rules-level3", "rules-hybrid", "token"])
def test_table_predictors_score_rows_independently(name: str, trace: Trace) -> None:
    """A row's scores do not depend on the rest of the batch (kernels keep no state between rows)."""
    p = make_predictor(name).fit(trace)
    for q in _queries(trace)[: L * 3]:
        if q.distance not in (p.modes() or [q.distance]):
            continue
        full = p.predict_scores(q)
        half = len(q) // 2
        idx = np.arange(half, len(q))
        sub = Queries(
            layer=q.layer,
            distance=q.distance,
            own=q.own[idx],
            prev=q.prev[idx],
            token_id=q.token_id[idx],
            prev_token_id=q.prev_token_id[idx],
            num_experts=q.num_experts,
            missing=q.missing,
            same_token=None if q.same_token is None else q.same_token[idx],
        )
        np.testing.assert_array_equal(p.predict_scores(sub), full[half:])
