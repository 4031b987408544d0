"""Replay a trace through an expert cache, a prefetcher and a timing model.

:func:`prepare` turns a trace into *steps* once (decode: one token per step, in trace order;
prefill: the union of a batch's experts per layer); :func:`run` replays prepared steps for one
policy, capacity and prefetch array; :func:`simulate` does both. The loops are in
:mod:`moescope.simulate.kernel`, whose docstring states the exact semantics. A prefetcher that
ranks from each row's own experts (the table, the oracle) is ranked block by block on a second
core while the replay runs (:func:`run` with ``prefetcher=``), so a decode replay with it costs
about the replay alone in wall time and never holds an ``(N, L, m)`` prediction array.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.simulate import kernel as K
from moescope.simulate.deployment import Deployment, ModelCost, compute_times, load_times
from moescope.simulate.policies import CachePolicy
from moescope.simulate.prefetch import Prefetcher
from moescope.trace.schema import signed_ids

MODES = ("decode", "prefill")
RESETS = ("none", "document")


@dataclass
class Steps:
    """A trace cut into replay steps.

    Attributes
    ----------
    demand : ``(S, L, W)`` int16 expert ids per step and layer, rank order, -1 padded.
    tokens : ``(S,)`` tokens in each step.
    doc_start : ``(S,)`` True where a step starts a new document.
    step_of_row : ``(N,)`` the step each trace row belongs to.
    num_experts : E.
    popularity : ``(L, E)`` demand counts (places experts on capacity-limited tiers).
    mode, batch_size : how the steps were cut.
    """

    demand: np.ndarray
    tokens: np.ndarray
    doc_start: np.ndarray
    step_of_row: np.ndarray
    num_experts: int
    popularity: np.ndarray
    mode: str = "decode"
    batch_size: int | None = None

    @property
    def num_steps(self) -> int:
        return int(self.demand.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.demand.shape[1])


def _union_rank(
    ids: np.ndarray, group: np.ndarray, n_groups: int, E: int, weight: np.ndarray | None = None
) -> np.ndarray:
    """Per group and layer, the distinct ids of ``ids`` ``(n, L, w)`` ordered by count (ties: lower id).

    Returns ``(G, L, W)`` int16 padded with -1, ``W`` the largest union.
    """
    _n, L, _w = ids.shape
    valid = ids >= 0
    flat = ((group[:, None, None] * L + np.arange(L)[None, :, None]) * E + np.where(valid, ids, 0)).ravel()
    wts = (np.ones(ids.shape) if weight is None else np.broadcast_to(weight, ids.shape)) * valid
    counts = np.bincount(flat, weights=wts.ravel(), minlength=n_groups * L * E).reshape(n_groups, L, E)
    order = np.argsort(-counts, axis=2, kind="stable")  # (G, L, E), ties keep the lower id first
    width = int((counts > 0).sum(axis=2).max()) if counts.size else 0
    order = order[:, :, :width]
    keep = np.take_along_axis(counts, order, axis=2) > 0
    return np.where(keep, order, -1).astype(np.int16)


def prepare(trace: Any, *, mode: str = "decode", batch_size: int | None = None) -> Steps:
    """Cut ``trace`` into steps. Decode: one token per step. Prefill: each document in batches of
    ``batch_size`` tokens (None: the whole document), demand = union of the batch's experts.

    Memory: the routing ids are held as int16, ``2 N L k`` bytes.
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    N, L, k, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    if N == 0:
        raise ConfigError(f"{trace.path}: the trace has no rows to simulate")
    ids = np.empty((N, L, k), np.int16)
    doc = np.empty(N, np.int64)
    start = 0
    for b in trace.iter_batches(["doc_id", "experts"]):
        n = len(b)
        ids[start : start + n] = signed_ids(b.experts, trace.missing_id)
        doc[start : start + n] = b.doc_id
        start += n
    new_doc = np.ones(N, bool)
    new_doc[1:] = doc[1:] != doc[:-1]
    valid = ids >= 0
    pop_flat = (np.arange(L)[None, :, None] * E + np.where(valid, ids, 0)).ravel()
    popularity = np.bincount(pop_flat, weights=valid.ravel(), minlength=L * E).reshape(L, E)
    if mode == "decode":
        return Steps(ids, np.ones(N, np.int64), new_doc, np.arange(N), E, popularity, mode, None)
    doc_index = np.cumsum(new_doc) - 1
    doc_first = np.flatnonzero(new_doc)
    pos_in_doc = np.arange(N) - doc_first[doc_index]
    chunk = np.zeros(N, np.int64) if batch_size is None else pos_in_doc // batch_size
    step_start = new_doc | np.concatenate([[True], chunk[1:] != chunk[:-1]])
    step_of_row = np.cumsum(step_start) - 1
    S = int(step_of_row[-1]) + 1
    demand = _union_rank(ids, step_of_row, S, E)
    tokens = np.bincount(step_of_row, minlength=S).astype(np.int64)
    return Steps(demand, tokens, new_doc[step_start], step_of_row, E, popularity, mode, batch_size)


def step_prefetch(steps: Steps, ranked: np.ndarray | None) -> np.ndarray:
    """The ``(S, L, m)`` prefetch array of the steps from per-row predictions ``(N, L, m)``.

    Decode: unchanged. Prefill: the ``m`` ids most often predicted across the batch's rows, each
    prediction weighted by ``m - rank`` so that first choices count most.
    """
    S, L = steps.num_steps, steps.num_layers
    if ranked is None:
        return np.full((S, L, 0), -1, np.int16)
    if ranked.shape[:2] != (len(steps.step_of_row), L):
        raise ConfigError(
            f"prefetch array has shape {ranked.shape}; the trace needs ({len(steps.step_of_row)}, {L}, m)"
        )
    if steps.mode == "decode":
        return np.ascontiguousarray(ranked, dtype=np.int16)
    m = ranked.shape[2]
    weight = (m - np.arange(m)).astype(np.float64)[None, None, :]
    union = _union_rank(ranked, steps.step_of_row, S, steps.num_experts, weight)
    out = np.full((S, L, m), -1, np.int16)
    w = min(m, union.shape[2])
    out[:, :, :w] = union[:, :, :w]
    return out


@dataclass
class SimResult:
    """Counts and times of one replay; :meth:`summary` and :meth:`per_layer` present them."""

    policy: str
    prefetcher: str
    distance: int
    budget: int
    capacity: np.ndarray
    shared: bool
    mode: str
    counts: np.ndarray  # (NCOUNT, L)
    stall_s: np.ndarray  # (L,)
    prefetch_wait_s: np.ndarray  # (L,)
    total_s: float
    compute_s: float
    no_cache_s: float
    tokens: int
    steps: int
    expert_bytes: float
    extra: dict[str, Any] = field(default_factory=dict)

    def _c(self, name: str) -> np.ndarray:
        return self.counts[getattr(K, name)]

    def per_layer(self) -> Any:
        """Polars frame, one row per MoE layer, counts and rates with units in the column names."""
        import polars as pl

        acc, hit, pfh = self._c("C_ACCESS"), self._c("C_HIT"), self._c("C_PF_HIT")
        miss, pfl, waste = self._c("C_MISS"), self._c("C_PF_LOAD"), self._c("C_PF_WASTE")
        with np.errstate(invalid="ignore", divide="ignore"):
            return pl.DataFrame(
                {
                    "layer": np.arange(self.counts.shape[1]),
                    "capacity_experts": (
                        self.capacity if not self.shared else np.full(self.counts.shape[1], -1)
                    ),
                    "accesses": acc,
                    "hits": hit,
                    "hit_rate": hit / acc,
                    "prefetch_hits": pfh,
                    "late_prefetch_hits": self._c("C_LATE"),
                    "demand_misses": miss,
                    "streamed": self._c("C_STREAM"),
                    "demand_bytes": miss * self.expert_bytes,
                    "prefetch_bytes": pfl * self.expert_bytes,
                    "wasted_prefetch_bytes": waste * self.expert_bytes,
                    "prefetch_precision": pfh / pfl,
                    "prefetch_coverage": pfh / (pfh + miss),
                    "stall_ms_per_token": self.stall_s * 1e3 / self.tokens,
                }
            )

    def summary(self) -> dict[str, Any]:
        """Overall figures (JSON-ready)."""
        c = self.counts.sum(axis=1)
        acc, hit, pfh, miss, pfl, waste = (
            int(c[getattr(K, n)])
            for n in ("C_ACCESS", "C_HIT", "C_PF_HIT", "C_MISS", "C_PF_LOAD", "C_PF_WASTE")
        )

        def ratio(a: float, b: float) -> float | None:
            return None if b == 0 else a / b

        return {
            "policy": self.policy,
            "prefetcher": self.prefetcher,
            "distance": self.distance,
            "budget": self.budget,
            "mode": self.mode,
            "shared_cache": self.shared,
            "capacity_experts": int(self.capacity.sum()),
            "tokens": self.tokens,
            "steps": self.steps,
            "events": self.steps * self.counts.shape[1],
            "accesses": acc,
            "hits": hit,
            "hit_rate": ratio(hit, acc),
            "prefetch_hits": pfh,
            "late_prefetch_hits": int(c[K.C_LATE]),
            "demand_misses": miss,
            "streamed": int(c[K.C_STREAM]),
            "demand_bytes": miss * self.expert_bytes,
            "prefetch_bytes": pfl * self.expert_bytes,
            "wasted_prefetch_bytes": waste * self.expert_bytes,
            "bytes_moved": (miss + pfl) * self.expert_bytes,
            "prefetch_precision": ratio(pfh, pfl),
            "prefetch_coverage": ratio(pfh, pfh + miss),
            "stall_ms_per_token": float(self.stall_s.sum()) * 1e3 / self.tokens,
            "time_s": self.total_s,
            "tokens_per_s": self.tokens / self.total_s if self.total_s > 0 else None,
            "tokens_per_s_all_in_gpu": self.tokens / self.compute_s if self.compute_s > 0 else None,
            "tokens_per_s_no_cache": self.tokens / self.no_cache_s if self.no_cache_s > 0 else None,
            **self.extra,
        }


def _occurrences(demand: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of demand events per key: ``occ_ev[occ_start[key]:occ_start[key+1]]`` ascending."""
    S, L, _W = demand.shape
    valid = demand >= 0
    keys = (np.arange(L)[None, :, None] * E + demand.astype(np.int64))[valid]
    events = np.broadcast_to((np.arange(S)[:, None] * L + np.arange(L)[None, :])[:, :, None], demand.shape)[
        valid
    ]
    order = np.argsort(keys, kind="stable")  # events are already ascending in row-major order
    occ_start = np.zeros(L * E + 1, np.int64)
    np.cumsum(np.bincount(keys, minlength=L * E), out=occ_start[1:])
    return occ_start, np.ascontiguousarray(events[order], dtype=np.int64)


def compute_table(deployment: Deployment, cost: ModelCost, steps: Steps) -> tuple[np.ndarray, np.ndarray]:
    """Compute time per layer as ``ctab[crow[s], n]`` for step ``s`` with ``n`` demand experts.

    ``ctab`` is :func:`~moescope.simulate.deployment.compute_times` over each distinct token count
    and ``n = 0..W``: the same numbers as the full ``(S, L)`` array, without building it.
    """
    tokens, crow = np.unique(steps.tokens, return_inverse=True)
    width = steps.demand.shape[2]
    n = np.broadcast_to(np.arange(width + 1), (tokens.size, width + 1))
    ctab = compute_times(deployment, cost, tokens.astype(np.float64), n)
    return np.ascontiguousarray(ctab, dtype=np.float64), crow.reshape(-1).astype(np.int64)


def _cores() -> int:
    """Cores this process may run on (the ranking thread only pays off with two or more)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


STREAM_BLOCK = 2048  # steps ranked per block when a prefetcher is ranked alongside the replay


def _stream(
    demand: np.ndarray,
    rank: Callable[[int, int, np.ndarray], np.ndarray],
    replay: Callable[[int, int, np.ndarray], None],
    m: int,
    block: int | None = None,
) -> None:
    """Replay ``demand`` block by block, ranking block ``i + 1`` on a second core while block ``i`` replays.

    ``rank(a, b, buf)`` fills ``buf`` ``(b - a, L, m)`` with the predictions of steps ``a:b``;
    ``replay(a, b, pref)`` replays them. Both release the GIL (compiled with ``nogil``). Two buffers
    alternate, so only ``2 * block`` steps of predictions exist at any time (default
    :data:`STREAM_BLOCK`). One core: no thread.
    """
    S, L, _ = demand.shape
    block = block or STREAM_BLOCK
    bufs = [np.empty((min(S, block), L, m), np.int16) for _ in range(2)]
    starts = list(range(0, S, block))
    if len(starts) == 1 or _cores() < 2:
        for a in starts:
            b = min(S, a + block)
            replay(a, b, rank(a, b, bufs[0][: b - a]))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(rank, 0, block, bufs[0])
        for i, a in enumerate(starts):
            b = min(S, a + block)
            pref = ahead.result()
            if b < S:
                c = min(S, b + block)
                ahead = pool.submit(rank, b, c, bufs[(i + 1) % 2][: c - b])
            replay(a, b, pref)


def run(
    steps: Steps,
    policy: CachePolicy,
    capacity: np.ndarray,
    deployment: Deployment,
    cost: ModelCost,
    *,
    shared: bool = False,
    prefetch: np.ndarray | None = None,
    prefetcher: Prefetcher | None = None,
    distance: int = 1,
    prefetcher_name: str = "none",
    reset: str = "none",
) -> SimResult:
    """Replay prepared ``steps`` with a fitted ``policy``.

    ``capacity`` is ``(L,)`` slots per layer, or ``(1,)`` with ``shared`` for one cache over all layers;
    ``prefetch`` is the ``(S, L, m)`` array of :func:`step_prefetch`; ``reset="document"`` empties
    the cache at every document start (each request starts cold).

    Instead of ``prefetch``, a fitted ``prefetcher`` whose predictions depend only on each row's own
    experts (``from_ids``: the table and the oracle) can be given for decode steps: its predictions
    are then made block by block on a second core while the replay runs, with the same results as
    ``prefetch=step_prefetch(steps, prefetcher.ranked(trace))`` and no ``(N, L, m)`` array.
    """
    policy.check_is_fitted()
    deployment.check()
    if reset not in RESETS:
        raise ConfigError(f"reset {reset!r} is unknown; use one of {', '.join(RESETS)}")
    S, L, E = steps.num_steps, steps.num_layers, steps.num_experts
    capacity = np.asarray(capacity, np.int64)
    want = (1,) if shared else (L,)
    if capacity.shape != want or (capacity < 1).any():
        raise ConfigError(
            f"capacity must have shape {want} ({'one shared cache' if shared else 'slots per layer'}), "
            f"each >= 1; got {capacity.tolist()}"
        )
    per_layer = not shared
    if prefetcher is not None:
        if prefetch is not None:
            raise ConfigError("pass either prefetch (an array) or prefetcher, not both")
        if not prefetcher.from_ids or steps.mode != "decode":
            raise ConfigError(
                f"{type(prefetcher).__name__} cannot be ranked during a {steps.mode} replay: pass "
                "prefetch=step_prefetch(steps, prefetcher.ranked(trace)) instead"
            )
        if not getattr(prefetcher, "fitted_", False):
            raise ConfigError(f"{type(prefetcher).__name__} is not fitted: call fit(trace) first")
        if (prefetcher.num_layers_, prefetcher.num_experts_) != (L, E):
            raise ConfigError(
                f"{type(prefetcher).__name__} was fitted on {prefetcher.num_layers_} layers x "
                f"{prefetcher.num_experts_} experts; the steps have {L} x {E}"
            )
        distance, M = int(prefetcher.distance), prefetcher.m_
        if prefetcher_name == "none":
            prefetcher_name = prefetcher.describe()
    else:
        if prefetch is None:
            prefetch = np.full((S, L, 0), -1, np.int16)
        if prefetch.shape[:2] != (S, L):
            raise ConfigError(f"prefetch array has shape {prefetch.shape}; expected ({S}, {L}, m)")
        prefetch = np.ascontiguousarray(prefetch, dtype=np.int16)
        M = prefetch.shape[2]
    if not 1 <= distance:
        raise ConfigError(f"distance must be >= 1, got {distance}")
    pinned = policy.pinned(L, E, capacity, per_layer)
    n_pinned = pinned.reshape(L, E).sum(axis=1) if per_layer else np.array([pinned.sum()])
    if (n_pinned > capacity).any():
        raise ConfigError(f"{policy.describe()} pins more experts than the cache holds")
    reset_mask = steps.doc_start.copy() if reset == "document" else np.zeros(S, bool)
    reset_mask[0] = True

    load_t, _ = load_times(deployment, cost, steps.popularity)
    demand = np.ascontiguousarray(steps.demand, dtype=np.int16)
    ctab, crow = compute_table(deployment, cost, steps)
    # a policy's own predictor, when it runs on the critical path, delays every layer
    ctab = ctab + float(policy.critical_path_s())
    counts = np.zeros((K.NCOUNT, L), np.int64)
    stall = np.zeros(L, np.float64)
    wait_pf = np.zeros(L, np.float64)
    clock = np.zeros(K.NCLOCK, np.float64)
    dist = int(distance)
    if (
        policy.priority_rule == K.PRIO_LAST
        and policy.use_rule == K.USE_NONE
        and not policy.protect
        and not policy.bypass
        and not policy.needs_future
        and not policy.pred_next
    ):
        # LRU and static pinning: the O(1) recency-list loop (same semantics, several times faster)
        node, lists = K.lru_state(load_t, E, capacity.shape[0])

        lru_cfg = K.LruConfig(dist, int(E), per_layer, capacity, pinned, ctab)
        lru_sta = K.LruState(node, lists, clock, counts, stall, wait_pf)

        def replay(a: int, b: int, pref: np.ndarray) -> None:
            K.replay_lru(K.LruBlock(demand[a:b], pref, reset_mask[a:b], crow[a:b], a), lru_cfg, lru_sta)

        unused = node["unused"]
    else:
        if policy.needs_future:
            occ_start, occ_ev = _occurrences(demand, E)
        else:
            occ_start, occ_ev = np.zeros(L * E + 1, np.int64), np.zeros(0, np.int64)
        seg_start = np.flatnonzero(reset_mask)
        seg_end = (np.append(seg_start[1:], S)[np.cumsum(reset_mask) - 1]).astype(np.int64) * L
        if policy.pred_next:
            nextpred = np.array(policy.next_use(steps), dtype=np.float64, order="C")
            if nextpred.shape != demand.shape:
                raise ConfigError(
                    f"{policy.describe()}: next_use returned shape {nextpred.shape}; the steps need {demand.shape}"
                )
            # a reset empties the cache, so a use predicted beyond it is no use to the cache
            nextpred[nextpred >= seg_end[:, None, None]] = np.inf
        else:
            nextpred = np.zeros((S, L, 0), np.float64)
        P = capacity.shape[0]
        cfg = K.Config(
            dist,
            int(E),
            per_layer,
            int(policy.priority_rule),
            int(policy.use_rule),
            float(policy.param()),
            bool(policy.bypass),
            bool(policy.protect),
            bool(policy.needs_future),
            bool(policy.pred_next),
            int(policy.horizon_steps()),
        )
        coef, trans, prior = policy.reuse_model(L, E, load_t)
        tab = K.Tables(capacity, pinned, occ_start, occ_ev, load_t, ctab, coef, trans, prior)
        sta = K.State(
            slots=np.full((P, int(capacity.max())), -1, np.int64),
            nres=np.zeros(P, np.int64),
            where=np.full(L * E, -1, np.int64),
            st=np.zeros((L * E, K.NSTATE), np.float64),
            lock=np.full(L * E, -1, np.int64),
            protect_until=np.full(L * E, -1, np.int64),
            unused=np.zeros(L * E, np.bool_),
            arrival=np.zeros(L * E, np.float64),
            ptr=occ_start[:-1].copy(),
            clock=clock,
            counts=counts,
            stall=stall,
            wait_pf=wait_pf,
            lastset=np.full((L, max(demand.shape[2], 1)), -1, np.int16),
        )
        unused = sta.unused

        def replay(a: int, b: int, pref: np.ndarray) -> None:
            blk = K.Block(demand[a:b], pref, nextpred[a:b], seg_end[a:b], reset_mask[a:b], crow[a:b], a)
            K.replay_chunk(blk, cfg, tab, sta)

    if prefetcher is None:
        replay(0, S, prefetch)
    else:

        def rank(a: int, b: int, buf: np.ndarray) -> np.ndarray:
            return prefetcher.rank_ids(demand[a:b], buf)

        _stream(demand, rank, replay, M)
    # prefetched experts never used by the end of the replay were moved for nothing
    left = np.flatnonzero(unused)
    np.add.at(counts[K.C_PF_WASTE], left // E, 1)

    return SimResult(
        policy=policy.describe(),
        prefetcher=prefetcher_name,
        distance=dist,
        budget=int(M),
        capacity=capacity,
        shared=shared,
        mode=steps.mode,
        counts=counts,
        stall_s=stall,
        prefetch_wait_s=wait_pf,
        total_s=float(clock[K.T_NOW]),
        compute_s=float(clock[K.T_COMPUTE]),
        no_cache_s=float(clock[K.T_NOCACHE]),
        tokens=int(steps.tokens.sum()),
        steps=S,
        expert_bytes=cost.expert_bytes,
    )


def simulate(
    trace: Any,
    policy: CachePolicy,
    capacity: np.ndarray,
    deployment: Deployment,
    cost: ModelCost,
    *,
    shared: bool = False,
    prefetcher: Any = None,
    mode: str = "decode",
    batch_size: int | None = None,
    reset: str = "none",
    fit_trace: Any = None,
) -> SimResult:
    """Replay ``trace`` through ``policy`` (and ``prefetcher``) on ``deployment``.

    Unfitted policies and prefetchers are fitted on ``fit_trace``: a training trace (e.g. the train
    half of ``trace.split()``), or ``"replayed"`` to fit on ``trace`` itself, which flatters whatever
    learns; ``None`` only when nothing learns from a trace (see
    :func:`moescope.simulate.fitting.fit_source`).

    Examples
    --------
    >>> from moescope.simulate import LRU, ModelCost, get_preset, simulate  # doctest: +SKIP
    >>> r = simulate(tr, LRU(), np.full(tr.num_layers, 4), get_preset("rtx4090-pcie4"),
    ...              ModelCost(expert_params=3 * 4096 * 14336, top_k=2))  # doctest: +SKIP
    >>> r.summary()["hit_rate"]  # doctest: +SKIP
    """
    from moescope.simulate.fitting import fit_source

    fit_on = fit_source(trace, fit_trace, policy, prefetcher)
    if not getattr(policy, "fitted_", False):
        policy.for_replay(
            deployment=deployment,
            cost=cost,
            capacity=capacity,
            shared=shared,
            mode=mode,
            batch_size=batch_size,
            reset=reset,
            prefetcher=prefetcher,
        )
        policy = policy.fit(fit_on)
    steps = prepare(trace, mode=mode, batch_size=batch_size)
    if prefetcher is None:
        return run(steps, policy, capacity, deployment, cost, shared=shared, reset=reset)
    if not getattr(prefetcher, "fitted_", False):
        prefetcher = prefetcher.fit(fit_on)
    if prefetcher.from_ids and steps.mode == "decode":  # ranked block by block alongside the replay
        prefetcher.check_fitted(trace)
        return run(
            steps, policy, capacity, deployment, cost, shared=shared, prefetcher=prefetcher, reset=reset
        )
    return run(
        steps,
        policy,
        capacity,
        deployment,
        cost,
        shared=shared,
        prefetch=step_prefetch(steps, prefetcher.ranked(trace)),
        distance=int(prefetcher.distance),
        prefetcher_name=prefetcher.describe(),
        reset=reset,
    )
