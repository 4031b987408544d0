"""Temporal predictors: when will ``(layer, expert)`` be used again, predicted at each use.

Next-layer predictors (the rest of :mod:`moescope.predict`) say which experts the *same token* needs
in a coming layer. A cache needs the other direction: of the experts a layer holds, which ones the
*coming tokens* will ask for soon (Belady evicts the one used furthest in the future). This module
predicts, at every use of an expert, the number of steps until that expert's next use at the same
layer, from what is known at that moment (causal features of the routing so far), after the
learned relaxed-Belady policies of the caching literature (Song et al., "Learning Relaxed Belady
for CDN caching", NSDI 2020: gaps between past uses, exponentially decayed counts, static
popularity; a gradient-boosted regressor on the log distance).

The features of a use at step ``s``, layer ``l``, expert ``e`` (:func:`access_features`):
``log2`` of the steps since the 1st..4th previous use of ``(l, e)``, ``log2(1 + c)`` of counts
decayed with half-lives 2, 8, 32 and 128 steps, ``log2`` of the step's position in its document and
the share of the document's steps so far that used ``(l, e)``, the layer, the log of the key's
training popularity, and a transition score: the summed training probabilities
``P(e at step s + 1 | e' at step s)`` over the experts ``e'`` of the current step at layer ``l``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numba import njit

from moescope.core.estimator import Estimator, Interval, OrNone, RandomState
from moescope.errors import ConfigError

CAP_LOG2 = 12.0  # distances are capped at 2^12 steps (no use before the end counts as the cap)
HALF_LIVES = (2.0, 8.0, 32.0, 128.0)
GAPS = 4
FEATURES = (
    *(f"log2_gap{i + 1}" for i in range(GAPS)),
    *(f"log2_count_h{int(h)}" for h in HALF_LIVES),
    "log2_doc_position",
    "doc_share",
    "layer",
    "log_popularity",
    "transition",
)


@njit(cache=True, nogil=True)
def _features(demand, doc_start, E, logpop, trans, half_lives, gaps):
    """One row of :data:`FEATURES` per valid entry of ``demand`` ``(S, L, W)``, in row-major order."""
    S, L, W = demand.shape
    K = L * E
    H = half_lives.shape[0]
    n = 0
    for s in range(S):
        for layer in range(L):
            for j in range(W):
                if demand[s, layer, j] >= 0:
                    n += 1
    F = gaps + H + 5
    out = np.empty((n, F), np.float32)
    last = np.full((K, gaps), -1, np.int64)  # steps of the previous uses, most recent first
    edc = np.zeros((K, H), np.float64)
    edc_t = np.zeros(K, np.int64)
    doc_count = np.zeros(K, np.int64)
    doc_first = 0
    cap = 2.0**CAP_LOG2
    r = 0
    for s in range(S):
        if doc_start[s]:
            doc_first = s
            doc_count[:] = 0
        pos = s - doc_first
        for layer in range(L):
            base = layer * E
            for j in range(W):
                e = demand[s, layer, j]
                if e < 0:
                    continue
                key = base + e
                for g in range(gaps):
                    t = last[key, g]
                    gap = cap if t < 0 else min(cap, float(s - t))
                    out[r, g] = np.log2(gap)
                dt = float(s - edc_t[key])
                for h in range(H):
                    out[r, gaps + h] = np.log2(1.0 + edc[key, h] * np.exp2(-dt / half_lives[h]))
                out[r, gaps + H] = np.log2(1.0 + pos)
                out[r, gaps + H + 1] = doc_count[key] / (pos + 1.0)
                out[r, gaps + H + 2] = layer
                out[r, gaps + H + 3] = logpop[key]
                tsum = 0.0
                for i in range(W):
                    e2 = demand[s, layer, i]
                    if e2 >= 0:
                        tsum += trans[layer, e2, e]
                out[r, gaps + H + 4] = tsum
                r += 1
        # update the state after the whole step: every feature of step s sees steps < s only
        for layer in range(L):
            base = layer * E
            for j in range(W):
                e = demand[s, layer, j]
                if e < 0:
                    continue
                key = base + e
                for g in range(gaps - 1, 0, -1):
                    last[key, g] = last[key, g - 1]
                last[key, 0] = s
                dt = float(s - edc_t[key])
                for h in range(H):
                    edc[key, h] = edc[key, h] * np.exp2(-dt / half_lives[h]) + 1.0
                edc_t[key] = s
                doc_count[key] += 1
    return out


@njit(cache=True, nogil=True)
def next_use_distance(demand, E):
    """Steps from every valid entry of ``demand`` ``(S, L, W)`` to the next use of the same
    ``(layer, expert)``; ``S`` (beyond the end) when there is none. Row-major order, like the features."""
    S, L, W = demand.shape
    nxt = np.full(L * E, -1, np.int64)
    dist = np.full((S, L, W), -1, np.int64)
    for s in range(S - 1, -1, -1):
        for layer in range(L):
            for j in range(W):
                e = demand[s, layer, j]
                if e < 0:
                    continue
                key = layer * E + e
                dist[s, layer, j] = (nxt[key] - s) if nxt[key] >= 0 else S
        for layer in range(L):
            for j in range(W):
                e = demand[s, layer, j]
                if e >= 0:
                    nxt[layer * E + e] = s
    return dist


def _demand_of(trace: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(N, L, k)`` int16 ids (-1 missing) and the ``(N,)`` document-start mask of a trace, in row order."""
    N, L, k = trace.num_tokens, trace.num_layers, trace.top_k
    ids = np.empty((N, L, k), np.int16)
    doc = np.empty(N, np.int64)
    start = 0
    for b in trace.iter_batches(["doc_id", "experts"]):
        n = len(b)
        ids[start : start + n] = np.where(b.experts == trace.missing_id, -1, b.experts.astype(np.int16))
        doc[start : start + n] = b.doc_id
        start += n
    new_doc = np.ones(N, bool)
    new_doc[1:] = doc[1:] != doc[:-1]
    return ids, new_doc


def batch_unions(
    demand: np.ndarray, doc_start: np.ndarray, num_experts: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each document's tokens in consecutive batches of ``batch_size``: ``(G, L, W)`` int16 union of
    a batch's experts per layer (ascending ids, -1 padded) and the ``(G,)`` document-start mask.

    The steps of ``moescope.simulate.prepare(trace, mode="prefill", batch_size=b)`` as sets (that
    one orders each union by count; a reuse model reads sets only).
    """
    N, L, _k = demand.shape
    E = int(num_experts)
    doc_index = np.cumsum(doc_start) - 1
    first = np.flatnonzero(doc_start)
    chunk = (np.arange(N) - first[doc_index]) // batch_size
    new_step = doc_start.copy()
    new_step[1:] |= chunk[1:] != chunk[:-1]
    group = np.cumsum(new_step) - 1
    G = int(group[-1]) + 1
    valid = demand >= 0
    flat = ((group[:, None, None] * L + np.arange(L)[None, :, None]) * E + np.where(valid, demand, 0))[valid]
    used = np.zeros(G * L * E, bool)
    used[flat] = True
    used = used.reshape(G, L, E)
    W = int(used.sum(axis=2).max())
    order = np.argsort(~used, axis=2, kind="stable")[:, :, :W]  # used ids first, ascending
    out = np.where(np.take_along_axis(used, order, axis=2), order, -1).astype(np.int16)
    return out, doc_start[new_step]


class NextUsePredictor(Estimator):
    """Predicts, at each use of an expert, how many steps until its next use at the same layer.

    Parameters
    ----------
    max_rows : training uses sampled (uniformly, ``random_state``) for the regressor.
    max_iter, max_leaf_nodes, learning_rate : of scikit-learn's ``HistGradientBoostingRegressor``.
    random_state : seed of the sample and the regressor.

    Attributes
    ----------
    num_layers_, num_experts_ : the fitted trace's shape.
    log_popularity_ : ``(L * E,)`` log share of training steps using each key.
    transition_ : ``(L, E, E)`` ``P(e at step s + 1 | e' at step s)`` per layer, from training.
    model_ : the fitted regressor of ``log2`` distance.
    train_mae_log2_ : its mean absolute error (log2 steps) on the training sample.

    Examples
    --------
    >>> p = NextUsePredictor(max_iter=20).fit(train)  # doctest: +SKIP
    >>> steps_ahead = p.predict_distance(demand, doc_start, num_experts=64)  # doctest: +SKIP
    """

    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "max_rows": Interval(int, 1, None),
        "max_iter": Interval(int, 1, None),
        "max_leaf_nodes": Interval(int, 2, None),
        "learning_rate": Interval(float, 1e-12, 1),
        "random_state": RandomState(),
    }

    def __init__(
        self,
        *,
        max_rows: int = 300_000,
        max_iter: int = 40,
        max_leaf_nodes: int = 31,
        learning_rate: float = 0.1,
        random_state: int = 0,
    ) -> None:
        self.max_rows = max_rows
        self.max_iter = max_iter
        self.max_leaf_nodes = max_leaf_nodes
        self.learning_rate = learning_rate
        self.random_state = random_state

    def fit(self, trace: Any) -> NextUsePredictor:
        """Learn the popularity, the transitions and the regressor from ``trace`` (decode order)."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        self._validate_params()
        self._reset()
        demand, doc_start = _demand_of(trace)
        S, L, _W = demand.shape
        E = int(trace.num_experts)
        self.num_layers_, self.num_experts_ = L, E
        valid = demand >= 0
        keys = (np.arange(L)[None, :, None] * E + np.where(valid, demand, 0))[valid]
        counts = np.bincount(keys, minlength=L * E).astype(np.float64)
        self.log_popularity_ = np.log((counts + 1.0) / (S + 2.0)).astype(np.float64)
        self.transition_ = _transitions(demand, doc_start, E)
        X = self._features(demand, doc_start)
        dist = next_use_distance(demand, E)[valid]
        y = np.log2(np.minimum(dist, 2.0**CAP_LOG2)).astype(np.float32)
        rng = np.random.default_rng(self.random_state)
        if len(y) > self.max_rows:
            pick = np.sort(rng.choice(len(y), self.max_rows, replace=False))
            X, y = X[pick], y[pick]
        model = HistGradientBoostingRegressor(
            max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes,
            learning_rate=self.learning_rate,
            random_state=self.random_state,
            early_stopping=False,
        )
        model.fit(X, y)
        self.model_ = model
        self.trees_ = _tree_arrays(model)
        self.train_mae_log2_ = float(np.mean(np.abs(self._predict_log2(X) - y)))
        self.fitted_ = True
        return self

    def _predict_log2(self, X: np.ndarray) -> np.ndarray:
        base, nodes, starts = self.trees_
        return _eval_trees(np.ascontiguousarray(X, dtype=np.float32), base, nodes, starts)

    def layer_latency_s(self, repeat: int = 200) -> float:
        """Median seconds to predict one layer's ``k`` uses at batch 1 (compiled trees, this CPU)."""
        import time

        self.check_fitted(self.num_layers_, self.num_experts_)
        k = 8
        X = np.zeros((k, len(FEATURES)), np.float32)
        self._predict_log2(X)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            self._predict_log2(X)
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def _features(self, demand: np.ndarray, doc_start: np.ndarray) -> np.ndarray:
        return _features(
            np.ascontiguousarray(demand, dtype=np.int16),
            np.ascontiguousarray(doc_start, dtype=np.bool_),
            self.num_experts_,
            self.log_popularity_,
            self.transition_,
            np.asarray(HALF_LIVES, np.float64),
            GAPS,
        )

    def check_fitted(self, num_layers: int, num_experts: int) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("NextUsePredictor is not fitted: call fit(trace) first")
        if (self.num_layers_, self.num_experts_) != (num_layers, num_experts):
            raise ConfigError(
                f"NextUsePredictor was fitted on {self.num_layers_} layers x {self.num_experts_} experts; "
                f"the replayed steps have {num_layers} x {num_experts}"
            )

    def predict_distance(self, demand: np.ndarray, doc_start: np.ndarray, num_experts: int) -> np.ndarray:
        """Predicted steps to the next use, ``(S, L, W)`` float64 (NaN where ``demand`` is -1).

        The prediction for ``demand[s, l, j]`` uses only steps ``< s`` and the experts of step ``s``
        at layer ``l``: what a deployment knows when that layer's router has run.
        """
        S, L, W = demand.shape
        self.check_fitted(L, int(num_experts))
        out = np.full((S, L, W), np.nan)
        valid = demand >= 0
        if valid.any():
            out[valid] = np.exp2(self._predict_log2(self._features(demand, doc_start)))
        return out


def _tree_arrays(model: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """The fitted regressor's trees as plain arrays for :func:`_eval_trees`.

    ``nodes`` ``(n, 5)`` float64 rows ``(feature or -1 at a leaf, threshold or leaf value, left,
    right, missing goes left)``, ``starts`` the first row of each tree; the prediction is the baseline
    plus one leaf value per tree (scikit-learn's own sum).
    """
    rows, starts, offset = [], [], 0
    for (tree,) in model._predictors:
        nd = tree.nodes
        leaf = nd["is_leaf"].astype(bool)
        arr = np.empty((len(nd), 5), np.float64)
        arr[:, 0] = np.where(leaf, -1, nd["feature_idx"])
        arr[:, 1] = np.where(leaf, nd["value"], nd["num_threshold"])
        arr[:, 2] = nd["left"] + offset
        arr[:, 3] = nd["right"] + offset
        arr[:, 4] = nd["missing_go_to_left"]
        rows.append(arr)
        starts.append(offset)
        offset += len(nd)
    base = float(np.ravel(model._baseline_prediction)[0])
    return base, np.concatenate(rows), np.asarray(starts, np.int64)


@njit(cache=True, nogil=True)
def _eval_trees(X, base, nodes, starts):
    """Sum of the trees' leaf values plus ``base`` for every row of ``X`` (see :func:`_tree_arrays`)."""
    n = X.shape[0]
    out = np.full(n, base)
    for r in range(n):
        acc = 0.0
        for t in range(starts.shape[0]):
            i = starts[t]
            while nodes[i, 0] >= 0:
                v = X[r, int(nodes[i, 0])]
                if np.isnan(v):
                    go_left = nodes[i, 4] != 0
                else:
                    go_left = v <= nodes[i, 1]
                i = int(nodes[i, 2]) if go_left else int(nodes[i, 3])
            acc += nodes[i, 1]
        out[r] += acc
    return out


@njit(cache=True)
def _transitions(demand, doc_start, E):
    """``(L, E, E)``: per layer, ``P(e at step s + 1 | e' at step s)`` within documents (add-one smoothed)."""
    S, L, W = demand.shape
    joint = np.zeros((L, E, E), np.float64)
    seen = np.zeros((L, E), np.float64)
    for s in range(S - 1):
        if doc_start[s + 1]:
            continue
        for layer in range(L):
            for i in range(W):
                a = demand[s, layer, i]
                if a < 0:
                    continue
                seen[layer, a] += 1.0
                for j in range(W):
                    b = demand[s + 1, layer, j]
                    if b >= 0:
                        joint[layer, a, b] += 1.0
    for layer in range(L):
        for a in range(E):
            for b in range(E):
                joint[layer, a, b] = (joint[layer, a, b] + 1.0 / E) / (seen[layer, a] + 1.0)
    return joint


REUSE_FEATURES = ("lrfu_log2", "log_transition", "log_popularity", "log2_age", "bias")


@njit(cache=True, nogil=True)
def _reuse_samples(demand, doc_start, E, decay, trans, prior, horizon, window, stride):
    """Training rows of :class:`ReusePredictor`: after step ``t`` at layer ``l``, every expert used in
    the last ``window`` steps, on every ``stride``-th (step, layer); label: used in ``t+1 .. t+horizon``."""
    S, L, W = demand.shape
    K = L * E
    # next use after each step: walk backwards once, keeping the CSR of uses per key
    counts = np.zeros(K + 1, np.int64)
    for s in range(S):
        for layer in range(L):
            for j in range(W):
                e = demand[s, layer, j]
                if e >= 0:
                    counts[layer * E + e + 1] += 1
    for k in range(K):
        counts[k + 1] += counts[k]
    occ = np.empty(counts[K], np.int64)
    fill = counts[:K].copy()
    for s in range(S):
        for layer in range(L):
            for j in range(W):
                e = demand[s, layer, j]
                if e >= 0:
                    occ[fill[layer * E + e]] = s
                    fill[layer * E + e] += 1
    ptr = counts[:K].copy()
    aux = np.full(K, -np.inf)
    last = np.full(K, -(10**9), np.int64)
    n_max = (S * L) // stride + 1
    X = np.empty((n_max * window if window < E else n_max * E, 5), np.float64)
    y = np.empty(X.shape[0], np.int8)
    r = 0
    for s in range(S):
        if doc_start[s]:
            for k in range(K):
                aux[k] = -np.inf
                last[k] = -(10**9)
        for layer in range(L):
            for j in range(W):
                e = demand[s, layer, j]
                if e >= 0:
                    key = layer * E + e
                    aux[key] = np.log2(1.0 + np.exp2(aux[key] - decay * s)) + decay * s
                    last[key] = s
        for layer in range(L):
            if (s * L + layer) % stride != 0 or s + 1 >= S:
                continue
            for e in range(E):
                key = layer * E + e
                if s - last[key] >= window:
                    continue
                while ptr[key] < counts[key + 1] and occ[ptr[key]] <= s:
                    ptr[key] += 1
                nxt = occ[ptr[key]] if ptr[key] < counts[key + 1] else S + horizon + 1
                t = 0.0
                for i in range(W):
                    a = demand[s, layer, i]
                    if a >= 0:
                        t += trans[layer, a, e]
                if r >= X.shape[0]:
                    break
                X[r, 0] = aux[key] - decay * s
                X[r, 1] = np.log(t + 1e-6)
                X[r, 2] = prior[key]
                X[r, 3] = np.log2(1.0 + s - last[key])
                X[r, 4] = 1.0
                y[r] = 1 if nxt - s <= horizon else 0
                r += 1
    return X[:r], y[:r]


class ReusePredictor(Estimator):
    """Probability that ``(layer, expert)`` is used again within the next ``horizon`` steps.

    A logistic model over the features a cache can keep per expert at no cost (:data:`REUSE_FEATURES`):
    its LRFU value (``decay``), the summed training transition probabilities
    ``P(e at s + 1 | e' at s)`` from the layer's current experts, its training popularity and the steps
    since its last use. Fitted on a training trace; :class:`moescope.simulate.policies.LearnedReuse`
    evaluates the same logit inside the replay at every eviction.

    Parameters
    ----------
    horizon : steps ahead that count as "reused soon".
    decay : LRFU decay of the recency-frequency feature.
    window : experts unused for this many steps are not sampled (they would not be resident).
    max_rows : about this many training rows (every ``stride``-th (step, layer) is sampled).
    batch_size : the steps the model learns on: None, one token per step (decode); ``b``, the union
        of ``b`` consecutive tokens of a document per step (what a batch-``b`` replay's cache sees:
        ``prepare(mode="prefill", batch_size=b)``). Fit on the steps you replay: a model fitted on
        single tokens misranks experts under 8-token unions (see BENCHMARKS.md, decision table).

    Attributes
    ----------
    coef_ : ``(5,)`` logistic coefficients in :data:`REUSE_FEATURES` order (the last is the intercept).
    transition_ : ``(L, E, E)`` add-one smoothed next-step transition probabilities per layer.
    log_popularity_ : ``(L * E,)``.
    num_layers_, num_experts_ : the fitted shape.
    """

    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "horizon": Interval(int, 1, None),
        "decay": Interval(float, 0, 64),
        "window": Interval(int, 1, None),
        "max_rows": Interval(int, 1, None),
        "batch_size": OrNone(Interval(int, 1, None)),
    }

    def __init__(
        self,
        *,
        horizon: int = 4,
        decay: float = 0.05,
        window: int = 64,
        max_rows: int = 500_000,
        batch_size: int | None = None,
    ) -> None:
        self.horizon = horizon
        self.decay = decay
        self.window = window
        self.max_rows = max_rows
        self.batch_size = batch_size

    def fit(self, trace: Any) -> ReusePredictor:
        """Learn transitions, popularity and the logistic coefficients from ``trace`` (decode order)."""
        from sklearn.linear_model import LogisticRegression

        self._validate_params()
        self._reset()
        demand, doc_start = _demand_of(trace)
        E = int(trace.num_experts)
        if self.batch_size is not None and self.batch_size > 1:
            demand, doc_start = batch_unions(demand, doc_start, E, int(self.batch_size))
        S, L, _W = demand.shape
        valid = demand >= 0
        keys = (np.arange(L)[None, :, None] * E + np.where(valid, demand, 0))[valid]
        counts = np.bincount(keys, minlength=L * E).astype(np.float64)
        prior = np.log((counts + 1.0) / (S + 2.0))
        trans = _transitions(demand, doc_start, E)
        per_event = max(1, min(E, self.window) // 2)
        stride = max(1, int(S * L * per_event // self.max_rows))
        X, y = _reuse_samples(
            demand, doc_start, E, float(self.decay), trans, prior, int(self.horizon), int(self.window), stride
        )
        if len(np.unique(y)) < 2:
            raise ConfigError(f"{trace.path}: too few steps to learn reuse (every sampled label is the same)")
        model = LogisticRegression(C=1.0, fit_intercept=False, max_iter=500)
        model.fit(X, y)
        self.coef_ = model.coef_.ravel().astype(np.float64)
        self.transition_ = trans
        self.log_popularity_ = prior
        self.num_layers_, self.num_experts_ = L, E
        self.train_rows_ = len(y)
        self.fitted_ = True
        return self
