"""SGLang ``return_routed_experts`` responses: base64 ``meta_info["routed_experts"]`` arrays.

With ``--enable-return-routed-experts`` on the server and ``return_routed_experts`` on a request,
SGLang's routed-experts capturer (``python/sglang/srt/layers/moe/routed_experts_capturer.py``,
``extract_routed_experts_from_meta_info``) returns ``meta_info["routed_experts"]``: the base64 of the
flattened ``(tokens, num_layers, top_k)`` id array, ``int32`` unless ``meta_info
["routed_experts_dtype"]`` names another. ``num_layers`` counts every decoder layer (dense ones hold
``-1``): give ``--num-hidden-layers`` (or ``--model``) so the MoE layers' columns are picked;
without it the rows are taken to hold the MoE layers only. Rows are prompt + completion - 1 tokens
(the last generated token is never fed back); ``meta_info["prompt_tokens"]`` rows are prefill.

Files: a ``/generate`` JSON response, a list of them, or JSONL with one per line. One document per
response; ``source.documents[i]["prefill_rows"]`` tells prefill rows (positions below it) from
decode rows. Checks as for every engine (:mod:`moescope.interop.engine_checks`): ``-1``/``255``
padding, shared experts logged as routed, ids out of range (error), the same response twice
(``duplicate_request``, counted once), a row count that is not prompt + completion - 1.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    default_label,
    expand_paths,
    iter_json_responses,
    resolve_facts,
)
from moescope.interop.engine_checks import clean_layers

NAME = "sglang-routed-experts"
DESCRIPTION = (
    "SGLang return_routed_experts: base64 meta_info.routed_experts of /generate responses (JSON, JSONL)"
)
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Decode every response's array, keep the MoE layers' columns, clean sentinels, one document each."""
    files = expand_paths(paths, (".json", ".jsonl"), "SGLang response")
    responses = [(path, where, obj) for path in files for where, obj in iter_json_responses(path)]
    facts = resolve_facts(opts, None, where=str(files[0]))
    L_all = facts.num_hidden_layers or len(facts.moe_layers)
    cols = np.asarray(facts.moe_layers) if facts.num_hidden_layers else np.arange(len(facts.moe_layers))
    k = facts.top_k
    report = ImportReport()
    mapping: list[dict[str, Any]] = []
    docs: list[RoutedDocument] = []
    seen: dict[bytes, str] = {}
    for path, where, obj in responses:
        meta = obj.get("meta_info") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("routed_experts"), str):
            raise DataError(
                f"{where}: no meta_info.routed_experts string: was the request sent with return_routed_experts"
                " to a server started with --enable-return-routed-experts?"
            )
        dtype = meta.get("routed_experts_dtype") or "int32"
        try:
            raw = base64.b64decode(meta["routed_experts"].encode("ascii"), validate=True)
            flat = np.frombuffer(raw, np.dtype(dtype)).astype(np.int64)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise DataError(f"{where}: meta_info.routed_experts is not base64 {dtype} ({exc})") from None
        if flat.size % (L_all * k):
            raise DataError(
                f"{where}: {flat.size} ids do not split into (tokens, {L_all} layers, top_k={k});"
                " check `num_hidden_layers` / `model` / `top_k`"
            )
        arr = flat.reshape(-1, L_all, k)[:, cols]  # (n, L, k)
        n = len(arr)
        experts = clean_layers(arr, facts, report, f"{where}:")
        key = experts.tobytes()
        if key in seen:
            report.add("duplicate_request", 1, f"{where}: the same rows as {seen[key]}; counted once")
            continue
        seen[key] = where
        prompt = meta.get("prompt_tokens")
        doc_id = len(docs)
        docs.append(RoutedDocument(doc_id, default_label(opts, None, path), np.arange(n), experts))
        mapping.append(
            {"doc_id": doc_id, "source": where, "id": meta.get("id"), "prefill_rows": prompt, "rows": n}
        )
        if isinstance(prompt, int) and isinstance(meta.get("completion_tokens"), int):
            want = prompt + meta["completion_tokens"] - 1
            if want != n:
                report.add("row_count_mismatch", 1, f"{where}: {n} rows, prompt + completion - 1 = {want}")
    if not docs:
        raise DataError(f"{files[0]}: no responses")
    if facts.num_hidden_layers is None:
        report.notes.append(
            "rows taken to hold the MoE layers only: pass `num_hidden_layers` if they hold every layer"
        )
    source = {
        "format": NAME,
        "files": [str(f) for f in files],
        "position": "row of the array: prompt tokens (prefill, below documents[i].prefill_rows), then decode",
        "slot_order": "set",
        "slot_order_note": "routed experts carry no weights: rank order cannot be checked, so ids are a set",
        "documents": mapping,
    }
    return Imported(facts, iter(docs), report, source)
