"""Miniatures keep the seed models' routing structure, run forward, and route top-k of E for real."""

from __future__ import annotations

import pytest
import torch

from moescope.capture.runner import resolve_model
from moescope.errors import ConfigError
from moescope.models import byte_tokenizer
from moescope.models.miniatures import (
    BYTE_VOCAB,
    MINI_VOCAB,
    MINIATURES,
    miniature,
    miniature_config,
)
from moescope.models.params import count_parameters
from moescope.models.registry import load_config_dict

# Structure of each seed model, written out from its published config.json.
# (layers, MoE layer ids, routed experts, top-k, shared experts, dense FFN layer ids)
EXPECTED = {
    "mini-mixtral-8x7b": ("mixtral-8x7b", 32, list(range(32)), 8, 2, 0),
    "mini-tinymistral-6x248m": ("tinymistral-6x248m", 12, list(range(12)), 6, 2, 0),
    "mini-deepseek-v2-lite": ("deepseek-v2-lite", 27, list(range(1, 27)), 64, 6, 2),
    "mini-qwen3-30b-a3b": ("qwen3-30b-a3b", 48, list(range(48)), 128, 8, 0),
}
ROUTING_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_experts_per_tok",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "topk_method",
    "scoring_func",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "q_lora_rank",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


@pytest.fixture(scope="module")
def minis() -> dict[str, torch.nn.Module]:
    return {name: build() for name, build in MINIATURES.items()}


def test_names() -> None:
    assert set(MINIATURES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_keeps_routing_fields(name: str) -> None:
    seed = EXPECTED[name][0]
    real = load_config_dict(seed)
    cfg = miniature_config(name)
    mini = cfg.to_dict()
    for key in ROUTING_FIELDS:
        if key not in real:
            continue
        want = real[key]
        if key == "rope_theta":  # transformers 5 keeps rope settings in rope_parameters
            assert cfg.rope_parameters["rope_theta"] == want
        elif key == "rope_scaling":
            assert want is None or all(cfg.rope_parameters[k] == v for k, v in want.items())
        else:
            assert getattr(cfg, key) == want, key
    assert cfg.vocab_size == MINI_VOCAB and cfg.hidden_size == 64
    assert mini["moescope_miniature_of"] == seed
    # Grouped-query ratio kept, and the widths really are small.
    real_group = real["num_attention_heads"] // real["num_key_value_heads"]
    assert cfg.num_attention_heads // cfg.num_key_value_heads == real_group
    assert count_parameters(cfg).total < 40e6


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_module_structure_matches_seed(name: str, minis: dict) -> None:
    _, layers, moe_layers, experts, top_k, n_shared = EXPECTED[name]
    model = minis[name]
    blocks = _blocks(model)
    assert len(blocks) == layers
    assert not model.training
    found_moe = [i for i, b in enumerate(blocks) if hasattr(b.mlp, "experts")]
    assert found_moe == moe_layers
    for i in found_moe:
        mlp = blocks[i].mlp
        assert mlp.experts.gate_up_proj.shape[0] == experts
        assert mlp.gate.top_k == top_k
        shared = getattr(mlp, "shared_experts", None)
        if n_shared:
            cfg = model.config
            assert shared.gate_proj.out_features == n_shared * cfg.moe_intermediate_size
        else:
            assert shared is None
    for i in set(range(layers)) - set(moe_layers):
        assert hasattr(blocks[i].mlp, "gate_proj")  # a dense SwiGLU FFN


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_routes_top_k_of_e(name: str, minis: dict) -> None:
    _, _, moe_layers, experts, top_k, _ = EXPECTED[name]
    model, tok = minis[name], byte_tokenizer()
    enc = tok(["The router picks experts.", "Short."], return_tensors="pt", padding=True)
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(_module, args):
            seen[layer] = args[1]  # experts(hidden, top_k_index, top_k_weights)

        return hook

    blocks = _blocks(model)
    handles = [blocks[i].mlp.experts.register_forward_pre_hook(grab(i)) for i in moe_layers]
    try:
        with torch.no_grad():
            out = model(**enc)
    finally:
        for h in handles:
            h.remove()
    n_tokens = enc["input_ids"].numel()
    assert out.logits.shape == (*enc["input_ids"].shape, MINI_VOCAB)
    assert torch.isfinite(out.logits).all()
    assert sorted(seen) == moe_layers
    for idx in seen.values():
        assert idx.shape == (n_tokens, top_k)
        assert int(idx.min()) >= 0 and int(idx.max()) < experts
        assert all(len(set(row)) == top_k for row in idx.tolist())  # k distinct experts per token


def test_seed_determinism() -> None:
    a = miniature("mini-tinymistral-6x248m", seed=3)
    b = miniature("tinymistral-6x248m", seed=3)
    c = miniature("mini-tinymistral-6x248m", seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.gate.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_byte_tokenizer_round_trip() -> None:
    tok = byte_tokenizer()
    text = "Mixture-of-Experts: héllo wörld, 東京 ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one id per byte, no merges
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert max(ids) < BYTE_VOCAB <= MINI_VOCAB


def test_bad_miniature_arguments() -> None:
    with pytest.raises(ConfigError, match="mini-olmoe"):
        miniature_config("mini-olmoe")
    with pytest.raises(ConfigError, match="hidden_size=30"):
        miniature_config("mini-mixtral-8x7b", hidden_size=30)


def test_named_models_load(tmp_path) -> None:
    loaded = resolve_model("mini-tinymistral-6x248m", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    assert tok is not None and model.config.name_or_path == "mini-tinymistral-6x248m"
    with pytest.raises(ConfigError, match="mini-mixtral-8x7b"):
        resolve_model("mixtral-8x7b", device="cpu")
    with pytest.raises(ConfigError, match="does-not-exist"):
        resolve_model(str(tmp_path / "does-not-exist"), device="cpu")

    # A saved miniature reloads from its directory with the same outputs and its tokenizer.
    model.save_pretrained(tmp_path / "mini")
    tok.save_pretrained(tmp_path / "mini")
    again = resolve_model(str(tmp_path / "mini"), device="cpu", dtype="float32")
    again, tok2 = again.model, again.tokenizer
    ids = tok("same weights")["input_ids"]
    assert tok2(["same weights"])["input_ids"][0] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits)
