"""Parameter accounting from a config alone: total, active per token, and where the parameters sit.

Counts follow the module definitions of transformers 5.23 (``models/<family>/modeling_<family>.py``)
term by term, so ``ParamCount.total`` equals ``sum(p.numel() for p in model.parameters())`` of the
model transformers builds from the same config (tests check this for every family on tiny models).
Buffers are not parameters: DeepSeek-V3/GLM4-MoE ``e_score_correction_bias`` is a buffer and is
not counted (Ernie 4.5 stores it as a parameter, and it is counted under ``router``). Which decoder
layers are MoE layers is the family table's rule (:mod:`moescope.core.families`), the one capture
and ablation use, never retyped here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moescope.core.families import resolve_adapter
from moescope.errors import ConfigError
from moescope.models.registry import load_config

COMPONENTS = (
    "embeddings",
    "lm_head",
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "norms",
    "other",
)

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one model, split by component, with the routing facts needed for "active".

    ``lm_head`` is 0 when the head is tied to the embeddings (``tied_embeddings``), except for a
    head bias, which is never tied. ``shared_experts`` includes a shared-expert gate (Qwen2-MoE).
    ``norms`` holds every normalisation weight, the q/k and MLA latent norms included. ``other``
    holds Mamba mixers (Jamba). ``expert_params`` is the size of one routed expert, biases included.
    """

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    n_shared_experts: int
    expert_params: int
    tied_embeddings: bool
    embeddings: int = 0
    lm_head: int = 0
    attention: int = 0
    router: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    dense_mlp: int = 0
    norms: int = 0
    other: int = 0

    @property
    def components(self) -> dict[str, int]:
        """Component name -> parameter count, in the order of :data:`COMPONENTS`."""
        return {name: getattr(self, name) for name in COMPONENTS}

    @property
    def total(self) -> int:
        """Every parameter of the model (a tied embedding/head matrix counted once)."""
        return sum(self.components.values())

    @property
    def active(self) -> int:
        """Parameters one token uses: everything except the routed experts it is not sent to.

        The embedding table is counted in full, as Mixtral, Qwen and OLMoE publish their active counts.
        """
        return self.total - self.routed_experts + len(self.moe_layers) * self.top_k * self.expert_params

    @property
    def active_compute(self) -> int:
        """``active`` without the input embedding table (a lookup, not a matmul), DeepSeek's convention.

        A tied table stays in, because the LM head multiplies by it.
        """
        return self.active - (0 if self.tied_embeddings else self.embeddings)

    @property
    def router_per_layer(self) -> int:
        """Router parameters of one MoE layer (Mixtral: 8 x 4096 = 32,768; seed 003's "32,000")."""
        return self.router // max(len(self.moe_layers), 1)

    @property
    def expert_all_layers(self) -> int:
        """One expert index summed over every MoE layer (Mixtral: 32 x 176M = 5.64B; seed 003's "5.6
        Billion"): what "expert 3" weighs if it is thought of as one network through the model."""
        return self.expert_params * len(self.moe_layers)

    def memory(self) -> dict[str, dict[str, float]]:
        """Bytes per storage type: the whole model (to load it), the active set of one token (to hold
        what a token uses), one expert, and one expert index over all MoE layers."""
        return {
            dtype: {
                "load_model_bytes": self.total * b,
                "active_per_token_bytes": self.active * b,
                "expert_bytes": self.expert_params * b,
                "expert_all_layers_bytes": self.expert_all_layers * b,
            }
            for dtype, b in BYTES_PER_PARAM.items()
        }

    def expert_bytes(self, dtype: str = "bf16") -> float:
        """Bytes of one routed expert stored as ``dtype`` (what an offloading cache moves per miss)."""
        if dtype not in BYTES_PER_PARAM:
            raise ConfigError(f"dtype '{dtype}' is unknown; use one of {', '.join(BYTES_PER_PARAM)}")
        return self.expert_params * BYTES_PER_PARAM[dtype]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: components, totals and routing facts."""
        return {
            "model_type": self.model_type,
            "total": self.total,
            "active": self.active,
            "active_compute": self.active_compute,
            "components": self.components,
            "expert_params": self.expert_params,
            "expert_all_layers": self.expert_all_layers,
            "router_per_layer": self.router_per_layer,
            "memory": self.memory(),
            "num_layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "n_shared_experts": self.n_shared_experts,
            "tied_embeddings": self.tied_embeddings,
        }


@dataclass
class _Tally:
    """Mutable accumulator the family counters fill, frozen into a :class:`ParamCount` at the end."""

    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    moe_layers: list[int] = field(default_factory=list)

    def add(self, component: str, n: int) -> None:
        self.parts[component] += int(n)


def _linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _glu(hidden: int, inner: int, bias: bool = False) -> int:
    """A gate/up/down MLP (SwiGLU): three hidden x inner matrices, optional biases."""
    return _linear(hidden, inner, bias) * 2 + _linear(inner, hidden, bias)


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _kv_heads(cfg: Any) -> int:
    kv = getattr(cfg, "num_key_value_heads", None)
    return int(kv) if kv else cfg.num_attention_heads


def _gqa(cfg: Any, qkv_bias: bool, o_bias: bool) -> int:
    """q/k/v/o projections of (grouped-query) multi-head attention."""
    h, hd = cfg.hidden_size, _head_dim(cfg)
    q, kv = cfg.num_attention_heads * hd, _kv_heads(cfg) * hd
    return _linear(h, q, qkv_bias) + 2 * _linear(h, kv, qkv_bias) + _linear(q, h, o_bias)


def _mla(cfg: Any, t: _Tally) -> None:
    """DeepSeek multi-head latent attention: low-rank q (optional) and a shared k/v latent."""
    h, heads, bias = cfg.hidden_size, cfg.num_attention_heads, bool(cfg.attention_bias)
    qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        t.add("attention", _linear(h, heads * qk_head))
    else:
        t.add("attention", _linear(h, cfg.q_lora_rank, bias) + _linear(cfg.q_lora_rank, heads * qk_head))
        t.add("norms", cfg.q_lora_rank)
    t.add("attention", _linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias))
    t.add("norms", cfg.kv_lora_rank)
    t.add("attention", _linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)))
    t.add("attention", _linear(heads * cfg.v_head_dim, h, bias))


def _moe(t: _Tally, layer: int, num_experts: int, expert: int, router: int, shared: int = 0) -> None:
    t.moe_layers.append(layer)
    t.add("routed_experts", num_experts * expert)
    t.add("router", router)
    t.add("shared_experts", shared)


# ---- one counter per family: (cfg, tally) -> (num_experts, top_k, expert_params, n_shared) ----


def _mixtral_like(cfg: Any, t: _Tally, qkv_bias: bool, o_bias: bool) -> tuple[int, int, int, int]:
    """GQA families (Mixtral, PhiMoE, GraniteMoE) whose every layer is MoE with experts of ``intermediate_size``."""
    h, e = cfg.hidden_size, cfg.num_local_experts
    expert = _glu(h, cfg.intermediate_size)
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias, o_bias))
        _moe(t, i, e, expert, router=e * h)
    return e, cfg.num_experts_per_tok, expert, 0


def _mixtral(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size)
    return _mixtral_like(cfg, t, qkv_bias=False, o_bias=False)


def _granitemoe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size)
    bias = bool(cfg.attention_bias)
    return _mixtral_like(cfg, t, qkv_bias=bias, o_bias=bias)


def _granitemoeshared(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    e, k, expert, _ = _granitemoe(cfg, t)
    s = cfg.shared_intermediate_size
    if s:  # input_linear (h -> 2s) and output_linear (s -> h), no biases
        t.add(
            "shared_experts",
            cfg.num_hidden_layers * (_linear(cfg.hidden_size, 2 * s) + _linear(s, cfg.hidden_size)),
        )
    return e, k, expert, int(s > 0)


def _phimoe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * 2 * cfg.hidden_size)  # LayerNorm: weight and bias
    bias = bool(cfg.attention_bias)
    return _mixtral_like(cfg, t, qkv_bias=bias, o_bias=bias)


def _is_moe_layer(cfg: Any, i: int) -> bool:
    """Whether decoder layer ``i`` is a MoE layer: the family table's dense-layer rule."""
    return resolve_adapter(cfg.model_type).is_moe_layer(cfg, i)


def _qwen2_moe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e = cfg.hidden_size, cfg.num_experts
    expert = _glu(h, cfg.moe_intermediate_size)
    shared = _glu(h, cfg.shared_expert_intermediate_size) + _linear(h, 1)  # + sigmoid shared_expert_gate
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias=bool(cfg.qkv_bias), o_bias=False))
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h, shared=shared)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size))
    return e, cfg.num_experts_per_tok, expert, int(cfg.shared_expert_intermediate_size > 0)


def _qwen3_moe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e = cfg.hidden_size, cfg.num_experts
    expert = _glu(h, cfg.moe_intermediate_size)
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h + cfg.num_hidden_layers * 2 * _head_dim(cfg))
    for i in range(cfg.num_hidden_layers):
        bias = bool(cfg.attention_bias)
        t.add("attention", _gqa(cfg, qkv_bias=bias, o_bias=bias))
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size))
    return e, cfg.num_experts_per_tok, expert, 0


def _olmoe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e, layers = cfg.hidden_size, cfg.num_experts, cfg.num_hidden_layers
    # q_norm spans the hidden size; k_norm spans (hidden // heads) * kv_heads (modeling_olmoe.py)
    qk_norms = h + (h // cfg.num_attention_heads) * _kv_heads(cfg)
    t.add("norms", (2 * layers + 1) * h + layers * qk_norms)
    expert = _glu(h, cfg.intermediate_size)
    bias = bool(cfg.attention_bias)
    for i in range(layers):
        t.add("attention", _gqa(cfg, qkv_bias=bias, o_bias=bias))
        _moe(t, i, e, expert, router=e * h)
    return e, cfg.num_experts_per_tok, expert, 0


def _deepseek(cfg: Any, t: _Tally, mlp_bias: bool) -> tuple[int, int, int, int]:
    """DeepSeek-V2/V3: MLA everywhere; the first ``first_k_dense_replace`` layers dense, then MoE."""
    h, e = cfg.hidden_size, cfg.n_routed_experts
    expert = _glu(h, cfg.moe_intermediate_size)
    shared = (
        _glu(h, cfg.moe_intermediate_size * cfg.n_shared_experts, mlp_bias) if cfg.n_shared_experts else 0
    )
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)
    for i in range(cfg.num_hidden_layers):
        _mla(cfg, t)
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h, shared=shared)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size, mlp_bias))
    return e, cfg.num_experts_per_tok, expert, int(cfg.n_shared_experts or 0)


def _deepseek_v2(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    return _deepseek(cfg, t, mlp_bias=bool(cfg.mlp_bias))


def _deepseek_v3(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    return _deepseek(cfg, t, mlp_bias=False)


def _glm4_moe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e = cfg.hidden_size, cfg.n_routed_experts
    expert = _glu(h, cfg.moe_intermediate_size)
    shared = _glu(h, cfg.moe_intermediate_size * cfg.n_shared_experts)
    qk_norms = 2 * _head_dim(cfg) if cfg.use_qk_norm else 0
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h + cfg.num_hidden_layers * qk_norms)
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias=bool(cfg.attention_bias), o_bias=False))
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h, shared=shared)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size))
    return e, cfg.num_experts_per_tok, expert, int(cfg.n_shared_experts or 0)


def _ernie4_5_moe(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e, bias = cfg.hidden_size, cfg.moe_num_experts, bool(cfg.use_bias)
    expert = _glu(h, cfg.moe_intermediate_size)
    n_shared = cfg.moe_num_shared_experts or 0
    shared = _glu(h, cfg.moe_intermediate_size * n_shared, bias) if n_shared > 0 else 0
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias=bias, o_bias=bias))
        if _is_moe_layer(
            cfg, i
        ):  # router weight + e_score_correction_bias, an (1, E) parameter in moe_statics
            _moe(t, i, e, expert, router=e * h + e, shared=shared)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size, bias))
    return e, cfg.moe_k, expert, int(n_shared)


def _jamba(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e = cfg.hidden_size, cfg.num_experts
    expert = _glu(h, cfg.intermediate_size)
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)
    inner, rank, state = cfg.mamba_expand * h, cfg.mamba_dt_rank, cfg.mamba_d_state
    mamba = (
        inner * cfg.mamba_d_conv
        + (inner if cfg.mamba_conv_bias else 0)  # depthwise conv1d
        + _linear(h, 2 * inner, cfg.mamba_proj_bias)  # in_proj
        + _linear(inner, rank + 2 * state)  # x_proj
        + _linear(rank, inner, True)  # dt_proj
        + inner * state
        + inner  # A_log, D
        + _linear(inner, h, cfg.mamba_proj_bias)  # out_proj
        + rank
        + 2 * state  # dt/b/c layernorms inside the mixer
    )
    for i, kind in enumerate(cfg.layers_block_type):
        if kind == "attention":
            t.add("attention", _gqa(cfg, qkv_bias=False, o_bias=False))
        else:
            t.add("other", mamba)
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h)
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size))
    return e, cfg.num_experts_per_tok, expert, 0


def _gpt_oss(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    expert = _linear(h, 2 * f, True) + _linear(f, h, True)  # fused gate_up with bias, down with bias
    bias = bool(cfg.attention_bias)
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias=bias, o_bias=bias) + cfg.num_attention_heads)  # + sinks
        _moe(t, i, e, expert, router=_linear(h, e, True))
    return e, cfg.num_experts_per_tok, expert, 0


def _llama4_text(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    """Llama 4 text: MoE layers listed in ``moe_layers`` (a shared expert each), dense layers between."""
    h, e = cfg.hidden_size, cfg.num_local_experts
    expert = _linear(h, 2 * cfg.intermediate_size) + _linear(cfg.intermediate_size, h)
    bias = bool(cfg.attention_bias)
    t.add("norms", (2 * cfg.num_hidden_layers + 1) * h)  # the q/k L2 norm has no weight
    for i in range(cfg.num_hidden_layers):
        t.add("attention", _gqa(cfg, qkv_bias=bias, o_bias=bias))
        if _is_moe_layer(cfg, i):
            _moe(t, i, e, expert, router=e * h, shared=_glu(h, cfg.intermediate_size))
        else:
            t.add("dense_mlp", _glu(h, cfg.intermediate_size_mlp))
    return e, cfg.num_experts_per_tok, expert, 1


def _dbrx(cfg: Any, t: _Tally) -> tuple[int, int, int, int]:
    h, heads, ffn = cfg.d_model, cfg.n_heads, cfg.ffn_config
    head_dim, e = h // heads, ffn.moe_num_experts
    expert = _glu(h, ffn.ffn_hidden_size)  # w1, v1, w2 stored as (E * ffn, h) each
    t.add("norms", (2 * cfg.n_layers + 1) * h)  # LayerNorm without bias
    for i in range(cfg.n_layers):
        t.add("attention", _linear(h, h + 2 * cfg.attn_config.kv_n_heads * head_dim) + _linear(h, h))
        _moe(t, i, e, expert, router=e * h)
    return e, ffn.moe_top_k, expert, 0


_FAMILIES: dict[str, Callable[[Any, _Tally], tuple[int, int, int, int]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "ernie4_5_moe": _ernie4_5_moe,
    "phimoe": _phimoe,
    "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoeshared,
    "jamba": _jamba,
    "gpt_oss": _gpt_oss,
    "dbrx": _dbrx,
    "llama4_text": _llama4_text,
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# Families whose LM head carries a bias, and the config flag that turns it on.
_LM_HEAD_BIAS = {"ernie4_5_moe": "use_bias", "phimoe": "lm_head_bias"}


def count_parameters(config: Any) -> ParamCount:
    """Count a model's parameters from its config alone (no weights, no model instantiation).

    ``config`` is a transformers config, a config dict, a shipped name (``mixtral-8x7b``), a path to
    a config.json or a model directory. Raises :class:`ConfigError` for an unsupported family.

    Examples
    --------
    >>> pc = count_parameters("mixtral-8x7b")
    >>> round(pc.total / 1e9, 1), round(pc.active / 1e9, 1)
    (46.7, 12.9)
    """
    cfg = load_config(config)
    family = cfg.model_type
    if family not in _FAMILIES:
        raise ConfigError(
            f"model_type '{family}' has no parameter counter; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    t = _Tally()
    try:
        num_experts, top_k, expert, n_shared = _FAMILIES[family](cfg, t)
    except AttributeError as exc:
        raise ConfigError(f"{family} config lacks a field the counter needs ({exc})") from exc
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    t.add("embeddings", vocab * hidden)
    head_bias = bool(getattr(cfg, _LM_HEAD_BIAS.get(family, ""), False))
    t.add("lm_head", (0 if tied else vocab * hidden) + (vocab if head_bias else 0))
    return ParamCount(
        model_type=family,
        num_layers=int(cfg.num_hidden_layers),
        moe_layers=tuple(t.moe_layers),
        num_experts=int(num_experts),
        top_k=int(top_k),
        n_shared_experts=int(n_shared),
        expert_params=int(expert),
        tied_embeddings=tied,
        **t.parts,
    )


def expert_params(config: Any) -> int:
    """Parameters of one routed expert (multiply by bytes per parameter for expert bytes)."""
    return count_parameters(config).expert_params


@dataclass(frozen=True)
class Published:
    """A model's published parameter counts, the convention its active count uses, and the source."""

    total: float
    active: float
    active_convention: str  # "active" (embedding table included) or "active_compute" (excluded)
    source: str


# Published totals/actives of the shipped configs (FIELD-NOTES section 2; model cards and papers).
PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published(46.7e9, 12.9e9, "active", "Mixtral of Experts, arXiv 2401.04088"),
    "deepseek-v2-lite": Published(
        15.7e9, 2.4e9, "active_compute", "DeepSeek-V2, arXiv 2405.04434 (V2-Lite model card)"
    ),
    "qwen3-30b-a3b": Published(30.5e9, 3.3e9, "active", "Qwen3-30B-A3B model card"),
    "olmoe-1b-7b": Published(6.9e9, 1.3e9, "active", "OLMoE, arXiv 2409.02060"),
}


def compare_published() -> list[dict[str, Any]]:
    """Our counts beside the published ones for every shipped model that has published numbers."""
    rows = []
    for name, pub in PUBLISHED.items():
        pc = count_parameters(name)
        ours_active = getattr(pc, pub.active_convention)
        rows.append(
            {
                "model": name,
                "published_total": pub.total,
                "ours_total": pc.total,
                "total_rel_diff": pc.total / pub.total - 1.0,
                "published_active": pub.active,
                "ours_active": ours_active,
                "active_rel_diff": ours_active / pub.active - 1.0,
                "active_convention": pub.active_convention,
                "ours_active_with_embeddings": pc.active,
                "ours_active_compute": pc.active_compute,
                "source": pub.source,
            }
        )
    return rows
