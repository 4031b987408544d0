"""Megatron-Core ``RouterTracer`` JSONL (``--moe-routing-trace-path``): one record per step and layer.

Layout of ``router_trace_rank<r>.jsonl``, one JSON object per line::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

``top_indices`` is ``(num_tokens, topk)``: the tokens of one router call, flattened the way
Megatron lays out activations (sequence-major, ``[seq, batch]``). The tracer derives them from
the router's boolean routing map, so each row is in **ascending id order, not rank order**. Records
of multi-token-prediction layers (``"block": "mtp"``) are skipped and counted.

Documents: one per (file, step, micro-batch). Within a step, the ``i``-th record of a layer
belongs to micro-batch ``i`` (training with gradient accumulation calls every router once per
micro-batch; run without activation recomputation, which would call them again). A layer
without a record for a document, or whose ``num_tokens`` disagrees with the other layers, is
masked and reported. The trace has no expert count: give ``--num-experts`` (or ``--model``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
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
    check_ids,
    default_label,
    expand_paths,
    id_rows,
    iter_jsonl,
    require,
    resolve_facts,
)

NAME = "megatron-router-trace"
DESCRIPTION = "Megatron-Core RouterTracer JSONL: step, layer, num_tokens, topk, top_indices"
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Parse every record, group them into (file, step, micro-batch) documents, mask what is missing."""
    files = expand_paths(paths, (".jsonl",), "router trace JSONL")
    report = ImportReport()
    # (file, step) -> layer -> [(line, ids)] in file order
    groups: dict[tuple[int, int], dict[int, list[tuple[int, np.ndarray]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    ranks: dict[int, Any] = {}
    topk: int | None = None
    first_where = None
    for fi, path in enumerate(files):
        last_step = -1
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            if obj.get("block", "decoder") != "decoder" or "mtp_idx" in obj:
                report.add("mtp_skipped", 1, f"{where}: block {obj.get('block')!r}")
                continue
            step = require(obj, "step", int, where)
            layer = require(obj, "layer", int, where)
            n = require(obj, "num_tokens", int, where)
            k = require(obj, "topk", int, where)
            rows = require(obj, "top_indices", list, where)
            for name, v in (("step", step), ("layer", layer), ("num_tokens", n)):
                if v < 0:
                    raise DataError(f"{where}: field {name!r} must be >= 0, got {v}")
            if topk is None:
                topk, first_where = k, where
            elif k != topk:
                raise DataError(f"{where}: topk {k}, but {first_where} has {topk}")
            if len(rows) != n:
                raise DataError(f"{where}: top_indices has {len(rows)} rows, num_tokens says {n}")
            ids = (
                id_rows(rows, k, "top_indices", lambda i, w=where: f"{w}: top_indices[{i}]")
                if n
                else np.zeros((0, k), np.int64)
            )
            if step < last_step:
                report.add(
                    "out_of_order", 1, f"{where}: step {step} after step {last_step}; placed by its number"
                )
            last_step = max(last_step, step)
            ranks.setdefault(fi, obj.get("rank", fi))
            groups[(fi, step)][layer].append((lineno, ids))
    if not groups:
        raise DataError(f"{files[0]}: no decoder router records")
    seen = sorted({layer for g in groups.values() for layer in g})
    facts = resolve_facts(opts, None, top_k=topk, seen_layers=seen, where=str(files[0]))
    column = facts.column_of()
    for (fi, _), g in groups.items():
        for layer, recs in g.items():
            if layer not in column:
                raise DataError(
                    f"{files[fi]}:{recs[0][0]}: layer {layer} is not a MoE layer of this model (moe_layers"
                    f" {facts.moe_layers}); pass `moe_layers` or the right `model`"
                )
            for lineno, ids in recs:
                check_ids(
                    ids,
                    facts.num_experts,
                    lambda i, lineno=lineno, fi=fi: f"{files[fi]}:{lineno}: top_indices[{i}]",
                )
    mapping: list[list[int]] = []
    ascending = True
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(f) for f in files],
        "doc_id": "one per (file, step, micro-batch), numbered in that order; see 'documents'",
        "documents_columns": ["doc_id", "file_index", "rank", "step", "microbatch"],
        "documents": mapping,
        "position": "token index in the router call (Megatron's sequence-major [seq, batch] flattening)",
    }

    def documents() -> Iterator[RoutedDocument]:
        nonlocal ascending
        doc_id = 0
        L, k = len(facts.moe_layers), facts.top_k
        for fi, step in sorted(groups):
            g = groups[(fi, step)]
            for m in range(max(len(v) for v in g.values())):
                sizes = [len(v[m][1]) for v in g.values() if len(v) > m]
                values, counts = np.unique(sizes, return_counts=True)
                n = int(values[counts == counts.max()].max())
                experts = np.full((n, L, k), facts.sentinel, facts.id_dtype)
                for col, layer in enumerate(facts.moe_layers):
                    recs = g.get(layer, [])
                    if len(recs) <= m:
                        report.add(
                            "missing_layer",
                            1,
                            f"{files[fi]}: step {step}, micro-batch {m}: no record for layer {layer}",
                        )
                        report.mask(doc_id, layer, n, 0, "no record for this layer", n)
                        continue
                    lineno, ids = recs[m]
                    if len(ids) != n:
                        report.add(
                            "num_tokens_mismatch",
                            1,
                            f"{files[fi]}:{lineno}: {len(ids)} tokens, the other layers {n}",
                        )
                        report.mask(
                            doc_id, layer, n, 0, f"{len(ids)} tokens where the other layers have {n}", n
                        )
                        continue
                    experts[:, col] = ids
                    if ascending and k > 1:
                        ascending = bool((np.diff(ids, axis=1) > 0).all())
                mapping.append([doc_id, fi, ranks.get(fi, fi), step, m])
                yield RoutedDocument(doc_id, default_label(opts, None, files[fi]), np.arange(n), experts)
                doc_id += 1
        source["slot_order"] = "set" if facts.top_k > 1 else "rank"
        if facts.top_k > 1:
            source["slot_order_note"] = (
                "ids from the routing map come sorted by id: treat them as a set"
                if ascending
                else "ids are not in the ascending order the tracer writes: order unknown, treated as a set"
            )

    return Imported(facts, documents(), report, source)
