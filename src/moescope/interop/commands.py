"""CLI: ``moescope import`` and ``moescope export``."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from moescope.cli_utils import JsonOpt, OverwriteOpt, TraceArg, emit
from moescope.interop import EXPORT_FORMATS, FORMAT_ALIASES, IMPORT_FORMATS, known_models


def _choices(table: dict[str, tuple[str, str]]) -> dict[str, str]:
    names = [*table, *(a for a, n in FORMAT_ALIASES.items() if n in table)]
    return {n.replace("-", "_"): n for n in names}


ImportFormat = enum.Enum("ImportFormat", _choices(IMPORT_FORMATS), type=str)
ExportFormat = enum.Enum("ExportFormat", _choices(EXPORT_FORMATS), type=str)


class ShortSeries(str, enum.Enum):
    mask = "mask"
    keep_prefix = "keep-prefix"


def register(app: typer.Typer) -> None:
    app.command("import", help=_import_help())(import_cmd)
    app.command("export", help=_export_help())(export_cmd)


def _listing(table: dict[str, tuple[str, str]]) -> str:
    alias = {n: a for a, n in FORMAT_ALIASES.items()}
    return "\n\n".join(
        f"  {name}{f' (alias {alias[name]})' if name in alias else ''}: {desc}"
        for name, (_, desc) in table.items()
    )


def _import_help() -> str:
    return (
        "Read routing logs of other tools into a trace, so every analysis and predictor runs on them.\n\n"
        f"Formats:\n\n{_listing(IMPORT_FORMATS)}\n\n"
        "Records that are missing, duplicated or out of order are counted and reported (first examples"
        " named), never shifted: a (document, layer) series that cannot be placed token by token is"
        " stored as missing and listed in the manifest's source section. Layouts: docs/interop.md.\n\n"
        "Example: moescope import routing-records-jsonl humaneval_2_routing.jsonl -o runs/mixtral-he"
        " --text humaneval_2_outputs.jsonl --tokenizer mistral-common:tokenizer.model.v1\n\n"
        "Example: moescope import moe-beyond training_data_eamc_prompts_0001-1000.tar.xz -o runs/dsv2-puffin\n\n"
        "Example: moescope import sglang-expert-distribution dumps/ -o runs/sglang --model qwen3-30b-a3b\n\n"
        "Example: moescope import tensorrt-llm-expert-statistic expert_statistic/ -o runs/trt --num-experts 64"
    )


def _export_help() -> str:
    return (
        "Write a trace in a format the seed documents' scripts and notebooks read.\n\n"
        f"Formats:\n\n{_listing(EXPORT_FORMATS)}\n\n"
        "Importing what was exported gives back the same routing for every field the format holds.\n\n"
        "Example: moescope export token-journeys-jsonl runs/mixtral-he -o journeys/ --documents 0 --tokens 0 10\n\n"
        "Example: moescope export router-logger-json runs/dsv2 -o dsv2_lambada_internal_routing.json"
    )


def import_cmd(
    format: ImportFormat = typer.Argument(..., help="Log format (see the list above).", show_default=False),
    paths: list[Path] = typer.Argument(
        ..., help="Log files, folders of them, or archives.", show_default=False
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Trace directory to create.", show_default=False),
    model: str | None = typer.Option(
        None,
        "--model",
        help=f"Routing facts of a known model ({', '.join(known_models())}) or 'none'. Default: mixtral-8x7b for"
        " the seed 004 formats, deepseek-v2-lite for moe-beyond, none otherwise (router-logger-json matches its"
        " 'config').",
    ),
    num_experts: int | None = typer.Option(None, "--num-experts", help="Routed experts per MoE layer."),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Experts chosen per token (default: the log's row width)."
    ),
    moe_layers: str | None = typer.Option(
        None, "--moe-layers", help="Decoder-layer indices of the MoE layers, e.g. '1-26' or '0,2,4'."
    ),
    family: str | None = typer.Option(
        None, "--family", help="Model family (transformers model_type) to record."
    ),
    n_shared_experts: int | None = typer.Option(
        None, "--shared-experts", help="Always-active shared experts (not in the log) to record."
    ),
    num_hidden_layers: int | None = typer.Option(
        None, "--num-hidden-layers", help="Decoder layers of the model, dense ones included."
    ),
    label: str | None = typer.Option(
        None,
        "--label",
        help="Domain label of every document (default: the log's data set name, else the file name).",
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="Rebuild token ids: a SentencePiece .model, a tokenizer.json, a folder with one, or"
        " mistral-common:tokenizer.model.v1 (moe-beyond, routing-records-jsonl with --text).",
    ),
    text: Path | None = typer.Option(
        None,
        "--text",
        help="routing-records-jsonl: outputs JSONL (problem_id, generated) whose tokens were routed.",
    ),
    short_series: ShortSeries = typer.Option(
        ShortSeries.mask,
        "--short-series",
        help="routing-records-jsonl: a series shorter than its document had a record dropped and later token_idx"
        " renumbered; 'mask' it whole, or 'keep-prefix' (only if records can only be lost at the end).",
    ),
    expert_map: Path | None = typer.Option(
        None,
        "--expert-map",
        help="Engines with redundant experts (SGLang EPLB, TensorRT-LLM load balancer): a (layers, physical)"
        " physical-to-logical map (.npy, .json or .pt) to map logged physical slots back to experts.",
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="flame-moe-parquet: tokens per training sequence (one document each)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace at --output."),
    json_out: JsonOpt = False,
) -> None:
    """Import routing logs into a trace (help text: ``_import_help``, with the formats and examples)."""
    from moescope.interop import import_log
    from moescope.interop.common import ImportReport

    options = {
        "model": model,
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_layers": moe_layers,
        "family": family,
        "n_shared_experts": n_shared_experts,
        "num_hidden_layers": num_hidden_layers,
        "label": label,
        "tokenizer": tokenizer,
        "text": text,
        "short_series": short_series.value,
        "expert_map": expert_map,
        "seq_len": seq_len,
    }
    tr = import_log(format.value, paths, output, overwrite=overwrite, **options)
    source = tr.manifest["source"]
    report = source["report"]
    r = tr.routing
    docs = sum(d.get("documents", 0) for d in tr.manifest.get("datasets", []))
    result = {
        "trace": str(output),
        "format": format.value,
        "tokens": tr.num_tokens,
        "documents": docs,
        "routing": r.to_dict(),
        "slot_order": r.slot_order,
        "issues": report["issues"],
        "examples": report["examples"],
        "masked_series_count": report["masked_series_count"],
        "masked_cells": report["masked_cells"],
        "masked_series": report["masked_series"],
        "notes": report["notes"],
        "counts_only": "counts" in tr.manifest,
    }
    text_out = (
        f"{output}: {result['tokens']} tokens in {docs} documents; top-{r.top_k} of {r.num_experts},"
        f" {r.num_moe_layers} MoE layers {r.moe_layers[0]}..{r.moe_layers[-1]}, slot order {result['slot_order']}"
    )
    if "counts" in tr.manifest:
        routed = max(tr.manifest["counts"]["tokens"], default=0)
        text_out += f"; counts only: {routed} tokens routed (busiest layer), no token rows"
    summary = ImportReport.from_dict(report).summary()
    emit(result, json_out, text=text_out + ("\n" + summary if summary else "\nno record problems"))


def export_cmd(
    format: ExportFormat = typer.Argument(
        ..., help="Output format (see the list above).", show_default=False
    ),
    trace: TraceArg = ...,
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="File (router-logger-json) or folder (token-journeys-jsonl) to write.",
        show_default=False,
    ),
    documents: str | None = typer.Option(
        None, "--documents", help="Only these document ids, e.g. '0,1' or '0-9' (default: all)."
    ),
    tokens: tuple[int, int] | None = typer.Option(
        None,
        "--tokens",
        help="token-journeys-jsonl: positions START END (END excluded), like extract_tokens.py.",
    ),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a trace (help text: ``_export_help``, with the formats and examples)."""
    from moescope.errors import ConfigError
    from moescope.interop import canonical_format, export_trace
    from moescope.interop.common import parse_index_list
    from moescope.trace.outputs import claim

    options: dict = {"overwrite": True}  # the output guard below decides what may be replaced
    if documents is not None:
        options["documents"] = parse_index_list(documents, "--documents")
    if tokens is not None:
        if canonical_format(format.value) != "token-journeys-jsonl":
            raise ConfigError(f"option --tokens does not apply to format {format.value!r}")
        options["tokens"] = tokens
    kind = "folder" if canonical_format(format.value) == "token-journeys-jsonl" else "file"
    with claim(output, kind, overwrite=overwrite, inputs=[trace]):
        result = export_trace(format.value, trace, output, **options)
    parts = ", ".join(f"{v} {k}" for k, v in result.items() if isinstance(v, int))
    emit(result, json_out, text=f"{output}: wrote {parts} ({format.value})")
