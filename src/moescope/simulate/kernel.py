"""The compiled replay loop: one pass over (step, layer) events through an expert cache and a link.

Everything a replay needs is an array, so the loop compiles with Numba's ``nopython`` mode and runs
at tens of millions of expert look-ups per second; policies plug in as two small jitted functions
(see :mod:`moescope.simulate.policies`). The semantics, which the plain reference simulator in the
tests implements line for line:

Keys are ``layer * E + expert``. A key belongs to partition ``layer`` (per-layer capacity) or to
partition 0 (one cache shared by all layers). At event ``(s, l)`` (step ``s``, MoE layer ``l``):

1. The resident experts of the demand set are locked: they cannot be evicted during this event
   (except by a bypassing policy, for which a used expert need not stay: Belady's MIN then keeps
   the ``C`` experts needed soonest, which is optimal).
2. Demand experts are served in rank order. One resident at the start of the event is a hit (a *prefetch hit* if it was
   prefetched and not used since). A missing one is loaded over the link; it takes a free slot, or
   evicts the unlocked, unpinned resident with the lowest ``(protected, priority, last touch)``;
   a bypassing policy (Belady) streams it instead when it ranks no better than that victim, and it
   is streamed (loaded, used, not kept) when every resident is locked or pinned.
3. The layer computes once every demand expert has arrived; the wait is the stall.
4. The prefetcher's ranked ids for layer ``l + d`` are issued: resident ones are marked protected
   (for the protecting policy), missing ones are loaded, evicting as in step 2 but never an expert
   predicted by this same issue. Their transfers are queued at the moment layer ``l``'s routing is
   known (the start of the event), right behind layer ``l``'s own demand loads, so they overlap
   with layer ``l``'s compute.

Transfers are first-in first-out on one link; a transfer of key ``x`` takes ``load_time[x]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# columns of the per-key policy state
LAST = 0  # touch counter of the last use or insertion (larger = more recent)
FREQ = 1  # demand uses so far
AUX = 2  # policy scratch (e.g. LRFU's combined recency-frequency value)
NEXT = 3  # next demand event of the key (Belady), +inf when none before the next reset

INF = np.inf

# eviction priority rules (the resident with the lowest priority is evicted)
PRIO_LAST = 0  # least recently touched first (LRU)
PRIO_FREQ = 1  # fewest demand uses first (LFU)
PRIO_AUX = 2  # lowest AUX first (LRFU)
PRIO_NEXT = 3  # furthest next use first (Belady)
# update rules on a use or a prefetch insertion
USE_NONE = 0
USE_LRFU = 1

# per-layer counters in the ``counts`` output, shape (NCOUNT, L)
C_ACCESS = 0
C_HIT = 1
C_PF_HIT = 2  # hits on a prefetched expert not used since its prefetch
C_LATE = 3  # prefetch hits that still had to wait for the transfer
C_MISS = 4  # demand loads (streamed ones included)
C_STREAM = 5  # demand loads that could not be kept
C_PF_LOAD = 6  # prefetch transfers issued
C_PF_WASTE = 7  # prefetched experts evicted (or left at a reset or the end) without a demand use
C_PF_RESIDENT = 8  # predictions already resident (no transfer)
C_EVICT = 9
NCOUNT = 10


@njit(cache=True)
def priority(rule, st, key, param):
    """Eviction priority of ``key`` under ``rule``: lower is evicted first."""
    if rule == PRIO_FREQ:
        return st[key, FREQ]
    if rule == PRIO_AUX:
        return st[key, AUX]
    if rule == PRIO_NEXT:
        return -st[key, NEXT]
    return st[key, LAST]


@njit(cache=True)
def on_use(rule, st, key, step, param):
    """Update the policy scratch column when ``key`` is used (or inserted by a prefetch) at ``step``."""
    if rule == USE_LRFU:
        # LRFU (Lee et al., IEEE TC 2001): C(t) = 1 + 2^(-lam (t - t_last)) C(t_last), stored as
        # log2 C(t_last) + lam t_last so that comparing keys at any common "now" compares this value.
        st[key, AUX] = np.log2(1.0 + np.exp2(st[key, AUX] - param * step)) + param * step


@njit(cache=True)
def _next_use(key, after, ptr, occ_start, occ_ev, seg_end):
    """First demand event of ``key`` strictly after ``after`` and before ``seg_end``; +inf if none."""
    p = ptr[key]
    end = occ_start[key + 1]
    while p < end and occ_ev[p] <= after:
        p += 1
    ptr[key] = p
    if p < end and occ_ev[p] < seg_end:
        return float(occ_ev[p])
    return INF


@njit(cache=True)
def _unlink(key, part, head, tail, nxt, prv):
    a, b = prv[key], nxt[key]
    if a >= 0:
        nxt[a] = b
    else:
        head[part] = b
    if b >= 0:
        prv[b] = a
    else:
        tail[part] = a
    prv[key] = -1
    nxt[key] = -1


@njit(cache=True)
def _append(key, part, head, tail, nxt, prv):
    t = tail[part]
    prv[key] = t
    nxt[key] = -1
    if t >= 0:
        nxt[t] = key
    else:
        head[part] = key
    tail[part] = key


@njit(cache=True)
def _pick_victim(part, slots, nres, st, lock, stamp, pinned, protect_until, event, use_protect,
                 prio_rule, param, need_next, ptr, occ_start, occ_ev, seg_end, fast, where, head, nxt):
    """Slot index of the victim in partition ``part``, or -1 when every resident is locked/pinned.

    ``fast``: plain LRU with nothing pinned; the residents are a recency list, oldest at ``head``.
    """
    if fast:
        key = head[part]
        while key >= 0 and lock[key] == stamp:
            key = nxt[key]
        return where[key] if key >= 0 else -1
    best = -1
    best_prot = 2
    best_pri = INF
    best_last = INF
    for i in range(nres[part]):
        key = slots[part, i]
        if lock[key] == stamp or pinned[key]:
            continue
        if need_next:
            st[key, NEXT] = _next_use(key, event, ptr, occ_start, occ_ev, seg_end)
        prot = 1 if (use_protect and protect_until[key] >= event) else 0
        pri = priority(prio_rule, st, key, param)
        last = st[key, LAST]
        if (prot < best_prot or (prot == best_prot and (pri < best_pri or (pri == best_pri and last < best_last)))):
            best, best_prot, best_pri, best_last = i, prot, pri, last
    return best


@njit(cache=True)
def replay_chunk(
    demand, pref, dist, E, per_layer, cap, pinned, prio_rule, use_rule, param, bypass, use_protect, need_next,
    occ_start, occ_ev, seg_end_of_step, reset, load_time, compute, step0,
    slots, nres, where, st, lock, protect_until, pf_unused, arrival, ptr, clock,
    counts, stall, wait_pf, fast, head, tail, nxt, prv,
):
    """Replay steps ``demand[0:S]`` (global step index ``step0 + s``); all state arrays are updated in place.

    ``demand`` is ``(S, L, W)`` and ``pref`` ``(S, L, M)`` (ids for layer ``l``, issued after layer
    ``l - dist``), both padded with -1. ``clock`` holds ``[touch counter, now, link free]``.
    """
    S, L, W = demand.shape
    M = pref.shape[2]
    K = L * E
    resident_at_start = np.zeros(W, np.bool_)
    for s in range(S):
        gs = step0 + s
        if reset[s]:
            for p in range(nres.shape[0]):
                for i in range(nres[p]):
                    key = slots[p, i]
                    if pf_unused[key]:
                        counts[C_PF_WASTE, key // E] += 1
                        pf_unused[key] = False
                    where[key] = -1
                nres[p] = 0
                head[p] = -1
                tail[p] = -1
            for key in range(K):
                nxt[key] = -1
                prv[key] = -1
                st[key, LAST] = 0.0
                st[key, FREQ] = 0.0
                st[key, AUX] = -INF
                st[key, NEXT] = INF
                protect_until[key] = -1
                arrival[key] = 0.0
                if pinned[key]:
                    p = key // E if per_layer else 0
                    slots[p, nres[p]] = key
                    where[key] = nres[p]
                    nres[p] += 1
        seg_end = seg_end_of_step[s]
        for layer in range(L):
            event = gs * L + layer
            part = layer if per_layer else 0
            t_start = clock[1]
            ready = t_start
            # 1. lock the resident part of the demand set; hits are decided now, before any eviction
            for j in range(W):
                e = demand[s, layer, j]
                resident_at_start[j] = False
                if e < 0:
                    continue
                key = layer * E + e
                if where[key] >= 0:
                    lock[key] = event
                    resident_at_start[j] = True
            # 2. serve demand in rank order
            for j in range(W):
                e = demand[s, layer, j]
                if e < 0:
                    continue
                key = layer * E + e
                counts[C_ACCESS, layer] += 1
                if resident_at_start[j]:
                    counts[C_HIT, layer] += 1
                    if pf_unused[key]:
                        counts[C_PF_HIT, layer] += 1
                        pf_unused[key] = False
                        if arrival[key] > t_start:
                            counts[C_LATE, layer] += 1
                            wait_pf[layer] += arrival[key] - t_start
                    if arrival[key] > ready:
                        ready = arrival[key]
                else:
                    counts[C_MISS, layer] += 1
                    start = clock[2] if clock[2] > t_start else t_start
                    clock[2] = start + load_time[key]
                    if clock[2] > ready:
                        ready = clock[2]
                    keep = True
                    victim = -1
                    if nres[part] >= cap[part]:
                        # a bypassing policy may evict what this step already used: it need not stay
                        victim = _pick_victim(part, slots, nres, st, lock, -3 if bypass else event, pinned, protect_until, event,
                                              use_protect, prio_rule, param, need_next, ptr, occ_start, occ_ev,
                                              seg_end, fast, where, head, nxt)
                        if victim < 0:
                            keep = False
                        elif bypass:
                            st[key, NEXT] = _next_use(key, event, ptr, occ_start, occ_ev, seg_end)
                            if priority(prio_rule, st, key, param) <= priority(prio_rule, st, slots[part, victim], param):
                                keep = False
                    if keep:
                        if victim >= 0:
                            old = slots[part, victim]
                            if pf_unused[old]:
                                counts[C_PF_WASTE, old // E] += 1
                                pf_unused[old] = False
                            where[old] = -1
                            if fast:
                                _unlink(old, part, head, tail, nxt, prv)
                            counts[C_EVICT, layer] += 1
                            slots[part, victim] = key
                            where[key] = victim
                        else:
                            slots[part, nres[part]] = key
                            where[key] = nres[part]
                            nres[part] += 1
                        if fast:
                            _append(key, part, head, tail, nxt, prv)
                        lock[key] = event
                        arrival[key] = clock[2]
                    else:
                        counts[C_STREAM, layer] += 1
                clock[0] += 1.0
                st[key, LAST] = clock[0]
                st[key, FREQ] += 1.0
                if fast and where[key] >= 0 and tail[part] != key:
                    _unlink(key, part, head, tail, nxt, prv)
                    _append(key, part, head, tail, nxt, prv)
                on_use(use_rule, st, key, float(gs), param)
            # 3. compute
            stall[layer] += ready - t_start
            clock[1] = ready + compute[s, layer]
            # 4. prefetch for layer + dist
            target = layer + dist
            if M == 0 or target >= L:
                continue
            tpart = target if per_layer else 0
            tevent = gs * L + target
            pf_stamp = -2 - event  # never equals an event index, so demand locks are untouched
            for j in range(M):
                e = pref[s, target, j]
                if e < 0:
                    continue
                key = target * E + e
                if use_protect and protect_until[key] < tevent:
                    protect_until[key] = tevent
                if where[key] >= 0:
                    counts[C_PF_RESIDENT, target] += 1
                    lock[key] = pf_stamp
                    continue
                victim = -1
                if nres[tpart] >= cap[tpart]:
                    victim = _pick_victim(tpart, slots, nres, st, lock, pf_stamp, pinned, protect_until, event,
                                          use_protect, prio_rule, param, need_next, ptr, occ_start, occ_ev, seg_end,
                                          fast, where, head, nxt)
                    if victim < 0:
                        continue
                    if bypass:
                        st[key, NEXT] = _next_use(key, event, ptr, occ_start, occ_ev, seg_end)
                        if priority(prio_rule, st, key, param) <= priority(prio_rule, st, slots[tpart, victim], param):
                            continue
                    old = slots[tpart, victim]
                    if pf_unused[old]:
                        counts[C_PF_WASTE, old // E] += 1
                        pf_unused[old] = False
                    where[old] = -1
                    if fast:
                        _unlink(old, tpart, head, tail, nxt, prv)
                    counts[C_EVICT, target] += 1
                    slots[tpart, victim] = key
                    where[key] = victim
                else:
                    slots[tpart, nres[tpart]] = key
                    where[key] = nres[tpart]
                    nres[tpart] += 1
                if fast:
                    _append(key, tpart, head, tail, nxt, prv)
                counts[C_PF_LOAD, target] += 1
                pf_unused[key] = True
                lock[key] = pf_stamp
                start = clock[2] if clock[2] > t_start else t_start
                clock[2] = start + load_time[key]
                arrival[key] = clock[2]
                clock[0] += 1.0
                st[key, LAST] = clock[0]
                on_use(use_rule, st, key, float(gs), param)
