"""The simulator against a plain reference simulator written here, Belady's optimality, and the contract."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.base import clone

from moescope.errors import ConfigError, MoescopeError
from moescope.predict.temporal import NextUsePredictor, ReusePredictor
from moescope.simulate import (
    LFU,
    LRFU,
    LRU,
    Belady,
    Deployment,
    LearnedReuse,
    LearnedReuseAdmit,
    ModelCost,
    NextUse,
    NextUseEvict,
    OracleNextUse,
    OraclePrefetcher,
    PreviousTokenPrefetcher,
    ProtectedLRU,
    StaticPin,
    TablePrefetcher,
    Tier,
    cache_capacity,
    get_preset,
    prepare,
    run,
    simulate,
    step_prefetch,
)
from moescope.trace.synthetic import write_synthetic_trace

# ---------------------------------------------------------------------------------------------
# reference simulator: one obvious Python loop, dictionaries and lists only


PRED_POLICIES = ("next-use", "next-use-evict", "oracle-next-use")


def reference(
    demand,
    pref,
    dist,
    E,
    cap,
    shared,
    policy,
    pinned_keys,
    load_t,
    compute,
    reset,
    nextpred=None,
    stale=0.0,
    reuse=None,
    horizon=None,
):
    """Counts and final time of a replay, by the rules stated in moescope.simulate.kernel.

    For the predicted-next-use policies, ``nextpred[s][l][j]`` is the predicted next event of the
    use ``demand[s][l][j]`` and ``stale`` the policy's staleness weight. For the learned reuse
    policies, ``reuse = (coef, transition, log popularity, decay)``.
    """
    S, L, _ = demand.shape
    pred = policy in PRED_POLICIES
    learned = policy in ("learned-reuse", "learned-reuse-admit")
    bypassing = policy in ("belady", "next-use", "oracle-next-use", "learned-reuse-admit")
    by_horizon = policy == "horizon-oracle"
    if by_horizon:
        bypassing = horizon[1]
    lastset = {}  # layer -> the experts of its latest event
    current = set()  # keys of the current event's demand
    future = {}  # key -> list of demand events
    for s in range(S):
        for layer in range(L):
            for e in demand[s][layer]:
                if e >= 0:
                    future.setdefault(layer * E + int(e), []).append(s * L + layer)
    seg_end = {}
    cur = S
    for s in range(S - 1, -1, -1):
        seg_end[s] = cur * L
        if reset[s]:
            cur = s

    def next_use(key, after, s):
        for ev in future.get(key, []):
            if ev > after:
                return ev if ev < seg_end[s] else math.inf
        return math.inf

    out = {n: [0] * L for n in ("access", "hit", "pf_hit", "miss", "stream", "pf_load", "pf_waste")}
    cache = {}  # partition -> list of resident keys
    info = {}  # key -> dict(last, freq, aux, unused, arrival, protect)
    counter = 0
    now = 0.0
    link = 0.0

    def part(layer):
        return 0 if shared else layer

    def prio(key, event, s):
        d = info[key]
        if policy == "lfu":
            return d["freq"]
        if policy == "lrfu":
            return d["aux"]
        if by_horizon:  # known within the horizon: by that use, above every other key (LRFU)
            nx = next_use(key, event, s)
            if nx < (s + horizon[0] + 1) * L:
                return 1e12 - nx
            return 5e10 if key in current else d["aux"]
        if policy == "belady":
            return -next_use(key, event, s)
        if learned:
            coef, trans, prior, decay = reuse
            layer, e = divmod(key, E)
            t = sum(trans[layer, a, e] for a in lastset.get(layer, []) if a >= 0)
            return (
                coef[0] * (d["aux"] - decay * s)
                + coef[1] * math.log(t + 1e-6)
                + coef[2] * prior[key]
                + coef[3] * math.log2(1.0 + s - d["step"])
                + coef[4]
            )
        if pred:
            nxt = d["next"]
            if stale > 0:
                nxt = max(nxt, event + stale * (event - d["aux"]))
            return -nxt
        return d["last"]

    def miss_prio(key, event, s):
        """The horizon oracle's rank of a miss: by its use when known, else below every known key."""
        nx = next_use(key, event, s)
        return 1e12 - nx if nx < (s + horizon[0] + 1) * L else 1e11

    def victim(p, locked, event, s):
        best = None
        for key in cache[p]:
            if key in locked or key in pinned_keys:
                continue
            prot = 1 if policy == "lru-protect" and info[key]["protect"] >= event else 0
            rank = (prot, prio(key, event, s), info[key]["last"])
            if best is None or rank < best[0]:
                best = (rank, key)
        return None if best is None else best[1]

    def use(key, s, event):
        if pred:
            info[key]["aux"] = event
        if learned:
            decay = reuse[3]
            info[key]["aux"] = math.log2(1 + 2 ** (info[key]["aux"] - decay * s)) + decay * s
            info[key]["step"] = s
        if policy == "lrfu" or by_horizon:
            info[key]["aux"] = math.log2(1 + 2 ** (info[key]["aux"] - 0.05 * s)) + 0.05 * s

    def fresh(key):
        return {
            "last": 0,
            "freq": 0,
            "aux": -math.inf,
            "next": math.inf,
            "step": 0,
            "unused": False,
            "arrival": 0.0,
            "protect": -1,
        }

    for s in range(S):
        if reset[s]:
            for keys in cache.values():
                for key in keys:
                    if info[key]["unused"]:
                        out["pf_waste"][key // E] += 1
            cache = {p: [] for p in range(1 if shared else L)}
            info = {key: fresh(key) for key in range(L * E)}
            for key in sorted(pinned_keys):
                cache[part(key // E)].append(key)
        for layer in range(L):
            event = s * L + layer
            p = part(layer)
            start = now
            ready = now
            keys = [layer * E + int(e) for e in demand[s][layer] if e >= 0]
            current.clear()
            current.update(keys)
            lastset[layer] = [int(e) for e in demand[s][layer]]
            if pred:  # every key of the event ranks by its use after it, before any eviction
                for j, e in enumerate(demand[s][layer]):
                    if e >= 0:
                        nx = float(nextpred[s][layer][j])
                        info[layer * E + int(e)]["next"] = nx if nx < seg_end[s] else math.inf
                        info[layer * E + int(e)]["aux"] = event
            at_start = {key for key in keys if key in cache[p]}
            locked = set(at_start) if not bypassing else set()
            for key in keys:
                out["access"][layer] += 1
                if key in at_start:
                    out["hit"][layer] += 1
                    if info[key]["unused"]:
                        out["pf_hit"][layer] += 1
                        info[key]["unused"] = False
                    ready = max(ready, info[key]["arrival"])
                else:
                    out["miss"][layer] += 1
                    link = max(link, start) + load_t[key]
                    ready = max(ready, link)
                    keep = True
                    if len(cache[p]) >= cap[p]:
                        v = victim(p, locked, event, s)
                        if v is None:
                            keep = False
                        elif policy == "belady" and -next_use(key, event, s) <= -next_use(v, event, s):
                            keep = False
                        elif bypassing and (pred or learned) and prio(key, event, s) <= prio(v, event, s):
                            keep = False
                        elif by_horizon and bypassing and miss_prio(key, event, s) <= prio(v, event, s):
                            keep = False
                        else:
                            if info[v]["unused"]:
                                out["pf_waste"][v // E] += 1
                                info[v]["unused"] = False
                            cache[p].remove(v)
                    if keep:
                        cache[p].append(key)
                        if not bypassing:
                            locked.add(key)
                        info[key]["arrival"] = link
                    else:
                        out["stream"][layer] += 1
                counter += 1
                info[key]["last"] = counter
                info[key]["freq"] += 1
                use(key, s, event)
            now = ready + compute[s][layer]
            target = layer + dist
            if target >= L or pref.shape[2] == 0:
                continue
            tp = part(target)
            issued = set()
            for e in pref[s][target]:
                if e < 0:
                    continue
                key = target * E + int(e)
                info[key]["protect"] = max(info[key]["protect"], s * L + target)
                if pred:
                    info[key]["next"] = min(info[key]["next"], s * L + target)
                if key in cache[tp]:
                    issued.add(key)
                    continue
                if len(cache[tp]) >= cap[tp]:
                    v = victim(tp, issued, event, s)
                    if v is None:
                        continue
                    if policy == "belady" and -next_use(key, event, s) <= -next_use(v, event, s):
                        continue
                    if bypassing and (pred or learned) and prio(key, event, s) <= prio(v, event, s):
                        continue
                    if by_horizon and bypassing and miss_prio(key, event, s) <= prio(v, event, s):
                        continue
                    if info[v]["unused"]:
                        out["pf_waste"][v // E] += 1
                        info[v]["unused"] = False
                    cache[tp].remove(v)
                cache[tp].append(key)
                issued.add(key)
                out["pf_load"][target] += 1
                info[key]["unused"] = True
                link = max(link, start) + load_t[key]
                info[key]["arrival"] = link
                counter += 1
                info[key]["last"] = counter
                use(key, s, s * L + target)
    for keys in cache.values():
        for key in keys:
            if info[key]["unused"]:
                out["pf_waste"][key // E] += 1
    return out, now


# ---------------------------------------------------------------------------------------------

COST = ModelCost(expert_params=3 * 64 * 32, bytes_per_param=2.0, dense_params_per_layer=4 * 64 * 64, top_k=2)
DEP = Deployment("test", 1.0, 100.0, 1.0, [Tier("host", 0.0000002, 20.0, 3.0), Tier("ssd", None, 2.0, 50.0)])

POLICIES = {
    "lru": LRU,
    "lfu": LFU,
    "lrfu": lambda: LRFU(decay=0.05),
    "lru-protect": ProtectedLRU,
    "static": lambda: StaticPin(pin_fraction=0.5),
    "belady": Belady,
}


def _markov(path, n_tokens, seed):
    """A 3-layer, top-2 of 8 Markov trace of 40-token documents: the shape every replay test uses."""
    return write_synthetic_trace(
        path,
        n_tokens=n_tokens,
        num_layers=3,
        num_experts=8,
        top_k=2,
        law="markov",
        noise=0.4,
        doc_len=40,
        seed=seed,
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _markov(tmp_path_factory.mktemp("sim") / "t", 240, seed=3)


def _engine_counts(res):
    from moescope.simulate import kernel as K

    names = {
        "access": K.C_ACCESS,
        "hit": K.C_HIT,
        "pf_hit": K.C_PF_HIT,
        "miss": K.C_MISS,
        "stream": K.C_STREAM,
        "pf_load": K.C_PF_LOAD,
        "pf_waste": K.C_PF_WASTE,
    }
    return {n: res.counts[i].tolist() for n, i in names.items()}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pf", ["none", "table", "previous"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_engine_matches_reference(small, policy, shared, pf, mode):
    steps = prepare(small, mode=mode, batch_size=8)
    L, E = small.num_layers, small.num_experts
    cap = np.array([7]) if shared else np.array([3, 2, 4])
    pol = POLICIES[policy]().fit(small)
    pref = None
    dist = 1 if pf != "table" else 2
    if pf == "table":
        pref = step_prefetch(steps, TablePrefetcher(distance=2, budget=3).fit(small).ranked(small))
    elif pf == "previous":
        pref = step_prefetch(steps, PreviousTokenPrefetcher(distance=1, budget=2).fit(small).ranked(small))
    reset = "document" if mode == "prefill" else "none"
    pinned = np.flatnonzero(pol.pinned(L, E, cap, not shared)).tolist()
    _check_against_reference(steps, pol, cap, shared, pref, dist, reset, policy=policy, pinned=pinned)


def _random_demand(rng, S, L, E, k):
    return np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(S)]).astype(
        np.int16
    )


def _steps_of(demand, E):
    from moescope.simulate.engine import Steps

    S, L, _ = demand.shape
    pop = np.zeros((L, E))
    return Steps(demand, np.ones(S, np.int64), np.r_[True, np.zeros(S - 1, bool)], np.arange(S), E, pop)


def _brute_force_max_hits(demand, E, cap):
    """Most hits any demand policy can get (one layer), by dynamic programming over every cache content.

    After a step the cache may keep any subset (at most ``cap``) of its old residents and that step's
    experts: every eviction, insertion and bypass choice is allowed.
    """
    best = {frozenset(): 0}
    for s in range(demand.shape[0]):
        need = {int(e) for e in demand[s, 0]}
        nxt = {}
        for cache, hits in best.items():
            h = hits + len(need & cache)
            pool = sorted(cache | need)
            for r in range(min(cap, len(pool)) + 1):
                for keep in itertools.combinations(pool, r):
                    key = frozenset(keep)
                    if nxt.get(key, -1) < h:
                        nxt[key] = h
        best = nxt
    return max(best.values())


def test_belady_is_optimal_on_tiny_traces():
    rng = np.random.default_rng(0)
    for trial in range(6):
        E, k, cap, S = 6, 2, 2 + trial % 2, 12
        demand = _random_demand(rng, S, 1, E, k)
        res = run(_steps_of(demand, E), Belady().fit(), np.array([cap]), DEP, COST)
        assert int(res.counts[1].sum()) == _brute_force_max_hits(demand, E, cap)


def test_belady_never_beaten(tmp_path):
    rng = np.random.default_rng(1)
    for trial in range(8):
        E, k, L, S = 10, 3, 2, 150
        demand = _random_demand(rng, S, L, E, k)
        steps = _steps_of(demand, E)
        cap = np.array([3 + trial % 5] * L)
        best = run(steps, Belady().fit(), cap, DEP, COST).counts[1].sum()
        pin = StaticPin()
        pin.counts_ = np.bincount(
            (np.arange(L)[None, :, None] * E + demand).ravel(), minlength=L * E
        ).reshape(L, E)
        pin.fitted_ = True
        for pol in (LRU().fit(), LFU().fit(), LRFU().fit(), ProtectedLRU().fit(), pin):
            assert run(steps, pol, cap, DEP, COST).counts[1].sum() <= best


def test_lru_hits_match_stack_distance():
    """Per-layer LRU, decode: a hit iff fewer than C distinct experts were used since the last use."""
    rng = np.random.default_rng(2)
    demand = rng.integers(0, 12, (400, 1, 1)).astype(np.int16)
    for cap in (1, 3, 6):
        res = run(_steps_of(demand, 12), LRU().fit(), np.array([cap]), DEP, COST)
        seq = demand[:, 0, 0].tolist()
        expect = 0
        for i, e in enumerate(seq):
            prev = [j for j in range(i) if seq[j] == e]
            if prev and len(set(seq[prev[-1] + 1 : i])) < cap:
                expect += 1
        assert res.counts[1].sum() == expect


def test_oracle_prefetch_covers_everything(small):
    """With the true next set prefetched in time and room for it, every access after layer 0 hits."""
    cost = ModelCost(expert_params=10, bytes_per_param=1.0, top_k=2)
    fast = Deployment("fast", 1.0, 1e3, 1.0, [Tier("host", None, 1e3, 0.0)], compute_ms_per_layer=1.0)
    res = simulate(small, LRU(), np.full(3, 4), fast, cost, prefetcher=OraclePrefetcher(distance=1))
    per = res.per_layer()
    assert per["hit_rate"][1] == 1.0 and per["hit_rate"][2] == 1.0
    assert per["prefetch_precision"][1] <= 1.0
    s = res.summary()
    assert s["stall_ms_per_token"] > 0  # layer 0 still misses
    assert s["tokens_per_s_no_cache"] < s["tokens_per_s"] <= s["tokens_per_s_all_in_gpu"]


def test_timing_single_miss_by_hand():
    """One token, one layer, one expert missing: time = latency + bytes/bandwidth + compute."""
    demand = np.array([[[1]]], np.int16)
    cost = ModelCost(expert_params=1000, bytes_per_param=2.0, top_k=1)
    dep = Deployment("d", 1.0, 1e3, 1.0, [Tier("host", None, 1.0, 5.0)], compute_ms_per_layer=0.5)
    res = run(_steps_of(demand, 4), LRU().fit(), np.array([2]), dep, cost)
    assert res.total_s == pytest.approx(5e-6 + 2000 / 1e9 + 0.5e-3)
    assert res.stall_s.sum() == pytest.approx(5e-6 + 2000 / 1e9)
    # a swapping system (evicted expert copied back first, same stream) pays every transfer twice
    swap = run(_steps_of(demand, 4), LRU().fit(), np.array([2]), dep.replace(copies_per_load=2.0), cost)
    assert swap.total_s == pytest.approx(2 * (5e-6 + 2000 / 1e9) + 0.5e-3)
    with pytest.raises(ConfigError, match="copies_per_load"):
        run(_steps_of(demand, 4), LRU().fit(), np.array([2]), dep.replace(copies_per_load=0.5), cost)


def test_capacity_forms_and_errors():
    dep = get_preset("rtx4090-pcie4")
    cost = ModelCost(expert_params=3 * 2048 * 1408, top_k=6)
    assert cache_capacity(dep, cost, 26, 64, fraction=0.25).tolist() == [16] * 26
    assert cache_capacity(dep, cost, 26, 64, experts=10, shared=True).tolist() == [10]
    assert cache_capacity(dep, cost, 26, 64, gb=1.0).tolist() == [int(1e9 // cost.expert_bytes) // 26] * 26
    with pytest.raises(ConfigError, match="exactly one"):
        cache_capacity(dep, cost, 26, 64, fraction=0.5, experts=3)
    with pytest.raises(ConfigError, match="cache_fraction"):
        cache_capacity(dep, cost, 26, 64, fraction=1.5)
    with pytest.raises(ConfigError, match="preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="decay"):
        LRFU(decay=-1).fit()
    with pytest.raises(ConfigError, match="not fitted"):
        run(_steps_of(np.zeros((1, 1, 1), np.int16), 2), LRU(), np.array([1]), dep, cost)


@pytest.mark.parametrize(
    "cls",
    [
        LRU,
        LFU,
        LRFU,
        ProtectedLRU,
        StaticPin,
        Belady,
        TablePrefetcher,
        PreviousTokenPrefetcher,
        OraclePrefetcher,
    ],
)
def test_estimator_contract(small, cls):
    est = cls()
    assert clone(est).get_params() == est.get_params()
    if isinstance(est, (TablePrefetcher, PreviousTokenPrefetcher, OraclePrefetcher)):
        with pytest.raises(MoescopeError, match="not fitted"):
            est.ranked(small)
        a = est.fit(small).ranked(small)
        b = clone(est).fit(small).ranked(small)
        assert np.array_equal(a, b)
        assert not any(isinstance(v, type(small)) for v in vars(est).values())
    else:
        assert est.fit(small) is est and est.fitted_


def test_table_prefetcher_against_counts(small):
    """Column l+d of the ranked array equals the argmax of summed conditionals computed here by hand."""
    d, m = 1, 2
    pf = TablePrefetcher(distance=d, budget=m, alpha=0.0).fit(small)
    ex = small.experts().astype(int)
    E = small.num_experts
    C = np.zeros((E, E))
    for row in ex:
        for a in row[0]:
            for b in row[1]:
                C[a, b] += 1
    cond = C / np.maximum(C.sum(1, keepdims=True), 1e-12)
    ranked = pf.ranked(small)
    for t in range(0, len(ex), 17):
        score = cond[ex[t, 0]].sum(0)
        order = sorted(range(E), key=lambda b: (-score[b], b))[:m]
        assert ranked[t, 1].tolist() == order
    assert (ranked[:, 0] == -1).all()


def test_markov_trace_prefetch_helps(tmp_path):
    tr = write_synthetic_trace(
        tmp_path / "m",
        n_tokens=2000,
        num_layers=4,
        num_experts=16,
        top_k=1,
        law="markov",
        noise=0.05,
        doc_len=100,
        seed=0,
    )
    cost = ModelCost(expert_params=3 * 1024 * 512, top_k=1)
    # compute long enough to hide a transfer: prefetch must then pay off in time as well as in hits
    dep = get_preset("rtx4090-pcie4").replace(compute_ms_per_layer=0.5)
    base = simulate(tr, LRU(), np.full(4, 4), dep, cost).summary()
    pf = simulate(
        tr, LRU(), np.full(4, 4), dep, cost, prefetcher=TablePrefetcher(budget=1), fit_trace="replayed"
    ).summary()
    assert pf["hit_rate"] > base["hit_rate"] + 0.3
    assert pf["prefetch_precision"] > 0.8
    assert pf["tokens_per_s"] > base["tokens_per_s"]


def test_cli_simulate_and_sweep(small, tmp_path):
    import json as _json

    from typer.testing import CliRunner

    from moescope.cli import app

    out = tmp_path / "sim"
    r = CliRunner().invoke(
        app,
        [
            "simulate",
            str(small.path),
            "--expert-params",
            "6144",
            "--cache-fraction",
            "0.5",
            "--prefetch",
            "table",
            "--budget",
            "2",
            "--sweep",
            "--fit-on-replayed",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = _json.loads(r.stdout)
    assert doc["policy"] == "lru" and 0 <= doc["hit_rate"] <= 1 and doc["prefetcher"].startswith("table")
    for name in (
        "summary.json",
        "per_layer.csv",
        "sweep.csv",
        "sweep_hit_rate.png",
        "sweep_hit_rate.csv",
        "sweep_tokens_per_s.png",
        "sweep_tokens_per_s.csv",
    ):
        assert (out / name).is_file(), name
    import polars as pl

    sw = pl.read_csv(out / "sweep.csv")
    guided = set(sw.filter(pl.col("predictor_guided"))["policy"].str.extract(r"^([a-z-]+)").to_list())
    assert guided == {"learned-reuse", "learned-reuse-admit", "next-use", "next-use-evict"}
    assert "best predictor-guided" in doc["prediction_pays"] and "Belady" in doc["prediction_pays"]
    for (_frac, pf), part in sw.group_by(["cache_fraction", "prefetcher"]):
        if pf == "none":
            assert part.filter(pl.col("policy") == "belady")["hits"][0] == part["hits"].max()
    bad = CliRunner().invoke(
        app,
        [
            "simulate",
            str(small.path),
            "--expert-params",
            "10",
            "--cache-fraction",
            "0.5",
            "--policy",
            "fifo",
            "-o",
            str(out),
            "--overwrite",
        ],
    )
    assert bad.exit_code != 0
    assert "unknown policy 'fifo'" in str(bad.exception) + bad.output


@pytest.mark.parametrize("policy", ["lru", "static"])
@pytest.mark.parametrize("shared", [False, True])
def test_lru_loop_matches_reference_on_random_traces(policy, shared):
    """The O(1) LRU loop against the reference: random demand with gaps, prefetch, resets, tight caches.

    Capacities below the demand width force the streamed path (every resident locked) and prefetch
    issues that find no victim; resets mid-trace exercise the cold restarts.
    """
    from moescope.simulate.deployment import compute_times, load_times

    rng = np.random.default_rng(7)
    for trial in range(6):
        S, L, E, k, m = 60, 3, 9, 3, 4
        demand = _random_demand(rng, S, L, E, k)
        demand[rng.random(demand.shape) < 0.1] = -1  # unrecorded slots
        pref = np.where(rng.random((S, L, m)) < 0.8, rng.integers(0, E, (S, L, m)), -1).astype(np.int16)
        steps = _steps_of(demand, E)
        steps.popularity = (
            np.bincount((np.arange(L)[None, :, None] * E + np.maximum(demand, 0)).ravel(), minlength=L * E)
            .reshape(L, E)
            .astype(float)
        )
        steps.doc_start = rng.random(S) < 0.1
        steps.doc_start[0] = True
        cap = np.array([2 + trial]) if shared else np.array([1 + trial % 3, 2 + trial % 4, 3])
        pol = LRU().fit()
        if policy == "static":
            pol = StaticPin(pin_fraction=0.5)
            pol.counts_ = steps.popularity.astype(np.int64)
            pol.fitted_ = True
        dist = 1 + trial % 2
        res = run(steps, pol, cap, DEP, COST, shared=shared, prefetch=pref, distance=dist, reset="document")
        load_t, _ = load_times(DEP, COST, steps.popularity)
        compute = compute_times(DEP, COST, steps.tokens.astype(float), (steps.demand >= 0).sum(2))
        pinned = set(np.flatnonzero(pol.pinned(L, E, cap, not shared)).tolist())
        ref, t_end = reference(
            demand, pref, dist, E, cap, shared, "lru", pinned, load_t, compute, steps.doc_start
        )
        assert _engine_counts(res) == ref
        assert res.total_s == pytest.approx(t_end, rel=1e-12)


def test_table_prefetcher_ties_and_gaps():
    """Hand-made conditionals with exact ties and missing sources: ranking by (-score, id), by brute force."""
    from moescope.simulate.prefetch import _table_topm

    rng = np.random.default_rng(3)
    n, L, k, E, m = 50, 4, 3, 10, 4
    cond = (rng.integers(0, 4, (L - 1, E, E)) / 4).astype(np.float32)  # many equal scores
    ids = rng.integers(0, E, (n, L, k)).astype(np.int16)
    ids[rng.random((n, L, k)) < 0.2] = -1
    ids[0, 1] = -1  # a layer with no known source: nothing predicted after it
    out = np.full((n, L, m), -1, np.int16)
    _table_topm(ids, cond, 1, m, out)
    for t in range(n):
        assert (out[t, 0] == -1).all()
        for src in range(L - 1):
            srcs = [int(a) for a in ids[t, src] if a >= 0]
            if not srcs:
                assert (out[t, src + 1] == -1).all()
                continue
            score = [sum(float(cond[src, a, b]) for a in srcs) for b in range(E)]
            assert out[t, src + 1].tolist() == sorted(range(E), key=lambda b: (-score[b], b))[:m]


def _brute_rank(ids, cond, dist, m):
    """The table ranking by hand: summed conditionals of the row's experts, top m by (-score, id)."""
    n, L, _ = ids.shape
    E = cond.shape[2]
    out = np.full((n, L, m), -1, np.int16)
    for t in range(n):
        for src in range(L - dist):
            srcs = [int(a) for a in ids[t, src] if a >= 0]
            if srcs:
                score = [sum(float(cond[src, a, b]) for a in srcs) for b in range(E)]
                out[t, src + dist] = sorted(range(E), key=lambda b: (-score[b], b))[:m]
    return out


@pytest.mark.parametrize(("L", "dist", "m"), [(4, 1, 4), (5, 1, 3), (5, 2, 10), (2, 1, 1), (6, 3, 6)])
def test_sequential_and_parallel_table_ranking_agree_with_brute_force(L, dist, m):
    """Both compiled rankings (per block on the replay's side core, and parallel for whole traces)
    equal the hand ranking: odd and even numbers of source layers, m up to E, exact ties, gaps."""
    from moescope.simulate.prefetch import _table_rank, _table_topm

    rng = np.random.default_rng(L * 10 + dist)
    n, k, E = 1100, 3, 10  # more rows than one parallel block
    cond = (rng.integers(0, 4, (L - dist, E, E)) / 4).astype(np.float32)  # many equal sums
    ids = rng.integers(0, E, (n, L, k)).astype(np.int16)
    ids[rng.random((n, L, k)) < 0.2] = -1
    ids[0, :] = -1  # a row with no known source anywhere
    want = _brute_rank(ids, cond, dist, m)
    seq = np.full((n, L, m), 7, np.int16)  # garbage: every entry must be written
    _table_rank(ids, cond, dist, m, seq)
    par = np.full((n, L, m), 7, np.int16)
    _table_topm(ids, cond, dist, m, par)
    assert np.array_equal(seq, want)
    assert np.array_equal(par, want)


def test_rank_ids_equals_ranked(small):
    for pf in (
        TablePrefetcher(distance=1, budget=3),
        TablePrefetcher(distance=2),
        OraclePrefetcher(budget=1),
    ):
        pf.fit(small)
        ids = prepare(small).demand
        assert np.array_equal(pf.rank_ids(ids), pf.ranked(small))
    with pytest.raises(ConfigError, match="needs the trace"):
        PreviousTokenPrefetcher().fit(small).rank_ids(ids)
    with pytest.raises(ConfigError, match="C-contiguous int16"):
        pf.rank_ids(ids, np.empty((1, 1, 1), np.int16))


@pytest.mark.parametrize("policy", ["lru", "static", "lfu", "lru-protect", "belady"])
@pytest.mark.parametrize("shared", [False, True])
def test_streamed_prefetch_equals_array_path(small, monkeypatch, policy, shared):
    """``run(prefetcher=...)`` ranks block by block beside the replay (several blocks here, so the
    second thread runs): identical counts and times to the precomputed array and to the reference,
    on random demand with gaps and document resets and a conditional table full of ties."""
    import moescope.simulate.engine as engine
    from moescope.simulate.deployment import compute_times, load_times
    from moescope.simulate.prefetch import _table_topm

    monkeypatch.setattr(engine, "STREAM_BLOCK", 7)
    rng = np.random.default_rng(11)
    S, L, E, k = 90, small.num_layers, small.num_experts, 2
    for trial in range(3):
        dist, m = 1 + trial % 2, 2 + trial
        pf = TablePrefetcher(distance=dist, budget=m).fit(small)
        pf.cond_ = (rng.integers(0, 3, pf.cond_.shape) / 4).astype(np.float32)
        demand = _random_demand(rng, S, L, E, k)
        demand[rng.random(demand.shape) < 0.15] = -1
        steps = _steps_of(demand, E)
        steps.popularity = (
            np.bincount((np.arange(L)[None, :, None] * E + np.maximum(demand, 0)).ravel(), minlength=L * E)
            .reshape(L, E)
            .astype(float)
        )
        steps.doc_start = rng.random(S) < 0.05
        steps.doc_start[0] = True
        cap = np.array([3 + trial]) if shared else np.array([2, 1 + trial, 3])
        pol = POLICIES[policy]().fit(small)
        pref = np.empty((S, L, m), np.int16)
        _table_topm(demand, pf.cond_, dist, m, pref)  # what ranked() computes for these rows
        kw = dict(shared=shared, reset="document")
        arr = run(steps, pol, cap, DEP, COST, prefetch=pref, distance=dist, **kw)
        streamed = run(steps, pol, cap, DEP, COST, prefetcher=pf, **kw)
        assert np.array_equal(streamed.counts, arr.counts)
        assert streamed.total_s == arr.total_s and streamed.no_cache_s == arr.no_cache_s
        assert streamed.summary()["bytes_moved"] == arr.summary()["bytes_moved"]
        load_t, _ = load_times(DEP, COST, steps.popularity)
        compute = compute_times(DEP, COST, steps.tokens.astype(float), (demand >= 0).sum(2))
        pinned = set(np.flatnonzero(pol.pinned(L, E, cap, not shared)).tolist())
        ref, t_end = reference(
            demand, pref, dist, E, cap, shared, policy, pinned, load_t, compute, steps.doc_start
        )
        assert _engine_counts(streamed) == ref
        assert streamed.total_s == pytest.approx(t_end, rel=1e-12)
    with pytest.raises(ConfigError, match="either prefetch"):
        run(steps, pol, cap, DEP, COST, prefetch=pref, prefetcher=pf, shared=shared)
    with pytest.raises(ConfigError, match="cannot be ranked during a prefill"):
        run(prepare(small, mode="prefill"), pol, cap, DEP, COST, prefetcher=pf, shared=shared)


def test_simulate_streams_the_table_prefetcher(small):
    """simulate() takes the streamed path for a table prefetcher in decode: same result as the array."""
    cap = np.array([3, 2, 4])
    pf = TablePrefetcher(distance=1, budget=2).fit(small)
    steps = prepare(small)
    arr = run(
        steps,
        LRU().fit(),
        cap,
        DEP,
        COST,
        prefetch=step_prefetch(steps, pf.ranked(small)),
        distance=1,
        prefetcher_name=pf.describe(),
    )
    res = simulate(
        small, LRU(), cap, DEP, COST, prefetcher=TablePrefetcher(distance=1, budget=2), fit_trace="replayed"
    )
    assert res.summary() == arr.summary()


def test_cli_train_trace(small, tmp_path):
    """--train fits the prefetcher on another trace: the CLI equals simulate(..., fit_trace=train)."""
    import json as _json

    from typer.testing import CliRunner

    from moescope.cli import app

    train = _markov(tmp_path / "train", 300, seed=9)
    args = [
        "simulate",
        str(small.path),
        "--expert-params",
        "6144",
        "--cache-experts",
        "3",
        "--prefetch",
        "table",
        "--budget",
        "2",
        "-o",
        str(tmp_path / "sim"),
        "--json",
    ]
    help_text = CliRunner().invoke(app, ["simulate", "--help"]).output
    assert "--train" in help_text and "--fit-on-replayed" in help_text and "flatters" in help_text
    implicit = CliRunner().invoke(app, args)  # neither --train nor --fit-on-replayed: refused, naming both
    assert implicit.exit_code != 0
    assert "--train TRAIN_TRACE" in str(implicit.exception) + implicit.output
    r = CliRunner().invoke(app, [*args, "--train", str(train.path)])
    assert r.exit_code == 0, r.output
    cost = ModelCost(expert_params=6144, top_k=small.top_k)
    dep = get_preset("rtx4090-pcie4")
    want = simulate(
        small, LRU(), np.full(3, 3), dep, cost, prefetcher=TablePrefetcher(budget=2), fit_trace=train
    )
    self_fit = simulate(
        small, LRU(), np.full(3, 3), dep, cost, prefetcher=TablePrefetcher(budget=2), fit_trace="replayed"
    )
    got = _json.loads(r.stdout)
    assert got["hits"] == want.summary()["hits"] and got["bytes_moved"] == want.summary()["bytes_moved"]
    assert want.summary()["hits"] != self_fit.summary()["hits"]  # the table really came from the other trace
    other = write_synthetic_trace(
        tmp_path / "wide", n_tokens=100, num_layers=3, num_experts=16, top_k=2, seed=1
    )
    bad = CliRunner().invoke(app, [*args, "--train", str(other.path), "--overwrite"])
    assert bad.exit_code != 0
    assert "was fitted on 3 layers x 16 experts" in str(bad.exception) + bad.output


def test_belady_may_evict_what_the_first_prefetch_loaded():
    """Regression: the prefetch issued at global event 1 locks with stamp -3, which once doubled as
    Belady's "nothing locked" marker, so its expert could not be evicted by the next demand miss."""
    demand = np.full((2, 3, 1), -1, np.int16)
    demand[:, 2, 0] = 1  # layer 2 uses expert 1 at both steps
    pref = np.full((2, 3, 1), -1, np.int16)
    pref[0, 2, 0] = 0  # the first issue for layer 2 (after layer 1, event 1) loads expert 0, never used
    res = run(_steps_of(demand, 4), Belady().fit(), np.array([1]), DEP, COST, shared=True, prefetch=pref)
    ref, _ = reference(
        demand,
        pref,
        1,
        4,
        np.array([1]),
        True,
        "belady",
        set(),
        np.ones(12),
        np.zeros((2, 3)),
        np.r_[True, False],
    )
    assert _engine_counts(res) == ref
    assert res.counts[1, 2] == 1  # kept at step 0 (evicting the useless prefetch), hit at step 1


# ---------------------------------------------------------------------------------------------
# predictor-guided policies (eviction and admission by predicted next use)


class _GivenNextUse(NextUse):
    """NextUse whose predictions are given (random or exact), so that the machinery is tested alone."""

    def __init__(self, *, staleness=1.0, admission=True, predictor=None, latency_ms=0.0, table=None):
        super().__init__(staleness=staleness, admission=admission, predictor=predictor, latency_ms=latency_ms)
        self.table = table

    def _fit(self, trace):
        self.latency_s_ = 0.0

    def next_use(self, steps):
        return self.table


def _ref_policy_name(pol):
    if isinstance(pol, OracleNextUse):
        return "oracle-next-use"
    return "next-use" if pol.admission else "next-use-evict"


def _check_against_reference(
    steps, pol, cap, shared, pref, dist, reset, dep=DEP, policy=None, pinned=(), **ref_kw
):
    """Replay with the engine and with :func:`reference` (under ``policy``, default the predicted
    next-use policy of ``pol`` with its predictions), and check counts and end time agree exactly."""
    from moescope.simulate.deployment import compute_times, load_times

    L, E = steps.num_layers, steps.num_experts
    res = run(steps, pol, cap, dep, COST, shared=shared, prefetch=pref, distance=dist, reset=reset)
    load_t, _ = load_times(dep, COST, steps.popularity)
    compute = compute_times(dep, COST, steps.tokens.astype(float), (steps.demand >= 0).sum(2))
    compute = compute + pol.critical_path_s()
    rmask = steps.doc_start.copy() if reset == "document" else np.zeros(steps.num_steps, bool)
    rmask[0] = True
    p = pref if pref is not None else np.zeros((steps.num_steps, L, 0), np.int16)
    if policy is None:
        policy = _ref_policy_name(pol)
        ref_kw = {"nextpred": pol.next_use(steps), "stale": float(pol.param()), **ref_kw}
    ref, t_end = reference(
        steps.demand, p, dist, E, cap, shared, policy, set(pinned), load_t, compute, rmask, **ref_kw
    )
    assert _engine_counts(res) == ref
    assert res.total_s == pytest.approx(t_end, rel=1e-9)
    return res


@pytest.mark.parametrize("admission", [True, False])
@pytest.mark.parametrize("staleness", [0.0, 1.5])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pf", ["none", "table"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_given_next_use_matches_reference(small, admission, staleness, shared, pf, mode):
    """Random predictions with ties, document resets and prefetches: engine == reference, exactly."""
    steps = prepare(small, mode=mode, batch_size=8)
    S, L, W = steps.demand.shape
    rng = np.random.default_rng(7)
    event = np.arange(S)[:, None, None] * L + np.arange(L)[None, :, None]
    table = event + L * rng.integers(1, 12, (S, L, W)).astype(float)  # integer steps: many ties
    table[rng.random((S, L, W)) < 0.1] = np.inf
    pol = _GivenNextUse(staleness=staleness, admission=admission, table=table).fit()
    cap = np.array([7]) if shared else np.array([3, 2, 4])
    pref, dist = None, 1
    if pf == "table":
        pref, dist = step_prefetch(steps, TablePrefetcher(distance=2, budget=3).fit(small).ranked(small)), 2
    reset = "document" if mode == "prefill" else "none"
    _check_against_reference(steps, pol, cap, shared, pref, dist, reset)


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    return _markov(tmp_path_factory.mktemp("simtrain") / "t", 600, seed=11)


@pytest.mark.parametrize("cls", [NextUse, NextUseEvict])
@pytest.mark.parametrize("shared", [False, True])
def test_fitted_next_use_matches_reference(small, small_train, cls, shared):
    """The real temporal predictor, fitted on other documents, through engine and reference alike."""
    steps = prepare(small)
    pol = cls(predictor=NextUsePredictor(max_iter=15, max_leaf_nodes=8), latency_ms=0.01).fit(small_train)
    assert pol.critical_path_s() == pytest.approx(1e-5)
    cap = np.array([7]) if shared else np.array([3, 2, 4])
    pref = step_prefetch(steps, TablePrefetcher(distance=1, budget=2).fit(small_train).ranked(small))
    _check_against_reference(steps, pol, cap, shared, pref, 1, "none")


def _next_use_oracle_equals_belady(demand, E, cap, shared=False):
    steps = _steps_of(demand, E)
    a = run(steps, Belady().fit(), cap, DEP, COST, shared=shared)
    b = run(steps, OracleNextUse().fit(), cap, DEP, COST, shared=shared)
    assert np.array_equal(a.counts, b.counts)
    assert a.total_s == b.total_s and np.array_equal(a.stall_s, b.stall_s)
    return a


def test_perfect_next_use_oracle_equals_belady():
    """A policy fed the true next uses makes Belady's choices: identical hits, bytes and times."""
    rng = np.random.default_rng(5)
    for trial in range(10):
        E, k, L, S = 10, 3, 3, 120
        demand = _random_demand(rng, S, L, E, k)
        if trial % 3 == 0:  # some -1 gaps
            demand[rng.random(demand.shape) < 0.1] = -1
        cap = np.array([2 + trial % 5] * L) if trial % 2 else np.array([4 + trial])
        _next_use_oracle_equals_belady(demand, E, cap, shared=not trial % 2)


def test_belady_never_beaten_by_predicted_policies(small_train):
    rng = np.random.default_rng(9)
    pred = NextUsePredictor(max_iter=10, max_leaf_nodes=8).fit(small_train)
    for trial in range(5):
        E, k, L, S = 8, 2, 3, 150
        demand = _random_demand(rng, S, L, E, k)
        steps = _steps_of(demand, E)
        cap = np.array([2 + trial % 4] * L)
        best = run(steps, Belady().fit(), cap, DEP, COST).counts[1].sum()
        for pol in (NextUse(predictor=pred, latency_ms=0.0), NextUseEvict(predictor=pred, latency_ms=0.0)):
            assert run(steps, pol.fit(), cap, DEP, COST).counts[1].sum() <= best


def test_temporal_predictor_trees_and_causality(small_train, small):
    """The compiled trees equal scikit-learn's predictions; a use's features ignore every later step."""
    from moescope.predict.temporal import FEATURES, next_use_distance

    p = NextUsePredictor(max_iter=12, max_leaf_nodes=8).fit(small_train)
    steps = prepare(small)
    X = p._features(steps.demand, steps.doc_start)
    assert X.shape == (int((steps.demand >= 0).sum()), len(FEATURES))
    np.testing.assert_allclose(p._predict_log2(X), p.model_.predict(X), rtol=1e-6, atol=1e-6)
    cut = 100
    changed = steps.demand.copy()
    changed[cut + 1 :] = np.random.default_rng(0).permutation(changed[cut + 1 :])
    a = p.predict_distance(steps.demand, steps.doc_start, steps.num_experts)
    b = p.predict_distance(changed, steps.doc_start, steps.num_experts)
    assert np.array_equal(a[: cut + 1], b[: cut + 1])
    # distances by hand on one key
    d = next_use_distance(steps.demand, steps.num_experts)
    e0 = int(steps.demand[0, 0, 0])
    uses = [s for s in range(steps.num_steps) if e0 in steps.demand[s, 0].tolist()]
    j = steps.demand[0, 0].tolist().index(e0)
    assert d[0, 0, j] == (uses[1] - uses[0] if len(uses) > 1 else steps.num_steps)
    with pytest.raises(ConfigError, match="max_iter"):
        NextUsePredictor(max_iter=0).fit(small_train)
    with pytest.raises(ConfigError, match="fitted on"):
        p.predict_distance(np.zeros((2, 5, 2), np.int16), np.ones(2, bool), 8)


# half the experts in a fast host tier, the rest behind it on a slow one (unequal load times)
DEP_TIERED = Deployment(
    "tiered", 1.0, 100.0, 1.0, [Tier("host", 12 * 12288 / 1e9, 20.0, 3.0), Tier("ssd", None, 2.0, 50.0)]
)


@pytest.mark.parametrize("cls", [LearnedReuse, LearnedReuseAdmit])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pf", ["none", "table"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("tiered", [False, True])
def test_learned_reuse_matches_reference(small, small_train, cls, shared, pf, mode, tiered):
    """The learned reuse policy (fitted on other documents) through engine and reference alike; on a
    tiered deployment its prior carries ``log(load time / fastest)`` (cost-aware ranking)."""
    from moescope.simulate.deployment import compute_times, load_times

    dep = DEP_TIERED if tiered else DEP

    steps = prepare(small, mode=mode, batch_size=8)
    L, E = steps.num_layers, steps.num_experts
    pol = cls(predictor=ReusePredictor(horizon=2, max_rows=20_000), latency_ms=0.02).fit(small_train)
    assert pol.critical_path_s() == pytest.approx(2e-5)
    cap = np.array([7]) if shared else np.array([3, 2, 4])
    pref, dist = None, 1
    if pf == "table":
        pref, dist = (
            step_prefetch(steps, TablePrefetcher(distance=2, budget=3).fit(small_train).ranked(small)),
            2,
        )
    reset = "document" if mode == "prefill" else "none"
    res = run(steps, pol, cap, dep, COST, shared=shared, prefetch=pref, distance=dist, reset=reset)
    load_t, _ = load_times(dep, COST, steps.popularity)
    compute = compute_times(dep, COST, steps.tokens.astype(float), (steps.demand >= 0).sum(2)) + 2e-5
    rmask = steps.doc_start.copy() if reset == "document" else np.zeros(steps.num_steps, bool)
    rmask[0] = True
    p = pref if pref is not None else np.zeros((steps.num_steps, L, 0), np.int16)
    coef, trans, prior = pol.reuse_model(L, E, load_t)
    plain = pol.predictor_
    if tiered:
        assert np.ptp(load_t) > 0 and coef[2] == 1.0
        np.testing.assert_allclose(
            prior, plain.coef_[2] * plain.log_popularity_ + np.log(load_t / load_t.min()), rtol=1e-12
        )
    else:
        assert np.ptp(load_t) == 0 and np.array_equal(prior, plain.log_popularity_)
    ref, t_end = reference(
        steps.demand,
        p,
        dist,
        E,
        cap,
        shared,
        cls.name,
        set(),
        load_t,
        compute,
        rmask,
        reuse=(coef, trans, prior, pol.predictor_.decay),
    )
    assert _engine_counts(res) == ref
    assert res.total_s == pytest.approx(t_end, rel=1e-9)


def test_belady_never_beaten_by_learned_reuse(small_train):
    rng = np.random.default_rng(4)
    pred = ReusePredictor(max_rows=20_000).fit(small_train)
    for trial in range(5):
        E, k, L, S = 8, 2, 3, 150
        demand = _random_demand(rng, S, L, E, k)
        steps = _steps_of(demand, E)
        cap = np.array([2 + trial % 4] * L)
        best = run(steps, Belady().fit(), cap, DEP, COST).counts[1].sum()
        for cls in (LearnedReuse, LearnedReuseAdmit):
            pol = cls(predictor=pred, latency_ms=0.0).fit()
            assert run(steps, pol, cap, DEP, COST).counts[1].sum() <= best


@pytest.mark.parametrize("horizon", [0, 2])
@pytest.mark.parametrize("admission", [True, False])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pf", ["none", "table"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_horizon_oracle_matches_reference(small, horizon, admission, shared, pf, mode):
    """The horizon-H oracle (exact next uses within H steps, LRFU beyond): engine == reference."""
    from moescope.simulate import HorizonOracle
    from moescope.simulate.deployment import compute_times, load_times

    steps = prepare(small, mode=mode, batch_size=8)
    L, E = steps.num_layers, steps.num_experts
    pol = HorizonOracle(horizon=horizon, admission=admission).fit()
    cap = np.array([7]) if shared else np.array([3, 2, 4])
    pref, dist = None, 1
    if pf == "table":
        pref, dist = step_prefetch(steps, TablePrefetcher(distance=2, budget=3).fit(small).ranked(small)), 2
    reset = "document" if mode == "prefill" else "none"
    res = run(steps, pol, cap, DEP, COST, shared=shared, prefetch=pref, distance=dist, reset=reset)
    load_t, _ = load_times(DEP, COST, steps.popularity)
    compute = compute_times(DEP, COST, steps.tokens.astype(float), (steps.demand >= 0).sum(2))
    rmask = steps.doc_start.copy() if reset == "document" else np.zeros(steps.num_steps, bool)
    rmask[0] = True
    p = pref if pref is not None else np.zeros((steps.num_steps, L, 0), np.int16)
    ref, t_end = reference(
        steps.demand,
        p,
        dist,
        E,
        cap,
        shared,
        "horizon-oracle",
        set(),
        load_t,
        compute,
        rmask,
        horizon=(horizon, admission),
    )
    assert _engine_counts(res) == ref
    assert res.total_s == pytest.approx(t_end, rel=1e-9)


def test_horizon_oracle_bounded_by_belady_and_reaches_it():
    """Never more hits than Belady; knowing the whole future (horizon >= steps) gives Belady's hits."""
    from moescope.simulate import HorizonOracle

    rng = np.random.default_rng(12)
    for trial in range(6):
        E, k, L, S = 10, 3, 3, 120
        demand = _random_demand(rng, S, L, E, k)
        steps = _steps_of(demand, E)
        cap = np.array([2 + trial % 5] * L) if trial % 2 else np.array([4 + trial])
        shared = not trial % 2
        best = run(steps, Belady().fit(), cap, DEP, COST, shared=shared).counts[1].sum()
        for h in (0, 1, 4):
            got = run(steps, HorizonOracle(horizon=h).fit(), cap, DEP, COST, shared=shared).counts[1].sum()
            assert got <= best
        full = run(steps, HorizonOracle(horizon=S).fit(), cap, DEP, COST, shared=shared)
        assert full.counts[1].sum() == best


def test_reuse_predictor_batch_unions_equal_prepare(small_train):
    """The reuse model's batch-b steps are the sets of ``prepare(mode="prefill", batch_size=b)``."""
    from moescope.predict.temporal import _demand_of, batch_unions

    demand, doc_start = _demand_of(small_train)
    for b in (1, 3, 8):
        got, starts = batch_unions(demand, doc_start, small_train.num_experts, b)
        steps = prepare(small_train, mode="prefill", batch_size=b)
        assert np.array_equal(starts, steps.doc_start)
        assert got.shape[0] == steps.num_steps
        for g in range(got.shape[0]):
            for layer in range(got.shape[1]):
                assert set(got[g, layer][got[g, layer] >= 0].tolist()) == set(
                    steps.demand[g, layer][steps.demand[g, layer] >= 0].tolist()
                )
    pol = LearnedReuse(batch_size=2, predictor=ReusePredictor(max_rows=20_000)).fit(small_train)
    assert pol.predictor_.batch_size == 2 and pol.predictor.batch_size is None
    one = LearnedReuse(predictor=ReusePredictor(max_rows=20_000)).fit(small_train)
    assert not np.allclose(pol.predictor_.coef_, one.predictor_.coef_)


def test_allocate_slots_against_brute_force():
    """Greedy marginal allocation on convex miss curves equals the best allocation found by brute force."""
    from moescope.simulate.sweep import allocate_slots

    rng = np.random.default_rng(3)
    caps = list(range(1, 7))
    for _ in range(5):
        L = 3
        drops = -np.sort(-rng.integers(0, 50, (len(caps) - 1, L)), axis=0)  # decreasing gains: convex
        curves = np.vstack([np.full(L, 400), 400 - np.cumsum(drops, axis=0)])
        for total in (3, 7, 12, 18):
            got = allocate_slots(curves, caps, total)
            assert got.sum() == total
            best = min(
                sum(curves[c - 1, layer] for layer, c in enumerate(combo))
                for combo in itertools.product(caps, repeat=L)
                if sum(combo) == total
            )
            assert sum(curves[c - 1, layer] for layer, c in enumerate(got)) == best
    with pytest.raises(ValueError, match="outside"):
        allocate_slots(curves, caps, 100)


def test_layer_miss_curves_match_separate_replays(small):
    """One replay at c slots per layer gives each layer's misses at c (per-layer caches are independent)."""
    from moescope.simulate import kernel as K
    from moescope.simulate.sweep import layer_miss_curves

    steps = prepare(small)
    curves = layer_miss_curves(steps, LRFU().fit(), DEP, COST, [1, 2, 3])
    for i, c in enumerate([1, 2, 3]):
        for layer in range(steps.num_layers):
            cap = np.full(steps.num_layers, 8)
            cap[layer] = c
            res = run(steps, LRFU().fit(), cap, DEP, COST)
            assert res.counts[K.C_MISS, layer] == curves[i, layer]


def test_fit_on_replay_steps_matches_the_batch():
    """A learned reuse policy named for a prefill replay learns on that replay's unions; others are untouched."""
    from moescope.simulate.policies import fit_on_replay_steps, make_policy

    assert fit_on_replay_steps(make_policy("learned-reuse"), "prefill", 8).batch_size == 8
    assert fit_on_replay_steps(make_policy("learned-reuse-admit"), "decode", None).batch_size is None
    assert fit_on_replay_steps(make_policy("learned-reuse"), "prefill", None).batch_size is None
    assert fit_on_replay_steps(make_policy("learned-reuse", batch_size=4), "prefill", 8).batch_size == 4
    assert fit_on_replay_steps(make_policy("lrfu"), "prefill", 8).get_params() == {"decay": 0.05}
