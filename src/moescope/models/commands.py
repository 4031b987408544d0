"""CLI: ``moescope params``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from moescope.cli_utils import JsonOpt, emit
from moescope.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("params")(params)


def _b(n: float) -> str:
    """Human form of a parameter count: 46.70B, 248.1M, 12.3K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    """Human form of a byte count in binary units: 16.5 MiB, 9.0 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _count_text(source: str, doc: dict[str, Any], dtype: str) -> str:
    total = doc["total"]
    lines = [
        f"{source} ({doc['model_type']}): {_b(total)} total, {_b(doc['active'])} active per token "
        f"({_b(doc['active_compute'])} without the input embedding table)",
        f"{doc['num_layers']} layers, {len(doc['moe_layers'])} MoE, top-{doc['top_k']} of "
        f"{doc['num_experts']} routed experts, {doc['n_shared_experts']} shared; one expert "
        f"{_b(doc['expert_params'])} params = {_bytes(doc['expert_bytes'])} in {dtype}",
    ]
    for name, n in doc["components"].items():
        note = " (tied to embeddings)" if name == "lm_head" and doc["tied_embeddings"] else ""
        lines.append(f"  {name:<15} {n:>16,d}  {100 * n / total:5.1f}%{note}")
    n_moe = len(doc["moe_layers"])
    lines.append(
        f"router: {doc['router_per_layer']:,d} params per MoE layer ({doc['num_experts']} experts x hidden);"
        f" one expert over all {n_moe} MoE layers: {doc['expert_all_layers']:,d} ({_b(doc['expert_all_layers'])})"
    )
    lines.append(
        f"  {'memory':<8} {'load model':>12} {'active/token':>13} {'one expert':>11} {'expert x layers':>16}"
    )
    for dt, m in doc["memory"].items():
        lines.append(
            f"  {dt:<8} {_bytes(m['load_model_bytes']):>12} {_bytes(m['active_per_token_bytes']):>13}"
            f" {_bytes(m['expert_bytes']):>11} {_bytes(m['expert_all_layers_bytes']):>16}"
        )
    return "\n".join(lines)


def _published_text(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<18} {'total pub/ours':>18} {'diff':>7} {'active pub/ours':>18} {'diff':>7}  convention"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<18} {_b(r['published_total']):>8} / {_b(r['ours_total']):<7} "
            f"{100 * r['total_rel_diff']:+6.2f}% {_b(r['published_active']):>8} / {_b(r['ours_active']):<7} "
            f"{100 * r['active_rel_diff']:+6.2f}%  {r['active_convention']}"
        )
    return "\n".join(lines)


def params(
    config_or_model: Annotated[
        str | None,
        typer.Argument(
            help="Shipped config name (mixtral-8x7b, deepseek-v2-lite, qwen3-30b-a3b, olmoe-1b-7b, "
            "tinymistral-6x248m), a miniature (mini-mixtral-8x7b, ...), a config.json or a model directory.",
            show_default=False,
        ),
    ] = None,
    published: Annotated[
        bool,
        typer.Option(
            "--published", help="Compare our counts with the published ones for the shipped models."
        ),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Storage type for expert bytes: fp32, bf16, fp16, fp8, int8 or int4."),
    ] = "bf16",
    json_out: JsonOpt = False,
) -> None:
    """Count parameters from a config alone: total, active per token, and per component.

    Components: embeddings, lm_head (0 when tied), attention, router, routed_experts, shared_experts
    (with their gate), dense_mlp (dense layers), norms, other (Mamba mixers). No weights are loaded.

    Example: moescope params deepseek-v2-lite --json

    Example: moescope params --published
    """
    from moescope.models.params import BYTES_PER_PARAM, compare_published, count_parameters

    if dtype not in BYTES_PER_PARAM:
        raise ConfigError(f"--dtype '{dtype}' is unknown; use one of {', '.join(BYTES_PER_PARAM)}")
    if published:
        rows = compare_published()
        emit(rows, json_out, text=_published_text(rows))
        return
    if config_or_model is None:
        raise ConfigError(
            "give CONFIG_OR_MODEL (a shipped name, a config.json or a model directory) or --published"
        )
    from moescope.models.miniatures import MINIATURES, miniature_config

    source: Any = miniature_config(config_or_model) if config_or_model in MINIATURES else config_or_model
    pc = count_parameters(source)
    doc = {"source": config_or_model, **pc.to_dict(), "dtype": dtype, "expert_bytes": pc.expert_bytes(dtype)}
    emit(doc, json_out, text=_count_text(config_or_model, doc, dtype))
