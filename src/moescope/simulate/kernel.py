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

from collections import namedtuple

import numpy as np
from numba import njit

# columns of the per-key policy state
LAST = 0  # touch counter of the last use or insertion (larger = more recent)
FREQ = 1  # demand uses so far
AUX = 2  # policy scratch (e.g. LRFU's combined recency-frequency value)
NEXT = 3  # next demand event of the key (Belady), +inf when none before the next reset
STEP = 4  # step of the last use (PRIO_REUSE)
NSTATE = 5

INF = np.inf
# lock stamps: a demand event locks with its index (>= 0), a prefetch issue with -2 - event (<= -2),
# and -1 means never locked; NO_STAMP equals none of them (a victim search that must skip nothing)
NO_STAMP = np.iinfo(np.int64).max

# eviction priority rules (the resident with the lowest priority is evicted)
PRIO_LAST = 0  # least recently touched first (LRU)
PRIO_FREQ = 1  # fewest demand uses first (LFU)
PRIO_AUX = 2  # lowest AUX first (LRFU)
PRIO_NEXT = 3  # furthest next use first (Belady)
PRIO_PRED = 4  # furthest predicted next use first (NEXT from the per-access predictions; AUX = last use)
PRIO_REUSE = 5  # lowest learned reuse score first (:func:`reuse_score`)
# horizon-H oracle: a key whose next use (NEXT, exact) falls within the next ``horizon`` steps ranks
# by it (sooner = kept), above every other key; the rest rank by LRFU (AUX), the current event's
# keys first (their AUX is updated only at their touch); a miss not known to return within the
# horizon is streamed only when the victim is known to return (an upper-bound study)
PRIO_HORIZON = 6
HORIZON_KNOWN = 1e12  # priority of a key known to return = HORIZON_KNOWN - its next event
HORIZON_MISS = 1e11  # priority of a miss not known to return (above every LRFU value, below known keys)
HORIZON_USED = 5e10  # a key of the current event not known to return: above every LRFU value
# update rules on a use or a prefetch insertion
USE_NONE = 0
USE_LRFU = 1
USE_EVENT = 2  # AUX = the event of the last use (PRIO_PRED)
USE_REUSE = 3  # LRFU in AUX and the step in STEP (PRIO_REUSE)

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
def priority(rule, last, freq, aux, nxt, event, param):
    """Eviction priority under ``rule`` of a key with state ``(last, freq, aux, nxt)`` at ``event``:
    lower is evicted first. Scalars only: an array handed to an inlined helper inside the loops is
    reference-counted at every call, which made the replay loops 2-4x slower."""
    if rule == PRIO_FREQ:
        return freq
    if rule == PRIO_AUX:
        return aux
    if rule == PRIO_NEXT:
        return -nxt
    if rule == PRIO_PRED:
        # predicted next use; once overdue, the wait so far (times param) estimates the rest
        if param > 0.0:
            late = event + param * (event - aux)
            if late > nxt:
                nxt = late
        return -nxt
    return last


@njit(cache=True, inline="always")
def lrfu(aux, step, param):
    """LRFU's value after a use at ``step`` (Lee et al., IEEE TC 2001): C(t) = 1 + 2^(-lam (t - t_last))
    C(t_last), stored as log2 C(t_last) + lam t_last so that comparing keys at any common "now"
    compares this value."""
    return np.log2(1.0 + np.exp2(aux - param * step)) + param * step


@njit(cache=True, inline="always")
def reuse_score(aux, last_step, prior, trans_sum, step, param, coef):
    """Learned reuse score (higher = kept) of a key at ``step``: the logit of a logistic model over
    its LRFU value ``aux`` (decay ``param``), ``trans_sum`` (the summed transition probabilities from
    its layer's latest expert set), its training popularity ``prior`` and its age since
    ``last_step``; ``coef`` (a 5-tuple of floats) fitted on a training trace."""
    return (
        coef[0] * (aux - param * step)
        + coef[1] * np.log(trans_sum + 1e-6)
        + coef[2] * prior
        + coef[3] * np.log2(1.0 + step - last_step)
        + coef[4]
    )


# a replay's configuration, read-only arrays, carried state and block of steps, packed so that
# :func:`replay_chunk` takes four arguments (Numba compiles each as one typed tuple)
Config = namedtuple(
    "Config", "dist E per_layer prio_rule use_rule param bypass use_protect need_next pred_next horizon"
)
Tables = namedtuple("Tables", "cap pinned occ_start occ_ev load_time ctab coef trans prior")
State = namedtuple(
    "State", "slots nres where st lock protect_until unused arrival ptr clock counts stall wait_pf lastset"
)
Block = namedtuple("Block", "demand pref nextpred seg_end reset crow step0")
# the same for :func:`replay_lru`, which needs fewer of them (three arguments)
LruConfig = namedtuple("LruConfig", "dist E per_layer cap pinned ctab")
LruState = namedtuple("LruState", "node lists clock counts stall wait_pf")
LruBlock = namedtuple("LruBlock", "demand pref reset crow step0")


@njit(cache=True, nogil=True)
def replay_chunk(blk, cfg, tab, sta):
    """Replay the steps of ``blk`` (a :data:`Block`) with the policy rules of ``cfg`` (a :data:`Config`).

    ``tab`` (:data:`Tables`) holds the read-only arrays, ``sta`` (:data:`State`) everything that
    carries over from one call to the next, so a trace can be replayed in consecutive blocks. Serves
    every policy; each eviction scans the partition's residents. Demand loads and prefetches go
    through one loop over ``W + M`` requests, so the victim search, the insertion and the touch are
    written once. Every array is read from the tuples once per call and the inlined rules
    (:func:`priority`, :func:`lrfu`, :func:`reuse_score`) take scalars: an array handed to an
    inlined helper inside the loops is reference-counted at every call (2-4x slower loops).
    """
    demand, pref, nextpred = blk.demand, blk.pref, blk.nextpred
    crow, seg_ends, resets, step0 = blk.crow, blk.seg_end, blk.reset, blk.step0
    dist, E, per_layer, prio_rule = cfg.dist, cfg.E, cfg.per_layer, cfg.prio_rule
    use_rule, param, bypass, use_protect = cfg.use_rule, cfg.param, cfg.bypass, cfg.use_protect
    need_next, pred_next = cfg.need_next, cfg.pred_next
    cap, pinned, load_time, ctab = tab.cap, tab.pinned, tab.load_time, tab.ctab
    slots, nres, where = sta.slots, sta.nres, sta.where
    lock, protect_until, unused, arrival = sta.lock, sta.protect_until, sta.unused, sta.arrival
    clock, counts, stall, wait_pf = sta.clock, sta.counts, sta.stall, sta.wait_pf
    st, ptr, lastset, occ_start, occ_ev = sta.st, sta.ptr, sta.lastset, tab.occ_start, tab.occ_ev
    coef, trans, prior = tab.coef, tab.trans, tab.prior
    reuse = prio_rule == PRIO_REUSE
    by_horizon = prio_rule == PRIO_HORIZON
    horizon = cfg.horizon
    cf = (coef[0], coef[1], coef[2], coef[3], coef[4])
    S, L, W = demand.shape
    M = pref.shape[2]
    K = L * E
    resident_at_start = np.zeros(W, np.bool_)
    for s in range(S):
        gs = step0 + s
        step = float(gs)
        if resets[s]:
            for p in range(nres.shape[0]):
                for i in range(nres[p]):
                    key = slots[p, i]
                    if unused[key]:
                        counts[C_PF_WASTE, key // E] += 1
                        unused[key] = False
                    where[key] = -1
                nres[p] = 0
            for key in range(K):
                st[key, LAST] = 0.0
                st[key, FREQ] = 0.0
                st[key, AUX] = -INF
                st[key, NEXT] = INF
                st[key, STEP] = 0.0
                protect_until[key] = -1
                arrival[key] = 0.0
                if pinned[key]:
                    p = key // E if per_layer else 0
                    slots[p, nres[p]] = key
                    where[key] = nres[p]
                    nres[p] += 1
        seg_end = seg_ends[s]
        known_before = float((gs + horizon + 1) * L)  # PRIO_HORIZON: the routing of steps <= gs + horizon
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
                if reuse:
                    lastset[layer, j] = e
                if e < 0:
                    continue
                n_demand += 1
                key = layer * E + e
                clock[T_NOCACHE] += load_time[key]
                if pred_next:  # every key of this event ranks by its use after it
                    st[key, NEXT] = nextpred[s, layer, j]
                    st[key, AUX] = event
                if where[key] >= 0:
                    lock[key] = event
                    resident_at_start[j] = True
            # 2. requests 0..W-1 serve demand in rank order, W..W+M-1 prefetch for layer + dist. A
            # bypassing policy may evict what this step already used (it need not stay), so its demand
            # loads search victims with a stamp that matches no lock; a prefetch never evicts an expert
            # predicted by the same issue (pf_stamp never equals an event index: demand locks stay).
            target = layer + dist
            n_req = W + M if target < L else W
            tpart = target if per_layer else 0
            tevent = gs * L + target
            pf_stamp = -2 - event
            for j in range(n_req):
                if j < W:
                    e = demand[s, layer, j]
                    if e < 0:
                        continue
                    key = layer * E + e
                    counts[C_ACCESS, layer] += 1
                    if resident_at_start[j]:
                        counts[C_HIT, layer] += 1
                        if unused[key]:
                            counts[C_PF_HIT, layer] += 1
                            unused[key] = False
                            if arrival[key] > t_start:
                                counts[C_LATE, layer] += 1
                                wait_pf[layer] += arrival[key] - t_start
                        if arrival[key] > ready:
                            ready = arrival[key]
                        admit = False
                    else:
                        admit = True
                        counts[C_MISS, layer] += 1
                        start = clock[T_LINK] if clock[T_LINK] > t_start else t_start
                        clock[T_LINK] = start + load_time[key]
                        if clock[T_LINK] > ready:
                            ready = clock[T_LINK]
                    p = part
                    stamp = NO_STAMP if bypass else event
                    lay = layer
                else:
                    e = pref[s, target, j - W]
                    if e < 0:
                        continue
                    key = target * E + e
                    if use_protect and protect_until[key] < tevent:
                        protect_until[key] = tevent
                    if pred_next and st[key, NEXT] > tevent:  # predicted for the target layer
                        st[key, NEXT] = tevent
                    if where[key] >= 0:
                        counts[C_PF_RESIDENT, target] += 1
                        lock[key] = pf_stamp
                        continue
                    admit = True
                    p = tpart
                    stamp = pf_stamp
                    lay = target
                # the one eviction: a free slot, else the resident of lowest (protected, priority, last
                # touch) that is neither pinned nor locked with this request's stamp; a bypassing
                # policy keeps the key only when it ranks above that victim (i = -1 ranks the key)
                keep = True
                slot = -1
                if admit:
                    if nres[p] < cap[p]:
                        slot = nres[p]
                        nres[p] += 1
                    else:
                        best_prot = 2
                        best_pri = INF
                        best_last = INF
                        mine = INF
                        for i in range(-1 if bypass else 0, nres[p]):
                            cand = key if i < 0 else slots[p, i]
                            if i >= 0 and (lock[cand] == stamp or pinned[cand]):
                                continue
                            if need_next:  # the first demand event of cand after this one, in this segment
                                q = ptr[cand]
                                q_end = occ_start[cand + 1]
                                while q < q_end and occ_ev[q] <= event:
                                    q += 1
                                ptr[cand] = q
                                st[cand, NEXT] = (
                                    float(occ_ev[q]) if q < q_end and occ_ev[q] < seg_end else INF
                                )
                            if by_horizon:
                                nx = st[cand, NEXT]
                                if nx < known_before:
                                    pri = HORIZON_KNOWN - nx
                                elif i < 0:
                                    pri = HORIZON_MISS
                                elif lock[cand] == event:  # used by this event: LRFU would rank it first
                                    pri = HORIZON_USED
                                else:
                                    pri = st[cand, AUX]
                            elif reuse:
                                c_layer = cand // E
                                c_e = cand - c_layer * E
                                tsum = 0.0
                                for q in range(lastset.shape[1]):
                                    if lastset[c_layer, q] >= 0:
                                        tsum += trans[c_layer, lastset[c_layer, q], c_e]
                                pri = reuse_score(
                                    st[cand, AUX], st[cand, STEP], prior[cand], tsum, step, param, cf
                                )
                            else:
                                pri = priority(
                                    prio_rule,
                                    st[cand, LAST],
                                    st[cand, FREQ],
                                    st[cand, AUX],
                                    st[cand, NEXT],
                                    event,
                                    param,
                                )
                            if i < 0:
                                mine = pri
                                continue
                            prot = 1 if (use_protect and protect_until[cand] >= event) else 0
                            last = st[cand, LAST]
                            if prot < best_prot or (
                                prot == best_prot
                                and (pri < best_pri or (pri == best_pri and last < best_last))
                            ):
                                slot, best_prot, best_pri, best_last = i, prot, pri, last
                        keep = slot >= 0 and not (bypass and mine <= best_pri)
                        if keep:
                            old = slots[p, slot]
                            if unused[old]:
                                counts[C_PF_WASTE, old // E] += 1
                                unused[old] = False
                            where[old] = -1
                            counts[C_EVICT, lay] += 1
                    if keep:
                        slots[p, slot] = key
                        where[key] = slot
                        lock[key] = stamp if j >= W else event
                        if j >= W:
                            counts[C_PF_LOAD, target] += 1
                            unused[key] = True
                            start = clock[T_LINK] if clock[T_LINK] > t_start else t_start
                            clock[T_LINK] = start + load_time[key]
                        arrival[key] = clock[T_LINK]
                    elif j < W:
                        counts[C_STREAM, layer] += 1
                    else:
                        continue  # a prefetch that found no room
                # touch: a demand use (hit, kept or streamed miss) or a prefetch insertion
                clock[T_TOUCH] += 1.0
                st[key, LAST] = clock[T_TOUCH]
                if j < W:
                    st[key, FREQ] += 1.0
                if use_rule == USE_LRFU or use_rule == USE_REUSE:
                    st[key, AUX] = lrfu(st[key, AUX], step, param)
                    if use_rule == USE_REUSE:
                        st[key, STEP] = step
                elif use_rule == USE_EVENT:
                    st[key, AUX] = event if j < W else tevent
            # 3. compute once every demand expert has arrived (the prefetch above never moves ready)
            stall[layer] += ready - t_start
            c = ctab[crow[s], n_demand]
            clock[T_COMPUTE] += c
            clock[T_NOCACHE] += c
            clock[T_NOW] = ready + c


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
def replay_lru(blk, cfg, sta):
    """:func:`replay_chunk` for LRU (optionally with pinned experts), with O(1) victims.

    Same semantics and outputs as :func:`replay_chunk` with ``PRIO_LAST``, ``USE_NONE`` and no
    bypass, protection or look-ahead, which is all plain LRU and static pinning need: the unpinned
    residents of each partition form a recency list (least recent at ``head``) that holds exactly the
    order of their last touch, so the victim is the first unlocked entry from the head (at most ``W``
    or ``M`` locked ones are skipped) instead of a scan over every resident. No per-event allocation;
    all per-key state sits in one :data:`NODE` record, so a look-up touches one cache line.

    The list operations and the eviction (``unlink``, ``append``, ``admit``), shared by demand loads
    and prefetches, are written once as closures, which Numba inlines: an array handed to a jitted
    helper as an argument is reference-counted at every call, pairs Numba cannot prune across the
    helper's branches (2-4x slower, seen in ``inspect_llvm()``), while a closure reads the arrays
    of this function without a reference of its own.

    Replays ``demand[0:S]`` as global steps ``step0 + s`` and carries the cache in ``node`` and
    ``lists`` (:func:`lru_state`) and the times in ``clock`` (rows ``T_*``), so a trace can be replayed
    in consecutive calls. The compute time of a layer is ``ctab[crow[s], n]`` for ``n`` demand experts.
    Takes :data:`LruBlock`, :data:`LruConfig` and :data:`LruState`, each read once here.
    """
    demand, pref, reset, crow, step0 = blk
    dist, E, per_layer, cap, pinned, ctab = cfg
    node, lists, clock, counts, stall, wait_pf = sta
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

    def unlink(part, key):
        # take key out of the recency list of partition part
        a = node[key].prv
        b = node[key].nxt
        if a >= 0:
            node[a].nxt = b
        else:
            head[part] = b
        if b >= 0:
            node[b].prv = a
        else:
            tail[part] = a

    def append(part, key):
        # put key at the most recent end of partition part's list
        t = tail[part]
        node[key].prv = t
        node[key].nxt = -1
        if t >= 0:
            node[t].nxt = key
        else:
            head[part] = key
        tail[part] = key

    def admit(part, key, stamp, lay):
        # make key resident (most recent, locked with stamp) in partition part: in a free slot, else in
        # place of the least recent resident not locked with stamp (an eviction counted for layer lay);
        # False when every resident is locked (the key is not kept)
        if nres[part] >= cap[part]:
            v = head[part]
            while v >= 0 and node[v].lock == stamp:
                v = node[v].nxt
            if v < 0:
                return False
            unlink(part, v)
            node[v].state = 0
            counts[C_PF_WASTE, node[v].layer] += node[v].unused
            counts[C_EVICT, lay] += 1
            node[v].unused = False
        else:
            nres[part] += 1
        node[key].state = 1
        node[key].lock = stamp
        append(part, key)
        return True

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
                        unlink(part, key)
                        append(part, key)
                    continue
                counts[C_MISS, layer] += 1
                link = (link if link > t_start else t_start) + node[key].load
                if link > ready:
                    ready = link
                if not admit(part, key, event, layer):
                    counts[C_STREAM, layer] += 1
                    continue
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
                if not admit(tpart, key, pf_stamp, target):
                    continue
                counts[C_PF_LOAD, target] += 1
                node[key].unused = True
                link = (link if link > t_start else t_start) + node[key].load
                node[key].arrival = link
    out = sta.clock  # stores to the unpacked name ``clock`` were lost here (Numba 0.68, with the closures)
    out[T_NOW] = now
    out[T_LINK] = link
    out[T_COMPUTE] = compute_sum
    out[T_NOCACHE] = nocache
