"""Prefetchers: for every (token, layer ``l``), the ranked experts to load for layer ``l + d``.

The replay needs, per trace row, an ``(L, m)`` array whose column ``l`` holds the ids issued for
layer ``l`` once layer ``l - d`` has run (-1 = nothing). A prefetcher computes that array for a
whole trace with :meth:`Prefetcher.ranked`, using only what is known at issue time: the token's
own experts at layers ``<= l - d`` and earlier tokens of the same document. Prefetchers that use
only the row's own experts (``from_ids``: table, oracle) also rank any block of rows with
:meth:`Prefetcher.rank_ids`, which the decode replay calls block by block on a second core.
Rankings order by descending score, equal scores by the lower id (as :func:`moescope.predict.base.rank`).

- :class:`TablePrefetcher`: per-layer conditional table ``P(expert at l + d | expert at l)`` fitted
  on a training trace (seed 000, method 3), scored by summing the conditionals of the source set.
- :class:`PreviousTokenPrefetcher`: the previous token's experts at the target layer.
- :class:`OraclePrefetcher`: the true set (a ceiling, not a deployable prefetcher).
- :class:`PredictorPrefetcher`: any fitted :mod:`moescope.predict` predictor (or a saved one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numba import njit, prange
from sklearn.base import BaseEstimator

from moescope.errors import ConfigError
from moescope.trace.schema import signed_ids


def _check_int(owner: str, name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"{owner}: parameter {name}={value!r} is invalid; it must be an int >= {lo}{extra}")


class Prefetcher(BaseEstimator):
    """Base class. Parameters ``distance`` (d >= 1) and ``budget`` (m ids per issue; None = top_k)."""

    name: ClassVar[str] = "base"
    #: True when a row's prediction depends only on that row's own experts at earlier layers, so
    #: a decode replay can rank the steps as it goes (:meth:`rank_ids`) instead of the whole trace first.
    from_ids: ClassVar[bool] = False

    def fit(self, trace: Any) -> Prefetcher:
        """Check parameters and learn from ``trace``; returns ``self`` and keeps no reference to it."""
        _check_int(type(self).__name__, "distance", self.distance, 1)
        _check_int(type(self).__name__, "budget", self.budget, 1, allow_none=True)
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        self.num_experts_, self.num_layers_, self.top_k_ = trace.num_experts, trace.num_layers, trace.top_k
        self._fit(trace)
        self.fitted_ = True
        return self

    def _fit(self, trace: Any) -> None:
        return None

    @property
    def m_(self) -> int:
        return int(min(self.budget or self.top_k_, self.num_experts_))

    def check_fitted(self, trace: Any) -> None:
        if not getattr(self, "fitted_", False):
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(trace) first")
        if (trace.num_layers, trace.num_experts) != (self.num_layers_, self.num_experts_):
            raise ConfigError(
                f"{type(self).__name__} was fitted on {self.num_layers_} layers x {self.num_experts_} experts; "
                f"the trace has {trace.num_layers} x {trace.num_experts}"
            )

    def ranked(self, trace: Any) -> np.ndarray:
        """``(N, L, m)`` int16 ids issued for each row's layer ``l`` after its layer ``l - d`` ran."""
        self.check_fitted(trace)
        out = np.full((trace.num_tokens, trace.num_layers, self.m_), -1, np.int16)
        start = 0
        prev_tail = None
        for b in trace.iter_batches(["doc_id", "experts"]):
            n = len(b)
            ids = signed_ids(b.experts, trace.missing_id)  # (n, L, k) int16, -1 = missing
            out[start : start + n] = self._ranked_block(ids, b.doc_id, prev_tail)
            prev_tail = (ids[-1:], b.doc_id[-1:])
            start += n
        return out

    def _ranked_block(self, ids: np.ndarray, doc_id: np.ndarray, prev_tail: Any) -> np.ndarray:
        raise NotImplementedError

    def rank_ids(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(n, L, m)`` predictions from the rows' own experts ``ids`` ``(n, L, k)`` (int16, -1 = none).

        Only for prefetchers with ``from_ids``; equals :meth:`ranked` on the same rows. Runs on the
        calling thread (no parallel loop), so that it can overlap a replay on another core.
        """
        if not self.from_ids:
            raise ConfigError(
                f"{type(self).__name__} needs the trace (documents, history): use ranked(trace)"
            )
        if not getattr(self, "fitted_", False):
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(trace) first")
        if ids.ndim != 3 or ids.shape[1] != self.num_layers_:
            raise ConfigError(f"ids have shape {ids.shape}; expected (n, {self.num_layers_}, k)")
        shape = (ids.shape[0], ids.shape[1], self.m_)
        if out is None:
            out = np.empty(shape, np.int16)
        elif out.shape != shape or out.dtype != np.int16 or not out.flags.c_contiguous:
            raise ConfigError(f"out must be a C-contiguous int16 array of shape {shape}")
        self._rank_ids(np.ascontiguousarray(ids, dtype=np.int16), out)
        return out

    def _rank_ids(self, ids: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(d={self.distance}, m={self.budget or 'k'})"


_NO_KEY = np.int64(-1)
_TOP_KEY = np.int64(0x7FFFFFFFFFFFFFFF)
_ID_MASK = np.int64(0xFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _sum_sources(ids, t, src, cond, acc):
    """``acc = sum of cond[src, a, :]`` over the experts ``a`` of row ``t`` at layer ``src``, added in
    source order from 0; returns False when the row has no known expert there."""
    E = acc.shape[0]
    for e in range(E):
        acc[e] = 0.0
    found = False
    for j in range(ids.shape[2]):
        a = np.int64(ids[t, src, j])
        if a < 0:
            continue
        found = True
        for e in range(E):
            acc[e] += cond[src, a, e]
    return found


@njit(cache=True, nogil=True, inline="always")
def _score_keys(acc, key):
    """One int64 per expert that orders as ``(score, -id)``: the score's bits above, ``~id`` below.

    Scores are sums of probabilities (>= 0, finite), whose IEEE bits order like the values, so the
    largest key is the best score with the lowest id; keys are distinct, so the ``j``-th best is the
    largest key below the ``j - 1``-th and the selection needs no writes.
    """
    bits = acc.view(np.int32)
    for e in range(acc.shape[0]):
        key[e] = (np.int64(bits[e]) << 32) | (_ID_MASK - e)


@njit(cache=True, nogil=True)
def _table_rank(ids, cond, dist, m, out):
    """out[t, l] = top-m of sum_{a in ids[t, l - dist]} cond[l - dist, a, :] (ties: lower id); -1 elsewhere.

    Sequential over the rows of ``ids`` ``(n, L, k)``. Per row the source layers are ranked two at a
    time: each pass over the ``E`` keys of both finds the next best of each (a max over keys below
    the previous one, which vectorises and keeps two independent chains in flight).
    """
    n, L, _ = ids.shape
    E = cond.shape[2]
    R = L - dist
    acc0 = np.empty(E, np.float32)
    acc1 = np.empty(E, np.float32)
    key0 = np.empty(E, np.int64)
    key1 = np.empty(E, np.int64)
    for t in range(n):
        for layer in range(min(dist, L)):
            for j in range(m):
                out[t, layer, j] = -1
        for src in range(0, R, 2):
            src1 = src + 1 if src + 1 < R else src
            has0 = _sum_sources(ids, t, src, cond, acc0)
            has1 = _sum_sources(ids, t, src1, cond, acc1)
            _score_keys(acc0, key0)
            _score_keys(acc1, key1)
            p0 = _TOP_KEY
            p1 = _TOP_KEY
            for j in range(m):
                t0 = _NO_KEY
                t1 = _NO_KEY
                for e in range(E):
                    x = key0[e]
                    x = x if x < p0 else _NO_KEY
                    t0 = x if x > t0 else t0
                    y = key1[e]
                    y = y if y < p1 else _NO_KEY
                    t1 = y if y > t1 else t1
                out[t, src + dist, j] = (_ID_MASK - (t0 & _ID_MASK)) if has0 else -1
                out[t, src1 + dist, j] = (_ID_MASK - (t1 & _ID_MASK)) if has1 else -1
                p0 = t0
                p1 = t1


@njit(cache=True, nogil=True, parallel=True)
def _table_topm(ids, cond, dist, m, out):
    """:func:`_table_rank` with blocks of rows shared out over the cores."""
    n = ids.shape[0]
    block = 512
    for b in prange((n + block - 1) // block):
        lo = b * block
        hi = min(n, lo + block)
        _table_rank(ids[lo:hi], cond, dist, m, out[lo:hi])


class TablePrefetcher(Prefetcher):
    """Conditional table ``P(b at layer l + d | a at layer l)``, one ``E x E`` table per layer.

    Each source expert ``a`` of the token's layer ``l`` votes ``P(b | a)`` for every ``b``; the ``m``
    best-voted experts of layer ``l + d`` are prefetched. Unseen sources fall back to the target
    layer's popularity through additive smoothing.

    Parameters
    ----------
    distance : layers ahead (d >= 1).
    budget : ids prefetched per issue (None: top_k).
    alpha : pseudo-counts spread as the target layer's marginal.

    Attributes
    ----------
    cond_ : ``(L - d, E, E)`` float32 ``P(b at l + d | a at l)``.

    Examples
    --------
    >>> from moescope.trace.synthetic import write_synthetic_trace
    >>> import tempfile, os
    >>> tr = write_synthetic_trace(os.path.join(tempfile.mkdtemp(), "t"), n_tokens=512, law="markov")
    >>> TablePrefetcher(distance=1, budget=2).fit(tr).ranked(tr).shape
    (512, 4, 2)
    """

    name = "table"
    from_ids = True

    def __init__(self, *, distance: int = 1, budget: int | None = None, alpha: float = 1.0) -> None:
        self.distance = distance
        self.budget = budget
        self.alpha = alpha

    def _fit(self, trace: Any) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ConfigError(
                f"TablePrefetcher: parameter alpha={self.alpha!r} is invalid; it must be a number >= 0"
            )
        L, E, d, missing = trace.num_layers, trace.num_experts, self.distance, trace.missing_id
        if d >= L:
            raise ConfigError(
                f"TablePrefetcher: distance={d} leaves no layer to predict in a {L}-layer trace"
            )
        counts = np.zeros((L - d, E + 1, E + 1), np.float64)
        for b in trace.iter_batches(["experts"]):
            ids = np.where(b.experts == missing, E, b.experts).astype(np.int64)  # (n, L, k)
            for src in range(L - d):
                a, t = ids[:, src], ids[:, src + d]  # (n, k) each
                pair = (a[:, :, None] * (E + 1) + t[:, None, :]).ravel()
                counts[src] += np.bincount(pair, minlength=(E + 1) ** 2).reshape(E + 1, E + 1)
        counts = counts[:, :E, :E]
        marg = counts.sum(axis=1)  # (L-d, E) target occurrences
        marg = marg / np.maximum(marg.sum(axis=1, keepdims=True), 1.0)
        src_tot = counts.sum(axis=2, keepdims=True)  # (L-d, E, 1)
        cond = (counts + self.alpha * marg[:, None, :]) / np.maximum(src_tot + self.alpha, 1e-12)
        self.cond_ = cond.astype(np.float32)

    def _ranked_block(self, ids: np.ndarray, doc_id: np.ndarray, prev_tail: Any) -> np.ndarray:
        out = np.empty((ids.shape[0], ids.shape[1], self.m_), np.int16)
        _table_topm(ids, self.cond_, int(self.distance), self.m_, out)
        return out

    def _rank_ids(self, ids: np.ndarray, out: np.ndarray) -> None:
        _table_rank(ids, self.cond_, int(self.distance), self.m_, out)


class PreviousTokenPrefetcher(Prefetcher):
    """Prefetch the previous token's experts at the target layer (same document); a reuse baseline."""

    name = "previous"

    def __init__(self, *, distance: int = 1, budget: int | None = None) -> None:
        self.distance = distance
        self.budget = budget

    def _ranked_block(self, ids: np.ndarray, doc_id: np.ndarray, prev_tail: Any) -> np.ndarray:
        n, L, k = ids.shape
        m = self.m_
        out = np.full((n, L, m), -1, np.int16)
        prev = np.empty_like(ids)
        prev[1:] = ids[:-1]
        same = np.zeros(n, bool)
        same[1:] = doc_id[1:] == doc_id[:-1]
        if prev_tail is not None and n:
            prev[0] = prev_tail[0][0]
            same[0] = prev_tail[1][0] == doc_id[0]
        w = min(m, k)
        out[:, self.distance :, :w] = np.where(same[:, None, None], prev[:, self.distance :, :w], -1)
        return out


class OraclePrefetcher(Prefetcher):
    """Prefetch the true expert set of the target layer: an upper bound, not a deployable predictor."""

    name = "oracle"
    from_ids = True

    def __init__(self, *, distance: int = 1, budget: int | None = None) -> None:
        self.distance = distance
        self.budget = budget

    def _ranked_block(self, ids: np.ndarray, doc_id: np.ndarray, prev_tail: Any) -> np.ndarray:
        out = np.empty((ids.shape[0], ids.shape[1], self.m_), np.int16)
        self._rank_ids(ids, out)
        return out

    def _rank_ids(self, ids: np.ndarray, out: np.ndarray) -> None:
        w = min(self.m_, ids.shape[2])
        out.fill(-1)
        out[:, self.distance :, :w] = ids[:, self.distance :, :w]


class PredictorPrefetcher(Prefetcher):
    """Any :mod:`moescope.predict` predictor as a prefetcher (spatial mode ``distance``).

    Parameters
    ----------
    predictor : a predictor instance (fitted or not: :meth:`fit` fits it when it is not) or the
        path of one saved with ``moescope predict fit``.
    window : previous tokens made visible to the predictor.
    """

    name = "predictor"

    def __init__(
        self, *, predictor: Any = None, distance: int = 1, budget: int | None = None, window: int = 4
    ) -> None:
        self.predictor = predictor
        self.distance = distance
        self.budget = budget
        self.window = window

    def learns_from_trace(self) -> bool:
        """A predictor instance that is not fitted yet learns from the fitting trace; a saved one does not."""
        return not isinstance(self.predictor, (str, Path)) and not (
            hasattr(self.predictor, "is_fitted") and self.predictor.is_fitted()
        )

    def fit_record(self) -> dict[str, Any] | None:
        """Which trace and held-out documents a saved predictor was fitted on (its file header), if known."""
        if not isinstance(self.predictor, (str, Path)):
            return None
        from moescope.predict.base import read_header

        return read_header(self.predictor).get("extra") or None

    def _fit(self, trace: Any) -> None:
        from moescope.predict.base import BasePredictor, load_predictor

        pred = self.predictor
        if isinstance(pred, (str, Path)):
            pred = load_predictor(pred)
        if not isinstance(pred, BasePredictor):
            raise ConfigError(
                f"PredictorPrefetcher: parameter predictor={self.predictor!r} must be a moescope predictor or the"
                " path of a saved one"
            )
        if not pred.is_fitted():
            pred = pred.fit(trace)
        modes = pred.modes()
        if modes and self.distance not in modes:
            raise ConfigError(
                f"PredictorPrefetcher: the predictor answers distances {modes}, not distance={self.distance}"
            )
        self.predictor_ = pred

    def ranked(self, trace: Any) -> np.ndarray:
        from moescope.predict.queries import iter_contexts

        self.check_fitted(trace)
        L, d, m = trace.num_layers, int(self.distance), self.m_
        out = np.full((trace.num_tokens, L, m), -1, np.int16)
        start = 0
        for ctx in iter_contexts(trace, window=self.window):
            n = len(ctx)
            for layer in range(d, L):
                ids, _ = self.predictor_.predict(ctx.queries(layer, d), m)
                out[start : start + n, layer, : ids.shape[1]] = ids
            start += n
        return out

    def describe(self) -> str:
        name = getattr(getattr(self, "predictor_", None), "name", None) or str(self.predictor)
        return f"{name}(d={self.distance}, m={self.budget or 'k'})"


PREFETCHERS: dict[str, type[Prefetcher]] = {
    cls.name: cls for cls in (TablePrefetcher, PreviousTokenPrefetcher, OraclePrefetcher)
}


def make_prefetcher(spec: str | Path, *, distance: int = 1, budget: int | None = None) -> Prefetcher:
    """A prefetcher from a built-in name (``table``, ``previous``, ``oracle``) or a saved predictor file."""
    if str(spec) in PREFETCHERS:
        return PREFETCHERS[str(spec)](distance=distance, budget=budget)
    path = Path(spec)
    if path.is_file():
        return PredictorPrefetcher(predictor=str(path), distance=distance, budget=budget)
    raise ConfigError(
        f"`prefetch` {spec!r}: not a built-in prefetcher ({', '.join(PREFETCHERS)}, none) nor a predictor file"
    )
