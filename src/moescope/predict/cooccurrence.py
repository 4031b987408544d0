"""Conditional probabilities from inter-layer co-occurrence counts (seed 000, method 3).

Seed 000 normalises the co-occurrence matrix of consecutive layers by row to get
``P(Y at layer L+1 | X at layer L)``, and warns that a rare source with a near-certain successor
looks strong but is rare. Here the counts are per expert rather than per expert pair (the pair
alphabet C(64, 6) is far too large for DeepSeek), per target layer and mode, and smoothed toward the
target layer's marginal, so a rarely seen source falls back to popularity instead of overfitting:

    P(e | x = a) = (C[a, e] + alpha * P(e)) / (N[a] + alpha)

Sources are the experts of :meth:`Queries.chain` (the token's own layer ``l-d``; the previous
token's layer ``l`` for temporal queries). With rank-ordered slots each slot has its own table (the
first choice carries more information than the second), else the set is one bag of sources. The
evidence of the sources is combined naive-Bayes style, ``log P(e) + sum_s log(P(e | x_s) / P(e))``,
or as the mean of the conditionals.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numba import njit

from moescope.predict.base import BasePredictor, Interval, Modes, Options
from moescope.predict.queries import Queries, iter_labelled, require_ranked


class CooccurrencePredictor(BasePredictor):
    """Score each expert by its smoothed conditional probability given the source experts.

    Parameters
    ----------
    distances : modes to fit (spatial distances >= 1; 0 = temporal).
    alpha : smoothing strength (pseudo-counts toward the marginal).
    slots : ``"ordered"`` (one table per slot rank), ``"set"`` (one table for every source expert),
        or ``"auto"`` (ordered when the trace's slots are in rank order, ``routing.slot_order``);
        ``"ordered"`` on a ``set`` trace is refused.
    combine : ``"naive_bayes"`` (sum of log-likelihood ratios) or ``"mean"`` (mean conditional).

    Attributes
    ----------
    modes_ : fitted modes.
    counts_ : ``(M, L, S, E, E)`` co-occurrence counts, ``[mode, target layer, slot, source, target]``.
    source_counts_ : ``(M, L, S, E)`` source occurrences; ``target_counts_`` ``(M, L, E)``; ``rows_`` ``(M, L)``.
    ordered_ : whether slots have their own tables.
    """

    name: ClassVar[str] = "cooccurrence"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "distances": Modes(),
        "alpha": Interval(float, 0.0, None),
        "slots": Options("auto", "ordered", "set"),
        "combine": Options("naive_bayes", "mean"),
    }

    def __init__(
        self,
        *,
        distances: tuple[int, ...] = (1,),
        alpha: float = 1.0,
        slots: str = "auto",
        combine: str = "naive_bayes",
    ) -> None:
        self.distances = distances
        self.alpha = alpha
        self.slots = slots
        self.combine = combine

    def _modes(self) -> list[int]:
        return [int(d) for d in self.modes_]

    def _fit(self, trace: Any) -> None:
        E, L, k = self.num_experts_, self.num_layers_, self.top_k_
        self.modes_ = np.asarray(sorted(set(int(d) for d in self.distances)), np.int64)
        if self.slots == "ordered":
            require_ranked(trace, "slots", self.slots)
        self.ordered_ = bool(self.slots == "ordered" or (self.slots == "auto" and trace.ranked))
        S = k if self.ordered_ else 1
        M = len(self.modes_)
        counts = np.zeros((M, L, S, E, E), np.float64)
        src_counts = np.zeros((M, L, S, E), np.float64)
        tgt_counts = np.zeros((M, L, E), np.float64)
        rows = np.zeros((M, L), np.float64)
        midx = {int(d): i for i, d in enumerate(self.modes_)}
        for q, actual, valid in iter_labelled(trace, list(self.modes_), window=1, lookahead=False):
            mi, layer = midx[q.distance], q.layer
            tgt = actual[valid].astype(np.int64)  # (n, k), all recorded
            src = q.chain(1)[valid][:, 0, :].astype(np.int64)  # (n, k), missing >= E
            tgt_counts[mi, layer] += np.bincount(tgt.ravel(), minlength=E)[:E]
            rows[mi, layer] += len(tgt)
            for s in range(k):
                slot = s if self.ordered_ else 0
                known = src[:, s] < E
                a = src[known, s]
                src_counts[mi, layer, slot] += np.bincount(a, minlength=E)[:E]
                pair = (a[:, None] * E + tgt[known]).ravel()  # (source, target) codes
                counts[mi, layer, slot] += np.bincount(pair, minlength=E * E).reshape(E, E)
        self.counts_ = counts.astype(np.float32)
        self.source_counts_ = src_counts.astype(np.float32)
        self.target_counts_ = tgt_counts.astype(np.float32)
        self.rows_ = rows.astype(np.float32)

    def conditional(self, distance: int, layer: int) -> np.ndarray:
        """``(S, E, E)`` smoothed ``P(target e | source slot s = a)`` for one mode and target layer."""
        self.check_is_fitted()
        mi = int(np.searchsorted(self.modes_, distance))
        marg = self._marginal(mi, layer)
        c = self.counts_[mi, layer]
        n = self.source_counts_[mi, layer][..., None]
        return ((c + self.alpha * marg) / np.maximum(n + self.alpha, 1e-12)).astype(np.float32)

    def _marginal(self, mi: int, layer: int) -> np.ndarray:
        E = self.num_experts_
        r = self.rows_[mi, layer]
        if r <= 0:
            return np.full(E, self.top_k_ / E, np.float32)
        # smoothed so no expert has probability 0 (log-safe)
        return ((self.target_counts_[mi, layer] + 0.5 * self.top_k_ / E) / (r + 0.5)).astype(np.float32)

    def _scores(self, q: Queries) -> np.ndarray:
        """Combine the source experts' evidence in one compiled pass per row (:func:`_sum_rows`).

        Unknown sources (``missing``) add nothing; each row adds its sources in slot order, in
        float32, as the vectorised formula did, without an ``(n, E)`` temporary per source.
        """
        E = q.num_experts
        mi = int(np.searchsorted(self.modes_, q.distance))
        marg = np.clip(self._marginal(mi, q.layer), 1e-6, 1 - 1e-6)
        cond = np.clip(self.conditional(q.distance, q.layer), 1e-6, 1 - 1e-6)  # (S, E, E)
        src = q.chain(1)[:, 0, :]  # (n, k), missing >= E
        slot = np.arange(src.shape[1]) if self.ordered_ else np.zeros(src.shape[1], np.int64)
        out = np.empty((len(q), E), np.float32)
        if self.combine == "naive_bayes":
            table = (np.log(cond) - np.log(marg)).astype(np.float32)  # (S, E, E) log-likelihood ratios
            _sum_rows(np.log(marg).astype(np.float32), table, slot, src, False, out)
        else:
            _sum_rows(marg.astype(np.float32), cond, slot, src, True, out)
        return out


@njit(cache=True, nogil=True)
def _sum_rows(
    base: np.ndarray, table: np.ndarray, slot: np.ndarray, src: np.ndarray, mean: bool, out: np.ndarray
) -> None:
    """``out[i]`` = ``base`` + the sum over known sources ``a = src[i, j]`` of ``table[slot[j], a]``.

    With ``mean``, ``out[i]`` is instead that sum (from zero) divided by the number of known
    sources, or ``base`` when there is none. A source is known when ``0 <= a < E``.
    """
    n, k = src.shape
    E = out.shape[1]
    for i in range(n):
        cnt = 0
        for e in range(E):
            out[i, e] = np.float32(0.0) if mean else base[e]
        for j in range(k):
            a = np.int64(src[i, j])
            if a < 0 or a >= E:
                continue
            cnt += 1
            s = slot[j]
            for e in range(E):
                out[i, e] += table[s, a, e]
        if mean:
            if cnt == 0:
                for e in range(E):
                    out[i, e] = base[e]
            else:
                c = np.float32(cnt)
                for e in range(E):
                    out[i, e] /= c
