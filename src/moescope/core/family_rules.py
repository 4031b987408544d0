"""The per-family rules the family table (:mod:`moescope.core.families`) points to.

Two kinds, each a plain function of a transformers config: which decoder layers are MoE layers
(``(config, layer) -> bool``; :mod:`moescope.models.params` counts with the same rules), and how a
router weights the experts it chose (``config -> WeightRule``; ablation re-routes with them). Facts
come from the transformers 5.23 modeling files. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def all_layers(config: Any, layer: int) -> bool:
    return True


def qwen_sparse(config: Any, layer: int) -> bool:
    # Qwen2/3-MoE decoder layer: `layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0`.
    only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer not in only and getattr(config, "num_experts", 0) > 0 and (layer + 1) % step == 0


def first_k_dense(config: Any, layer: int) -> bool:
    # DeepSeek-V2/V3, GLM4-MoE: `layer >= first_k_dense_replace`.
    return layer >= (getattr(config, "first_k_dense_replace", 0) or 0)


def ernie_interval(config: Any, layer: int) -> bool:
    # Ernie4.5-MoE: `(layer + 1) % moe_layer_interval == 0 and start <= layer <= end`.
    end = config.moe_layer_end_index
    end = config.num_hidden_layers - 1 if end is None or end < 0 else end
    return (layer + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= layer <= end


def jamba_period(config: Any, layer: int) -> bool:
    # Jamba: `layers_num_experts[layer] > 1`, i.e. `layer % expert_layer_period == expert_layer_offset`.
    return config.num_experts > 1 and layer % config.expert_layer_period == config.expert_layer_offset


def llama4_listed(config: Any, layer: int) -> bool:
    # Llama4: the config lists its MoE layers (derived from interleave_moe_layer_step).
    return layer in (config.moe_layers or [])


#: Per-expert score a router's weights are built from (see :class:`WeightRule`).
WEIGHT_SCORES = ("softmax", "sigmoid", "softmax_chosen", "sparsemixer")


@dataclass(frozen=True)
class WeightRule:
    """How a router turns its logits into the weights of the experts it chose.

    Ablation re-routes a token to another expert and must weight the new set exactly as the
    family would have: ``score`` is computed per expert from the logits (``softmax`` over all E,
    ``sigmoid``, ``softmax_chosen``: softmax over the chosen logits only, ``sparsemixer``: PhiMoE's
    eval-mode sparsemixer with threshold ``2 * jitter_eps``), gathered at the chosen ids, divided by
    ``max(norm_p-norm + norm_eps, norm_floor)`` when ``norm_p`` is set, then multiplied by ``scale``.
    """

    score: str = "softmax"
    norm_p: float | None = None
    norm_eps: float = 0.0
    norm_floor: float = 0.0
    scale: float = 1.0
    jitter_eps: float = 0.0


def w_renorm(config: Any) -> WeightRule:
    # Mixtral: softmax over E, top-k renormalised to sum 1.
    return WeightRule("softmax", norm_p=1)


def w_norm_topk(config: Any) -> WeightRule:
    # Qwen2/3-MoE, OLMoE: renormalised only when config.norm_topk_prob.
    return WeightRule("softmax", norm_p=1 if getattr(config, "norm_topk_prob", False) else None)


def w_scaled_softmax(config: Any) -> WeightRule:
    # DeepSeek-V2: softmax probabilities times routed_scaling_factor, never renormalised.
    return WeightRule("softmax", scale=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0))


def w_biased_sigmoid(config: Any) -> WeightRule:
    # DeepSeek-V3, GLM4-MoE: unbiased sigmoid scores, `/ (sum + 1e-20)` if norm_topk_prob, then scaled.
    norm = 1 if getattr(config, "norm_topk_prob", False) else None
    return WeightRule(
        "sigmoid",
        norm_p=norm,
        norm_eps=1e-20,
        scale=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
    )


def w_ernie(config: Any) -> WeightRule:
    # Ernie4.5-MoE: unbiased softmax, `/ clamp(sum, min=moe_norm_min)`.
    return WeightRule("softmax", norm_p=1, norm_floor=float(getattr(config, "moe_norm_min", 0.0) or 0.0))


def w_chosen(config: Any) -> WeightRule:
    # GraniteMoE, gpt-oss, JetMoE: softmax over the k chosen logits.
    return WeightRule("softmax_chosen")


def w_softmax(config: Any) -> WeightRule:
    # Jamba: softmax probabilities, not renormalised.
    return WeightRule("softmax")


def w_dbrx(config: Any) -> WeightRule:
    # DBRX: softmax probabilities divided by their p-norm, p = ffn_config.moe_normalize_expert_weights.
    ffn = getattr(config, "ffn_config", None)
    key = "moe_normalize_expert_weights"
    p = ffn.get(key) if isinstance(ffn, dict) else getattr(ffn, key, None)
    return WeightRule("softmax", norm_p=None if p is None else float(p))


def w_sigmoid(config: Any) -> WeightRule:
    # Llama4: sigmoid of the chosen logits, not renormalised.
    return WeightRule("sigmoid")


def w_sparsemixer(config: Any) -> WeightRule:
    # PhiMoE: sparsemixer in eval mode, threshold from router_jitter_noise.
    return WeightRule("sparsemixer", jitter_eps=float(getattr(config, "router_jitter_noise", 0.0) or 0.0))


def qwen2_shared(config: Any) -> int:
    return 1 if (getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0 else 0
