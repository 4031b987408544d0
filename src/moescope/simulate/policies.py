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

from moescope.core.estimator import Estimator, Interval
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

    def check_fitted(self) -> None:
        """Alias of :meth:`check_is_fitted` (the name the simulator used first)."""
        self.check_is_fitted()

    def param(self) -> float:
        """The one float the jitted functions receive."""
        return 0.0

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


POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (LRU, LFU, LRFU, ProtectedLRU, StaticPin, Belady)
}


def make_policy(name: str, **params: Any) -> CachePolicy:
    """A new policy by name (``lru``, ``lfu``, ``lrfu``, ``lru-protect``, ``static``, ``belady``)."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](**params)


# the state columns are part of the policy contract
__all__ = ["AUX", "FREQ", "LAST", "NEXT", "POLICIES", "CachePolicy", "make_policy"]
