"""Config-faithful miniatures of the seed models: real routing structure, tiny widths, random weights.

A miniature keeps everything that decides routing from the published config (family, layer count,
which layers are dense, expert count, top-k, shared experts, ``norm_topk_prob``, ``topk_method``,
``scoring_func``, ``routed_scaling_factor``, groups, rope settings) and shrinks only the widths:
hidden size, FFN sizes, head dimensions, MLA ranks, and the vocabulary (512, with an offline
byte-level tokenizer). Capture, analysis and prediction can then run on every seed model on a CPU in
seconds, with the same tensor shapes per token (L MoE layers x k of E experts) as the real model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError
from moescope.models.registry import HUB_IDS, load_config, load_config_dict, resolve_shipped

MINI_VOCAB = 512  # the byte tokenizer (4 specials + 256 bytes) fits, and embeddings stay tiny
BYTE_VOCAB = 260  # ids the byte tokenizer uses: every byte, losslessly
MIN_HEADS = 4

SEEDS: dict[str, str] = {
    "mini-mixtral-8x7b": "mixtral-8x7b",
    "mini-tinymistral-6x248m": "tinymistral-6x248m",
    "mini-deepseek-v2-lite": "deepseek-v2-lite",
    "mini-qwen3-30b-a3b": "qwen3-30b-a3b",
}


def _resolve(name: str) -> str:
    """``mini-mixtral-8x7b`` or ``mixtral-8x7b`` -> ``mini-mixtral-8x7b``; ConfigError otherwise."""
    key = name.strip().lower()
    if key in SEEDS:
        return key
    shipped = resolve_shipped(key)
    if shipped is not None and f"mini-{shipped}" in SEEDS:
        return f"mini-{shipped}"
    raise ConfigError(f"no miniature named '{name}'; available: {', '.join(SEEDS)}")


def _round4(x: float) -> int:
    return max(4, 4 * round(x / 4))


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def miniature_config(name: str, hidden_size: int = 64, vocab_size: int = MINI_VOCAB) -> Any:
    """The transformers config of a miniature: the seed's published config with only widths shrunk.

    Widths scale by ``hidden_size / real hidden size``. Heads become ``max(4, group size)`` with the
    real grouped-query ratio kept; per-head sizes scale so that heads x head_dim keeps its ratio to
    the hidden size (Qwen3's 2x included).
    """
    mini = _resolve(name)
    real = load_config_dict(SEEDS[mini])
    heads, kv = real["num_attention_heads"], real.get("num_key_value_heads") or real["num_attention_heads"]
    group = heads // kv
    mini_heads = min(heads, max(MIN_HEADS, group))
    if hidden_size < 16 or hidden_size % mini_heads:
        raise ConfigError(
            f"hidden_size={hidden_size} must be >= 16 and a multiple of {mini_heads} for {mini}"
        )
    if vocab_size < BYTE_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size} is too small for the byte tokenizer (needs >= 259)")
    ratio = hidden_size / real["hidden_size"]
    per_head = ratio * heads / mini_heads  # scale of each head's width

    fields = dict(real)
    fields.update(
        hidden_size=hidden_size,
        num_attention_heads=mini_heads,
        num_key_value_heads=mini_heads // group,
        intermediate_size=_round4(real["intermediate_size"] * ratio),
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=real.get("tie_word_embeddings", False),
    )
    if real.get("head_dim"):
        fields["head_dim"] = _even(real["head_dim"] * per_head)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if real.get(key):
            fields[key] = _round4(real[key] * ratio)
    if "kv_lora_rank" in real:  # DeepSeek MLA: latent ranks scale with the width, per-head dims per head
        fields["kv_lora_rank"] = _round4(real["kv_lora_rank"] * ratio)
        if real.get("q_lora_rank") is not None:
            fields["q_lora_rank"] = _round4(real["q_lora_rank"] * ratio)
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            fields[key] = _even(real[key] * per_head)
    fields.pop("torch_dtype", None)
    fields.pop("transformers_version", None)
    cfg = load_config(fields)
    cfg.name_or_path = mini
    cfg.moescope_miniature_of = SEEDS[mini]  # recorded in config.to_dict(), hence in trace manifests
    return cfg


def miniature(name: str, hidden_size: int = 64, seed: int = 0) -> Any:
    """A random-weight miniature of a seed model, in eval mode (see :func:`miniature_config`).

    The same ``name``, ``hidden_size`` and ``seed`` give the same weights; the caller's torch RNG
    state is left untouched.

    Examples
    --------
    >>> m = miniature("mini-mixtral-8x7b")
    >>> m.config.num_hidden_layers, m.config.num_local_experts, m.config.num_experts_per_tok
    (32, 8, 2)
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = miniature_config(name, hidden_size=hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


MINIATURES: dict[str, Callable[..., Any]] = {name: functools.partial(miniature, name) for name in SEEDS}


def shipped_without_weights(name: str) -> str | None:
    """Why ``name`` cannot load, when it is a shipped config name (``mixtral-8x7b``): only its config ships.

    The message points to its miniature (when one exists) and to the hub id; ``None`` for any other name.
    """
    key = name.strip().lower()
    if "/" in name or Path(name).exists() or key in SEEDS:
        return None
    shipped = resolve_shipped(key)
    if shipped is None:
        return None
    hint = f"'mini-{shipped}', " if f"mini-{shipped}" in SEEDS else ""
    return f"'{name}' is a shipped config without weights; use {hint}a local model directory or the hub id {HUB_IDS[shipped]}"
