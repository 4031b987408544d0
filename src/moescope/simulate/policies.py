"""Eviction policies as small estimator-style classes (STYLE.md, "Predictors and cache policies as estimators").

A policy is declared, not coded into the loop: it names a priority rule over the per-key state the
replay keeps (columns ``LAST``, ``FREQ``, ``AUX``, ``NEXT`` of :mod:`moescope.simulate.kernel`; the
resident with the *lowest* priority is evicted, ties to the least recently touched), an update rule
for ``AUX``, one float parameter, and three flags: ``bypass`` (a miss may be streamed instead of
inserted when it ranks no better than the victim), ``protect`` (experts the prefetcher predicted for
a coming layer are evicted last) and ``needs_future`` (``NEXT`` is kept up to date from the trace).
A new policy is a subclass setting these; a new rule is one branch in ``kernel.priority`` or
``kernel.on_use`` (rules are integers so that the compiled loop is cached on disk once for all).
Parameters are stored unchanged by ``__init__`` and checked by :meth:`CachePolicy.fit` against
``_parameter_constraints`` (the estimator contract of :mod:`moescope.core.estimator`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numba import njit

from moescope.core.estimator import Boolean, Estimator, Interval, OrNone, clone
from moescope.errors import ConfigError
from moescope.simulate import kernel as K
from moescope.simulate.kernel import AUX, FREQ, LAST, NEXT


class CachePolicy(Estimator):
    """Base of every eviction policy; see the module docstring for the contract.

    Attributes
    ----------
    fitted_ : True once :meth:`fit` ran.
    """

    name: ClassVar[str] = "base"
    bypass: ClassVar[bool] = False
    protect: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False
    pred_next: ClassVar[bool] = False
    predictor_guided: ClassVar[bool] = False  # driven by a fitted predictor (the sweep's comparison)
    priority_rule: ClassVar[int] = K.PRIO_LAST
    use_rule: ClassVar[int] = K.USE_NONE

    def fit(self, trace: Any = None) -> CachePolicy:
        """Check the parameters and learn any statistics from ``trace``; returns ``self``."""
        self._validate_params()
        self._reset()
        self._fit(trace)
        self.fitted_ = True
        return self

    def _fit(self, trace: Any) -> None:
        return None

    def for_replay(self, **replay: Any) -> CachePolicy:
        """Hook called before :meth:`fit` with the replay's conditions (``deployment``, ``cost``,
        ``capacity``, ``shared``, ``mode``, ``batch_size``, ``reset``, ``prefetcher``); a policy
        that decides under them (``auto``) keeps them, the others ignore them. Returns ``self``."""
        return self

    def check_fitted(self) -> None:
        """Alias of :meth:`check_is_fitted` (the name the simulator used first)."""
        self.check_is_fitted()

    def param(self) -> float:
        """The one float the jitted functions receive."""
        return 0.0

    def critical_path_s(self) -> float:
        """Seconds the policy's own computation adds to every layer on the critical path (a predictor)."""
        return 0.0

    def horizon_steps(self) -> int:
        """Steps ahead whose routing the policy knows exactly (``PRIO_HORIZON`` only)."""
        return 0

    def reuse_model(
        self, num_layers: int, num_experts: int, load_time: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(coef, transition, per-key prior)`` of the learned reuse score (``PRIO_REUSE`` only);
        ``load_time`` ``(L * E,)`` is each key's transfer time on the replayed deployment."""
        return np.zeros(5), np.zeros((1, 1, 1)), np.zeros(1)

    def next_use(self, steps: Any) -> np.ndarray:
        """Predicted next demand event (``step * L + layer``, +inf for none) of every access of ``steps``.

        ``(S, L, W)`` float, aligned with ``steps.demand``; read by the replay when ``pred_next`` is set.
        A prediction for the access at ``(s, l)`` may only use the demand up to ``(s, l)``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict next uses")

    def pinned(self, num_layers: int, num_experts: int, capacity: np.ndarray, per_layer: bool) -> np.ndarray:
        """``(L * E,)`` mask of keys that are loaded at the start and never evicted."""
        return np.zeros(num_layers * num_experts, dtype=np.bool_)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params(deep=False).items())
        return f"{self.name}({args})" if args else self.name


class LRU(CachePolicy):
    """Evict the least recently used expert (per-layer LRU is the offloading baseline).

    Examples
    --------
    >>> LRU().fit().describe()
    'lru'
    """

    name = "lru"


class LFU(CachePolicy):
    """Evict the expert with the fewest demand uses since the start (ties: least recently used)."""

    name = "lfu"
    priority_rule = K.PRIO_FREQ


class LRFU(CachePolicy):
    """Frequency-recency mix (LRFU): every past use counts ``2^(-decay * age in steps)``.

    Parameters
    ----------
    decay : ``lambda``; near 0 behaves as LFU, 1 or more as LRU.
    """

    name = "lrfu"
    priority_rule = K.PRIO_AUX
    use_rule = K.USE_LRFU
    _parameter_constraints: ClassVar[dict[str, Any]] = {"decay": Interval(float, 0, 64)}

    def __init__(self, *, decay: float = 0.05) -> None:
        self.decay = decay

    def param(self) -> float:
        return float(self.decay)


class ProtectedLRU(CachePolicy):
    """LRU that evicts last the experts the prefetcher predicted for a layer still to come (MoE-Infinity).

    A prediction protects its expert from the moment it is issued until its target layer has run;
    use a prefetch distance ``d`` to protect ``d`` layers ahead. Without a prefetcher it is LRU.
    """

    name = "lru-protect"
    protect = True


class StaticPin(CachePolicy):
    """Pin the most popular experts (by demand counts of the fitting trace); the rest of the capacity is LRU.

    Parameters
    ----------
    pin_fraction : share of each partition's capacity that is pinned (1.0: a purely static cache,
        every other expert is streamed).

    Attributes
    ----------
    counts_ : ``(L, E)`` demand counts learned in :meth:`fit`.
    """

    name = "static"
    _parameter_constraints: ClassVar[dict[str, Any]] = {"pin_fraction": Interval(float, 0.0, 1.0)}

    def __init__(self, *, pin_fraction: float = 1.0) -> None:
        self.pin_fraction = pin_fraction

    def _fit(self, trace: Any) -> None:
        if trace is None:
            raise ConfigError("StaticPin needs a trace to learn expert popularity: call fit(trace)")
        L, E, missing = trace.num_layers, trace.num_experts, trace.missing_id
        counts = np.zeros((L, E + 1), np.int64)
        for b in trace.iter_batches(["experts"]):
            ids = np.where(b.experts == missing, E, b.experts).astype(np.int64)  # (n, L, k)
            flat = (np.arange(L)[None, :, None] * (E + 1) + ids).ravel()
            counts += np.bincount(flat, minlength=L * (E + 1)).reshape(L, E + 1)
        self.counts_ = counts[:, :E]

    def next_use(self, steps: Any) -> np.ndarray:
        """Predicted next demand event (``step * L + layer``, +inf for none) of every access of ``steps``.

        ``(S, L, W)`` float, aligned with ``steps.demand``; read by the replay when ``pred_next`` is set.
        A prediction for the access at ``(s, l)`` may only use the demand up to ``(s, l)``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict next uses")

    def pinned(self, num_layers: int, num_experts: int, capacity: np.ndarray, per_layer: bool) -> np.ndarray:
        self.check_is_fitted()
        if self.counts_.shape != (num_layers, num_experts):
            raise ConfigError(
                f"StaticPin was fitted on {self.counts_.shape[0]} layers x {self.counts_.shape[1]} experts; "
                f"the replayed trace has {num_layers} x {num_experts}"
            )
        mask = np.zeros(num_layers * num_experts, dtype=np.bool_)
        # ties broken by the lower id, so the pinned set is deterministic
        if per_layer:
            for layer in range(num_layers):
                n = int(np.floor(self.pin_fraction * capacity[layer] + 1e-9))
                order = np.lexsort((np.arange(num_experts), -self.counts_[layer]))[:n]
                mask[layer * num_experts + order] = True
        else:
            n = int(np.floor(self.pin_fraction * capacity[0] + 1e-9))
            flat = self.counts_.ravel()
            order = np.lexsort((np.arange(flat.size), -flat))[:n]
            mask[order] = True
        return mask


class Belady(CachePolicy):
    """Belady's MIN with bypass: evict the expert used furthest in the future (offline ceiling).

    A miss whose own next use is no sooner than the victim's is streamed instead of kept, which is
    what makes MIN optimal when a cache may refuse an item. Without prefetch no policy gets more hits.
    """

    name = "belady"
    bypass = True
    needs_future = True
    priority_rule = K.PRIO_NEXT


class OracleNextUse(CachePolicy):
    """Eviction and bypass by a perfect next-use oracle (the steps' true next use): equals Belady.

    A check of the predicted-next-use machinery (:class:`NextUse` with a perfect predictor) and the
    ceiling of every predictor-guided policy without prefetch.
    """

    name = "oracle-next-use"
    predictor_guided = True
    bypass = True
    pred_next = True
    priority_rule = K.PRIO_PRED
    use_rule = K.USE_EVENT

    def next_use(self, steps: Any) -> np.ndarray:
        from moescope.predict import next_use_distance

        S, L, _W = steps.demand.shape
        dist = next_use_distance(np.ascontiguousarray(steps.demand, dtype=np.int16), steps.num_experts)
        event = (np.arange(S)[:, None, None] * L + np.arange(L)[None, :, None]).astype(np.float64)
        out = event + L * dist.astype(np.float64)
        out[(dist >= S) | (steps.demand < 0)] = np.inf
        return out


class HorizonOracle(CachePolicy):
    """Upper-bound study: an oracle that knows the exact routing of the next ``horizon`` tokens only.

    At an eviction, a resident whose next use falls within the next ``horizon`` steps is ranked by
    that use (Belady within the horizon) and kept before every other resident; the others are ranked
    by LRFU (what is known without prediction). With ``admission`` a miss not used again within the
    horizon is streamed when every candidate victim is known to return. ``horizon=0`` knows nothing
    beyond the current token; a horizon past the end of the trace makes Belady's hits. What perfect
    prediction of the next ``H`` tokens could buy, before any predictor is fitted.

    Parameters
    ----------
    horizon : tokens (steps) ahead known exactly.
    decay : LRFU decay of the fallback ranking.
    admission : stream a miss not known to return when the victim is.
    """

    name = "horizon-oracle"
    predictor_guided = True
    needs_future = True
    priority_rule = K.PRIO_HORIZON
    use_rule = K.USE_LRFU
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "horizon": Interval(int, 0, None),
        "decay": Interval(float, 0, 64),
        "admission": Boolean(),
    }

    def __init__(self, *, horizon: int = 1, decay: float = 0.05, admission: bool = True) -> None:
        self.horizon = horizon
        self.decay = decay
        self.admission = admission

    @property
    def bypass(self) -> bool:  # type: ignore[override]
        return bool(self.admission)

    def param(self) -> float:
        return float(self.decay)

    def horizon_steps(self) -> int:
        return int(self.horizon)


class NextUse(CachePolicy):
    """Approximate Belady: evict the resident whose *predicted* next use is furthest, bypass a miss
    predicted to return later than that victim (admission), from a temporal predictor fitted on a
    training trace (:class:`moescope.predict.temporal.NextUsePredictor`).

    At each use of ``(layer, expert)`` the predictor estimates the steps until its next use; the
    replay ranks residents by the predicted next event. Once a prediction is overdue, ``staleness``
    times the wait so far is taken as the rest (a key not back when expected is likely gone for long).
    A prefetched expert is predicted for its target layer.

    Parameters
    ----------
    staleness : weight of the wait so far once a prediction is overdue (0: never revised).
    admission : bypass (stream without keeping) a miss predicted to return after the victim.
    predictor : an unfitted or fitted ``NextUsePredictor`` (None: the default one).
    latency_ms : predictor time per layer at batch 1 charged on the critical path (None: measured
        in :meth:`fit`, the median of 200 single-layer calls of the compiled trees).

    Attributes
    ----------
    predictor_ : the fitted temporal predictor.
    latency_s_ : seconds charged per layer.
    """

    name = "next-use"
    predictor_guided = True
    pred_next = True
    priority_rule = K.PRIO_PRED
    use_rule = K.USE_EVENT
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "staleness": Interval(float, 0, 1e3),
        "admission": Boolean(),
        "latency_ms": OrNone(Interval(float, 0, None)),
    }

    def __init__(
        self,
        *,
        staleness: float = 1.0,
        admission: bool = True,
        predictor: Any = None,
        latency_ms: float | None = None,
    ) -> None:
        self.staleness = staleness
        self.admission = admission
        self.predictor = predictor
        self.latency_ms = latency_ms

    @property
    def bypass(self) -> bool:  # type: ignore[override]
        return bool(self.admission)

    def _fit(self, trace: Any) -> None:
        from moescope.predict import NextUsePredictor

        self.predictor_ = _fitted_predictor(self, trace, NextUsePredictor, "model_")
        if self.latency_ms is None:
            self.latency_s_ = self.predictor_.layer_latency_s()
        else:
            self.latency_s_ = float(self.latency_ms) / 1e3

    def param(self) -> float:
        return float(self.staleness)

    def critical_path_s(self) -> float:
        self.check_is_fitted()
        return float(self.latency_s_)

    def next_use(self, steps: Any) -> np.ndarray:
        self.check_is_fitted()
        S, L, _W = steps.demand.shape
        memo = getattr(self, "_memo", None)  # a sweep replays the same steps at every cache size
        if memo is not None and memo[0] is steps:
            return memo[1]
        dist = self.predictor_.predict_distance(steps.demand, steps.doc_start, steps.num_experts)
        event = (np.arange(S)[:, None, None] * L + np.arange(L)[None, :, None]).astype(np.float64)
        out = event + L * dist
        out[steps.demand < 0] = np.inf
        self._memo = (steps, out)
        return out


class NextUseEvict(NextUse):
    """:class:`NextUse` without admission control: every miss is kept (eviction by prediction only)."""

    name = "next-use-evict"

    def __init__(
        self,
        *,
        staleness: float = 1.0,
        admission: bool = False,
        predictor: Any = None,
        latency_ms: float | None = None,
    ) -> None:
        super().__init__(staleness=staleness, admission=admission, predictor=predictor, latency_ms=latency_ms)


class LearnedReuse(CachePolicy):
    """Evict the resident least likely to be used again soon, by a reuse predictor fitted on a
    training trace (:class:`moescope.predict.temporal.ReusePredictor`): a learned, relaxed Belady.

    At each eviction the replay evaluates, for every candidate, the logistic model's logit over its
    LRFU value, the transition probabilities from its layer's latest experts, its training
    popularity and its age (all state the cache keeps anyway). With ``admission`` a miss is streamed
    instead of kept when it scores no higher than the victim.

    Parameters
    ----------
    admission : bypass low-scoring misses.
    predictor : an unfitted or fitted ``ReusePredictor`` (None: the default one).
    batch_size : the steps an unfitted predictor learns on (its ``batch_size``; None keeps the
        predictor's own): set it to the replay's batch (``prepare(mode="prefill", batch_size=b)``).
    cost_weight : weight of ``log(load time / fastest load)`` in the score, so that on a tiered
        deployment (NVMe behind a host staging tier) an expert slow to reload is kept before a fast
        one of the same reuse probability (0: rank by reuse alone). No effect when every expert
        loads equally fast.
    latency_ms : cost per layer charged on the critical path (None: measured in :meth:`fit`: one
        layer's scores for 16 candidates at batch 1, median of 200 calls).

    Attributes
    ----------
    predictor_ : the fitted reuse predictor.
    latency_s_ : seconds charged per layer.
    """

    name = "learned-reuse"
    predictor_guided = True
    priority_rule = K.PRIO_REUSE
    use_rule = K.USE_REUSE
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "admission": Boolean(),
        "latency_ms": OrNone(Interval(float, 0, None)),
        "batch_size": OrNone(Interval(int, 1, None)),
        "cost_weight": Interval(float, 0, None),
    }

    def __init__(
        self,
        *,
        admission: bool = False,
        predictor: Any = None,
        latency_ms: float | None = None,
        batch_size: int | None = None,
        cost_weight: float = 1.0,
    ) -> None:
        self.admission = admission
        self.predictor = predictor
        self.latency_ms = latency_ms
        self.batch_size = batch_size
        self.cost_weight = cost_weight

    @property
    def bypass(self) -> bool:  # type: ignore[override]
        return bool(self.admission)

    def _fit(self, trace: Any) -> None:
        from moescope.predict import ReusePredictor

        pred = self.predictor
        if self.batch_size is not None and not hasattr(pred, "coef_"):
            pred = (ReusePredictor() if pred is None else clone(pred)).set_params(batch_size=self.batch_size)
        self.predictor_ = _fitted_predictor(self, trace, ReusePredictor, "coef_", pred)
        if self.latency_ms is None:
            self.latency_s_ = _reuse_latency(self.predictor_)
        else:
            self.latency_s_ = float(self.latency_ms) / 1e3

    def param(self) -> float:
        self.check_is_fitted()
        return float(self.predictor_.decay)

    def critical_path_s(self) -> float:
        self.check_is_fitted()
        return float(self.latency_s_)

    def reuse_model(
        self, num_layers: int, num_experts: int, load_time: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fitted logistic model; with ``cost_weight`` and unequal ``load_time`` the per-key prior
        becomes ``coef[2] * log popularity + cost_weight * log(load time / fastest)`` (and ``coef[2]``
        1): the score then ranks by expected transfer time saved (``log p + log cost``, GreedyDual's
        idea), so a tiered deployment keeps the experts that are slow to bring back."""
        self.check_is_fitted()
        p = self.predictor_
        if (p.num_layers_, p.num_experts_) != (num_layers, num_experts):
            raise ConfigError(
                f"{self.describe()} was fitted on {p.num_layers_} layers x {p.num_experts_} experts; "
                f"the replayed steps have {num_layers} x {num_experts}"
            )
        coef, prior = p.coef_, p.log_popularity_
        if load_time is not None and self.cost_weight > 0 and np.ptp(load_time) > 0:
            lt = np.asarray(load_time, np.float64)
            prior = coef[2] * prior + self.cost_weight * np.log(lt / lt.min())
            coef = coef.copy()
            coef[2] = 1.0
        return coef, p.transition_, prior


class LearnedReuseAdmit(LearnedReuse):
    """:class:`LearnedReuse` with admission control (a miss scoring below the victim is streamed)."""

    name = "learned-reuse-admit"

    def __init__(
        self,
        *,
        admission: bool = True,
        predictor: Any = None,
        latency_ms: float | None = None,
        batch_size: int | None = None,
        cost_weight: float = 1.0,
    ) -> None:
        super().__init__(
            admission=admission,
            predictor=predictor,
            latency_ms=latency_ms,
            batch_size=batch_size,
            cost_weight=cost_weight,
        )


def _fitted_predictor(policy: Any, trace: Any, default: type, fitted_attr: str, pred: Any = None) -> Any:
    """The policy's ``predictor`` (or ``pred``) when it is already fitted (has ``fitted_attr``), else a
    fresh copy of it (or of ``default``) fitted on ``trace``."""
    pred = policy.predictor if pred is None else pred
    if pred is not None and hasattr(pred, fitted_attr):
        return pred
    if trace is None:
        raise ConfigError(f"{type(policy).__name__} needs a training trace: call fit(trace)")
    return (default() if pred is None else clone(pred)).fit(trace)


def _reuse_latency(pred: Any, repeat: int = 200) -> float:
    """Median seconds of one layer's reuse scores for 16 candidates at batch 1 (compiled, this CPU)."""
    import time

    st = np.zeros((16, K.NSTATE))
    lastset = np.zeros((1, 8), np.int16)
    coef, trans, prior = pred.coef_, pred.transition_[:1], pred.log_popularity_[:16]
    _scores(st, coef, trans, prior, lastset)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        _scores(st, coef, trans, prior, lastset)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


@njit(cache=True)
def _scores(st, coef, trans, prior, lastset):
    out = np.empty(st.shape[0])
    cf = (coef[0], coef[1], coef[2], coef[3], coef[4])
    for key in range(st.shape[0]):
        layer, e = divmod(key, 16)
        tsum = 0.0
        for i in range(lastset.shape[1]):
            if lastset[layer, i] >= 0:
                tsum += trans[layer, lastset[layer, i], e]
        out[key] = K.reuse_score(st[key, K.AUX], st[key, K.STEP], prior[key], tsum, 1.0, 0.05, cf)
    return out


POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls
    for cls in (
        LRU,
        LFU,
        LRFU,
        ProtectedLRU,
        StaticPin,
        Belady,
        HorizonOracle,
        LearnedReuse,
        LearnedReuseAdmit,
        NextUse,
        NextUseEvict,
        OracleNextUse,
    )
}


def fit_on_replay_steps(policy: CachePolicy, mode: str, batch_size: int | None) -> CachePolicy:
    """``policy`` set to learn on the steps it will replay: a prefill replay in batches of ``b``
    tokens gives a learned reuse policy ``batch_size=b`` (its model then sees the same unions)."""
    params = policy.get_params(deep=False)
    if mode == "prefill" and batch_size and "batch_size" in params and params["batch_size"] is None:
        policy.set_params(batch_size=int(batch_size))
    return policy


def make_policy(name: str, **params: Any) -> CachePolicy:
    """A new policy by name (``lru``, ``lfu``, ``lrfu``, ``lru-protect``, ``static``, ``belady``,
    ``next-use``, ``next-use-evict``, ``oracle-next-use``, ``horizon-oracle``, ``learned-reuse``,
    ``learned-reuse-admit``)."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](**params)


# the state columns are part of the policy contract
__all__ = ["AUX", "FREQ", "LAST", "NEXT", "POLICIES", "CachePolicy", "make_policy"]
