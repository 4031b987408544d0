"""Routing generated from known laws: the right predictor reaches 100%, the others their analytic value."""

from __future__ import annotations

from math import comb
from pathlib import Path

import numpy as np
import pytest

from moescope.predict import (
    LearnedPredictor,
    evaluate,
    evaluate_many,
    iter_contexts,
    make_predictor,
    split_documents,
)
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns

E, K, L = 8, 2, 4


def _split(tr: Trace, seed: int = 0) -> tuple[Trace, Trace]:
    train, test = split_documents(tr, 0.25, seed=seed)
    return tr.filter(documents=train), tr.filter(documents=test)


@pytest.fixture(scope="module")
def uniform(synthetic) -> tuple[Trace, Trace]:
    tr = synthetic(
        n_tokens=24 * 256, num_layers=L, num_experts=E, top_k=K, law="uniform", noise=0.0, doc_len=256, seed=3
    )
    return _split(tr)


@pytest.fixture(scope="module")
def markov(synthetic) -> tuple[Trace, Trace]:
    tr = synthetic(n_tokens=16 * 128, num_layers=L, num_experts=E, top_k=K, noise=0.0, doc_len=128)
    return _split(tr)


@pytest.fixture(scope="module")
def token_law(synthetic) -> tuple[Trace, Trace]:
    tr = synthetic(
        n_tokens=24 * 128,
        num_layers=L,
        num_experts=E,
        top_k=K,
        law="token",
        noise=0.0,
        doc_len=128,
        vocab_size=40,
        seed=5,
    )
    return _split(tr)


def test_uniform_routing_gives_the_analytic_random_values(uniform: tuple[Trace, Trace]) -> None:
    train, test = uniform
    preds = {
        n: make_predictor(n, distances=(1, 0)) if n in ("cooccurrence", "rules-hybrid") else make_predictor(n)
        for n in ("uniform", "popularity", "previous", "window", "cooccurrence", "rules-hybrid")
    }
    for p in preds.values():
        p.fit(train)
    res = evaluate_many(preds, test, modes=[1, 0], budgets=[2, 4], n_boot=200)
    for name, r in res.items():
        for mode in (1, 0):
            sr = r.summary["modes"]["d1" if mode else "temporal"]["overall"]
            # every predictor is at chance: slot recall and top-1 k/E, exact 1/C(E,k), recall@4 4/E
            assert abs(sr["slot_recall"]["value"] - K / E) < 0.02, (name, mode, sr["slot_recall"])
            assert abs(sr["top1"]["value"] - K / E) < 0.03, (name, mode)
            assert abs(sr["exact"]["value"] - 1 / comb(E, K)) < 0.015, (name, mode)
            assert abs(sr["recall@4"]["value"] - 4 / E) < 0.03, (name, mode)
            assert abs(sr["precision@4"]["value"] - K / E) < 0.02, (name, mode)
            lo, hi = sr["slot_recall"]["ci"]
            assert lo <= sr["slot_recall"]["value"] <= hi
            assert sr["slot_recall"]["random"] == K / E


def test_markov_law_rules_and_cooccurrence_reach_100_percent(markov: tuple[Trace, Trace]) -> None:
    """Layer l+1's first choice is a fixed permutation of layer l's: top-1 is certain from layer 1 on."""
    train, test = markov
    preds = {
        "rules-level1": make_predictor("rules-level1", distances=(1, 2)),
        "rules-hybrid": make_predictor("rules-hybrid", distances=(1, 2)),
        "cooccurrence": make_predictor("cooccurrence", distances=(1, 2)),
        "popularity": make_predictor("popularity"),
        "previous": make_predictor("previous"),
    }
    for p in preds.values():
        p.fit(train)
    res = evaluate_many(preds, test, modes=[1, 2], n_boot=50)
    for name in ("rules-level1", "rules-hybrid", "cooccurrence"):
        for d in (1, 2):
            for layer in range(d, L):
                assert res[name].value("top1", d, layer) == 1.0, (name, d, layer)
                # the second choice is random: slot recall is (1 + P(second guessed)) / 2 > 1/2
                assert res[name].value("slot_recall", d, layer) >= 0.5
    # the level-1 rule has nothing to key on at the first layer: it abstains there, as the seed skips
    assert res["rules-level1"].value("coverage", 1, 0) == 0.0
    assert res["rules-hybrid"].value("coverage", 1, 0) == 1.0
    # history-blind baselines stay at chance (first choice uniform over E)
    for name in ("popularity", "previous"):
        assert abs(res[name].value("top1", 1) - K / E) < 0.05, name


def test_token_law_learned_model_reaches_100_percent(token_law: tuple[Trace, Trace]) -> None:
    """Expert sets are a function of (token id, layer): the token-aware model gets every set right,
    even at the first layer and two layers ahead; history-free baselines stay at chance."""
    train, test = token_law
    learned = make_predictor(
        "learned",
        distances=(1, 2),
        hidden=32,
        epochs=6,
        batch_size=128,
        lr=1e-2,
        token_buckets=64,
        random_state=0,
    ).fit(train)
    pop = make_predictor("popularity").fit(train)
    res = evaluate_many({"learned": learned, "popularity": pop}, test, modes=[1, 2], n_boot=50)
    for d in (1, 2):
        for layer in range(L):
            assert res["learned"].value("exact", d, layer) == 1.0, (d, layer)
    assert abs(res["popularity"].value("slot_recall", 1) - K / E) < 0.03


def test_token_law_token_table_is_exact_at_every_layer(token_law: tuple[Trace, Trace]) -> None:
    train, test = token_law
    r = evaluate(make_predictor("token").fit(train), test, modes=[1, 2], n_boot=20)
    for d in (1, 2):
        for layer in range(L):
            assert r.value("exact", d, layer) == 1.0
    # the target's token is hidden in temporal mode: back to chance
    rt = evaluate(make_predictor("token").fit(train), test, modes=[0], n_boot=20)
    assert abs(rt.value("slot_recall", 0) - K / E) < 0.05


def test_token_law_cooccurrence_is_exact_after_the_first_layer(token_law: tuple[Trace, Trace]) -> None:
    """Under the token law layer l's set is layer l-1's shifted by one: ordered co-occurrence is exact
    from layer 1 on, and the first layer (no source) is at chance."""
    train, test = token_law
    r = evaluate(make_predictor("cooccurrence").fit(train), test, modes=[1], n_boot=20)
    for layer in range(1, L):
        assert r.value("exact", 1, layer) == 1.0
    assert abs(r.value("slot_recall", 1, 0) - K / E) < 0.05


def _sticky_trace(path: Path, n_docs: int = 10, doc_len: int = 40, seed: int = 0) -> Trace:
    """Each document keeps one random expert set per layer for all its tokens (a temporal law), and its
    gate-lookahead columns hold the true experts of layer l+1 (gate_input) or random ids (residual)."""
    rng = np.random.default_rng(seed)
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="synthetic")
    cols = default_columns(weights=False, lookahead_distances=[1], lookahead_m=3)
    with TraceWriter.create(path, spec, columns=cols, overwrite=True) as w:
        for doc in range(n_docs):
            per_layer = np.argsort(rng.random((L, E)), axis=-1)[:, :K]  # (L, K)
            experts = np.broadcast_to(per_layer, (doc_len, L, K)).astype(np.uint8)
            good = np.full((doc_len, L, 3), 255, np.uint8)
            for layer in range(L - 1):
                rest = next(e for e in range(E) if e not in per_layer[layer + 1])
                good[:, layer] = [*per_layer[layer + 1], rest]
            bad = np.argsort(rng.random((doc_len, L, E)), axis=-1)[..., :3].astype(np.uint8)
            bad[:, L - 1] = 255
            w.append(
                doc_id=np.full(doc_len, doc),
                position=np.arange(doc_len),
                token_id=rng.integers(0, 100, doc_len),
                label="x",
                experts=experts,
                lookahead={"lookahead_gate_input_d1": good, "lookahead_residual_d1": bad},
            )
            w.commit(doc)
    return Trace.open(path)


def test_temporal_law_previous_token_is_exact(tmp_path: Path) -> None:
    tr = _sticky_trace(tmp_path / "s")
    prev = make_predictor("previous").fit(tr)
    checked = 0
    for ctx in iter_contexts(tr, window=1):
        for layer in range(L):
            q = ctx.queries(layer, 0)
            ids, _ = prev.predict(q)
            has_prev = q.prev_token_id[:, 0] >= 0
            assert has_prev.sum() == len(q) - len(np.unique(ctx.doc_id))  # first token of each doc has none
            got = np.sort(ids[has_prev], axis=1)
            want = np.sort(ctx.actual[has_prev, layer].astype(np.int16), axis=1)
            np.testing.assert_array_equal(got, want)
            checked += int(has_prev.sum())
    assert checked > 0


def test_temporal_queries_hide_the_target_token_and_later_layers(tmp_path: Path) -> None:
    tr = _sticky_trace(tmp_path / "s", n_docs=2, doc_len=5)
    ctx = next(iter_contexts(tr, window=2))
    q = ctx.queries(1, 0)
    assert q.own.shape[1] == 0 and (q.token_id == -1).all()
    assert (q.prev[:, 0, 2:] == 255).all()  # token i-1 is known only up to layer l = 1
    assert (q.prev[1:5, 0, :2] == ctx.actual[0:4, :2]).all()
    assert (q.prev[:, 1] != 255).sum() > 0 and (q.prev[0] == 255).all()
    s = ctx.queries(2, 1)
    assert s.own.shape[1] == 2 and (s.token_id >= 0).all()  # layers 0..l-d visible
    assert ctx.queries(0, 1).own.shape[1] == 0 and not ctx.queries(0, 1).lookahead


def test_gate_lookahead_reads_the_right_variant_and_combined_keeps_it(tmp_path: Path) -> None:
    tr = _sticky_trace(tmp_path / "s", n_docs=24, seed=1)
    train, test = _split(tr, seed=2)
    good = make_predictor("lookahead").fit(train)
    bad = make_predictor("lookahead-residual").fit(train)
    best = make_predictor(
        "best",
        distances=(1,),
        learned=LearnedPredictor(hidden=16, epochs=1, batch_size=256, token_buckets=64, max_samples=3000),
    ).fit(train)
    res = evaluate_many({"good": good, "bad": bad, "best": best}, test, modes=[1], n_boot=50)
    for layer in range(1, L):
        assert res["good"].value("exact", 1, layer) == 1.0
        assert res["best"].value("slot_recall", 1, layer) >= 0.99
    # where lookahead has nothing (the first layer) the combined predictor still uses the history
    assert res["best"].value("slot_recall", 1, 0) > res["good"].value("slot_recall", 1, 0) + 0.2
    assert res["best"].value("slot_recall", 1) > res["good"].value("slot_recall", 1)
    assert abs(res["bad"].value("slot_recall", 1) - K / E) < 0.1
