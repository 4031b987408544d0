"""Policy ``auto`` (:class:`moescope.simulate.AutoPolicy`): choice, replay and command line.

The choice is checked against an independent brute force through the public API (each candidate
fitted on the larger part of the training split and replayed on the held-out part with
``moescope.simulate.replay``), and auto's replay against replaying the chosen policy directly.
Guided candidates get a fixed predictor cost (``latency_ms``) so that two fits give the same times.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import moescope
from moescope.cli import app
from moescope.core.estimator import clone
from moescope.errors import ConfigError
from moescope.simulate import AutoPolicy, LearnedReuse, LearnedReuseAdmit, make_policy
from moescope.trace.manifest import RoutingSpec
from moescope.trace.reader import Trace
from moescope.trace.schema import default_columns
from moescope.trace.writer import TraceWriter

EXPERT_PARAMS = 6144


def _topical(path, n_docs, seed, doc_len=40, L=3, E=8, k=2):
    """Documents that each keep to a few experts per layer (their topic), with 20% off-topic picks:
    recency pays here, global popularity less, so different policies win in different cells."""
    rng = np.random.default_rng(seed)
    spec = RoutingSpec(
        num_experts=E, top_k=k, moe_layers=list(range(L)), family="synthetic", num_hidden_layers=L
    )
    n = n_docs * doc_len
    ids = np.empty((n, L, k), np.int16)
    for d in range(n_docs):
        topic = np.stack([rng.choice(E, 3, replace=False) for _ in range(L)])  # (L, 3)
        for t in range(d * doc_len, (d + 1) * doc_len):
            for layer in range(L):
                pool = topic[layer] if rng.random() < 0.8 else np.arange(E)
                ids[t, layer] = rng.choice(pool, k, replace=False)
    rows = np.arange(n)
    with TraceWriter.create(
        path, spec, columns=default_columns(weights=True), model={"id": "synthetic-topical"}, overwrite=True
    ) as w:
        w.append(
            doc_id=rows // doc_len,
            position=rows % doc_len,
            token_id=rng.integers(0, 1000, n).astype(np.int32),
            label=["a"] * n,
            experts=ids,
            weights=np.full((n, L, k), 1.0 / k, np.float32),
        )
        w.commit(n_docs - 1)
    return Trace.open(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    return _topical(root / "train", 20, seed=11), _topical(root / "test", 6, seed=3)


def _candidates(latency_ms, batch_size=None):
    return (
        "lru",
        "lfu",
        "lrfu",
        "static",
        LearnedReuse(latency_ms=latency_ms, batch_size=batch_size),
        LearnedReuseAdmit(latency_ms=latency_ms, batch_size=batch_size),
    )


def _label(c):
    return c if isinstance(c, str) else c.name


def _fresh(c):
    return make_policy(c) if isinstance(c, str) else clone(c)


# (preset, cache slots per layer, mode, batch, predictor ms per layer)
CONFIGS = [
    ("rtx4090-pcie4", 2, "decode", None, 0.0),  # learned-reuse-admit wins (a free predictor)
    ("rtx4090-pcie4", 2, "decode", None, 5.0),  # the same at 5 ms per layer: lru (ties lfu, lrfu)
    ("rtx4090-pcie4", 4, "prefill", 4, 0.0),  # lfu (ties lrfu)
    ("rtx4090-nvme", 3, "decode", None, 0.0),  # lru
    ("h100-pcie5", 5, "prefill", 4, 0.001),
]


def _replay(trace, fit, policy, preset, slots, mode, batch, **kw):
    return moescope.simulate(
        trace,
        fit_trace=fit,
        policy=policy,
        cache_experts=slots,
        expert_params=EXPERT_PARAMS,
        preset=preset,
        mode=mode,
        batch_size=batch,
        **kw,
    )


def test_choice_is_the_brute_force_argmax_on_the_held_out_split(traces):
    train, test = traces
    choices = []
    for preset, slots, mode, batch, ms in CONFIGS:
        cands = _candidates(ms, batch)
        auto = AutoPolicy(candidates=cands)
        _replay(test, train, auto, preset, slots, mode, batch)
        part, val = train.split(0.2, seed=1)  # the split auto documents (holdout 0.2, seed 1)
        brute = {
            _label(c): _replay(val, part, _fresh(c), preset, slots, mode, batch).summary()["tokens_per_s"]
            for c in cands
        }
        best = max(brute.values())
        want = next(k for k, v in brute.items() if v == best)  # ties: the earlier candidate
        assert auto.scores_ == pytest.approx(brute, rel=1e-12), (preset, slots, mode, batch, ms)
        assert auto.choice_ == want
        assert auto.heldout_documents_ == len(val.documents())
        choices.append(want)
    # the cells exercise both outcomes and the ties: a predictor that costs nothing wins the first,
    # the same predictor at 5 ms per layer loses it
    assert choices[0] in ("learned-reuse", "learned-reuse-admit")
    assert choices[1] in ("lru", "lfu", "lrfu", "static")
    assert len(set(choices)) >= 3


@pytest.mark.parametrize("preset, slots, mode, batch, ms", [CONFIGS[0], CONFIGS[2], CONFIGS[4]])
@pytest.mark.parametrize("prefetch", [None, "table"])
def test_auto_replays_exactly_as_the_chosen_policy(traces, preset, slots, mode, batch, ms, prefetch):
    train, test = traces
    cands = _candidates(ms, batch)
    auto = AutoPolicy(candidates=cands)
    got = _replay(test, train, auto, preset, slots, mode, batch, prefetch=prefetch)
    chosen = dict(zip(map(_label, cands), cands, strict=True))[auto.choice_]
    want = _replay(test, train, _fresh(chosen), preset, slots, mode, batch, prefetch=prefetch)
    assert np.array_equal(got.counts, want.counts)
    assert got.total_s == want.total_s and np.array_equal(got.stall_s, want.stall_s)
    g, w = got.summary(), want.summary()
    assert got.policy == "auto" and g.pop("policy") == "auto"
    w.pop("policy")
    assert g == w
    assert auto.policy_.predictor_guided == (auto.choice_ in ("learned-reuse", "learned-reuse-admit"))


def test_auto_needs_a_training_trace_and_the_replay(traces):
    train, test = traces
    with pytest.raises(ConfigError, match="deployment, cost, capacity"):
        AutoPolicy().fit(train)
    with pytest.raises(ConfigError, match="fit_trace"):
        moescope.simulate(test, fit_trace=None, policy="auto", cache_experts=2, expert_params=EXPERT_PARAMS)
    with pytest.raises(ConfigError, match="candidate 'auto'"):
        _replay(test, train, AutoPolicy(candidates=("lru", "auto")), "rtx4090-pcie4", 2, "decode", None)
    with pytest.raises(ConfigError, match="candidate 'fifo'"):
        _replay(test, train, AutoPolicy(candidates=("fifo",)), "rtx4090-pcie4", 2, "decode", None)


def _cli(args):
    r = CliRunner().invoke(app, ["simulate", *args])
    return r, str(r.exception) + r.output


def test_cli_auto_without_train_names_the_option(traces, tmp_path):
    _, test = traces
    base = [str(test.path), "--expert-params", str(EXPERT_PARAMS), "--cache-fraction", "0.5"]
    for extra in ([], ["--fit-on-replayed"]):
        r, text = _cli([*base, "--policy", "auto", *extra, "-o", str(tmp_path / "x")])
        assert r.exit_code != 0
        assert "--policy auto" in text and "--train" in text


def test_cli_auto_json_and_sweep(traces, tmp_path):
    train, test = traces
    out = tmp_path / "sim"
    args = [str(test.path), "--train", str(train.path), "--expert-params", str(EXPERT_PARAMS)]
    args += ["--cache-fraction", "0.25", "--policy", "auto", "--sweep", "-o", str(out), "--json"]
    r, text = _cli(args)
    assert r.exit_code == 0, text
    doc = json.loads(r.stdout)
    sel = doc["auto"]
    names = ["lru", "lfu", "lrfu", "static", "learned-reuse", "learned-reuse-admit"]
    assert list(sel["heldout_tokens_per_s"]) == names
    assert sel["choice"] == max(names, key=lambda n: (sel["heldout_tokens_per_s"][n], -names.index(n)))
    assert doc["policy"] == "auto" and sel["heldout_documents"] >= 1
    assert json.loads((out / "summary.json").read_text())["auto"] == sel
    # the replay equals the chosen policy fitted on all of --train (free choices have no timing noise)
    if not sel["predictor_guided"]:
        want = moescope.simulate(
            test,
            fit_trace=train,
            policy=sel["choice"],
            cache_fraction=0.25,
            expert_params=EXPERT_PARAMS,
        ).summary()
        assert doc["hits"] == want["hits"] and doc["bytes_moved"] == want["bytes_moved"]
    import polars as pl

    sw = pl.read_csv(out / "sweep.csv")
    auto_rows = sw.filter(pl.col("policy") == "auto")
    assert auto_rows.height == sw["cache_fraction"].n_unique()
    assert set(auto_rows["auto_choice"].to_list()) <= set(names)
    assert "auto (chosen on held-out training documents)" in doc["prediction_pays"]
    text_run, text = _cli([*(a for a in args if a not in ("--sweep", "--json")), "--overwrite"])
    assert text_run.exit_code == 0, text
    assert f"auto chose {sel['choice']}" in text
