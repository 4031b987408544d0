"""Tiny random MoE models of every supported family, built offline from configs.

They exist for tests, demos and benchmarks: each has 3-4 decoder layers, hidden size 32, 8 experts
and top-2 routing, and dense layers wherever the family allows them, so layer mapping by module
name is exercised. Weights are seeded, so the same call always gives the same model.
"""

from __future__ import annotations

from typing import Any

import torch

from moescope.errors import ConfigError

_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_DEEPSEEK_MLA: dict[str, Any] = {
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.5,
    "num_key_value_heads": 4,  # MLA expands keys to every head
}

#: Per-family config overrides on top of ``_BASE``. Each gives E=8, k=2 and, where the family has
#: them, dense layers, shared experts and bias-corrected or grouped routing.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [1],
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "head_dim": 8,
        "norm_topk_prob": True,
    },
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v2": {
        **_DEEPSEEK_MLA,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
    },
    "deepseek_v3": {
        **_DEEPSEEK_MLA,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
    },
    "glm4_moe": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "head_dim": 8,
        "partial_rotary_factor": 0.5,
    },
    "ernie4_5_moe": {
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_intermediate_size": 16,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 3,
        "moe_layer_interval": 1,
        "head_dim": 8,
    },
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "granitemoeshared": {"num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 32},
    "jamba": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "mamba_d_state": 4,
        "mamba_d_conv": 2,
        "mamba_expand": 2,
        "mamba_dt_rank": 4,
        "use_mamba_kernels": False,
    },
    "gpt_oss": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    },
    "dbrx": {
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 3,
        "max_seq_len": 256,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "llama4_text": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size_mlp": 32,
        "interleave_moe_layer_step": 2,
        "head_dim": 8,
        "attention_chunk_size": 64,
    },
    "jetmoe": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "kv_channels": 8,
        "num_key_value_heads": 4,
    },
}

#: Families whose routers select with a bias (the tiny model gets a non-zero one).
_BIAS_BUFFERS = ("e_score_correction_bias",)


def tiny_config(family: str, **overrides: Any):
    """The transformers config of a tiny random ``family`` model (``model_type``), with overrides."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ConfigError(
            f"no tiny model for model_type {family!r}; known: {', '.join(sorted(TINY_CONFIGS))}"
        )
    kwargs = {**_BASE, **TINY_CONFIGS[family], **overrides}
    if family == "dbrx":
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            kwargs.pop(key, None)
    try:
        return AutoConfig.for_model(family, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"cannot build a tiny {family!r} config: {exc}") from exc


def tiny_model(
    family: str, *, seed: int = 0, experts_implementation: str = "eager", **overrides: Any
) -> torch.nn.Module:
    """An eval-mode, float32 causal LM of ``family`` with seeded random weights.

    Routers that select with a correction bias (DeepSeek-V3, GLM4-MoE, Ernie4.5) get a non-zero
    bias, so tests exercise the path where naive ``topk(logits)`` is wrong.
    ``experts_implementation`` picks the transformers experts kernel (``eager``, ``batched_mm``,
    ``grouped_mm``); capture must not depend on it.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as exc:  # e.g. an experts implementation the family does not offer
        raise ConfigError(f"cannot build a tiny {family!r} model: {exc}") from exc
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
            if name.rsplit(".", 1)[-1] in _BIAS_BUFFERS:
                buf.copy_(torch.rand(buf.shape, generator=generator) * 0.6)
    return model.eval()
