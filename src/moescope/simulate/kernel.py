"""The compiled replay loops: one pass over (step, layer) events through an expert cache and a link.

Everything a replay needs is an array, so the loops compile with Numba's ``nopython`` mode.
:func:`replay_chunk` serves every policy: policies plug in as small jitted rules (see
:mod:`moescope.simulate.policies`) and each eviction scans the partition's residents.
:func:`replay_lru` serves LRU and static pinning with the same semantics in O(1) per eviction (a
recency list); :func:`moescope.simulate.engine.run` picks it whenever the policy allows. The
semantics, which the plain reference simulator in the tests implements line for line:

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
# lock stamps: a demand event locks with its index (>= 0), a prefetch issue with -2 - event (<= -2),
# and -1 means never locked; NO_STAMP equals none of them (a victim search that must skip nothing)
NO_STAMP = np.iinfo(np.int64).max

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

# rows of the ``clock`` array of the loops: totals that carry over from one call to the next
T_NOW = 0  # end of the last computed layer
T_LINK = 1  # when the link is free
T_COMPUTE = 2  # sum of the compute times (the all-in-GPU time)
T_NOCACHE = 3  # sum of every demand expert's load time and the compute (the no-cache time)
T_TOUCH = 4  # touch counter of :func:`replay_chunk`
NCLOCK = 5


@njit(cache=True, inline="always")
def priority(rule, st, key, param):
    """Eviction priority of ``key`` under ``rule``: lower is evicted first."""
    if rule == PRIO_FREQ:
        return st[key, FREQ]
    if rule == PRIO_AUX:
        return st[key, AUX]
    if rule == PRIO_NEXT:
        return -st[key, NEXT]
    return st[key, LAST]


@njit(cache=True, inline="always")
def on_use(rule, st, key, step, param):
    """Update the policy scratch column when ``key`` is used (or inserted by a prefetch) at ``step``."""
    if rule == USE_LRFU:
        # LRFU (Lee et al., IEEE TC 2001): C(t) = 1 + 2^(-lam (t - t_last)) C(t_last), stored as
        # log2 C(t_last) + lam t_last so that comparing keys at any common "now" compares this value.
        st[key, AUX] = np.log2(1.0 + np.exp2(st[key, AUX] - param * step)) + param * step


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
def _pick_victim(
    part,
    slots,
    nres,
    st,
    lock,
    stamp,
    pinned,
    protect_until,
    event,
    use_protect,
    prio_rule,
    param,
    need_next,
    ptr,
    occ_start,
    occ_ev,
    seg_end,
):
    """Slot index of the victim in partition ``part``, or -1 when every resident is locked/pinned."""
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
        if prot < best_prot or (
            prot == best_prot and (pri < best_pri or (pri == best_pri and last < best_last))
        ):
            best, best_prot, best_pri, best_last = i, prot, pri, last
    return best


@njit(cache=True, nogil=True)
def replay_chunk(
    demand,
    pref,
    dist,
    E,
    per_layer,
    cap,
    pinned,
    prio_rule,
    use_rule,
    param,
    bypass,
    use_protect,
    need_next,
    occ_start,
    occ_ev,
    seg_end_of_step,
    reset,
    load_time,
    ctab,
    crow,
    step0,
    slots,
    nres,
    where,
    st,
    lock,
    protect_until,
    pf_unused,
    arrival,
    ptr,
    clock,
    counts,
    stall,
    wait_pf,
):
    """Replay steps ``demand[0:S]`` (global step index ``step0 + s``); all state arrays are updated in place.

    ``demand`` is ``(S, L, W)`` and ``pref`` ``(S, L, M)`` (ids for layer ``l``, issued after layer
    ``l - dist``), both padded with -1. ``clock`` holds the times and the touch counter (rows ``T_*``);
    the compute time of a layer with ``n`` demand experts is ``ctab[crow[s], n]``.
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
            for key in range(K):
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
            t_start = clock[T_NOW]
            ready = t_start
            n_demand = 0
            # 1. lock the resident part of the demand set; hits are decided now, before any eviction
            for j in range(W):
                e = demand[s, layer, j]
                resident_at_start[j] = False
                if e < 0:
                    continue
                n_demand += 1
                key = layer * E + e
                clock[T_NOCACHE] += load_time[key]
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
                    start = clock[T_LINK] if clock[T_LINK] > t_start else t_start
                    clock[T_LINK] = start + load_time[key]
                    if clock[T_LINK] > ready:
                        ready = clock[T_LINK]
                    keep = True
                    victim = -1
                    if nres[part] >= cap[part]:
                        # a bypassing policy may evict what this step already used: it need not stay
                        victim = _pick_victim(
                            part,
                            slots,
                            nres,
                            st,
                            lock,
                            NO_STAMP if bypass else event,
                            pinned,
                            protect_until,
                            event,
                            use_protect,
                            prio_rule,
                            param,
                            need_next,
                            ptr,
                            occ_start,
                            occ_ev,
                            seg_end,
                        )
                        if victim < 0:
                            keep = False
                        elif bypass:
                            st[key, NEXT] = _next_use(key, event, ptr, occ_start, occ_ev, seg_end)
                            if priority(prio_rule, st, key, param) <= priority(
                                prio_rule, st, slots[part, victim], param
                            ):
                                keep = False
                    if keep:
                        if victim >= 0:
                            old = slots[part, victim]
                            if pf_unused[old]:
                                counts[C_PF_WASTE, old // E] += 1
                                pf_unused[old] = False
                            where[old] = -1
                            counts[C_EVICT, layer] += 1
                            slots[part, victim] = key
                            where[key] = victim
                        else:
                            slots[part, nres[part]] = key
                            where[key] = nres[part]
                            nres[part] += 1
                        lock[key] = event
                        arrival[key] = clock[T_LINK]
                    else:
                        counts[C_STREAM, layer] += 1
                clock[T_TOUCH] += 1.0
                st[key, LAST] = clock[T_TOUCH]
                st[key, FREQ] += 1.0
                on_use(use_rule, st, key, float(gs), param)
            # 3. compute
            stall[layer] += ready - t_start
            c = ctab[crow[s], n_demand]
            clock[T_COMPUTE] += c
            clock[T_NOCACHE] += c
            clock[T_NOW] = ready + c
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
                    victim = _pick_victim(
                        tpart,
                        slots,
                        nres,
                        st,
                        lock,
                        pf_stamp,
                        pinned,
                        protect_until,
                        event,
                        use_protect,
                        prio_rule,
                        param,
                        need_next,
                        ptr,
                        occ_start,
                        occ_ev,
                        seg_end,
                    )
                    if victim < 0:
                        continue
                    if bypass:
                        st[key, NEXT] = _next_use(key, event, ptr, occ_start, occ_ev, seg_end)
                        if priority(prio_rule, st, key, param) <= priority(
                            prio_rule, st, slots[tpart, victim], param
                        ):
                            continue
                    old = slots[tpart, victim]
                    if pf_unused[old]:
                        counts[C_PF_WASTE, old // E] += 1
                        pf_unused[old] = False
                    where[old] = -1
                    counts[C_EVICT, target] += 1
                    slots[tpart, victim] = key
                    where[key] = victim
                else:
                    slots[tpart, nres[tpart]] = key
                    where[key] = nres[tpart]
                    nres[tpart] += 1
                counts[C_PF_LOAD, target] += 1
                pf_unused[key] = True
                lock[key] = pf_stamp
                start = clock[T_LINK] if clock[T_LINK] > t_start else t_start
                clock[T_LINK] = start + load_time[key]
                arrival[key] = clock[T_LINK]
                clock[T_TOUCH] += 1.0
                st[key, LAST] = clock[T_TOUCH]
                on_use(use_rule, st, key, float(gs), param)


# per-key state of :func:`replay_lru`, one record per key so that a look-up touches one cache line
NODE = np.dtype(
    [
        ("lock", np.int64),  # event (demand) or -2 - event (prefetch issue) that locked the key last
        ("arrival", np.float64),  # when its last transfer ends
        ("load", np.float64),  # transfer time
        ("prv", np.int32),  # recency list of its partition: older neighbour, -1 at the head
        ("nxt", np.int32),  # newer neighbour, -1 at the tail
        ("layer", np.int16),  # key // E, kept so that no eviction divides
        ("state", np.int8),  # 0 absent, 1 resident (in the recency list), 2 pinned
        ("unused", np.bool_),  # prefetched and not used since
    ],
    align=True,
)


def lru_state(load_time: np.ndarray, num_experts: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh ``(node, lists)`` state of :func:`replay_lru`: one :data:`NODE` per key, and per
    partition ``lists[0]`` the recency list's head, ``lists[1]`` its tail, ``lists[2]`` the residents."""
    node = np.zeros(load_time.shape[0], NODE)
    node["lock"] = -1
    node["prv"] = -1
    node["nxt"] = -1
    node["load"] = load_time
    node["layer"] = np.arange(load_time.shape[0]) // num_experts
    lists = np.zeros((3, num_partitions), np.int64)
    lists[:2] = -1
    return node, lists


@njit(cache=True, nogil=True)
def replay_lru(
    demand,
    pref,
    dist,
    E,
    per_layer,
    cap,
    pinned,
    reset,
    ctab,
    crow,
    step0,
    node,
    lists,
    clock,
    counts,
    stall,
    wait_pf,
):
    """:func:`replay_chunk` for LRU (optionally with pinned experts), with O(1) victims.

    Same semantics and outputs as :func:`replay_chunk` with ``PRIO_LAST``, ``USE_NONE`` and no
    bypass, protection or look-ahead, which is all plain LRU and static pinning need: the unpinned
    residents of each partition form a recency list (least recent at ``head``) that holds exactly the
    order of their last touch, so the victim is the first unlocked entry from the head (at most ``W``
    or ``M`` locked ones are skipped) instead of a scan over every resident. No per-event allocation
    and no calls; all per-key state sits in one :data:`NODE` record, so a look-up touches one cache line.

    Replays ``demand[0:S]`` as global steps ``step0 + s`` and carries the cache in ``node`` and
    ``lists`` (:func:`lru_state`) and the times in ``clock`` (rows ``T_*``), so a trace can be replayed
    in consecutive calls. The compute time of a layer is ``ctab[crow[s], n]`` for ``n`` demand experts.
    """
    S, L, W = demand.shape
    M = pref.shape[2]
    K = L * E
    P = cap.shape[0]
    head = lists[0]
    tail = lists[1]
    nres = lists[2]
    ras = np.zeros(W, np.bool_)  # resident at the start of the event, per demand rank
    now = clock[T_NOW]
    link = clock[T_LINK]
    compute_sum = clock[T_COMPUTE]
    nocache = clock[T_NOCACHE]
    for s in range(S):
        gs = step0 + s
        if reset[s]:
            for key in range(K):
                if node[key].state != 0 and node[key].unused:
                    counts[C_PF_WASTE, node[key].layer] += 1
                node[key].unused = False
                node[key].state = 0
                node[key].nxt = -1
                node[key].prv = -1
                node[key].arrival = 0.0
            for p in range(P):
                head[p] = -1
                tail[p] = -1
                nres[p] = 0
            for key in range(K):
                if pinned[key]:
                    node[key].state = 2
                    nres[node[key].layer if per_layer else 0] += 1
        crow_s = crow[s]
        for layer in range(L):
            event = gs * L + layer
            part = layer if per_layer else 0
            base = layer * E
            t_start = now
            ready = t_start
            n_demand = 0
            for j in range(W):
                e = demand[s, layer, j]
                ras[j] = False
                if e >= 0:
                    n_demand += 1
                    if node[base + e].state != 0:
                        node[base + e].lock = event
                        ras[j] = True
            for j in range(W):
                e = demand[s, layer, j]
                if e < 0:
                    continue
                key = base + e
                nocache += node[key].load
                if ras[j]:
                    counts[C_HIT, layer] += 1
                    if node[key].unused:
                        counts[C_PF_HIT, layer] += 1
                        node[key].unused = False
                        if node[key].arrival > t_start:
                            counts[C_LATE, layer] += 1
                            wait_pf[layer] += node[key].arrival - t_start
                    if node[key].arrival > ready:
                        ready = node[key].arrival
                    if node[key].state == 1 and tail[part] != key:  # move to the most recent end
                        a = node[key].prv
                        b = node[key].nxt
                        if a >= 0:
                            node[a].nxt = b
                        else:
                            head[part] = b
                        node[b].prv = a  # b >= 0: key is not the tail
                        t = tail[part]
                        node[key].prv = t
                        node[key].nxt = -1
                        node[t].nxt = key
                        tail[part] = key
                    continue
                counts[C_MISS, layer] += 1
                link = (link if link > t_start else t_start) + node[key].load
                if link > ready:
                    ready = link
                if nres[part] >= cap[part]:
                    v = head[part]
                    while v >= 0 and node[v].lock == event:
                        v = node[v].nxt
                    if v < 0:
                        counts[C_STREAM, layer] += 1
                        continue
                    counts[C_PF_WASTE, node[v].layer] += node[v].unused
                    node[v].unused = False
                    node[v].state = 0
                    a = node[v].prv
                    b = node[v].nxt
                    if a >= 0:
                        node[a].nxt = b
                    else:
                        head[part] = b
                    if b >= 0:
                        node[b].prv = a
                    else:
                        tail[part] = a
                    counts[C_EVICT, layer] += 1
                else:
                    nres[part] += 1
                node[key].state = 1
                t = tail[part]
                node[key].prv = t
                node[key].nxt = -1
                if t >= 0:
                    node[t].nxt = key
                else:
                    head[part] = key
                tail[part] = key
                node[key].lock = event
                node[key].arrival = link
            counts[C_ACCESS, layer] += n_demand
            stall[layer] += ready - t_start
            c = ctab[crow_s, n_demand]
            compute_sum += c
            nocache += c
            now = ready + c
            target = layer + dist
            if M == 0 or target >= L:
                continue
            tpart = target if per_layer else 0
            tbase = target * E
            pf_stamp = -2 - event
            for j in range(M):
                e = pref[s, target, j]
                if e < 0:
                    continue
                key = tbase + e
                if node[key].state != 0:
                    counts[C_PF_RESIDENT, target] += 1
                    node[key].lock = pf_stamp
                    continue
                if nres[tpart] >= cap[tpart]:
                    v = head[tpart]
                    while v >= 0 and node[v].lock == pf_stamp:
                        v = node[v].nxt
                    if v < 0:
                        continue
                    counts[C_PF_WASTE, node[v].layer] += node[v].unused
                    node[v].unused = False
                    node[v].state = 0
                    a = node[v].prv
                    b = node[v].nxt
                    if a >= 0:
                        node[a].nxt = b
                    else:
                        head[tpart] = b
                    if b >= 0:
                        node[b].prv = a
                    else:
                        tail[tpart] = a
                    counts[C_EVICT, target] += 1
                else:
                    nres[tpart] += 1
                node[key].state = 1
                t = tail[tpart]
                node[key].prv = t
                node[key].nxt = -1
                if t >= 0:
                    node[t].nxt = key
                else:
                    head[tpart] = key
                tail[tpart] = key
                counts[C_PF_LOAD, target] += 1
                node[key].unused = True
                node[key].lock = pf_stamp
                link = (link if link > t_start else t_start) + node[key].load
                node[key].arrival = link
    clock[T_NOW] = now
    clock[T_LINK] = link
    clock[T_COMPUTE] = compute_sum
    clock[T_NOCACHE] = nocache
