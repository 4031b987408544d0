"""Read routing logs of other tools into traces, and write traces in the formats seed scripts read.

>>> from moescope.interop import import_log, export_trace  # doctest: +SKIP
>>> tr = import_log("routing-records-jsonl", ["humaneval_2_routing.jsonl"], "runs/mixtral-he")  # doctest: +SKIP
>>> tr.manifest["source"]["report"]["masked_series_count"]  # doctest: +SKIP
27
>>> export_trace("token-journeys-jsonl", tr, "journeys/", documents=[0], tokens=(0, 10))  # doctest: +SKIP

Each format lives in its own module with its layout documented; ``docs/interop.md`` has them all.
Formats are named for what they are; the names the seed documents used are kept as aliases
(:data:`FORMAT_ALIASES`, e.g. ``seed002-json`` for ``router-logger-json``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError
from moescope.interop.common import ImportOptions, known_models, write_documents
from moescope.interop.records import SHORT_SERIES_POLICIES, find_short_series

#: Import formats: name -> (module, one-line description). Modules load only when used.
IMPORT_FORMATS: dict[str, tuple[str, str]] = {
    "router-logger-json": (
        "moescope.interop.seed002",
        "router-logger JSON (seed 002): samples[].layers[] with selected_experts, expert_weights, router logits",
    ),
    "token-journeys-jsonl": (
        "moescope.interop.seed004_journeys",
        "token journeys (seed 004): p<problem>_token_<i>.jsonl, one record per layer",
    ),
    "routing-records-jsonl": (
        "moescope.interop.seed004_routing",
        "raw routing records JSONL (seed 004): problem_id, layer, token_idx, experts, gating_probs",
    ),
    "moe-beyond": (
        "moescope.interop.moe_beyond",
        "MoE-Beyond CSVs (Layer ID,Batch Number,Token,Activated Expert IDs), files, folders or a .tar.xz",
    ),
    "vllm-replay": (
        "moescope.interop.vllm_replay",
        "vLLM routed-experts replay arrays (seq_len, moe_layers, top_k) in .npy / .npz files",
    ),
    "megatron-router-trace": (
        "moescope.interop.megatron",
        "Megatron-Core RouterTracer JSONL: step, layer, num_tokens, topk, top_indices (+ bf16 logits sidecar)",
    ),
    "vllm-routed-experts": (
        "moescope.interop.vllm",
        "vLLM routed experts: prompt_routed_experts + routed_experts from RequestOutput (.npz) or HTTP JSON",
    ),
    "sglang-expert-distribution": (
        "moescope.interop.sglang",
        "SGLang ExpertDistributionRecorder .pt dumps (per_token, per_pass, stat), read weights-only",
    ),
    "sglang-routed-experts": (
        "moescope.interop.sglang_routed",
        "SGLang return_routed_experts: base64 meta_info.routed_experts of /generate responses (JSON, JSONL)",
    ),
    "llama-cpp-moe-trace": (
        "moescope.interop.llama_cpp",
        "llama.cpp llama-moe-trace CSV: phase,token,layer,rank,expert (one row per routed activation)",
    ),
    "flame-moe-parquet": (
        "moescope.interop.flame",
        "FLAME-MoE-Traces Parquet: actives/iter_N/layer_NN.parquet (indices, scores) + samples/*.parquet",
    ),
    "tensorrt-llm-expert-statistic": (
        "moescope.interop.tensorrt_llm",
        "TensorRT-LLM expert statistics: meta_info.json + rank*.safetensors per-expert counts (counts only)",
    ),
}

#: Export formats: name -> (module, one-line description).
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "router-logger-json": (
        "moescope.interop.seed002",
        "router-logger JSON (seed 002 pipeline), one sample per document",
    ),
    "token-journeys-jsonl": (
        "moescope.interop.seed004_journeys",
        "token journeys (seed 004), one p<doc>_token_<pos>.jsonl per token",
    ),
}

#: The seed documents' names of the formats above (accepted wherever a format name is).
FORMAT_ALIASES: dict[str, str] = {
    "seed002-json": "router-logger-json",
    "seed004-journeys": "token-journeys-jsonl",
    "seed004-routing": "routing-records-jsonl",
}

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_ALIASES",
    "IMPORT_FORMATS",
    "SHORT_SERIES_POLICIES",
    "ImportOptions",
    "canonical_format",
    "export_trace",
    "find_short_series",
    "import_log",
    "known_models",
]


def canonical_format(name: str) -> str:
    """The format's own name for ``name`` (an alias such as ``seed002-json`` maps to ``router-logger-json``)."""
    return FORMAT_ALIASES.get(name, name)


def _module(name: str, table: dict[str, tuple[str, str]], what: str) -> Any:
    name = canonical_format(name)
    if name not in table:
        known = [*table, *(a for a, n in FORMAT_ALIASES.items() if n in table)]
        raise ConfigError(f"unknown {what} format {name!r}; known: {', '.join(known)}")
    return importlib.import_module(table[name][0])


def import_log(
    format: str,
    paths: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    **options: Any,
):
    """Import the routing log(s) ``paths`` in ``format`` into the trace directory ``out``.

    ``options`` are the fields of :class:`~moescope.interop.common.ImportOptions` that the format
    uses (others are refused, naming the option). Returns the opened :class:`~moescope.Trace`;
    what was wrong with the records (counts, first examples, masked series) is in
    ``trace.manifest["source"]["report"]``.
    """
    from moescope.trace.reader import Trace

    mod = _module(format, IMPORT_FORMATS, "import")
    names = {f.name: f.default for f in dataclasses.fields(ImportOptions)}
    for key, value in options.items():
        if key not in names:
            raise ConfigError(f"unknown import option {key!r}; known: {', '.join(names)}")
        if value is not None and value != names[key] and key not in mod.OPTIONS:
            raise ConfigError(f"option {key} does not apply to format {format!r}")
    from moescope.trace.outputs import claim

    opts = ImportOptions(**options)
    if isinstance(paths, str | Path):
        paths = [paths]
    left = f"{out} as it was (the import writes into a temporary folder the next import removes)"
    with claim(out, "trace", overwrite=overwrite, inputs=[*paths, opts.text, opts.expert_map], left=left):
        got = mod.read(list(paths), opts)
        write_documents(
            out,
            got.facts,
            got.documents,
            weights=got.weights,
            logits=got.logits,
            token_text=got.token_text,
            doc_loss=got.doc_loss,
            source=got.source,
            report=got.report,
            tokenizer=got.tokenizer,
            overwrite=overwrite,
            counts=got.counts,
        )
    return Trace.open(out)


def export_trace(format: str, trace: Any, out: str | Path, **options: Any) -> dict[str, Any]:
    """Write ``trace`` (a :class:`~moescope.Trace` or its path) to ``out`` in ``format``.

    Returns a summary (files written, documents, tokens). Options are the format's own, e.g.
    ``documents=[0, 1]``, ``tokens=(0, 10)`` and ``overwrite=True`` for ``token-journeys-jsonl``.
    """
    from moescope.trace.reader import Trace

    mod = _module(format, EXPORT_FORMATS, "export")
    if not isinstance(trace, Trace):
        trace = Trace.open(trace)
    return mod.export(trace, Path(out), **options)
