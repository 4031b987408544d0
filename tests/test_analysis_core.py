"""Core analyses against brute-force per-token loops and analytic cases."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from math import comb

import numpy as np
import polars as pl
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as sp_entropy
from sklearn.metrics import mutual_info_score
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from analysis_helpers import build_trace
from moescope.analysis import (
    aux_loss,
    coactivation,
    domain_specialisation,
    layer_transitions,
    load_balance,
    load_summary,
    repetition,
    routing_entropy,
    vocabulary_specialisation,
)
from moescope.errors import ConfigError, DataError
from moescope.trace.synthetic import write_synthetic_trace


@pytest.fixture
def hand(tmp_path):
    return build_trace(tmp_path / "t")


def _valid(a, t, li):
    return all(x != a["sentinel"] for x in a["experts"][t, li])


def test_load_matches_loop(hand):
    tr, a = hand
    df = load_balance(tr, batch_size=7).sort("layer", "expert")
    E, k, L = a["E"], a["k"], a["L"]
    counts = np.zeros((L, E))
    first = np.zeros((L, E))
    wsum = np.zeros((L, E))
    tokens = np.zeros(L)
    for t in range(len(a["doc"])):
        for li in range(L):
            if not _valid(a, t, li):
                continue
            tokens[li] += 1
            first[li, a["experts"][t, li, 0]] += 1
            for s in range(k):
                counts[li, a["experts"][t, li, s]] += 1
                wsum[li, a["experts"][t, li, s]] += a["weights"][t, li, s]
    assert df["layer"].unique().sort().to_list() == a["layers"]
    np.testing.assert_array_equal(df["assignments"].to_numpy().reshape(L, E), counts)
    np.testing.assert_array_equal(df["first_choice_count"].to_numpy().reshape(L, E), first)
    np.testing.assert_allclose(
        df["assignment_share"].to_numpy().reshape(L, E), counts / (k * tokens[:, None])
    )
    mw = df["mean_router_weight"].to_numpy().reshape(L, E)
    np.testing.assert_allclose(mw, np.where(counts > 0, wsum / np.maximum(counts, 1), np.nan), rtol=1e-5)
    s = load_summary(df, k).sort("layer")
    for li in range(L):
        c = counts[li]
        mean = sum(c) / E
        std = (sum((x - mean) ** 2 for x in c) / E) ** 0.5
        gini = sum(abs(x - y) for x in c for y in c) / (2 * E * E * mean)
        assert s["cv"][li] == pytest.approx(std / mean)
        assert s["max_violation"][li] == pytest.approx(max(c) / mean - 1)
        assert s["gini"][li] == pytest.approx(gini)
        assert s["load_entropy_bits"][li] == pytest.approx(sp_entropy(c / c.sum(), base=2))


def test_aux_loss_matches_transformers(tmp_path):
    tr, a = build_trace(tmp_path / "t", missing_frac=0.0, E=8, k=2, L=4)
    ours = aux_loss(load_balance(tr))
    # transformers wants one (tokens, E) tensor per layer; its top-k of the softmax equals our experts
    gate = tuple(torch.tensor(a["logits"][:, li, :]) for li in range(a["L"]))
    ref = float(load_balancing_loss_func(gate, num_experts=8, top_k=2))
    assert ours == pytest.approx(ref, rel=1e-5)


def test_balance_analytic_cases(tmp_path):
    uni = write_synthetic_trace(
        tmp_path / "u", n_tokens=40000, num_layers=3, logits=True, law="uniform", seed=3
    )
    s = load_summary(load_balance(uni), 2)
    assert s["cv"].max() < 0.03  # multinomial noise: sqrt((E-1)/(kT)) ~ 0.01
    assert aux_loss(load_balance(uni)) == pytest.approx(2.0, abs=0.01)
    det = write_synthetic_trace(
        tmp_path / "d", n_tokens=2000, num_layers=2, logits=True, law="token", seed=3, vocab_size=1
    )  # one token id: every token takes the same two experts
    s = load_summary(load_balance(det), 2)
    E = 8
    # two experts share everything: counts (T, T, 0, ...): CV = sqrt(E/2 - 1), MaxVio = E/2 - 1
    assert s["cv"][0] == pytest.approx(np.sqrt(E / 2 - 1))
    assert s["max_violation"][0] == pytest.approx(E / 2 - 1)
    assert s["dead_experts"][0] == E - 2


def test_entropy_matches_loop(hand):
    tr, a = hand
    res = routing_entropy(tr, bins=10, batch_size=5)
    by = res["by_layer"].sort("layer")
    for li in range(a["L"]):
        hs = []
        for t in range(len(a["doc"])):
            if _valid(a, t, li):
                z = a["logits"][t, li].astype(np.float64)
                p = np.exp(z - z.max())
                hs.append(sp_entropy(p / p.sum(), base=2))
        assert by["tokens"][li] == len(hs)
        assert by["mean_entropy_bits"][li] == pytest.approx(np.mean(hs), rel=1e-5)
        assert by["std_entropy_bits"][li] == pytest.approx(np.std(hs), rel=1e-4)
        assert by["max_entropy_bits"][li] == pytest.approx(max(hs), rel=1e-5)
        hist = res["histogram"].filter(pl.col("layer") == a["layers"][li])
        ref, _ = np.histogram(hs, bins=10, range=(0, np.log2(a["E"])))
        np.testing.assert_array_equal(hist["count"].to_numpy(), ref)


def test_entropy_sigmoid_router(tmp_path):
    tr, a = build_trace(tmp_path / "t", router_kind="sigmoid", missing_frac=0.0)
    by = routing_entropy(tr)["by_layer"].sort("layer")
    s = 1 / (1 + np.exp(-a["logits"][:, 0].astype(np.float64)))
    ref = np.mean([sp_entropy(r / r.sum(), base=2) for r in s])
    assert by["mean_entropy_bits"][0] == pytest.approx(ref, rel=1e-5)
    assert by["normaliser"][0] == "sigmoid/sum"


def test_entropy_needs_logits(tmp_path):
    tr, _ = build_trace(tmp_path / "t", logits=False)
    with pytest.raises(DataError, match="'logits'"):
        routing_entropy(tr)


def test_transitions_match_loop(hand):
    tr, a = hand
    res = layer_transitions(tr, distances=[1, 2], batch_size=9)
    cells = res["cells"]
    E, k, L = a["E"], a["k"], a["L"]
    for d in (1, 2):
        for li in range(L - d):
            cnt: Counter = Counter()
            xs, ys = [], []
            for t in range(len(a["doc"])):
                if _valid(a, t, li) and _valid(a, t, li + d):
                    i = tuple(sorted(a["experts"][t, li]))
                    j = tuple(sorted(a["experts"][t, li + d]))
                    cnt[(i, j)] += 1
                    xs.append(str(i))
                    ys.append(str(j))
            g = cells.filter(
                (pl.col("layer_from") == a["layers"][li]) & (pl.col("layer_to") == a["layers"][li + d])
            )
            got = {(r["symbol_from"], r["symbol_to"]): r["count"] for r in g.iter_rows(named=True)}
            want = {("-".join(map(str, i)), "-".join(map(str, j))): c for (i, j), c in cnt.items()}
            assert got == want
            n = sum(cnt.values())
            row_tot = Counter()
            for (i, _), c in cnt.items():
                row_tot[i] += c
            r0 = g.row(0, named=True)
            i0 = tuple(int(x) for x in r0["symbol_from"].split("-"))
            assert r0["p_row"] == pytest.approx(r0["count"] / row_tot[i0])
            assert r0["p_joint"] == pytest.approx(r0["count"] / n)
            s = res["summary"].filter((pl.col("layer_from") == a["layers"][li]) & (pl.col("distance") == d))
            assert s["mi_bits"][0] == pytest.approx(mutual_info_score(xs, ys) / np.log(2), abs=1e-9)
    assert comb(E, k) == 15 and res["summary"]["alphabet"][0] == "subset"


def test_transitions_expert_alphabet_loop(hand):
    tr, a = hand
    res = layer_transitions(tr, alphabet="expert")
    g = res["cells"].filter(pl.col("layer_from") == a["layers"][0])
    cnt: Counter = Counter()
    for t in range(len(a["doc"])):
        if _valid(a, t, 0) and _valid(a, t, 1):
            for i, j in itertools.product(a["experts"][t, 0], a["experts"][t, 1]):
                cnt[(int(i), int(j))] += 1
    assert {(r["i"], r["j"]): r["count"] for r in g.iter_rows(named=True)} == dict(cnt)


def test_mutual_information_null_and_maximum(tmp_path):
    uni = write_synthetic_trace(tmp_path / "u", n_tokens=30000, num_layers=3, law="uniform", seed=5)
    s = layer_transitions(uni)["summary"]
    # plug-in MI of independent choices sits at its stated bias, (28-1)^2 / (2 N ln 2) ~ 0.018 bits
    assert (s["mi_bits"] - s["mi_bias_bits"]).abs().max() < 0.006
    assert s["mi_bias_bits"][0] == pytest.approx(27 * 27 / (2 * 30000 * np.log(2)), rel=0.01)
    det = write_synthetic_trace(
        tmp_path / "d", n_tokens=5000, num_layers=3, law="token", seed=5, vocab_size=50
    )
    s = layer_transitions(det)["summary"]
    assert s["nmi"].min() == pytest.approx(1.0)  # the set at L determines the set at L+1


def test_coactivation_loop(hand):
    tr, a = hand
    co = coactivation(tr)
    li = 1
    pair: Counter = Counter()
    single: Counter = Counter()
    for t in range(len(a["doc"])):
        if _valid(a, t, li):
            ex = [int(x) for x in a["experts"][t, li]]
            for x in ex:
                single[x] += 1
            for x, y in itertools.permutations(ex, 2):
                pair[(x, y)] += 1
    g = co.filter(pl.col("layer") == a["layers"][li])
    for r in g.iter_rows(named=True):
        assert r["count_ab"] == pair[(r["a"], r["b"])]
        if single[r["a"]]:
            assert r["p_b_given_a"] == pytest.approx(pair[(r["a"], r["b"])] / single[r["a"]])


def _rep_loop(a, li):
    same = anys = n = 0
    for t in range(1, len(a["doc"])):
        if a["doc"][t] != a["doc"][t - 1] or a["pos"][t] != a["pos"][t - 1] + 1:
            continue
        if not (_valid(a, t, li) and _valid(a, t - 1, li)):
            continue
        n += 1
        same += a["experts"][t, li, 0] == a["experts"][t - 1, li, 0]
        anys += bool(set(a["experts"][t, li]) & set(a["experts"][t - 1, li]))
    return n, same / n, anys / n


@pytest.mark.parametrize("batch_size", [1, 4, 23, 65536])
def test_repetition_matches_loop_any_batch_size(hand, batch_size):
    tr, a = hand
    rep = repetition(tr, batch_size=batch_size).filter(pl.col("domain") == "all").sort("layer")
    for li in range(a["L"]):
        n, same, anys = _rep_loop(a, li)
        assert rep["pairs"][li] == n
        assert rep["first_choice_same"][li] == pytest.approx(same)
        assert rep["any_shared"][li] == pytest.approx(anys)
    assert set(repetition(tr)["domain"]) == {"all", "x", "y"}


def test_repetition_nulls_and_maximum(tmp_path):
    uni = write_synthetic_trace(tmp_path / "u", n_tokens=40000, num_layers=2, law="uniform", seed=7)
    g = repetition(uni).filter(pl.col("domain") == "all")
    assert g["any_shared_null"][0] == pytest.approx(1 - 15 / 28)  # 0.464 for E8k2
    assert (g["first_choice_same"] - 1 / 8).abs().max() < 0.01
    assert (g["any_shared"] - g["any_shared_null"]).abs().max() < 0.015
    det = write_synthetic_trace(
        tmp_path / "d", n_tokens=1000, num_layers=2, law="token", seed=7, vocab_size=1
    )
    g = repetition(det).filter(pl.col("domain") == "all")
    assert g["first_choice_same"].min() == 1.0 and g["any_shared"].min() == 1.0


def test_set_slots_flag_first_choice(tmp_path):
    tr, _ = build_trace(tmp_path / "t", slot_order="set")
    assert tr.slot_order == "set" and not tr.ranked
    assert repetition(tr)["first_choice_same"].null_count() == repetition(tr).height
    assert load_balance(tr)["first_choice_share"].null_count() == load_balance(tr).height


def test_vocabulary_specialisation_loop(hand):
    tr, a = hand
    res = vocabulary_specialisation(tr, min_count=3)
    li = 2
    occ: Counter = Counter()
    per: dict = defaultdict(Counter)
    for t in range(len(a["doc"])):
        if _valid(a, t, li):
            occ[int(a["tok"][t])] += 1
            for e in a["experts"][t, li]:
                per[int(a["tok"][t])][int(e)] += 1
    g = res["per_token"].filter(pl.col("layer") == a["layers"][li])
    want = {x: max(per[x].values()) / occ[x] for x in occ if occ[x] >= 3}
    assert {r["token_id"]: r["top_expert_fraction"] for r in g.iter_rows(named=True)} == pytest.approx(want)
    top = res["top_tokens"].filter((pl.col("layer") == a["layers"][li]) & (pl.col("rank") == 1))
    for r in top.iter_rows(named=True):
        best = max(per[x][r["expert"]] / occ[x] for x in occ if occ[x] >= 3)
        assert r["token_fraction"] == pytest.approx(best)


def test_vocabulary_specialisation_deterministic_router(tmp_path):
    det = write_synthetic_trace(
        tmp_path / "d", n_tokens=6000, num_layers=2, law="token", seed=1, vocab_size=100
    )
    s = vocabulary_specialisation(det)["summary"]
    assert s["specialisation_weighted"].min() == pytest.approx(1.0)


def test_domain_specialisation_jsd_and_permutation(hand, tmp_path):
    tr, a = hand
    res = domain_specialisation(tr, n_perm=50)
    li = 0
    cx = np.zeros(a["E"])
    cy = np.zeros(a["E"])
    for t in range(len(a["doc"])):
        if _valid(a, t, li):
            for e in a["experts"][t, li]:
                (cx if a["label"][t] == "x" else cy)[e] += 1
    j = res["jsd"].filter(pl.col("layer") == a["layers"][li])["jsd_bits"][0]
    assert j == pytest.approx(jensenshannon(cx / cx.sum(), cy / cy.sum(), base=2) ** 2)
    # routing independent of the domain: the test must not reject
    uni = write_synthetic_trace(
        tmp_path / "u", n_tokens=20000, num_layers=2, law="uniform", seed=11, doc_len=100
    )
    assert domain_specialisation(uni, n_perm=100)["test"]["p_value"][0] > 0.01


def test_domain_permutation_detects_dependence(tmp_path):
    from moescope.trace import RoutingSpec, TraceWriter
    from moescope.trace.schema import default_columns

    rng = np.random.default_rng(0)
    spec = RoutingSpec(num_experts=4, top_k=1, moe_layers=[0])
    with TraceWriter.create(tmp_path / "dom", spec, columns=default_columns(weights=False)) as w:
        for d in range(40):
            lab = "code" if d % 2 else "prose"
            p = [0.4, 0.3, 0.2, 0.1] if lab == "code" else [0.1, 0.2, 0.3, 0.4]
            ex = rng.choice(4, size=(50, 1, 1), p=p)
            w.append(
                doc_id=np.full(50, d), position=np.arange(50), token_id=np.zeros(50), label=lab, experts=ex
            )
            w.commit(d)
    from moescope.trace import Trace

    t = domain_specialisation(Trace.open(tmp_path / "dom"), n_perm=99)["test"]
    assert t["p_value"][0] == pytest.approx(1 / 100)


def test_bad_layer_is_a_config_error(hand):
    tr, _ = hand
    with pytest.raises(ConfigError, match="layers: \\[0\\] not MoE layer"):
        load_balance(tr, layers=[0])
    df = load_balance(tr, layers=[3])
    assert df["layer"].unique().to_list() == [3]
