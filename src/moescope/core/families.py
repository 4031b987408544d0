"""How to find and read the routing of each transformers MoE family: one declarative table.

Each family is one frozen :class:`FamilySpec` row. It says where the MoE block sits in a decoder
layer, what its router and experts children are called, where the expert ids and weights the
model really used can be read, which output of the router holds the logits, how the router turns
logits into probabilities, which config keys give E, k and the shared experts, and which decoder
layers are dense. Everything family-specific lives here: capture, ablation, routing strategies,
parameter counting (:mod:`moescope.models.params`) and the importers' model presets
(:mod:`moescope.interop.common`) all read these rows; :mod:`moescope.core.routing` holds the
torch side (hooks, router decoding, weights). No torch import here.

Facts come from the transformers 5.23 modeling files (``models/<family>/modeling_<family>.py``)
and FIELD-NOTES section 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moescope.core import family_rules as R
from moescope.core.family_rules import WeightRule
from moescope.errors import ConfigError

#: Where the expert ids and weights the model consumed are read.
#: ``experts_call``: forward pre-hook on ``<block>.<experts>``, whose call carries
#: ``(hidden, top_k_index, top_k_weights)`` (every v5 family with an experts module).
#: ``router_dense_scores``: the router returns a dense ``(N, E)`` score matrix that is zero outside
#: the chosen experts and multiplies the expert inputs (Llama4).
#: ``router_sorted``: the router returns ScatterMoE-style expert-sorted assignments
#: ``(index_sorted, batch_index, batch_gates, expert_size, logits)`` that the block consumes (JetMoE).
SELECTION_KINDS = ("experts_call", "router_dense_scores", "router_sorted")

#: Score used to rank experts beyond the router's own top-k in gate lookahead: the router's
#: probability transform of the logits, plus its selection bias when it has one.
CHOICE_SCORES = ("logits", "softmax", "sigmoid")


@dataclass(frozen=True)
class FamilySpec:
    """One family's routing layout.

    Parameters
    ----------
    model_types : transformers ``model_type`` values this row serves.
    layers : module path of the decoder-layer list, relative to any prefix (``layers``, ``blocks``).
    prefix : that list's usual prefix in a causal LM, for module paths derived from a config alone.
    block : name of the MoE block inside a decoder layer (``mlp``, ``block_sparse_moe``, ...).
    router : name of the router inside the block.
    router_classes : class names the router must have, so a dense MLP is never taken for a block.
    experts : name of the experts module inside the block (``None`` when the family has none).
    selection : one of ``SELECTION_KINDS``: where the consumed ids and weights are read.
    index_arg, weights_arg : positions of ``top_k_index`` / ``top_k_weights`` in the experts call.
    index_kwarg, weights_kwarg : the same arguments' keyword names.
    router_ids : index of ``top_k_index`` in the router's output tuple (``None``: computed by
        ``block_route``), used by gate lookahead.
    block_route : name of a block method turning router logits into ``(weights, ids)`` when the
        router returns logits only (DBRX ``route_tokens_to_experts``).
    logits_index : index of the logits in the router's output tuple; ``None`` when the output
        is the logits tensor itself.
    router_kind : how logits become probabilities (``softmax``, ``sigmoid``, ``sparsemixer``).
    choice_score, choice_bias : ranking of experts beyond the router's top-k in lookahead: the
        transform in ``CHOICE_SCORES`` plus the selection-bias buffer at this router path, if any.
    num_experts_keys, top_k_keys : config attributes (dotted for sub-configs), first present wins.
    shared_keys : config attributes giving the shared-expert count; ``shared_rule`` overrides.
    is_moe_layer : the family's dense-layer rule, ``(config, decoder_layer) -> bool``.
    pre_moe_norm : the norm inside a decoder layer applied to the residual stream right before
        the MoE block (for the "residual" lookahead variant).
    weight_rule : ``config -> WeightRule``: how the router weights a chosen set (ablation re-route);
        ``None`` when unknown, and re-routing such a family is refused.
    unsupported : when set, the family is known but cannot be captured; the text says why.
    notes : what a user should know about this family's capture.
    """

    model_types: tuple[str, ...]
    block: str
    router: str
    router_classes: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    layers: str = "layers"
    prefix: str = "model."
    experts: str | None = "experts"
    selection: str = "experts_call"
    index_arg: int = 1
    weights_arg: int = 2
    index_kwarg: str = "top_k_index"
    weights_kwarg: str = "top_k_weights"
    router_ids: int | None = 2
    block_route: str | None = None
    logits_index: int | None = 0
    router_kind: str = "softmax"
    choice_score: str = "logits"
    choice_bias: str | None = None
    shared_keys: tuple[str, ...] = ()
    shared_rule: Callable[[Any], int] | None = None
    is_moe_layer: Callable[[Any, int], bool] = R.all_layers
    pre_moe_norm: str = "post_attention_layernorm"
    weight_rule: Callable[[Any], WeightRule] | None = None
    unsupported: str | None = None
    notes: str = ""

    @property
    def family(self) -> str:
        return self.model_types[0]

    def block_pattern(self) -> re.Pattern[str]:
        """Regex matching a MoE block's module path under any prefix; group 1 is the layer index."""
        return re.compile(rf"^(?:.*\.)?{re.escape(self.layers)}\.(\d+)\.{re.escape(self.block)}$")

    def layer_pattern(self) -> re.Pattern[str]:
        """Regex matching a decoder layer's module path; group 1 is its index."""
        return re.compile(rf"^(?:.*\.)?{re.escape(self.layers)}\.(\d+)$")


_STD = {"num_experts_keys": ("num_local_experts", "num_experts"), "top_k_keys": ("num_experts_per_tok",)}

#: The table. Order does not matter; each model_type appears once.
FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        ("mixtral",),
        block="mlp",
        router="gate",
        router_classes=("MixtralTopKRouter",),
        weight_rule=R.w_renorm,
        **_STD,
        notes="softmax over E, top-k renormalised",
    ),
    FamilySpec(
        ("qwen2_moe",),
        block="mlp",
        router="gate",
        router_classes=("Qwen2MoeTopKRouter",),
        weight_rule=R.w_norm_topk,
        **_STD,
        shared_rule=R.qwen2_shared,
        is_moe_layer=R.qwen_sparse,
        notes="one shared expert with a sigmoid gate; dense layers from mlp_only_layers/decoder_sparse_step",
    ),
    FamilySpec(
        ("qwen3_moe",),
        block="mlp",
        router="gate",
        router_classes=("Qwen3MoeTopKRouter",),
        weight_rule=R.w_norm_topk,
        **_STD,
        is_moe_layer=R.qwen_sparse,
    ),
    FamilySpec(
        ("olmoe",),
        block="mlp",
        router="gate",
        router_classes=("OlmoeTopKRouter",),
        weight_rule=R.w_norm_topk,
        **_STD,
    ),
    FamilySpec(
        ("deepseek_v2",),
        block="mlp",
        router="gate",
        router_classes=("DeepseekV2TopkRouter",),
        weight_rule=R.w_scaled_softmax,
        **_STD,
        shared_keys=("n_shared_experts",),
        is_moe_layer=R.first_k_dense,
        notes="greedy or group-limited greedy over softmax; weights scaled by routed_scaling_factor",
    ),
    FamilySpec(
        ("deepseek_v3",),
        block="mlp",
        router="gate",
        router_classes=("DeepseekV3TopkRouter",),
        weight_rule=R.w_biased_sigmoid,
        **_STD,
        router_kind="sigmoid",
        choice_score="sigmoid",
        choice_bias="e_score_correction_bias",
        shared_keys=("n_shared_experts",),
        is_moe_layer=R.first_k_dense,
        notes="sigmoid scores + e_score_correction_bias select within top groups; naive topk(logits) is wrong",
    ),
    FamilySpec(
        ("glm4_moe",),
        block="mlp",
        router="gate",
        router_classes=("Glm4MoeTopkRouter",),
        weight_rule=R.w_biased_sigmoid,
        **_STD,
        router_kind="sigmoid",
        choice_score="sigmoid",
        choice_bias="e_score_correction_bias",
        shared_keys=("n_shared_experts",),
        is_moe_layer=R.first_k_dense,
    ),
    FamilySpec(
        ("ernie4_5_moe",),
        block="mlp",
        router="gate",
        router_classes=("Ernie4_5_MoeTopKRouter",),
        weight_rule=R.w_ernie,
        **_STD,
        choice_score="softmax",
        choice_bias="moe_statics.e_score_correction_bias",
        shared_keys=("moe_num_shared_experts",),
        is_moe_layer=R.ernie_interval,
        notes="softmax + e_score_correction_bias selects; weights renormalised without the bias",
    ),
    FamilySpec(
        ("phimoe",),
        block="mlp",
        router="router",
        router_classes=("PhimoeTopKRouter",),
        weight_rule=R.w_sparsemixer,
        **_STD,
        router_kind="sparsemixer",
        notes="sparsemixer (top-2 only); eval-mode selection is deterministic",
    ),
    FamilySpec(
        ("granitemoe",),
        block="block_sparse_moe",
        router="router",
        router_classes=("GraniteMoeTopKRouter",),
        weight_rule=R.w_chosen,
        **_STD,
        notes="softmax over the top-k logits",
    ),
    FamilySpec(
        ("granitemoeshared",),
        block="block_sparse_moe",
        router="router",
        router_classes=("GraniteMoeSharedTopKRouter",),
        weight_rule=R.w_chosen,
        **_STD,
        shared_rule=lambda c: 1 if (getattr(c, "shared_intermediate_size", 0) or 0) > 0 else 0,
    ),
    FamilySpec(
        ("jamba",),
        block="feed_forward",
        router="router",
        router_classes=("JambaTopKRouter",),
        weight_rule=R.w_softmax,
        **_STD,
        is_moe_layer=R.jamba_period,
        pre_moe_norm="pre_ff_layernorm",
        notes="MoE every expert_layer_period layers; weights are unnormalised softmax probabilities",
    ),
    FamilySpec(
        ("gpt_oss",),
        block="mlp",
        router="router",
        router_classes=("GptOssTopKRouter",),
        weight_rule=R.w_chosen,
        **_STD,
        notes="router logits include a bias; softmax over the top-k logits",
    ),
    FamilySpec(
        ("dbrx",),
        layers="blocks",
        prefix="transformer.",
        block="ffn",
        router="router",
        router_classes=("DbrxRouter",),
        weight_rule=R.w_dbrx,
        num_experts_keys=("ffn_config.moe_num_experts",),
        top_k_keys=("ffn_config.moe_top_k",),
        router_ids=None,
        block_route="route_tokens_to_experts",
        logits_index=None,
        pre_moe_norm="norm_attn_norm.norm_2",
        notes="router returns logits only; the block's route_tokens_to_experts selects (p-norm weights)",
    ),
    FamilySpec(
        ("llama4_text",),
        block="feed_forward",
        router="router",
        router_classes=("Llama4Router",),
        weight_rule=R.w_sigmoid,
        **_STD,
        selection="router_dense_scores",
        router_ids=None,
        logits_index=1,
        router_kind="sigmoid",
        shared_rule=lambda c: 1,
        is_moe_layer=R.llama4_listed,
        notes="router returns (scores, logits); the dense sigmoid scores scale each expert's INPUT, "
        "so weights are those scores; one shared expert per MoE layer",
    ),
    FamilySpec(
        ("jetmoe",),
        block="mlp",
        router="router",
        router_classes=("JetMoeTopKGating",),
        weight_rule=R.w_chosen,
        **_STD,
        experts=None,
        selection="router_sorted",
        router_ids=None,
        logits_index=4,
        notes="only the MLP mixture is recorded; the attention mixture (MoA) routers are not",
    ),
)

_BY_TYPE: dict[str, FamilySpec] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    """Every model_type with an adapter row."""
    return sorted(t for t, f in _BY_TYPE.items() if f.unsupported is None)


def resolve_adapter(model_type: str) -> FamilySpec:
    """The adapter row for a transformers ``model_type``; unknown types raise :class:`ConfigError`."""
    spec = _BY_TYPE.get(model_type)
    if spec is None:
        raise ConfigError(
            f"model_type {model_type!r} has no capture adapter; supported: {', '.join(supported_model_types())}"
        )
    if spec.unsupported:
        raise ConfigError(f"model_type {model_type!r} cannot be captured: {spec.unsupported}")
    return spec


def config_value(config: Any, keys: tuple[str, ...], what: str) -> Any:
    """The first of ``keys`` (dotted paths into sub-configs) present on ``config``."""
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            return value
    raise ConfigError(
        f"config of model_type {getattr(config, 'model_type', '?')!r} has none of {list(keys)} for {what}"
    )


def text_config(config: Any) -> Any:
    """The language-model config of a composite model (Llama4 -> llama4_text), else the config."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    return text if text is not None else config


@dataclass(frozen=True)
class ConfigFacts:
    """The routing facts a config states, read through its family's row (no model, no torch)."""

    model_type: str
    num_experts: int
    top_k: int
    n_shared_experts: int
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    router_kind: str


def config_facts(config: Any) -> ConfigFacts:
    """E, k, shared experts, layer count and MoE layers of a transformers config, per its family's row."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ConfigError(f"cannot tell the model family: {type(config).__name__} has no model_type")
    fam = resolve_adapter(model_type)
    num_experts = int(config_value(config, fam.num_experts_keys, "the number of routed experts"))
    top_k = int(config_value(config, fam.top_k_keys, "top-k"))
    n_layers = int(config_value(config, ("num_hidden_layers", "n_layers"), "the number of layers"))
    if fam.shared_rule is not None:
        n_shared = fam.shared_rule(config)
    else:
        n_shared = int(config_value(config, fam.shared_keys, "shared experts")) if fam.shared_keys else 0
    return ConfigFacts(
        model_type=model_type,
        num_experts=num_experts,
        top_k=top_k,
        n_shared_experts=int(n_shared),
        num_hidden_layers=n_layers,
        moe_layers=tuple(i for i in range(n_layers) if fam.is_moe_layer(config, i)),
        router_kind=fam.router_kind,
    )
