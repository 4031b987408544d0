"""Baselines every other predictor is reported beside (STYLE.md: "a baseline comes first")."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numba import njit

from moescope.predict.base import BasePredictor, Interval, Options, RandomState, count_popularity
from moescope.predict.queries import Queries


class FrequencyPredictor(BasePredictor):
    """Trivial predictors: random, popularity, or the previous tokens' experts at the same layer.

    Parameters
    ----------
    strategy : ``"uniform"`` (random ranking; slot recall k/E in expectation), ``"most_frequent"``
        (the layer's most used experts in training), ``"previous_token"`` (the previous token's set at
        the same layer), ``"window"`` (experts used most often by the last ``window`` tokens at the
        same layer, their union when it fits the budget) or ``"same_token"`` (the set of the same
        token id's most recent earlier occurrence in the document at the same layer, popularity when
        there is none or the query hides the token).
    window : tokens looked back by ``"window"``.
    random_state : seed of ``"uniform"``; the same seed gives the same ranking.

    Attributes
    ----------
    popularity_ : ``(L, E)`` share of training routing slots per expert; breaks ties and answers
        queries without a previous token.

    Examples
    --------
    >>> p = FrequencyPredictor(strategy="previous_token")
    >>> p.get_params()["strategy"]
    'previous_token'
    """

    name: ClassVar[str] = "frequency"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "strategy": Options("uniform", "most_frequent", "previous_token", "window", "same_token"),
        "window": Interval(int, 1, 64),
        "random_state": RandomState(),
    }

    def __init__(
        self, *, strategy: str = "most_frequent", window: int = 4, random_state: int | None = 0
    ) -> None:
        self.strategy = strategy
        self.window = window
        self.random_state = random_state

    def history_window(self) -> int:
        return self.window if self.strategy == "window" else 1

    def _fit(self, trace: Any) -> None:
        self.popularity_ = count_popularity(trace)  # (L, E)

    def _scores(self, q: Queries) -> np.ndarray:
        n, E = len(q), q.num_experts
        pop = self.popularity_[q.layer].astype(np.float32)
        if self.strategy == "uniform":
            seed = [0 if self.random_state is None else int(self.random_state), q.layer, q.distance, n]
            return np.random.default_rng(seed).random((n, E), dtype=np.float32)
        base = pop * 1e-3  # popularity only breaks ties
        if self.strategy == "most_frequent":
            return np.broadcast_to(base, (n, E)).copy()
        if self.strategy == "same_token":
            if q.same_token is None:
                return np.broadcast_to(base, (n, E)).copy()
            hist, weight = q.same_token[:, None, q.layer], np.ones(1, np.float32)  # (n, 1, k)
        else:
            w = min(1 if self.strategy == "previous_token" else self.window, q.prev.shape[1])
            if w == 0:
                return np.broadcast_to(base, (n, E)).copy()
            hist = q.prev[:, :w, q.layer]  # (n, w, k), most recent first
            weight = (1.0 + 1e-2 * (w - np.arange(w, dtype=np.float32)) / w).astype(
                np.float32
            )  # newer counts more
        out = np.empty((n, E), np.float32)
        _add_history(base, hist, weight, q.missing, out)
        return out


@njit(cache=True, nogil=True)
def _add_history(
    base: np.ndarray, hist: np.ndarray, weight: np.ndarray, missing: int, out: np.ndarray
) -> None:
    """``out[i]`` = ``base`` + per expert the summed ``weight[t]`` of its appearances in ``hist[i, t]``.

    ``hist`` is ``(n, T, k)`` ids (``missing`` and ids outside ``[0, E)`` are skipped). Sums run in
    float64 in (t, slot) order and are rounded to float32 once, as a ``np.bincount`` of the ids would.
    """
    n, T, k = hist.shape
    E = out.shape[1]
    acc = np.zeros(E, np.float64)
    for i in range(n):
        for t in range(T):
            wt = np.float64(weight[t])
            for j in range(k):
                a = np.int64(hist[i, t, j])
                if a != missing and 0 <= a < E:
                    acc[a] += wt
        for e in range(E):
            out[i, e] = base[e] + np.float32(acc[e])
            acc[e] = 0.0


class TokenPredictor(BasePredictor):
    """Per-layer expert frequencies of each token id: ``P(e used at layer l | token)``, smoothed.

    Routing is largely decided by the token id (OpenMoE, FIELD-NOTES section 3), so this table alone
    predicts the first MoE layer, which no routing history can. Probabilities are smoothed toward
    the layer's popularity with ``alpha`` pseudo-counts, so unseen tokens get the popularity ranking.
    Token ids are hashed into ``buckets`` rows; temporal queries (the token is not known yet) get
    the popularity ranking.

    Attributes
    ----------
    keys_ : sorted int64 codes ``layer * buckets + bucket`` of the (layer, token) pairs seen.
    indptr_, experts_, counts_ : CSR lists of the experts each pair used, with their counts.
    totals_ : occurrences of each pair; ``popularity_`` ``(L, E)``.
    """

    name: ClassVar[str] = "token"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "alpha": Interval(float, 0.0, None),
        "buckets": Interval(int, 1, 1 << 40),
    }

    def __init__(self, *, alpha: float = 1.0, buckets: int = 1 << 31) -> None:
        self.alpha = alpha
        self.buckets = buckets

    def _fit(self, trace: Any) -> None:
        from moescope.predict.queries import iter_contexts
        from moescope.predict.rules import sum_by_code, votes_to_csr

        E, L = self.num_experts_, self.num_layers_
        self.popularity_ = count_popularity(trace)
        pairs, vals = [], []
        for ctx in iter_contexts(trace, window=0, lookahead=False):
            tok = ctx.token_id.astype(np.int64)
            known = tok >= 0
            for layer in range(L):
                act = ctx.actual[:, layer].astype(np.int64)  # (n, k)
                ok = known[:, None] & (act < E)
                key = layer * self.buckets + tok % self.buckets  # (n,)
                code = (key[:, None] * E + np.where(ok, act, 0))[ok]
                pairs.append(code)
                vals.append(np.ones(len(code), np.float32))
        pair, val = sum_by_code(np.concatenate(pairs), np.concatenate(vals))
        self.keys_, self.indptr_, self.experts_, self.counts_ = votes_to_csr(pair, val, E, E)
        k = self.top_k_
        self.totals_ = (
            (np.add.reduceat(self.counts_, self.indptr_[:-1]) / k).astype(np.float32)
            if len(self.counts_)
            else np.zeros(0, np.float32)
        )

    def _match(self, q: Queries) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose (layer, token) was seen in training and the table index of each."""
        if q.temporal or len(self.keys_) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tok = q.token_id.astype(np.int64)
        code = q.layer * self.buckets + tok % self.buckets
        pos = np.minimum(np.searchsorted(self.keys_, code), len(self.keys_) - 1)
        rows = np.nonzero((tok >= 0) & (self.keys_[pos] == code))[0]
        return rows, pos[rows]

    def counts(self, q: Queries) -> tuple[np.ndarray, np.ndarray]:
        """``(n, E)`` expert counts of each query's (layer, token) in training and ``(n,)`` occurrences."""
        from moescope.predict.rules import fill_rows

        out = np.zeros((len(q), q.num_experts), np.float32)
        tot = np.zeros(len(q), np.float32)
        rows, pos = self._match(q)
        fill_rows(out, rows, pos, self.indptr_, self.experts_, self.counts_)
        tot[rows] = self.totals_[pos]
        return out, tot

    def log_proba(self, q: Queries) -> np.ndarray:
        """``(n, E)`` smoothed ``log P(e used | layer, token)``.

        Computed once per distinct (layer, token) of the queries, and once for all unseen ones, then
        copied to the rows: tokens repeat, and the log dominates the cost.
        """
        from moescope.predict.rules import fill_rows

        E, n = q.num_experts, len(q)
        p = np.clip(self.popularity_[q.layer] * self.top_k_, 1e-6, 1 - 1e-6)  # marginal P(e used)
        rows, pos = self._match(q)
        uniq, inv = np.unique(pos, return_inverse=True)
        c = np.zeros((len(uniq) + 1, E), np.float32)  # row 0: an unseen token
        tot = np.zeros(len(uniq) + 1, np.float32)
        fill_rows(c, np.arange(1, len(uniq) + 1), uniq, self.indptr_, self.experts_, self.counts_)
        tot[1:] = self.totals_[uniq]
        table = np.log((c + self.alpha * p[None, :]) / (tot[:, None] + self.alpha)).astype(np.float32)
        which = np.zeros(n, np.int64)
        which[rows] = inv.reshape(-1) + 1
        return table[which]

    def _scores(self, q: Queries) -> np.ndarray:
        return self.log_proba(q)
