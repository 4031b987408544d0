"""Expert ablation: routing edits at run time, metrics, bootstrap intervals, the sweep and the CLI.

Every check compares with a computation that does not go through the ablation code: the model's
own routing read by the capture engine, expert outputs computed by hand from the weights, routing
rules written out per family in this file (or transformers' own ``sparsemixer``), unbatched
per-window forward passes for the metrics, a capture of the same data for the load share, and
the known coverage of a bootstrap interval on simulated data.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from moescope.ablate.hooks import ExpertAblator, ablate
from moescope.ablate.measure import DocTotals, baseline_intervals, compare, resample_counts, token_scores
from moescope.ablate.sweep import AblateOptions, default_data, run_ablation
from moescope.capture.engine import RoutingRecorder
from moescope.capture.tiny import TINY_CONFIGS, tiny_model
from moescope.cli import app
from moescope.core.families import resolve_adapter
from moescope.core.routing import rule_weights
from moescope.errors import ConfigError, as_flags
from moescope.models import byte_tokenizer

FAMILIES = sorted(TINY_CONFIGS)
#: Families whose re-route and drop are checked token by token (every selection kind and weight rule).
EDIT_FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "deepseek_v3",
    "ernie4_5_moe",
    "phimoe",
    "gpt_oss",
    "dbrx",
    "llama4_text",
    "jetmoe",
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


def _batch(n: int = 2, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(5))
    return ids, torch.ones_like(ids)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- routing rules by hand
def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _hand_choice_score(family: str, router, logits: np.ndarray) -> np.ndarray:
    """The score each family's router selects experts by, written out from its modeling file."""
    if family == "deepseek_v3":
        return _sigmoid(logits) + router.e_score_correction_bias.double().numpy()
    if family == "ernie4_5_moe":
        return _softmax(logits) + router.moe_statics.e_score_correction_bias.double().numpy().reshape(-1)
    return logits  # softmax, sigmoid and top-k-over-logits routers rank by the logits themselves


def _hand_weights(
    family: str, model, logits: np.ndarray, chosen: list[int], off: set[int]
) -> dict[int, float]:
    """The weight each family gives the ``chosen`` experts, written out from its modeling file."""
    cfg = model.config
    c = np.array(chosen)
    if family == "mixtral":
        p = _softmax(logits)[c]
        w = p / p.sum()
    elif family == "qwen2_moe":  # norm_topk_prob=False in the tiny config
        assert not cfg.norm_topk_prob
        w = _softmax(logits)[c]
    elif family == "deepseek_v3":
        s = _sigmoid(logits)[c]
        w = s / (s.sum() + 1e-20) * cfg.routed_scaling_factor
    elif family == "ernie4_5_moe":
        p = _softmax(logits)[c]
        w = p / max(p.sum(), cfg.moe_norm_min)
    elif family in ("gpt_oss", "jetmoe"):
        w = _softmax(logits[c])
    elif family == "dbrx":
        p = _softmax(logits)[c]
        q = cfg.ffn_config.moe_normalize_expert_weights
        w = p / (np.abs(p) ** q).sum() ** (1 / q)
    elif family == "llama4_text":
        w = _sigmoid(logits[c])
    elif family == "phimoe":  # transformers' own sparsemixer with the disabled experts absent
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        scores = torch.tensor(logits, dtype=torch.float64)[None]
        scores[0, sorted(off)] = float("-inf")
        mult, sel = sparsemixer(scores, jitter_eps=cfg.router_jitter_noise, training=False)
        got = dict(zip(sel[0].tolist(), mult[0].tolist(), strict=True))
        assert set(got) == set(chosen)
        return got
    else:
        raise AssertionError(family)
    return dict(zip(chosen, w.tolist(), strict=True))


def _routed(family: str, block, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Output of the routed experts for tokens ``x`` (n, H) under the given choice, outside the block."""
    fam = resolve_adapter(family)
    ids, w = ids.long(), w.float()
    if family == "mixtral":  # by hand from the stored expert matrices
        ex = block.experts
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            gate_up = ex.gate_up_proj[ids[:, slot]]  # (n, 2I, H)
            gate, up = torch.einsum("noh,nh->no", gate_up, x).chunk(2, dim=-1)
            y = torch.einsum("nhi,ni->nh", ex.down_proj[ids[:, slot]], ex.act_fn(gate) * up)
            out += w[:, slot, None] * y
        return out
    if fam.selection == "experts_call":
        return block.experts(x, ids, w).reshape(len(x), -1)
    if fam.selection == "router_dense_scores":  # Llama4: scores scale each expert's input
        E = block.experts.num_experts
        scores = torch.zeros(len(x), E).scatter(1, ids, w)
        routed_in = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
        return block.experts(routed_in).reshape(E, len(x), -1).sum(0)
    w_in = block.input_linear.weight[ids]  # JetMoE, by hand: (n, k, 2I, H)
    gate, up = torch.einsum("nkoh,nh->nko", w_in, x).chunk(2, dim=-1)
    y = torch.einsum("nkhi,nki->nkh", block.output_linear.weight[ids], block.activation(gate) * up)
    return (y * w[..., None]).sum(1)


def _probe(block):
    """Forward hook keeping a block's input (n, H) and output (n, H)."""
    store: dict[str, torch.Tensor] = {}

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        store["x"] = x.detach().reshape(-1, x.shape[-1])
        y = out[0] if isinstance(out, tuple) else out
        store["y"] = y.detach().reshape(-1, y.shape[-1])

    return store, block.register_forward_hook(hook, with_kwargs=True)


def _run_recorded(model, ids, mask, ablator: ExpertAblator | None = None, probe_layer: int | None = None):
    """Routing (ids, weights, logits) as the capture engine reads it, plus one block's input/output."""
    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    block = model.get_submodule(rec.spec.module_paths[probe_layer]) if probe_layer is not None else None
    store, handle = _probe(block) if block is not None else ({}, None)
    try:
        if ablator is None:
            out = rec.run(ids, mask)
        else:
            with ablator:
                out = rec.run(ids, mask)
    finally:
        if handle is not None:
            handle.remove()
    return out, store


# --------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_rule_reproduces_the_routers_own_weights(family):
    model = _model(family)
    ids, mask = _batch()
    out, _ = _run_recorded(model, ids, mask)
    rule = resolve_adapter(family).weight_rule(ExpertAblator(model).config)
    for j in range(out["experts"].shape[1]):
        w = rule_weights(rule, torch.from_numpy(out["logits"][:, j]), torch.from_numpy(out["experts"][:, j]))
        np.testing.assert_allclose(w.numpy(), out["weights"][:, j], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["reroute", "drop"])
def test_nothing_disabled_is_bit_identical_and_exit_restores_exactly(family, mode):
    model = _model(family)
    ids, _ = _batch()
    before = _logits(model, ids)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    abl = ExpertAblator(model, mode=mode)
    layer = abl.spec.moe_layers[0]
    base_routing = RoutingRecorder(model).run(ids, torch.ones_like(ids))["experts"][:, 0]
    expert = int(np.bincount(base_routing.ravel()).argmax())  # surely chosen by some token
    with abl:
        assert torch.equal(_logits(model, ids), before)
        abl.set({layer: [expert]})
        assert not torch.equal(_logits(model, ids), before)
        abl.set(None)
        assert torch.equal(_logits(model, ids), before)
        abl.set({layer: [expert]})
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(RuntimeError, match="boom"), ablate(model, {layer: [expert]}, mode=mode):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids), before)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_drop_equals_the_forward_pass_without_that_experts_contribution(family):
    model = _model(family)
    ids, mask = _batch()
    base, probe = _run_recorded(model, ids, mask, probe_layer=0)
    abl = ExpertAblator(model, mode="drop")
    d = int(np.bincount(base["experts"][:, 0].ravel()).argmax())
    abl.set({abl.spec.moe_layers[0]: [d]})
    dropped, probe_d = _run_recorded(model, ids, mask, abl, probe_layer=0)
    x = probe["x"]
    torch.testing.assert_close(probe_d["x"], x, rtol=0, atol=0)  # the block saw the same input
    e, w = torch.from_numpy(base["experts"][:, 0]), torch.from_numpy(base["weights"][:, 0])
    hit = e == d
    assert hit.any()
    with torch.no_grad():
        contribution = _routed(family, model.get_submodule(abl.spec.module_paths[0]), x, e, w * hit)
    assert contribution.abs().max() > 1e-3
    torch.testing.assert_close(probe_d["y"], probe["y"] - contribution, rtol=1e-4, atol=1e-5)
    # the other experts keep their exact weights; the dropped one weighs exactly zero (a dense-score
    # router like Llama4's cannot tell a zero-weight choice from no choice, so compare non-zero weights)
    for t in range(len(e)):
        got = {
            int(i): wt for i, wt in zip(dropped["experts"][t, 0], dropped["weights"][t, 0], strict=True) if wt
        }
        want = {
            int(i): wt for i, wt in zip(base["experts"][t, 0], base["weights"][t, 0], strict=True) if i != d
        }
        assert got == want
        if resolve_adapter(family).selection != "router_dense_scores":
            np.testing.assert_array_equal(np.sort(dropped["experts"][t, 0]), np.sort(base["experts"][t, 0]))


@pytest.mark.parametrize("family", EDIT_FAMILIES)
@pytest.mark.parametrize("both", [False, True])
def test_reroute_picks_the_next_best_allowed_expert_and_reweights_like_the_family(family, both):
    model = _model(family)
    ids, mask = _batch()
    base, probe = _run_recorded(model, ids, mask, probe_layer=0)
    e0, w0 = base["experts"][:, 0], base["weights"][:, 0]
    counts = np.bincount(e0.ravel(), minlength=8)
    # one expert; or both experts of one token (its whole top-k goes elsewhere) plus another busy one
    off = {int(counts.argmax())} if not both else {*map(int, e0[0]), int(np.argsort(counts)[-2])}
    abl = ExpertAblator(model, mode="reroute")
    layer = abl.spec.moe_layers[0]
    abl.set({layer: sorted(off)})
    new, probe_r = _run_recorded(model, ids, mask, abl, probe_layer=0)
    router = getattr(model.get_submodule(abl.spec.module_paths[0]), resolve_adapter(family).router)
    logits = base["logits"][:, 0].astype(np.float64)
    assert not np.isin(new["experts"][:, 0], list(off)).any(), "a disabled expert was selected"
    hand_ids, hand_w = [], []
    for t in range(len(e0)):
        chosen = [int(i) for i in e0[t]]
        got = dict(zip(new["experts"][t, 0].tolist(), new["weights"][t, 0].tolist(), strict=True))
        if not off & set(chosen):  # untouched token: same ids and bit-identical weights
            assert got == dict(zip(chosen, w0[t].tolist(), strict=True))
            hand_ids.append(chosen)
            hand_w.append([got[i] for i in chosen])
            continue
        score = _hand_choice_score(family, router, logits[t])
        ranked = [int(i) for i in np.argsort(-score, kind="stable") if i not in off and i not in chosen]
        kept = [i for i in chosen if i not in off]
        want = kept + ranked[: len(chosen) - len(kept)]
        assert set(got) == set(want)
        expected = _hand_weights(family, model, logits[t], want, off)
        for i in want:
            assert math.isclose(got[i], expected[i], rel_tol=1e-5, abs_tol=1e-6), (t, i, got, expected)
        hand_ids.append(want)
        hand_w.append([expected[i] for i in want])
    # the block really computed with the new choice: its output equals the hand-routed mixture
    # plus the part of the block that is not routed (shared experts, biases), unchanged
    block = model.get_submodule(abl.spec.module_paths[0])
    x = probe["x"]
    with torch.no_grad():
        rest = probe["y"] - _routed(family, block, x, torch.from_numpy(e0), torch.from_numpy(w0))
        want_y = rest + _routed(family, block, x, torch.tensor(hand_ids), torch.tensor(hand_w))
    torch.testing.assert_close(probe_r["y"], want_y, rtol=1e-4, atol=1e-5)


def test_bad_ablation_requests_are_refused():
    model = _model("deepseek_v3")  # decoder layer 0 is dense
    abl = ExpertAblator(model)
    with pytest.raises(ConfigError, match=r"layer 0 is not a MoE layer .*\[1, 2, 3\]"):
        abl.set({0: [1]})
    with pytest.raises(ConfigError, match=r"outside 0\.\.7"):
        abl.set({1: [8]})
    with pytest.raises(ConfigError, match="fewer than top_k=2"):
        abl.set({1: range(7)})
    abl.set({1: range(7)}, mode="drop")  # drop has no such limit
    with pytest.raises(ConfigError, match="option mode"):
        ExpertAblator(model, mode="zero")


# --------------------------------------------------------------------------- metrics
def test_token_scores_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    valid, c1, c5, nll = token_scores(logits, ids, mask)
    for b in range(2):
        for t in range(5):
            assert bool(valid[b, t]) == (bool(mask[b, t]) and bool(mask[b, t + 1]))
            if not valid[b, t]:
                continue
            row = logits[b, t].tolist()
            target = int(ids[b, t + 1])
            order = sorted(range(11), key=lambda i: -row[i])
            assert bool(c1[b, t]) == (order[0] == target)
            assert bool(c5[b, t]) == (target in order[:5])
            lse = math.log(sum(math.exp(v) for v in row))
            assert math.isclose(float(nll[b, t]), lse - row[target], rel_tol=1e-5)


def test_resample_counts_stay_within_each_group():
    groups = [np.array([0, 2, 5]), np.array([1, 3])]
    W = resample_counts(groups, 7, 500, seed=1)
    assert W.shape == (500, 7)
    np.testing.assert_array_equal(W[:, [0, 2, 5]].sum(1), 3)
    np.testing.assert_array_equal(W[:, [1, 3]].sum(1), 2)
    assert (W[:, [4, 6]] == 0).all()
    np.testing.assert_array_equal(W, resample_counts(groups, 7, 500, seed=1))
    # each document is drawn about equally often
    assert np.allclose(W[:, [0, 2, 5]].mean(0), 1, atol=0.15)


def _synthetic_totals(rng, D: int, p_doc: np.ndarray) -> DocTotals:
    n = rng.integers(20, 80, D)
    c1 = rng.binomial(n, p_doc)
    return DocTotals(n, c1, c1, rng.random(D) * n)


def test_paired_interval_collapses_when_nothing_changes_and_points_match_sums():
    rng = np.random.default_rng(0)
    base = _synthetic_totals(rng, 30, rng.beta(3, 7, 30))
    W = resample_counts([np.arange(30)], 30, 300, seed=0)
    same = compare(base, base, np.arange(30), W)
    assert same["delta_accuracy"] == 0 and same["delta_accuracy_lo"] == 0 and same["delta_accuracy_hi"] == 0
    worse = DocTotals(base.n, base.correct1 - (base.correct1 > 0), base.correct5, base.nll + base.n * 0.1)
    docs = np.arange(10, 30)
    out = compare(base, worse, docs, W)
    acc_b = base.correct1[docs].sum() / base.n[docs].sum()
    acc_a = worse.correct1[docs].sum() / base.n[docs].sum()
    assert math.isclose(out["delta_accuracy"], acc_a - acc_b)
    assert math.isclose(out["delta_nll"], 0.1) and math.isclose(out["delta_nll_lo"], 0.1)
    nll_b = base.nll[docs].sum() / base.n[docs].sum()
    assert math.isclose(out["delta_perplexity"], math.exp(nll_b + 0.1) - math.exp(nll_b))
    assert out["delta_accuracy_lo"] <= out["delta_accuracy"] <= out["delta_accuracy_hi"] < 0


def test_document_bootstrap_interval_has_its_nominal_coverage():
    # Documents with their own accuracy (clustered tokens): the interval must cover the true
    # token-weighted accuracy (0.3, the Beta mean, as n is independent of p) about 90% of the time.
    rng = np.random.default_rng(42)
    reps, D, hits = 300, 40, 0
    for r in range(reps):
        t = _synthetic_totals(rng, D, rng.beta(3, 7, D))
        W = resample_counts([np.arange(D)], D, 400, seed=r)
        ci = baseline_intervals(t, np.arange(D), W, confidence=0.9)
        hits += ci["accuracy_lo"] <= 0.3 <= ci["accuracy_hi"]
    assert 0.83 <= hits / reps <= 0.96, hits / reps


# --------------------------------------------------------------------------- the sweep
def _corpus(path: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(3)
    words = {"prose": "the cat sat on a mat and ate".split(), "code": "def f ( x ) : return x + 1".split()}
    with open(path, "w") as f:
        for i in range(n):
            topic = "prose" if i % 2 else "code"
            text = " ".join(rng.choice(words[topic], rng.integers(6, 25)))
            f.write(json.dumps({"text": text, "topic": topic}) + "\n")
    return path


def _per_window_metrics(model, tok, path: Path, seq_len: int) -> tuple[float, float, float]:
    """Accuracy, top-5 accuracy and mean NLL with every window run alone (no batching, no padding)."""
    n = c1 = c5 = 0
    nll = 0.0
    for line in path.read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        for s in range(0, len(ids), seq_len):
            w = torch.tensor([ids[s : s + seq_len]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                lg = model(input_ids=w, use_cache=False).logits[0].double()
            for t in range(w.shape[1] - 1):
                target = int(w[0, t + 1])
                order = torch.argsort(lg[t], descending=True)
                c1 += int(order[0] == target)
                c5 += int(target in order[:5].tolist())
                nll += float(torch.logsumexp(lg[t], 0) - lg[t, target])
                n += 1
    return c1 / n, c5 / n, nll / n


def test_sweep_matches_unbatched_runs_and_a_capture_of_the_same_data(tmp_path):
    from moescope.capture.runner import CaptureOptions, LoadedModel, capture
    from moescope.trace import Trace

    model, tok = _model("mixtral"), byte_tokenizer(128)
    data = _corpus(tmp_path / "d.jsonl")
    opts = AblateOptions(
        layers=[1], experts=[(2,), (4, 5)], label_field="topic", seq_len=16, batch_size=3, bootstrap=200
    )
    res = run_ablation(model, tok, [str(data)], opts)
    assert res.results.height == 2 * 3  # two conditions x (two domains + all)
    base = res.baseline.filter(pl.col("domain") == "all").row(0, named=True)
    acc, top5, nll = _per_window_metrics(model, tok, data, 16)
    assert math.isclose(base["accuracy"], acc, abs_tol=1e-9) and math.isclose(
        base["top5"], top5, abs_tol=1e-9
    )
    assert math.isclose(base["nll"], nll, rel_tol=1e-5)
    with ablate(model, {1: [4, 5]}, mode="reroute"):
        acc_a, _, nll_a = _per_window_metrics(model, tok, data, 16)
    row = res.results.filter((pl.col("experts") == "4+5") & (pl.col("domain") == "all")).row(0, named=True)
    assert math.isclose(row["delta_accuracy"], acc_a - acc, abs_tol=1e-9)
    assert math.isclose(row["delta_nll"], nll_a - nll, rel_tol=1e-4, abs_tol=1e-6)
    assert row["delta_nll_lo"] <= row["delta_nll"] <= row["delta_nll_hi"]
    # load share equals the one counted from a capture trace of the same data
    capture(
        LoadedModel(model, tok, "tiny", "object"),
        [str(data)],
        tmp_path / "t",
        CaptureOptions(label_field="topic", seq_len=16),
    )
    experts = Trace.open(tmp_path / "t").experts()  # (n, L, k)
    share = np.bincount(experts[:, 1].ravel(), minlength=8) / experts[:, 1].size
    load = res.load.filter((pl.col("domain") == "all") & (pl.col("layer") == 1)).sort("expert")
    np.testing.assert_allclose(load["load_share"].to_numpy(), share, atol=1e-12)
    # routing change: every token that chose expert 2 is directly hit, k * load share of them;
    # re-route changes exactly those at the ablated layer, and more downstream through attention
    one = res.results.filter((pl.col("experts") == "2") & (pl.col("domain") == "all")).row(0, named=True)
    assert math.isclose(one["direct_share"], 2 * share[2]) and one["load_share"] == pytest.approx(share[2])
    at = res.routing_change.filter((pl.col("experts") == "2") & (pl.col("observed_layer") == 1))
    assert at["changed_share"][0] == pytest.approx(one["direct_share"])
    before = res.routing_change.filter((pl.col("experts") == "2") & (pl.col("observed_layer") == 0))
    assert before["changed_share"][0] == 0
    assert one["routing_changed_share"] >= one["direct_share"]


def test_drop_mode_leaves_the_ablated_layers_ids_alone(tmp_path):
    model, tok = _model("qwen3_moe"), byte_tokenizer(128)
    data = _corpus(tmp_path / "d.jsonl", n=6)
    opts = AblateOptions(
        layers=[2], experts=[(1,)], mode="drop", label_field="topic", seq_len=32, bootstrap=50
    )
    res = run_ablation(model, tok, [str(data)], opts)
    at = res.routing_change.filter(pl.col("observed_layer") <= 2)
    assert (at["changed_share"] == 0).all()
    row = res.results.filter(pl.col("domain") == "all").row(0, named=True)
    assert row["direct_share"] > 0 and row["routing_changed_share"] >= row["direct_share"]


def test_outputs_of_a_run_with_only_expert_sets(tmp_path):
    from moescope.ablate.report import write_outputs

    model, tok = _model("glm4_moe"), byte_tokenizer(128)
    opts = AblateOptions(layers=[2], experts=[(0, 1, 2)], label_field="topic", seq_len=32, bootstrap=50)
    res = run_ablation(model, tok, [str(_corpus(tmp_path / "d.jsonl", n=4))], opts)
    summary = write_outputs(res, tmp_path / "out")
    assert summary["layers"][0]["most_harmful"]["experts"] == "0+1+2"
    assert summary["layers"][0]["spearman_load_impact"] is None  # no single-expert condition to correlate
    assert not (tmp_path / "out" / "load_vs_impact.png").exists()
    row = res.results.filter(pl.col("domain") == "all").row(0, named=True)
    load = res.load.filter((pl.col("domain") == "all") & (pl.col("layer") == 2) & (pl.col("expert") <= 2))
    assert row["load_share"] == pytest.approx(load["load_share"].sum())


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return CliRunner().invoke(app, ["ablate", *map(str, args)])


def test_cli_writes_tables_figures_and_one_json_document(tmp_path):
    data = _corpus(tmp_path / "d.jsonl", n=6)
    out = tmp_path / "out"
    res = _cli(
        "tiny:deepseek_v3",
        data,
        "--label-field",
        "topic",
        "--layer",
        "2,3",
        "--experts",
        "0,3+5",
        "--bootstrap",
        "50",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "-o",
        out,
        "--json",
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["family"] == "deepseek_v3" and [x["layer"] for x in summary["layers"]] == [2, 3]
    for stem in ("heatmap", "ranking", "load_vs_impact"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.csv").is_file()
    ranking = pl.read_csv(out / "ranking.csv")
    assert ranking.height == 4 and set(ranking["effect"]) <= {"critical", "redundant", "helps when off"}
    heat = pl.read_csv(out / "heatmap.csv")
    table = pl.read_csv(out / "ablation.csv")
    np.testing.assert_allclose(heat["delta_accuracy_pp"].to_numpy(), table["delta_accuracy"].to_numpy() * 100)
    assert set(table["domain"]) == {"code", "prose", "all"}
    assert set(summary["files"]) == {str(p) for p in out.iterdir() if p.name != ".moescope-output.json"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "0"], "layer 0 is not a MoE layer"),
        (["--layer", "x"], "--layer: expected 'all'"),
        (["--experts", "1+a"], "--experts: expected ids"),
        (["--experts", "9"], "--experts: ids [9] are outside 0..7"),
        (["--mode", "zero"], "--mode must be one of reroute, drop"),
        (["--rank-by", "loss"], "--rank-by must be one of"),
        (["--bootstrap", "0"], "--bootstrap must be >= 1"),
    ],
)
def test_cli_errors_name_the_option(tmp_path, args, message):
    data = _corpus(tmp_path / "d.jsonl", n=2)
    res = _cli("tiny:deepseek_v3", data, "--device", "cpu", "-o", tmp_path / "o", *args)
    assert res.exit_code == 1 and isinstance(res.exception, ConfigError)
    assert message in as_flags(str(res.exception))


def test_bundled_model_and_corpus(tmp_path):
    from moescope.data import BUNDLED_MODELS, corpus_domains

    files, field = default_data()
    assert [Path(f).stem.removeprefix("heldout-") for f in files] == corpus_domains() and field == "domain"
    if "tiny-mixtral" not in BUNDLED_MODELS:
        pytest.skip("no bundled tiny-mixtral")
    humaneval = [f for f in files if f.endswith("heldout-humaneval.jsonl")]
    res = _cli(
        "tiny-mixtral",
        *humaneval,
        "--label-field",
        "domain",
        "--max-documents",
        "2",
        "--experts",
        "0",
        "--layer",
        "0",
        "--bootstrap",
        "50",
        "--device",
        "cpu",
        "--no-figures",
        "-o",
        tmp_path,
        "--json",
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["domains"] == ["humaneval"] and summary["family"] == "mixtral"
    assert (tmp_path / "ranking.csv").is_file() and not (tmp_path / "ranking.png").exists()


def test_docstring_examples_run():
    import doctest

    import moescope.ablate.hooks as hooks

    result = doctest.testmod(hooks)
    assert result.attempted > 0 and result.failed == 0
