"""Routing strategies: known answers on every family the capture engine supports.

References are independent of the strategy code: the model's own forward pass (no hooks), the
ablation's ``drop``, a dense mixture whose weights are written out here per family from the
transformers modeling files, and per-token brute-force re-implementations of every rule.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from moescope.ablate.hooks import ExpertAblator
from moescope.analysis.density import fit_from_samples
from moescope.capture.tiny import TINY_CONFIGS, tiny_model
from moescope.core.families import resolve_adapter
from moescope.core.routing import decode_router_output, routing_spec
from moescope.errors import ConfigError
from moescope.strategies import STRATEGIES, StrategyRouter, parse_strategy
from moescope.strategies.rules import adjust
from test_capture_engine import _hook_io, _reference_output

torch.set_num_threads(1)

FAMILIES = sorted(TINY_CONFIGS)


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))


def _run(model, spec, *, samples=None):
    """Logits of the model under ``spec``, the applied routing, each MoE layer's router logits and
    the model's own ``(ids, weights)`` at each layer in that same forward (read before the edit)."""
    spec_r = routing_spec(model)
    fam = resolve_adapter(spec_r.family)
    blocks = [model.get_submodule(p) for p in spec_r.module_paths]
    routers = [getattr(b, fam.router) for b in blocks]
    seen: list = [None] * len(routers)
    own: list = [None] * len(routers)

    def grab(j):
        def hook(mod, args, out):
            lg = out if fam.logits_index is None else out[fam.logits_index]
            seen[j] = lg.detach().reshape(-1, lg.shape[-1]).float()
            if fam.selection != "experts_call":
                own[j] = tuple(t.detach() for t in decode_router_output(fam, blocks[j], out, spec_r.top_k))

        return hook

    def grab_call(j):
        def hook(mod, args, kwargs):
            own[j] = (
                args[1] if len(args) > 1 else kwargs["top_k_index"],
                args[2] if len(args) > 2 else kwargs["top_k_weights"],
            )

        return hook

    handles = []
    try:
        with torch.no_grad(), StrategyRouter(model, spec, record=True, samples=samples) as router:
            for j, (b, r) in enumerate(zip(blocks, routers, strict=True)):
                handles.append(r.register_forward_hook(grab(j), prepend=True))
                if fam.selection == "experts_call":
                    handles.append(
                        b.experts.register_forward_pre_hook(grab_call(j), with_kwargs=True, prepend=True)
                    )
            out = model(_ids()).logits
    finally:
        for h in handles:
            h.remove()
    router.own = own
    return out, router, seen


def _sets(applied) -> list[set[int]]:
    ids, count = applied.ids.tolist(), applied.count.tolist()
    return [set(row[:c]) for row, c in zip(ids, count, strict=True)]


def _probs(family: str, logits: torch.Tensor) -> torch.Tensor:
    if resolve_adapter(family).router_kind == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)
    return logits.softmax(-1)


# ----------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("family", FAMILIES)
def test_topk_at_the_models_own_k_is_bit_identical(family):
    model = _model(family)
    with torch.no_grad():
        plain = model(_ids()).logits
    k = routing_spec(model).top_k
    for spec in ("topk", f"topk:k={k}"):
        out, router, _ = _run(model, spec)
        assert torch.equal(out, plain), spec
        assert all(int(a.count.min()) == int(a.count.max()) == k for a in router.applied)
    # a different k changes the output, so the comparison above can fail
    out, _, _ = _run(model, f"topk:k={k + 1}")
    assert not torch.equal(out, plain)


def _hand_dense_weights(family: str, config, logits: torch.Tensor) -> torch.Tensor:
    """Weights (N, E) each family gives all E experts, read off the transformers modeling files."""
    if family == "deepseek_v2":
        return logits.softmax(-1) * config.routed_scaling_factor
    if family in ("deepseek_v3", "glm4_moe"):
        s = logits.sigmoid()
        if config.norm_topk_prob:
            s = s / (s.sum(-1, keepdim=True) + 1e-20)
        return s * config.routed_scaling_factor
    if family == "llama4_text":
        return logits.sigmoid()
    if family == "dbrx":
        p = logits.softmax(-1)
        norm = config.ffn_config.moe_normalize_expert_weights
        return p if norm is None else p / torch.linalg.vector_norm(p, ord=norm, dim=-1, keepdim=True)
    if family == "phimoe":  # sparsemixer, slot by slot, best logit first (brute force per token)
        eps = config.router_jitter_noise
        out = torch.zeros_like(logits)
        for n, row in enumerate(logits.tolist()):
            masked = list(row)
            for e in sorted(range(len(row)), key=lambda i: -row[i]):
                top = row[e]
                allowed = [
                    i
                    for i in range(len(row))
                    if masked[i] != -math.inf and (top - row[i]) / max(abs(row[i]), top) <= 2 * eps
                ]
                z = sum(math.exp(masked[i]) for i in allowed)
                out[n, e] = math.exp(row[e]) / z
                masked[e] = -math.inf
        return out
    return logits.softmax(
        -1
    )  # Mixtral, Qwen, OLMoE, Ernie (renormalised over all E), Jamba, Granite, gpt-oss, JetMoE


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["topp:p=1", "threshold:w=0"])
def test_full_sets_equal_a_dense_mixture_computed_by_hand(family, spec):
    model = _model(family)
    rspec = routing_spec(model)
    fam = resolve_adapter(family)
    blocks = [model.get_submodule(p) for p in rspec.module_paths]
    probes = [{} for _ in blocks]
    targets = [b if fam.selection == "router_sorted" else b.experts for b in blocks]
    handles = [_hook_io(t, s) for t, s in zip(targets, probes, strict=True)]
    extra = [{} for _ in blocks]
    if fam.selection == "router_dense_scores":
        handles += [_hook_io(b.router, s) for b, s in zip(blocks, extra, strict=True)]
    try:
        _, router, logits = _run(model, spec)
    finally:
        for h in handles:
            h.remove()
    E = rspec.num_experts
    config = model.config.get_text_config()
    for j, block in enumerate(blocks):
        assert int(router.applied[j].count.min()) == E
        w = _hand_dense_weights(family, config, logits[j])
        ids = np.tile(np.arange(E), (len(w), 1))
        if fam.selection == "router_dense_scores":
            x = extra[j]["input"].reshape(-1, extra[j]["input"].shape[-1])
            real = probes[j]["output"].reshape(E, len(w), -1).sum(0)
        else:
            x = probes[j]["input"].reshape(-1, probes[j]["input"].shape[-1])
            real = probes[j]["output"].reshape(len(w), -1)
        with torch.no_grad():
            ref = _reference_output(family, block, x, ids, w.numpy().astype(np.float32))
        torch.testing.assert_close(real, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_equals_the_ablation_drop(family):
    model = _model(family)
    layers = routing_spec(model).moe_layers
    disabled = {layers[0]: [0, 3], layers[-1]: [1]}
    with torch.no_grad(), ExpertAblator(model, mode="drop") as abl:
        abl.set(disabled)
        dropped = model(_ids()).logits
    out, router, _ = _run(model, f"mask:{layers[0]}:0+3;mask:{layers[-1]}:1")
    torch.testing.assert_close(out, dropped, rtol=1e-5, atol=1e-5)  # slot order may change sums
    assert all(not ({0, 3} & s) for s in _sets(router.applied[0]))


def _rules(family, E, k):
    """Brute-force, per-token versions of each rule: (spec, check(set, probs, model_set, model_w, count))."""

    def topp(p):
        def check(s, pr, *_):
            order = sorted(range(E), key=lambda e: -pr[e])
            m = next(i + 1 for i in range(E) if sum(pr[e] for e in order[: i + 1]) >= p - 1e-6)
            return s == set(order[:m])

        return check

    def threshold(w):
        return lambda s, pr, *_: (
            s == ({e for e in range(E) if pr[e] >= w} or {max(range(E), key=pr.__getitem__)})
        )

    def skip(beta):
        def check(s, pr, ms, mw, c):
            top = max(mw.values())
            return s == {e for e in ms if mw[e] >= beta * top}

        return check

    def entropy(lo, hi):
        def check(s, pr, ms, mw, c):
            h = -sum(p * math.log(max(p, 1e-30)) for p in pr) / math.log(E)
            nested = s <= ms if len(s) <= k else ms <= s  # ranked: the model's own choice first
            return len(s) == lo + round((hi - lo) * h) and nested

        return check

    return [
        ("topp:p=0.5", topp(0.5)),
        ("topp:p=0.9", topp(0.9)),
        ("threshold:w=0.15", threshold(0.15)),
        ("skip:beta=0.8", skip(0.8)),
        (f"entropy:low=1,high={E}", entropy(1, E)),
        ("random:k=3", lambda s, *_: len(s) == 3),
        ("topk:k=1", lambda s, pr, ms, mw, c: len(s) == 1 and s <= ms),
        (f"topk:k={k + 2}", lambda s, pr, ms, mw, c: len(s) == k + 2 and ms <= s),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_strategy_obeys_its_rule_token_by_token(family):
    model = _model(family)
    rspec = routing_spec(model)
    E, k = rspec.num_experts, rspec.top_k
    for spec, check in _rules(family, E, k):
        _, router, logits = _run(model, spec)
        for j, applied in enumerate(router.applied):
            probs = _probs(family, logits[j]).tolist()
            own_ids, own_w = router.own[j]
            for n, s in enumerate(_sets(applied)):
                ms = set(own_ids[n].tolist())
                mw = dict(zip(own_ids[n].tolist(), own_w[n].float().tolist(), strict=True))
                assert check(s, probs[n], ms, mw, int(applied.count[n])), (spec, j, n, sorted(s))
                assert len(s) == int(applied.count[n]), "expert ids repeat within a token"
                pad = applied.weights[n, int(applied.count[n]) :]
                assert bool((pad == 0).all()), "padding slots must carry weight 0"


def test_reweighted_sets_follow_the_family_rule():
    model = _model("mixtral")  # softmax over E, renormalised over the chosen set
    _, router, logits = _run(model, "topp:p=0.7")
    for j, a in enumerate(router.applied):
        probs = logits[j].softmax(-1)
        for n, _s in enumerate(_sets(a)):
            c = int(a.count[n])
            ids = a.ids[n, :c]
            expect = probs[n, ids] / probs[n, ids].sum()
            torch.testing.assert_close(a.weights[n, :c].float(), expect, rtol=1e-5, atol=1e-6)


def _null_samples(model, n=64):
    _, _router, logits = _run(model, "topk")
    spec = routing_spec(model)
    return {layer: logits[j].numpy() for j, layer in enumerate(spec.moe_layers)}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_pvalue_alpha_one_without_correction_keeps_every_expert(family):
    model = _model(family)
    samples = _null_samples(model)
    _, router, _ = _run(model, "pvalue:alpha=1,correction=none", samples=samples)
    E = routing_spec(model).num_experts
    assert all(int(a.count.min()) == E for a in router.applied)
    _, strict, _ = _run(model, "pvalue:alpha=0.05,correction=bonferroni", samples=samples)
    assert all(int(a.count.max()) < E for a in strict.applied)


def test_pvalue_selection_is_benjamini_hochberg_on_kde_tail_probabilities():
    model = _model("mixtral")
    samples = _null_samples(model)
    _, router, logits = _run(model, "pvalue:alpha=0.3,correction=bh", samples=samples)
    layer0 = routing_spec(model).moe_layers[0]
    ref = samples[layer0].astype(np.float64)
    h = np.maximum(ref.std(0), 1e-6) * len(ref) ** (-0.2)
    from scipy.stats import norm

    checked = 0
    for n, s in enumerate(_sets(router.applied[0])):
        x = logits[0][n].numpy()
        p = np.array([norm.sf((x[e] - ref[:, e]) / h[e]).mean() for e in range(len(x))])
        order = np.argsort(p)
        thresholds = 0.3 * np.arange(1, len(p) + 1) / len(p)
        if np.abs(p[order] - thresholds).min() < 1e-3:
            continue  # too close to call against a tabulated CDF
        passed = np.nonzero(p[order] <= thresholds)[0]
        expect = set(order[: passed[-1] + 1].tolist()) if len(passed) else {int(np.argmax(x))}
        assert s == expect, (n, s, expect)
        checked += 1
    assert checked >= len(x) // 2


def test_bh_and_bonferroni_on_known_p_values():
    p = torch.tensor([[0.001, 0.02, 0.03, 0.5], [0.2, 0.3, 0.4, 0.9]])
    assert adjust(p, 0.05, "bh").tolist() == [[True, True, True, False], [False] * 4]
    assert adjust(p, 0.05, "bonferroni").tolist() == [[True, False, False, False], [False] * 4]
    assert adjust(p, 0.05, "none").tolist() == [[True, True, True, False], [False] * 4]


# ----------------------------------------------------------------------------- specs and errors
def test_per_layer_specs_route_each_layer_by_its_own_strategy():
    model = _model("mixtral")
    layers = routing_spec(model).moe_layers
    _, router, _ = _run(model, f"topk:k=1@{layers[0]};topk:k=4")
    assert int(router.applied[0].count.max()) == 1
    assert all(int(a.count.min()) == 4 for a in router.applied[1:])


def test_registry_and_estimator_conventions():
    assert sorted(STRATEGIES) == ["entropy", "mask", "pvalue", "random", "skip", "threshold", "topk", "topp"]
    for cls in STRATEGIES.values():
        est = cls()
        assert cls(**est.get_params()).get_params() == est.get_params()
    s = parse_strategy("topp:p=0.7,min=2").items[0][0]
    assert s.get_params() == {"p": 0.7, "min": 2, "max": None} and s.spec() == "topp:p=0.7,min=2"
    assert parse_strategy("topk_baseline").is_baseline


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nucleus:p=0.5", "unknown strategy 'nucleus'"),
        ("topp:q=0.5", "unknown parameter 'q'"),
        ("topk:k=9", "k=9 is outside 1..E=8"),
        ("topp:p=0", r"p=0.0 is outside \(0, 1\]"),
        ("topp:p=1.5", r"p=1.5 is outside \(0, 1\]"),
        ("threshold:w=abc", "w='abc' is not a number"),
        ("pvalue:alpha=0.1,correction=holm", "correction='holm'"),
        ("pvalue:alpha=0.1", "give density=FILE"),
        ("mask:1:9", r"expert ids \[9\] are outside 0..7"),
        ("topk:k=1@7", r"layer\(s\) \[7\] are not MoE layers"),
        ("topp:p", "must be key=value"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec, match):
    with pytest.raises(ConfigError, match=match):
        StrategyRouter(_model("mixtral"), spec)


def test_density_file_of_another_model_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    other = fit_from_samples(
        {layer: rng.normal(size=(40, 16)) for layer in range(4)}, num_experts=16, top_k=2, trim=2
    )
    other.save(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"density=.*other.*E=16.*E=8"):
        StrategyRouter(_model("mixtral"), f"pvalue:alpha=0.1,density={tmp_path / 'other'}")
    own = fit_from_samples(_null_samples(_model("mixtral")), num_experts=8, top_k=2, trim=2)
    own.save(tmp_path / "own")
    _, router, _ = _run(_model("mixtral"), f"pvalue:alpha=0.2,density={tmp_path / 'own'}")
    assert all(int(a.count.min()) >= 1 for a in router.applied)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "dbrx"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_padded_slots_are_not_computed_and_change_nothing(family, impl, monkeypatch):
    """The experts module sees one row per kept (token, expert); outputs equal the zero-weight padding."""
    import moescope.strategies.apply as apply_mod

    try:
        model = tiny_model(family, experts_implementation=impl)
    except ConfigError:
        pytest.skip(f"{family} has no {impl} kernel")
    ids = _ids()
    spec = routing_spec(model)
    experts = [model.get_submodule(p).experts for p in spec.module_paths]
    rows: list[int] = []
    handles = []
    try:
        with torch.no_grad(), StrategyRouter(model, "topp:p=0.6", record=True) as router:
            handles = [  # registered after the router's: they see the call the kernel runs
                e.register_forward_pre_hook(
                    lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])
                )
                for e in experts
            ]
            out = model(ids).logits
            kept = [int(a.count.sum()) for a in router.applied]
            width = [a.ids.shape[1] for a in router.applied]
    finally:
        for h in handles:
            h.remove()
    n = ids.numel()
    assert any(w * n > k for w, k in zip(width, kept, strict=True))  # the batch has padding
    if family == "dbrx":  # its experts take (B, T, H) hidden states: the call is kept as it is
        assert rows == [n] * len(rows)
    else:
        assert rows == [k if w * n > k else n for w, k in zip(width, kept, strict=True)]
    monkeypatch.setattr(apply_mod, "compaction_ok", lambda *a: False)
    with torch.no_grad(), StrategyRouter(model, "topp:p=0.6", record=True) as router:
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # kernels block the matmuls differently


def test_logit_order_and_ranking_are_those_of_a_stable_sort_with_and_without_ties():
    from moescope.strategies.base import Routing

    g = torch.Generator().manual_seed(0)
    for ties in (False, True):
        logits = torch.randn(64, 8, generator=g)
        if ties:  # few distinct values: most rows hold equal logits
            logits = torch.randint(0, 3, (64, 8), generator=g).float()
        stable = logits.sort(dim=1, descending=True, stable=True)
        ids = stable.indices[:, :2]
        r = Routing(logits, ids, torch.ones(64, 2) / 2, logits, "softmax", 0)
        assert torch.equal(r.logit_sort[0], stable.values) and torch.equal(r.logit_sort[1], stable.indices)
        assert torch.equal(r.ranking, stable.indices)
        # the model's own slots in another order than the logits' (a tie broken the other way)
        swapped = Routing(logits, ids.flip(1), torch.ones(64, 2) / 2, logits, "softmax", 0)
        first = swapped.ranking[:, :2]
        by_hand = []
        for row, (a, b) in zip(logits, ids.flip(1).tolist(), strict=True):
            by_hand.append([a, b] if row[a] >= row[b] else [b, a])  # by score, ties in slot order
        assert first.tolist() == by_hand
