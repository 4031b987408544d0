"""The capture engine records the routing each MoE block really consumed, for every family.

Every check is independent of the engine's own code path: captured ids and weights are fed back
into the model's experts module (or a brute-force mixture for JetMoE) and must reproduce the
block's real output; captured logits must equal the model's own ``output_router_logits``.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch

from moescope.capture.engine import RoutingRecorder
from moescope.capture.tiny import TINY_CONFIGS, tiny_config, tiny_model
from moescope.core.families import resolve_adapter, supported_model_types
from moescope.core.routing import routing_spec
from moescope.errors import ConfigError, MoescopeError

torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend on a shared 2-core machine

FAMILIES = sorted(TINY_CONFIGS)
#: ``MOESCOPE_TEST_DEVICE=cuda`` runs these checks on the GPU (the models and the references move there).
DEVICE = os.environ.get("MOESCOPE_TEST_DEVICE", "cpu")

#: Decoder layers holding a MoE block in each tiny model, read off its config by hand.
EXPECTED_MOE_LAYERS = {
    "qwen2_moe": [0, 2, 3],  # mlp_only_layers=[1]
    "deepseek_v2": [1, 2, 3],  # first_k_dense_replace=1
    "deepseek_v3": [1, 2, 3],
    "glm4_moe": [1, 2, 3],
    "ernie4_5_moe": [1, 2, 3],  # moe_layer_start_index=1
    "jamba": [1, 3],  # expert_layer_period=2, offset=1
    "llama4_text": [1, 3],  # interleave_moe_layer_step=2
    "dbrx": [0, 1, 2],  # 3 blocks, all MoE
}


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family).to(DEVICE)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences of lengths 7, 4 and 2: full, left-padded, right-padded."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, 2:] = 0
    return (ids * mask).to(DEVICE), mask.to(DEVICE)


def _hook_io(module: torch.nn.Module, store: dict) -> torch.utils.hooks.RemovableHandle:
    def hook(mod, args, kwargs, out):
        store["input"] = (args[0] if args else kwargs["hidden_states"]).detach()
        store["output"] = (out[0] if isinstance(out, tuple) else out).detach()

    return module.register_forward_hook(hook, with_kwargs=True)


def _reference_output(family: str, block: torch.nn.Module, x: torch.Tensor, ids: np.ndarray, w: np.ndarray):
    """The routed expert output for tokens ``x`` (n, H) under the captured choice, computed outside the model."""
    fam = resolve_adapter(family)
    ids_t, w_t = torch.from_numpy(ids).long().to(x.device), torch.from_numpy(w).to(x.device)
    if fam.selection == "experts_call":
        return block.experts(x, ids_t, w_t).reshape(len(x), -1)
    if fam.selection == "router_dense_scores":  # Llama4: scores scale each expert's input
        E = block.experts.num_experts
        scores = torch.zeros(len(x), E, device=x.device).scatter(1, ids_t, w_t)
        routed_in = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
        return block.experts(routed_in).reshape(E, len(x), -1).sum(0)
    # JetMoE: brute-force mixture of GLU experts, plus the block's output bias
    w_in = block.input_linear.weight[ids_t]  # (n, k, 2I, H)
    w_out = block.output_linear.weight[ids_t]  # (n, k, H, I)
    gate, up = torch.einsum("nkoh,nh->nko", w_in, x).chunk(2, dim=-1)
    y = torch.einsum("nkhi,nki->nkh", w_out, block.activation(gate) * up)
    return (y * w_t[..., None]).sum(1) + block.bias


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_choice_reproduces_what_the_experts_computed(family):
    model = _model(family)
    rec = RoutingRecorder(model)
    fam = rec.family
    input_ids, mask = _batch()
    blocks = [model.get_submodule(p) for p in rec.spec.module_paths]
    probes = [{} for _ in blocks]
    # JetMoE has no experts module: probe the whole block. Llama4's experts see E scaled copies of
    # the tokens, so probe its router for the tokens and its experts for the output.
    targets = [b if fam.selection == "router_sorted" else b.experts for b in blocks]
    handles = [_hook_io(t, s) for t, s in zip(targets, probes, strict=True)]
    extra = [{} for _ in blocks]
    if fam.selection == "router_dense_scores":
        handles += [_hook_io(b.router, s) for b, s in zip(blocks, extra, strict=True)]
    try:
        out = rec.run(input_ids, mask)
    finally:
        for h in handles:
            h.remove()
    keep = mask.reshape(-1).bool()
    n, L, k = out["experts"].shape
    assert (n, L, k) == (int(mask.sum()), rec.spec.num_moe_layers, rec.spec.top_k)
    for j, block in enumerate(blocks):
        ids, w = out["experts"][:, j], out["weights"][:, j]
        assert all(len(set(row)) == k for row in ids.tolist()), "expert ids repeat within a token"
        if fam.selection == "router_dense_scores":
            E = block.experts.num_experts
            x = extra[j]["input"].reshape(-1, extra[j]["input"].shape[-1])[keep]
            real = probes[j]["output"].reshape(E, keep.numel(), -1)[:, keep].sum(0)
        else:
            x = probes[j]["input"].reshape(-1, probes[j]["input"].shape[-1])[keep]
            real = probes[j]["output"].reshape(keep.numel(), -1)[keep]
        with torch.no_grad():
            ref = _reference_output(family, block, x, ids, w)
        torch.testing.assert_close(ref, real, rtol=1e-4, atol=1e-5)
        # A wrong choice must not reproduce it: swap in the next expert for each token's first pick.
        wrong = ids.copy()
        wrong[:, 0] = (ids[:, 0] + 1) % rec.spec.num_experts
        clash = (wrong[:, :1] == ids[:, 1:]).any(1)
        wrong[clash, 0] = (ids[clash, 0] + 2) % rec.spec.num_experts
        with torch.no_grad():
            bad = _reference_output(family, block, x, wrong, w)
        assert not torch.allclose(bad, real, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_changes_or_adds_rows(family):
    model = _model(family)
    rec = RoutingRecorder(model)
    input_ids, mask = _batch()
    batched = rec.run(input_ids, mask)
    singles = [
        rec.run(input_ids[b][mask[b].bool()][None], torch.ones(1, int(mask[b].sum()))) for b in range(3)
    ]
    assert batched["experts"].shape[0] == int(mask.sum()) == sum(s["experts"].shape[0] for s in singles)
    np.testing.assert_array_equal(batched["experts"], np.concatenate([s["experts"] for s in singles]))
    np.testing.assert_allclose(batched["weights"], np.concatenate([s["weights"] for s in singles]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_mapped_by_name_and_dense_layers_absent(family):
    model = _model(family)
    spec = routing_spec(model)
    n_layers = spec.num_hidden_layers
    assert spec.moe_layers == EXPECTED_MOE_LAYERS.get(family, list(range(n_layers)))
    assert spec.family == family and spec.num_experts == 8 and spec.top_k == 2
    for layer, path in zip(spec.moe_layers, spec.module_paths, strict=True):
        assert f".{layer}." in path and hasattr(model.get_submodule(path), resolve_adapter(family).router)
    from_config = routing_spec(model.config)
    assert from_config.moe_layers == spec.moe_layers and from_config.module_paths == spec.module_paths
    assert from_config.n_shared_experts == spec.n_shared_experts


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f != "jetmoe"]
)  # jetmoe mixes in its attention routers
def test_logits_equal_the_models_router_logits(family):
    model = _model(family)
    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    input_ids, mask = _batch()
    out = rec.run(input_ids, mask)
    with torch.no_grad():
        ref = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            output_router_logits=True,
            use_cache=False,
        ).router_logits
    keep = mask.reshape(-1).bool()
    assert out["logits"].shape == (int(mask.sum()), rec.spec.num_moe_layers, 8)
    assert len(ref) == rec.spec.num_moe_layers
    for j, r in enumerate(ref):
        np.testing.assert_allclose(
            out["logits"][:, j], r.reshape(-1, 8)[keep].float().cpu().numpy(), rtol=1e-5, atol=1e-6
        )


def _layer_outputs(model, family) -> tuple[dict, list]:
    pattern = resolve_adapter(family).layer_pattern()
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if pattern.match(name):

            def hook(mod, args, out, name=name):
                store[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()

            handles.append(module.register_forward_hook(hook))
    return store, handles


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_leave_the_model_unchanged_and_are_removed(family):
    model = _model(family)
    input_ids, mask = _batch()
    before = _hook_counts(model)
    plain, handles = _layer_outputs(model, family)
    with torch.no_grad():
        model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        )
    plain = dict(plain)
    for h in handles:
        h.remove()
    rec = RoutingRecorder(model, logits=True, lookahead=1, lookahead_m=3)
    recorded, handles = _layer_outputs(model, family)
    rec.run(input_ids, mask)
    for h in handles:
        h.remove()
    assert plain.keys() == recorded.keys() and len(plain) == rec.spec.num_hidden_layers
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name
    assert _hook_counts(model) == before
    with rec:
        assert _hook_counts(model) > before
        with torch.no_grad():  # outside run() the hooks record nothing and raise nothing
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError), rec:
        raise RuntimeError("boom")
    assert _hook_counts(model) == before


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_biased_routers_are_recorded_not_recomputed(family):
    model = _model(family)
    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    out = rec.run(*_batch())
    naive = np.argsort(-out["logits"], axis=-1)[..., : rec.spec.top_k]
    same = (np.sort(naive, -1) == np.sort(out["experts"], -1)).all(-1)
    assert not same.all(), "naive topk(logits) matched every token: the bias path is not exercised"


def test_deepseek_v3_choice_follows_bias_and_groups():
    """Brute force of DeepSeek-V3's rule, written plainly: the captured set is what it picks."""
    model = _model("deepseek_v3")
    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    out = rec.run(*_batch())
    cfg = model.config
    for j, path in enumerate(rec.spec.module_paths):
        bias = model.get_submodule(path).gate.e_score_correction_bias.cpu().numpy()
        s = 1 / (1 + np.exp(-out["logits"][:, j].astype(np.float64))) + bias
        size = cfg.n_routed_experts // cfg.n_group
        for t in range(len(s)):
            groups = [sorted(s[t, g * size : (g + 1) * size])[-2:] for g in range(cfg.n_group)]
            best = np.argsort([-sum(v) for v in groups], kind="stable")[: cfg.topk_group]
            allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
            pick = sorted(allowed, key=lambda e: -s[t, e])[: cfg.num_experts_per_tok]
            assert set(pick) == set(out["experts"][t, j].tolist())
        raw = 1 / (1 + np.exp(-out["logits"][:, j].astype(np.float64)))
        chosen = np.take_along_axis(raw, out["experts"][:, j], 1)
        expect = chosen / chosen.sum(1, keepdims=True) * cfg.routed_scaling_factor
        np.testing.assert_allclose(out["weights"][:, j], expect, rtol=1e-5)


def test_mixtral_weights_are_renormalised_softmax():
    model = _model("mixtral")
    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    out = rec.run(*_batch())
    p = np.exp(out["logits"] - out["logits"].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = -np.sort(-p, axis=-1)[..., :2]
    np.testing.assert_allclose(out["weights"], top / top.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(out["experts"], np.argsort(-p, axis=-1, kind="stable")[..., :2])


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_capture_does_not_depend_on_the_experts_kernel(family, impl):
    eager = RoutingRecorder(_model(family)).run(*_batch())
    other = RoutingRecorder(tiny_model(family, experts_implementation=impl).to(DEVICE)).run(*_batch())
    np.testing.assert_array_equal(other["experts"], eager["experts"])
    np.testing.assert_allclose(other["weights"], eager["weights"], atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "llama4_text"])
def test_bfloat16_models_are_recorded(family):
    model = tiny_model(family).to(DEVICE, torch.bfloat16)
    rec = RoutingRecorder(model, logits=True, lookahead=1)
    out = rec.run(*_batch())
    assert rec.spec.dtype == "bfloat16"
    assert out["weights"].dtype == np.float32 and out["logits"].dtype == np.float16
    assert np.isfinite(out["weights"]).all() and out["experts"].max() < 8
    assert out["experts"].shape == (13, rec.spec.num_moe_layers, 2)  # 7 + 4 + 2 valid tokens


def test_unknown_family_lists_supported():
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match=r"model_type 'llama' has no capture adapter; supported: .*mixtral"):
        routing_spec(AutoConfig.for_model("llama"))
    assert "deepseek_v3" in supported_model_types()


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no MoE layer"):
        routing_spec(tiny_config("qwen2_moe", mlp_only_layers=[0, 1, 2, 3]))
    model = _model("mixtral")
    with pytest.raises(ConfigError, match="lookahead_m"):
        RoutingRecorder(model, lookahead=1, lookahead_m=1)
    with pytest.raises(ConfigError, match="logits_dtype"):
        RoutingRecorder(model, logits_dtype="int8")
    with pytest.raises(ConfigError, match="lookahead=4 must be smaller"):
        RoutingRecorder(model, lookahead=4)
    ids, mask = _batch()
    with pytest.raises(ConfigError, match=r"\(batch, seq\)"):
        RoutingRecorder(model).run(ids[0], mask[0])
    model.train()
    try:
        with pytest.raises(ConfigError, match="training mode"):
            RoutingRecorder(model).run(ids, mask)
    finally:
        model.eval()
    assert issubclass(ConfigError, MoescopeError)


def test_shape_mismatch_with_config_is_refused():
    """A router that selects more experts than the config says must not pass silently."""
    model = tiny_model("mixtral")
    model.model.layers[2].mlp.gate.top_k = 3
    with pytest.raises(
        ConfigError,
        match=r"model\.layers\.2\.mlp: captured top_k_index has shape \(21, 3\), expected \(21, 2\)",
    ):
        RoutingRecorder(model).run(*_batch())


def test_tiny_models_are_deterministic_and_finite():
    a, b = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    bias = _model("deepseek_v3").model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    out = RoutingRecorder(_model("gpt_oss")).run(*_batch())
    assert np.isfinite(out["weights"]).all() and not math.isnan(float(out["weights"].sum()))


def test_old_transformers_is_refused_with_upgrade_hint():
    from moescope.capture.engine import check_transformers_version

    with pytest.raises(ConfigError, match=r"transformers 4\.57\.1 is too old.*>= 5\.19.*pip install -U"):
        check_transformers_version("4.57.1")
    with pytest.raises(ConfigError, match=r"5\.18\.0 is too old"):
        check_transformers_version("5.18.0")
    check_transformers_version("5.19.0")
    check_transformers_version()  # the installed one is new enough
