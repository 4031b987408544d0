"""Gate lookahead: later layers' routers applied to earlier hidden states, checked by hand."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from moescope.capture.engine import RoutingRecorder
from moescope.capture.lookahead import extend_ranking
from moescope.capture.tiny import TINY_CONFIGS, tiny_model
from moescope.trace import missing_id

torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend on a shared 2-core machine

FAMILIES = sorted(TINY_CONFIGS)


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return ids * mask, mask


def _probe(modules: list[torch.nn.Module], what: str) -> tuple[list[dict], list]:
    """Record each module's first input ('input') or output ('output') during the next forward."""
    stores: list[dict] = [{} for _ in modules]
    handles = []
    for mod, store in zip(modules, stores, strict=True):

        def hook(m, args, kwargs, out, store=store):
            x = (args[0] if args else kwargs["hidden_states"]) if what == "input" else out
            x = x[0] if isinstance(x, tuple) else x
            store[what] = x.detach().reshape(-1, x.shape[-1])

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return stores, handles


def _run_with_probes(rec: RoutingRecorder, modules, what):
    stores, handles = _probe(modules, what)
    try:
        out = rec.run(*_batch())
    finally:
        for h in handles:
            h.remove()
    return out, [s[what] for s in stores]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [2, 4])
def test_a_router_on_its_own_input_reproduces_the_captured_choice(family, m):
    """The lookahead call path (router module + the family's decoding) agrees with what the model used."""
    model = _model(family)
    rec = RoutingRecorder(model, lookahead=1, lookahead_m=m)
    out, inputs = _run_with_probes(rec, rec._routers, "input")
    keep = _batch()[1].reshape(-1).bool()
    for t, x in enumerate(inputs):
        with torch.no_grad():
            pred = rec.select_top_m(t, x)[keep].numpy()
        assert pred.shape == (int(keep.sum()), m)
        np.testing.assert_array_equal(np.sort(pred[:, :2], 1), np.sort(out["experts"][:, t], 1))
        assert all(len(set(row)) == m for row in pred.tolist())


def _hand_topm(logits: np.ndarray, m: int) -> np.ndarray:
    return np.argsort(-logits, axis=-1, kind="stable")[:, :m]


def test_mixtral_gate_input_lookahead_by_hand():
    model = _model("mixtral")
    rec = RoutingRecorder(model, lookahead=2, lookahead_m=3)
    out, inputs = _run_with_probes(rec, rec._routers, "input")
    keep = _batch()[1].reshape(-1).bool()
    for d in (1, 2):
        col = out[f"lookahead_gate_input_d{d}"]
        for j in range(rec.spec.num_moe_layers - d):
            w = rec._routers[j + d].weight.detach().numpy()
            expect = _hand_topm(inputs[j][keep].numpy() @ w.T, 3)
            np.testing.assert_array_equal(col[:, j], expect)


@pytest.mark.parametrize("family", ["mixtral", "jamba", "dbrx"])
def test_residual_lookahead_by_hand(family):
    """Residual after decoder layer l, normalised by hand with layer l+d's pre-MoE norm weights."""
    model = _model(family)
    rec = RoutingRecorder(model, lookahead=1, lookahead_m=3)
    layers = [model.get_submodule(p.rsplit(".", 1)[0]) for p in rec.spec.module_paths]
    out, resid = _run_with_probes(rec, layers, "output")
    keep = _batch()[1].reshape(-1).bool()
    col = out["lookahead_residual_d1"]
    for j in range(rec.spec.num_moe_layers - 1):
        x = resid[j][keep].double().numpy()
        norm = rec._plan.norms[j + 1]
        if family == "dbrx":  # LayerNorm without bias
            xn = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.eps)
        else:  # RMSNorm
            xn = x / np.sqrt((x**2).mean(-1, keepdims=True) + norm.variance_epsilon)
        xn = xn * norm.weight.detach().double().numpy()
        router = rec._routers[j + 1]
        w = (router.layer.weight if family == "dbrx" else router.weight).detach().double().numpy()
        np.testing.assert_array_equal(col[:, j], _hand_topm(xn @ w.T, 3))
    assert (col[:, -1] == missing_id(8)).all()


def test_deepseek_v3_lookahead_keeps_the_biased_group_choice_first():
    model = _model("deepseek_v3")
    rec = RoutingRecorder(model, lookahead=1, lookahead_m=4)
    out, inputs = _run_with_probes(rec, rec._routers, "input")
    keep = _batch()[1].reshape(-1).bool()
    cfg = model.config
    size = cfg.n_routed_experts // cfg.n_group
    col = out["lookahead_gate_input_d1"]
    for j in range(rec.spec.num_moe_layers - 1):
        gate = rec._routers[j + 1]
        x = inputs[j][keep].double().numpy()
        s = 1 / (1 + np.exp(-(x @ gate.weight.detach().double().numpy().T)))
        s = s + gate.e_score_correction_bias.double().numpy()
        for t in range(len(s)):
            group_score = [sum(sorted(s[t, g * size : (g + 1) * size])[-2:]) for g in range(cfg.n_group)]
            best = np.argsort(group_score)[::-1][: cfg.topk_group]
            allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
            first = sorted(sorted(allowed, key=lambda e: -s[t, e])[:2], key=lambda e: -s[t, e])
            rest = [e for e in np.argsort(-s[t], kind="stable") if e not in first][:2]
            assert col[t, j].tolist() == first + rest


def test_lookahead_columns_shapes_and_sentinel():
    model = _model("mixtral")
    rec = RoutingRecorder(model, lookahead=2, lookahead_m=3)
    assert rec.lookahead_columns == [
        "lookahead_gate_input_d1",
        "lookahead_gate_input_d2",
        "lookahead_residual_d1",
        "lookahead_residual_d2",
    ]
    out = rec.run(*_batch())
    sentinel = missing_id(8)
    for name in rec.lookahead_columns:
        d = int(name[-1])
        arr = out[name]
        assert arr.shape == (10, 4, 3) and arr.dtype == np.uint8
        assert (arr[:, 4 - d :] == sentinel).all()
        assert (arr[:, : 4 - d] < 8).all()


@pytest.mark.parametrize("family", ["deepseek_v3", "jetmoe", "llama4_text", "dbrx"])
def test_lookahead_does_not_change_the_recorded_routing(family):
    model = _model(family)
    plain = RoutingRecorder(model).run(*_batch())
    ahead = RoutingRecorder(model, lookahead=1, lookahead_m=3).run(*_batch())
    np.testing.assert_array_equal(plain["experts"], ahead["experts"])
    np.testing.assert_array_equal(plain["weights"], ahead["weights"])


def test_extend_ranking_keeps_the_routers_set_first():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3]])
    chosen = torch.tensor([[2, 1]])  # a biased/grouped router may choose outside the top scores
    assert extend_ranking(scores, chosen, 2).tolist() == [[2, 1]]
    assert extend_ranking(scores, chosen, 4).tolist() == [[2, 1, 0, 3]]
