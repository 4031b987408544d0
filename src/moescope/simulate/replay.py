"""``moescope.simulate(...)``: one call from traces to a simulated expert cache, for notebooks and scripts.

It does what ``moescope simulate`` does for one configuration, with the same defaults, but takes
objects as well as names (a policy, a fitted predictor) and always asks where learned parts are
fitted: ``fit_trace`` is a training trace (the other half of a split by document), or the explicit
``"replayed"`` to fit on the replayed trace itself, which flatters whatever learns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from moescope.errors import ConfigError
from moescope.simulate.deployment import (
    BYTES_PER_PARAM,
    Deployment,
    ModelCost,
    cache_capacity,
    get_preset,
    model_cost,
)
from moescope.simulate.engine import SimResult, simulate
from moescope.simulate.fitting import REPLAYED
from moescope.simulate.policies import CachePolicy, fit_on_replay_steps, make_policy
from moescope.simulate.prefetch import PredictorPrefetcher, Prefetcher, make_prefetcher


class ReplaySetup(NamedTuple):
    """What a replay is made of, built from names and options by :func:`replay_setup`."""

    trace: Any  # the replayed Trace
    fit_trace: Any  # a training Trace, "replayed", or None
    deployment: Deployment
    cost: ModelCost
    capacity: np.ndarray  # cache slots (per layer, or one shared cache)
    policy: CachePolicy
    prefetcher: Prefetcher | None
    shared: bool  # one cache for all layers
    named_policy: bool = False  # built here from a name: it may be set to learn on the replayed steps

    def run(self, *, mode: str = "decode", batch_size: int | None = None, reset: str = "none") -> SimResult:
        """Replay (:func:`moescope.simulate.engine.simulate`) with these parts."""
        policy = fit_on_replay_steps(self.policy, mode, batch_size) if self.named_policy else self.policy
        return simulate(
            self.trace,
            policy,
            self.capacity,
            self.deployment,
            self.cost,
            shared=self.shared,
            prefetcher=self.prefetcher,
            mode=mode,
            batch_size=batch_size,
            reset=reset,
            fit_trace=self.fit_trace,
        )


def replay_setup(
    trace: Any,
    *,
    fit_trace: Any = None,
    policy: str | CachePolicy = "lru",
    prefetch: Any = None,
    cache_fraction: float | None = None,
    cache_experts: int | None = None,
    cache_gb: float | None = None,
    preset: str = "rtx4090-pcie4",
    compute_ms: float | None = None,
    link_efficiency: float = 1.0,
    model: str | None = None,
    expert_params: int | None = None,
    dtype: str = "bf16",
    shared: bool = False,
    distance: int = 1,
    budget: int | None = None,
) -> ReplaySetup:
    """Open the traces and build the deployment, expert cost, cache size, policy and prefetcher of a
    replay (the parameters of :func:`replay`), without replaying; ``moescope simulate`` uses it too.

    ``fit_trace`` may be ``None`` here (nothing learns, or the caller decides).
    """
    from moescope.predict.base import BasePredictor
    from moescope.trace.reader import Trace

    tr = trace if isinstance(trace, Trace) else Trace.open(trace)
    if fit_trace is None or (isinstance(fit_trace, str) and fit_trace == REPLAYED):
        fit_tr = fit_trace
    else:
        fit_tr = fit_trace if isinstance(fit_trace, Trace) else Trace.open(fit_trace)
    dep = get_preset(preset).replace(compute_ms_per_layer=compute_ms, link_efficiency=link_efficiency)
    if expert_params is not None:
        if dtype not in BYTES_PER_PARAM:
            raise ConfigError(f"`dtype` {dtype!r} is unknown; use one of {', '.join(BYTES_PER_PARAM)}")
        cost = ModelCost(expert_params=expert_params, bytes_per_param=BYTES_PER_PARAM[dtype], top_k=tr.top_k)
    else:
        name = model or (tr.manifest.get("model") or {}).get("id")
        if not name:
            raise ConfigError(f"{tr.path}: the trace names no model: pass `model` or `expert_params`")
        try:
            cost = model_cost(name, dtype)
        except ConfigError as exc:
            raise ConfigError(f"`model` {name!r}: {exc}; pass `model` or `expert_params`") from None
    capacity = cache_capacity(
        dep,
        cost,
        tr.num_layers,
        tr.num_experts,
        experts=cache_experts,
        fraction=cache_fraction,
        gb=cache_gb,
        shared=shared,
    )
    pol = make_policy(policy) if isinstance(policy, str) else policy
    if prefetch is None or isinstance(prefetch, Prefetcher):
        pf = prefetch
    elif isinstance(prefetch, BasePredictor):
        pf = PredictorPrefetcher(predictor=prefetch, distance=distance, budget=budget)
    elif isinstance(prefetch, str | Path):
        pf = make_prefetcher(prefetch, distance=distance, budget=budget)
    else:
        raise ConfigError(f"prefetch: expected None, a name, a predictor or a prefetcher, got {prefetch!r}")
    return ReplaySetup(tr, fit_tr, dep, cost, capacity, pol, pf, shared, isinstance(policy, str))


def replay(
    trace: Any,
    *,
    fit_trace: Any,
    policy: str | CachePolicy = "lru",
    prefetch: Any = None,
    cache_fraction: float | None = None,
    cache_experts: int | None = None,
    cache_gb: float | None = None,
    preset: str = "rtx4090-pcie4",
    compute_ms: float | None = None,
    link_efficiency: float = 1.0,
    model: str | None = None,
    expert_params: int | None = None,
    dtype: str = "bf16",
    shared: bool = False,
    distance: int = 1,
    budget: int | None = None,
    mode: str = "decode",
    batch_size: int | None = None,
    reset: str = "none",
) -> SimResult:
    """Replay ``trace`` through an expert cache (and a prefetcher) on a preset deployment.

    Parameters
    ----------
    trace : the trace to replay (a :class:`~moescope.Trace`, a view of one, or its path).
    fit_trace : where the policy and prefetcher learn (static pinning, tables, an unfitted
        predictor): a training trace or path, or ``"replayed"`` to fit on ``trace`` itself.
    policy : an eviction policy name (``lru``, ``lfu``, ``lrfu``, ``lru-protect``, ``static``,
        ``belady``, the predictor-guided ones, or ``auto``: the fastest candidate on held-out
        documents of ``fit_trace`` under this replay, :class:`~moescope.simulate.AutoPolicy`) or a
        :class:`~moescope.simulate.CachePolicy`.
    prefetch : None, a prefetcher name (``table``, ``previous``, ``oracle``), a saved predictor
        file, a predictor (fitted or not) or a :class:`~moescope.simulate.Prefetcher`.
    cache_fraction, cache_experts, cache_gb : the cache size, exactly one of them.
    preset, compute_ms, link_efficiency : the deployment preset, with a fixed compute time per
        layer (ms; default: derived) and the share of the published link bandwidth reached.
    model, expert_params, dtype : the expert sizes: a model config (default: the trace's model)
        or the parameters of one expert, stored at ``dtype``.

    Returns the :class:`~moescope.simulate.SimResult` (``summary()``, ``per_layer()``).
    """
    if fit_trace is None:
        raise ConfigError(
            "fit_trace: name the trace the cache policy and prefetcher learn from (a training split), "
            "or 'replayed' to fit on the replayed trace itself"
        )
    setup = replay_setup(
        trace,
        fit_trace=fit_trace,
        policy=policy,
        prefetch=prefetch,
        cache_fraction=cache_fraction,
        cache_experts=cache_experts,
        cache_gb=cache_gb,
        preset=preset,
        compute_ms=compute_ms,
        link_efficiency=link_efficiency,
        model=model,
        expert_params=expert_params,
        dtype=dtype,
        shared=shared,
        distance=distance,
        budget=budget,
    )
    return setup.run(mode=mode, batch_size=batch_size, reset=reset)
