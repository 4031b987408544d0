"""Rules on expert histories: seed 004's five levels, majority vote, and its hybrid back-off.

Seed 004 predicts the next layer's *primary* expert of a token from the primary experts it used so
far (Mixtral, top-2 of 8):

- level 1: (layer, expert at N) -> expert at N+1;
- level 2: (layer, experts at N-1, N);
- level 3: (layer, experts at N-2, N-1, N);
- level 4: (layer, primary and secondary at N) -> primary at N+1;
- level 5: (layer, expert at N) -> expert at N+K, K = 2, 4, 8: here level 1 fitted at distance K.

A rule's answer is the majority vote of the training tokens with that key. The hybrid tries level 3,
then 2, then 1, then the layer's most frequent expert, so every query is answered.

Generalised to any trace and mode: the key is read from :meth:`Queries.chain` (the target token's
layers ``l-d, l-d-1, ...`` for spatial distance ``d``; the previous token's layers ``l, l-1, ...``
for temporal queries). Each key ranks experts by votes for the next primary (when slots are in
rank order) and then by votes for membership of the next set, so budgets beyond one are filled.
The tables are sparse (only observed keys), stored as sorted key codes with CSR candidate lists.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numba import njit

from moescope.predict.base import BasePredictor, Interval, Modes, Options, count_popularity
from moescope.predict.queries import Queries, iter_labelled, require_ranked, set_mask


def _key_parts(q: Queries, level: int) -> np.ndarray:
    """``(n, p)`` the primary ids (and secondary for level 4) forming a rule key; ``missing`` = unknown."""
    chain = q.chain(3 if level == 3 else 2)  # (n, depth, k)
    if level == 1:
        return chain[:, :1, 0]
    if level == 2:
        return chain[:, 1::-1, 0]  # (prev, curr)
    if level == 3:
        return chain[:, 2::-1, 0]  # (e-2, e-1, e)
    k = chain.shape[2]
    if k < 2:
        return np.concatenate([chain[:, :1, 0], chain[:, :1, 0]], axis=1)
    return chain[:, 0, :2]  # (primary, secondary)


def _encode(parts: np.ndarray, mode_idx: int, layer: int, L: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Key codes ``(n,)`` int64 and a mask of rows whose key is fully known."""
    ok = (parts < E).all(axis=1)
    code = np.full(len(parts), mode_idx * L + layer, np.int64)
    for j in range(parts.shape[1]):
        code = code * E + np.where(ok, parts[:, j], 0).astype(np.int64)
    return code, ok


class RulesPredictor(BasePredictor):
    """Seed 004's rule tables (levels 1-4, level 5 = level 1 at distance K) and the hybrid back-off.

    Parameters
    ----------
    level : 1, 2, 3, 4 or ``"hybrid"`` (3, else 2, else 1, else the layer's most frequent expert).
        A single level abstains where no rule matches, as the seed's evaluation skips them.
    distances : modes to fit (spatial distances >= 1; 0 = temporal). Level 5 of the seed is
        ``level=1, distances=(2, 4, 8)``.
    target : ``"primary"`` votes for the next first choice as the seed does, with membership votes
        ranking the rest; ``"set"`` votes for membership only; ``"auto"`` picks ``"primary"`` when the
        trace's slots are in rank order (``routing.slot_order == "rank"``), else ``"set"``;
        ``"primary"`` on a ``set`` trace is refused.
    max_candidates : experts kept per rule (the most voted), bounding the table size.

    Attributes
    ----------
    tables_ : per level, ``keys`` (sorted int64 codes of mode, layer and expert ids), ``indptr``,
        ``experts`` and ``votes`` (CSR candidate lists).
    popularity_ : ``(L, E)`` most-frequent fallback of the hybrid.
    primary_ : whether votes use the primary expert.
    """

    name: ClassVar[str] = "rules"
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "level": Options(1, 2, 3, 4, "hybrid"),
        "distances": Modes(),
        "target": Options("auto", "primary", "set"),
        "max_candidates": Interval(int, 1, None),
    }

    def __init__(
        self,
        *,
        level: int | str = "hybrid",
        distances: tuple[int, ...] = (1,),
        target: str = "auto",
        max_candidates: int = 16,
    ) -> None:
        self.level = level
        self.distances = distances
        self.target = target
        self.max_candidates = max_candidates

    def _levels(self) -> tuple[int, ...]:
        return (3, 2, 1) if self.level == "hybrid" else (int(self.level),)

    def _modes(self) -> list[int]:
        return [int(d) for d in self.modes_]

    def _fit(self, trace: Any) -> None:
        E, L, k = self.num_experts_, self.num_layers_, self.top_k_
        self.modes_ = np.asarray(sorted(set(int(d) for d in self.distances)), np.int64)
        if self.target == "primary":
            require_ranked(trace, "target", self.target)
        self.primary_ = bool(self.target == "primary" or (self.target == "auto" and trace.ranked))
        self.popularity_ = count_popularity(trace)
        mode_idx = {int(d): i for i, d in enumerate(self.modes_)}
        # votes per (key, expert): primary votes weigh (k + 1) set votes, so primary decides first
        w_primary = float(k + 1) if self.primary_ else 0.0
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {lv: [] for lv in self._levels()}
        for q, actual, valid in iter_labelled(trace, list(self.modes_), window=1, lookahead=False):
            onehot = set_mask(actual, E, q.missing).astype(np.float32)  # (n, E)
            if w_primary:
                onehot[np.arange(len(actual)), np.minimum(actual[:, 0], E - 1)] += w_primary
            for lv in parts:
                code, ok = _encode(_key_parts(q, lv), mode_idx[q.distance], q.layer, L, E)
                ok &= valid
                rows, ex = np.nonzero(onehot[ok] > 0)
                pair = code[ok][rows] * E + ex
                val = onehot[ok][rows, ex]
                parts[lv].append(sum_by_code(pair, val))
        self.tables_ = {}
        for lv, chunks in parts.items():
            pair, val = sum_by_code(
                np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64),
                np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.float32),
            )
            keys, indptr, experts, votes = votes_to_csr(pair, val, E, self.max_candidates)
            self.tables_[f"{lv}.keys"] = keys
            self.tables_[f"{lv}.indptr"] = indptr
            self.tables_[f"{lv}.experts"] = experts
            self.tables_[f"{lv}.votes"] = votes

    def _match(self, q: Queries, level: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the queries ``rows``: table index of their rule at ``level`` and whether one matches."""
        mode_idx = int(np.searchsorted(self.modes_, q.distance))
        code, ok = _encode(_key_parts(q, level)[rows], mode_idx, q.layer, self.num_layers_, q.num_experts)
        keys = self.tables_[f"{level}.keys"]
        if len(keys) == 0:
            return np.zeros(len(rows), np.int64), np.zeros(len(rows), bool)
        pos = np.minimum(np.searchsorted(keys, code), len(keys) - 1)
        return pos, ok & (keys[pos] == code)

    def _scores(self, q: Queries) -> np.ndarray:
        """Votes of the matching rule plus a popularity tie-break; NaN rows abstain (single level).

        The hybrid takes each row from the first level (3, 2, 1) with a matching rule and zero votes
        where none matches; a level looks up only the rows still unanswered and fills its matches in
        one vectorised pass over the CSR candidate lists.
        """
        tie = (self.popularity_[q.layer] * 1e-6).astype(np.float32)
        hybrid = self.level == "hybrid"
        out = np.full((len(q), q.num_experts), 0.0 if hybrid else np.nan, np.float32)
        todo = np.arange(len(q))
        for lv in self._levels():
            if len(todo) == 0:
                break
            pos, found = self._match(q, lv, todo)
            fill_rows(
                out,
                todo[found],
                pos[found],
                self.tables_[f"{lv}.indptr"],
                self.tables_[f"{lv}.experts"],
                self.tables_[f"{lv}.votes"],
            )
            todo = todo[~found]
        out += tie
        return out


def fill_rows(
    out: np.ndarray,
    rows: np.ndarray,
    pos: np.ndarray,
    indptr: np.ndarray,
    experts: np.ndarray,
    values: np.ndarray,
) -> None:
    """``out[rows[i]]`` = zeros, then ``values`` at ``experts`` of CSR entry ``pos[i]`` (``(n, E)`` in place)."""
    if len(rows):
        _fill_rows_kernel(out, rows, pos, indptr, experts, values)


@njit(cache=True, nogil=True)
def _fill_rows_kernel(
    out: np.ndarray,
    rows: np.ndarray,
    pos: np.ndarray,
    indptr: np.ndarray,
    experts: np.ndarray,
    values: np.ndarray,
) -> None:
    """Compiled body of :func:`fill_rows`: one row at a time, no temporaries."""
    E = out.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for e in range(E):
            out[r, e] = 0.0
        p = pos[i]
        for c in range(indptr[p], indptr[p + 1]):
            out[r, experts[c]] = values[c]


def sum_by_code(pair: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``val`` per distinct ``pair`` code."""
    if len(pair) == 0:
        return pair.astype(np.int64), val.astype(np.float32)
    uniq, inv = np.unique(pair, return_inverse=True)
    return uniq, np.bincount(inv, weights=val, minlength=len(uniq)).astype(np.float32)


def votes_to_csr(
    pair: np.ndarray, val: np.ndarray, E: int, keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted pair codes -> (keys, indptr, experts, votes), keeping the ``keep`` most voted per key."""
    key = pair // E
    ex = (pair % E).astype(np.int16)
    # order by key, then by descending votes, then by expert id
    order = np.lexsort((ex, -val, key))
    key, ex, val = key[order], ex[order], val[order]
    keys, first, counts = np.unique(key, return_index=True, return_counts=True)
    rank_in_key = np.arange(len(key)) - np.repeat(first, counts)
    sel = rank_in_key < keep
    key, ex, val = key[sel], ex[sel], val[sel]
    counts = np.minimum(counts, keep)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return keys.astype(np.int64), indptr, ex, val.astype(np.float32)
