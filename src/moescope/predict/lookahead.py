"""Gate lookahead (seed 000, method 1): the next layers' gates applied early, read from the trace.

A capture with lookahead stores, for every token and MoE layer ``l``, the ``m`` best experts that
layer ``l+d``'s gate picks from layer ``l``'s state, in two variants (FIELD-NOTES section 4):
``gate_input`` (the next gate on this layer's gate input, as Mixtral-offloading, AdapMoE and
BigMoeOnEdge do) and ``residual`` (the next gate on the residual stream after this layer,
normalised with the next layer's norm). Column ``lookahead_<variant>_d<d>`` row ``l`` predicts layer
``l + d``; this predictor only re-ranks those ids, so its accuracy is the capture's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from moescope.errors import ConfigError
from moescope.predict.base import BasePredictor, Options, count_popularity
from moescope.predict.queries import Queries, split_lookahead_column


class LookaheadPredictor(BasePredictor):
    """Rank the experts the later gate picked from the current hidden state.

    Parameters
    ----------
    variant : ``"gate_input"`` or ``"residual"`` (see the module docstring).
    fallback : ``"popularity"`` answers queries with no lookahead (``l < d``, temporal) with the
        layer's most used experts; ``"abstain"`` leaves them unanswered (counted in coverage).

    Attributes
    ----------
    distances_ : distances the trace holds lookahead for; the predictor answers only these.
    popularity_ : ``(L, E)`` training popularity, used to fill budgets beyond ``m`` and as fallback.
    """

    name: ClassVar[str] = "lookahead"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "variant": Options("gate_input", "residual"),
        "fallback": Options("popularity", "abstain"),
    }

    def __init__(self, *, variant: str = "gate_input", fallback: str = "popularity") -> None:
        self.variant = variant
        self.fallback = fallback

    def _fit(self, trace: Any) -> None:
        dists = sorted(
            d for v, d in map(split_lookahead_column, trace.lookahead_columns) if v == self.variant
        )
        if not dists:
            raise ConfigError(
                f"{trace.path}: the trace has no lookahead_{self.variant}_d* columns (it has "
                f"{trace.lookahead_columns or 'none'}); capture with `lookahead` to use this predictor"
            )
        self.distances_ = np.asarray(dists, np.int64)
        self.popularity_ = count_popularity(trace)

    def _modes(self) -> list[int]:
        return [int(d) for d in self.distances_]

    def _scores(self, q: Queries) -> np.ndarray:
        n, E = len(q), q.num_experts
        look = q.lookahead.get(self.variant)
        if look is None:
            if self.fallback == "abstain":
                return np.full((n, E), np.nan, np.float32)
            return np.broadcast_to(self.popularity_[q.layer], (n, E)).astype(np.float32)
        m = look.shape[1]
        scores = np.broadcast_to(self.popularity_[q.layer] * 1e-3, (n, E)).astype(np.float32)
        scores = scores.copy()
        ids = np.where(look == q.missing, E, look).astype(np.int64)  # (n, m)
        rank_score = (m - np.arange(m, dtype=np.float32))[None, :].repeat(n, 0)
        padded = np.concatenate([scores, np.zeros((n, 1), np.float32)], axis=1)
        np.put_along_axis(padded, ids, np.take_along_axis(padded, ids, 1) + rank_score, axis=1)
        return padded[:, :E]
