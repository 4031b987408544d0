"""Megatron-Core ``RouterTracer`` JSONL (``--moe-routing-trace-path``): one record per step and layer.

Layout of ``router_trace_rank<r>.jsonl``, one JSON object per line::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

``top_indices`` is ``(num_tokens, topk)``: the tokens of one router call, flattened the way
Megatron lays out activations (sequence-major, ``[seq, batch]``). The tracer derives them from
the router's boolean routing map, so each row is in **ascending id order, not rank order**. Records
of multi-token-prediction layers (``"block": "mtp"``) are skipped and counted.

**Logits sidecar** (``--moe-routing-trace-logits``; ``megatron/core/transformer/moe/router_trace.py``,
``load_logits_for_record``): records then also carry ``logit_offset``, ``logit_bytes`` and
``logit_shape`` (``[num_tokens, num_experts]``) pointing into ``logits_rank{rank}.bin`` beside the
JSONL: the pre-top-k router logits as raw **bfloat16**. They are read into the trace's ``logits``
column (stored as float16, the trace's type; bf16 values beyond float16's range become inf and are
counted as ``logits_overflow``), and ``logit_shape[1]`` gives the expert count. A sidecar that is
missing, shorter than a record's span, or a span that disagrees with ``num_tokens`` is an error
naming the file; a record without logits in a traced run leaves its cells NaN (``logits_missing``).

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
    groups: dict[tuple[int, int], dict[int, list[tuple[int, np.ndarray, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    logit_E: int | None = None
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
            span = None
            if "logit_offset" in obj:
                span = _logit_span(obj, path, where, n)
                if logit_E is None:
                    logit_E = span[3][1]
                elif span[3][1] != logit_E:
                    raise DataError(
                        f"{where}: logit_shape {span[3]} but earlier records have {logit_E} experts"
                    )
            groups[(fi, step)][layer].append((lineno, ids, span))
    if not groups:
        raise DataError(f"{files[0]}: no decoder router records")
    seen = sorted({layer for g in groups.values() for layer in g})
    facts = resolve_facts(opts, None, num_experts=logit_E, top_k=topk, seen_layers=seen, where=str(files[0]))
    column = facts.column_of()
    for (fi, _), g in groups.items():
        for layer, recs in g.items():
            if layer not in column:
                raise DataError(
                    f"{files[fi]}:{recs[0][0]}: layer {layer} is not a MoE layer of this model (moe_layers"
                    f" {facts.moe_layers}); pass --moe-layers or the right --model"
                )
            for lineno, ids, _ in recs:
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
                logits = np.full((n, L, facts.num_experts), np.nan, np.float32) if logit_E else None
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
                    lineno, ids, span = recs[m]
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
                    if logits is not None:
                        if span is None:
                            report.add("logits_missing", 1, f"{files[fi]}:{lineno}: no logit_offset")
                        else:
                            logits[:, col] = _read_logits(*span)
                    if ascending and k > 1:
                        ascending = bool((np.diff(ids, axis=1) > 0).all())
                mapping.append([doc_id, fi, ranks.get(fi, fi), step, m])
                if logits is not None:
                    over = np.isfinite(logits) & (np.abs(logits) > np.finfo(np.float16).max)
                    report.add("logits_overflow", int(over.sum()), f"{files[fi]}: step {step}")
                yield RoutedDocument(
                    doc_id, default_label(opts, None, files[fi]), np.arange(n), experts, logits=logits
                )
                doc_id += 1
        source["slot_order"] = "set" if facts.top_k > 1 else "rank"
        if facts.top_k > 1:
            source["slot_order_note"] = (
                "ids from the routing map come sorted by id: treat them as a set"
                if ascending
                else "ids are not in the ascending order the tracer writes: order unknown, treated as a set"
            )

    return Imported(facts, documents(), report, source, logits=logit_E is not None)


def _logit_span(
    obj: dict[str, Any], path: Path, where: str, n: int
) -> tuple[Path, int, int, tuple[int, int], str]:
    """``(sidecar, offset, bytes, shape, where)`` of a record's logits, checked against the record."""
    off, nb, shape = obj.get("logit_offset"), obj.get("logit_bytes"), obj.get("logit_shape")
    if not (isinstance(off, int) and isinstance(nb, int) and isinstance(shape, list) and len(shape) == 2):
        raise DataError(
            f"{where}: logit_offset / logit_bytes / logit_shape must be int, int, [tokens, experts]"
        )
    if shape[0] != n or nb != 2 * shape[0] * shape[1] or off < 0:
        raise DataError(
            f"{where}: logit_shape {shape} and logit_bytes {nb} do not fit num_tokens {n} in bfloat16"
        )
    sidecar = path.parent / f"logits_rank{obj.get('rank', 0)}.bin"
    if not sidecar.is_file():
        raise DataError(f"{sidecar}: missing (the logits sidecar the record at {where} points into)")
    return sidecar, off, nb, (int(shape[0]), int(shape[1])), where


def _read_logits(sidecar: Path, off: int, nb: int, shape: tuple[int, int], where: str) -> np.ndarray:
    """bfloat16 bytes at ``off`` as float32 ``shape`` (bf16 is the top half of a float32)."""
    with open(sidecar, "rb") as f:
        f.seek(off)
        raw = f.read(nb)
    if len(raw) != nb:
        raise DataError(
            f"{sidecar}: {len(raw)} bytes at offset {off}, the record at {where} needs {nb} (truncated?)"
        )
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
