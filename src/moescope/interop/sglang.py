"""SGLang ``ExpertDistributionRecorder`` dumps (``.pt``): per-token routing, or per-expert counts.

**Expert distribution dumps** (``python/sglang/srt/eplb/expert_distribution.py``;
``--expert-distribution-recorder-mode``, ``/start_expert_distribution_record`` then
``/dump_expert_distribution_record`` write ``expert_distribution_recorder_{time}[_{rank}].pt``
with ``torch.save``). Read here with ``torch.load(weights_only=True)`` only:

- ``per_token`` (``_DetailAccumulator``, one file per rank): ``{"records": [...],
  "last_physical_to_logical_map": int tensor (num_layers, num_physical)}``; each record
  ``{"forward_pass_id", "rank", "gatherer_key", "input_ids": [..], "positions": [..],
  "extend_seq_lens": [..] or None, "forward_mode": int, "topk_ids_of_layer": int32 tensor
  (num_layers, num_tokens, 8), "misc_objects", "global_physical_count"}``. ``topk_ids_of_layer``
  holds **physical** expert ids (replicas under EPLB), padded to 8 slots with ``-1``; its first
  axis is the decoder layer (dense layers stay ``-1``). Tokens of a pass are split into sequences
  by ``extend_seq_lens`` (extend / mixed passes) or one per token (decode passes): one document per
  (file, record, sequence), ``position`` and ``token_id`` from ``positions`` and ``input_ids``.
  ``forward_mode`` (1 extend = prefill, 2 decode, 3 mixed, ...) is kept per document in
  ``source.documents``: prefill and decode are told apart there.
- ``per_pass``: the same file, records with ``global_physical_count`` (num_layers, num_physical)
  only: a **counts-only** trace (docs/trace-format.md), physical counts mapped to logical experts
  through ``last_physical_to_logical_map``.
- ``stat`` (``_StatAccumulator``, rank 0 only): ``{"rank", "logical_count": tensor (steps,
  num_layers, num_logical), "average_utilization_rate_over_window"}``, already logical and
  all-reduced over ranks: a counts-only trace (with tensor parallelism and no DP attention every
  rank counted the same tokens; the report notes it).

SGLang's ``return_routed_experts`` responses (base64 arrays) are read by
:mod:`moescope.interop.sglang_routed` (format ``sglang-routed-experts``).

Checks (:mod:`moescope.interop.engine_checks`): ``-1``/``255`` padding, shared experts fused in as
extra routed slots (``--shared-experts``, ids ``E..E+S-1``), physical replicas mapped back to
logical experts (the dump's map, or ``--expert-map``), the same pass logged by several ranks
(``duplicate_rank``, counted once), per-layer counts not adding up to top-k x tokens; ranks whose
maps or layer counts disagree are errors naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Facts,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    counts_section,
    default_label,
    expand_paths,
    resolve_facts,
)
from moescope.interop.engine_checks import (
    check_counts,
    clean_rows,
    load_expert_map,
    same_as,
    to_logical,
    torch_load,
)

NAME = "sglang-expert-distribution"
DESCRIPTION = "SGLang ExpertDistributionRecorder .pt dumps (per_token, per_pass, stat), read weights-only"
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS | {"expert_map"}
FORWARD_MODES = {1: "extend", 2: "decode", 3: "mixed", 4: "idle", 5: "target_verify", 6: "draft_extend"}


def _np(x: Any, where: str) -> np.ndarray:
    if hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError):
        raise DataError(f"{where}: not an array") from None


def _load(files: list[Path]) -> tuple[str, list[tuple[Path, Any]]]:
    """The recorder mode shared by every file and the loaded dumps."""
    dumps, modes = [], set()
    for path in files:
        obj = torch_load(path)
        if isinstance(obj, dict) and "logical_count" in obj:
            mode = "stat"
        elif isinstance(obj, dict) and isinstance(obj.get("records"), list):
            recs = obj["records"]
            if not recs:
                raise DataError(f"{path}: 'records' is empty (was anything recorded before the dump?)")
            if not all(isinstance(r, dict) for r in recs):
                raise DataError(f"{path}: 'records' must be a list of dicts")
            mode = "per_token" if "topk_ids_of_layer" in recs[0] else "per_pass"
            if mode == "per_pass" and "global_physical_count" not in recs[0]:
                raise DataError(
                    f"{path}: records hold neither 'topk_ids_of_layer' nor 'global_physical_count'"
                )
            if "last_physical_to_logical_map" not in obj:
                raise DataError(f"{path}: missing 'last_physical_to_logical_map'")
        else:
            keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"{path}: not an ExpertDistributionRecorder dump (expected 'records' or 'logical_count'; got {keys})"
            )
        modes.add(mode)
        dumps.append((path, obj))
    if len(modes) > 1:
        raise DataError(
            f"{files[0]}: dumps of different recorder modes {sorted(modes)}: import them separately"
        )
    return modes.pop(), dumps


def _facts(
    opts: ImportOptions, num_layers: int, num_logical: int | None, k: int | None, seen: list[int], where: str
) -> Facts:
    facts = resolve_facts(opts, None, num_experts=num_logical, top_k=k, seen_layers=seen, where=where)
    if max(facts.moe_layers) >= num_layers:
        raise DataError(
            f"{where}: the dump has {num_layers} layers, MoE layer {max(facts.moe_layers)} is listed"
        )
    return facts


def _p2l(dumps: list[tuple[Path, Any]], opts: ImportOptions, facts: Facts, num_layers: int) -> np.ndarray:
    """``(num_layers, num_physical)`` map: ``--expert-map`` or the dumps' own (which must agree)."""
    if opts.expert_map is not None:
        return load_expert_map(opts.expert_map, num_layers)
    ref_path, ref = None, None
    for path, obj in dumps:
        m = _np(obj["last_physical_to_logical_map"], f"{path}: last_physical_to_logical_map").astype(np.int64)
        if m.ndim != 2 or m.shape[0] != num_layers:
            raise DataError(
                f"{path}: last_physical_to_logical_map has shape {m.shape}, expected ({num_layers}, physical)"
            )
        if ref is None:
            ref_path, ref = path, m
        elif m.shape != ref.shape or not np.array_equal(m, ref):
            raise DataError(f"{path}: ranks disagree: its physical-to-logical map differs from {ref_path}'s")
    return ref


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Detect the recorder mode, then build a per-token trace (per_token) or a counts-only one."""
    files = expand_paths(paths, (".pt",), "SGLang expert distribution")
    mode, dumps = _load(files)
    if mode == "stat":
        return _stat(dumps, opts)
    if mode == "per_pass":
        return _per_pass(dumps, opts)
    return _per_token(dumps, opts)


def _stat(dumps: list[tuple[Path, Any]], opts: ImportOptions) -> Imported:
    report = ImportReport()
    arrays = []
    for path, obj in dumps:
        c = _np(obj["logical_count"], f"{path}: logical_count")
        if c.dtype.kind not in "iu" or c.ndim != 3:
            raise DataError(
                f"{path}: logical_count has shape {c.shape}, dtype {c.dtype}; expected integers (steps, layers, experts)"
            )
        if arrays and c.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{path}: logical_count has shape {c.shape}, {dumps[0][0]} has {arrays[0].shape}")
        arrays.append(c.astype(np.int64))
    for i, d in enumerate(same_as(arrays)):
        if d is not None:
            report.add("duplicate_rank", 1, f"{dumps[i][0]}: identical to {dumps[d][0]}; counted once")
    total = sum(a for a, d in zip(arrays, same_as(arrays), strict=True) if d is None)  # (steps, layers, E)
    num_layers, E = total.shape[1:]
    seen = [int(x) for x in np.flatnonzero(total.sum((0, 2)) > 0)]
    facts = _facts(opts, num_layers, int(E), None, seen, str(dumps[0][0]))
    if facts.num_experts != E:
        raise DataError(f"{dumps[0][0]}: logical_count has {E} experts, the model {facts.num_experts}")
    cols = np.asarray(facts.moe_layers)
    per_step = total[:, cols]  # (steps, L, E)
    flat = per_step.reshape(-1, E)
    tok = check_counts(
        flat,
        facts.top_k,
        report,
        lambda g: f"{dumps[0][0]}: step {g // len(cols)}, layer {cols[g % len(cols)]}",
    )
    report.notes.append(
        "stat counts are all-reduced over ranks: with tensor parallelism and no DP attention every rank"
        " counted the same tokens, multiplying every count by the number of ranks"
    )
    source = {
        "format": NAME,
        "mode": "stat",
        "files": [str(p) for p, _ in dumps],
        "slot_order": "set",
        "slot_order_note": "per-expert counts: no token, no slot order",
    }
    counts = counts_section(
        per_step.sum(0), tok.reshape(-1, len(cols)).sum(0), "recorder steps (buffered passes), all ranks"
    )
    return Imported(facts, iter(()), report, source, counts=counts)


def _per_pass(dumps: list[tuple[Path, Any]], opts: ImportOptions) -> Imported:
    report = ImportReport()
    per_rank = []
    for path, obj in dumps:
        rows = []
        for i, r in enumerate(obj["records"]):
            c = _np(r.get("global_physical_count"), f"{path}: records[{i}].global_physical_count")
            if c.ndim != 2 or c.dtype.kind not in "iu":
                raise DataError(
                    f"{path}: records[{i}].global_physical_count has shape {c.shape}; expected (layers, physical)"
                )
            if rows and c.shape != rows[0].shape:
                raise DataError(
                    f"{path}: records[{i}].global_physical_count has shape {c.shape}, records[0] {rows[0].shape}"
                )
            rows.append(c.astype(np.int64))
        if per_rank and rows[0].shape != per_rank[0].shape[1:]:
            raise DataError(
                f"{path}: ranks disagree: counts of shape {rows[0].shape}, {dumps[0][0]} has {per_rank[0].shape[1:]}"
            )
        per_rank.append(np.stack(rows))
    dup = same_as(per_rank)
    for i, d in enumerate(dup):
        if d is not None:
            report.add(
                "duplicate_rank",
                1,
                f"{dumps[i][0]}: identical to {dumps[d][0]}: the same passes on both ranks; counted once",
            )
    num_layers, P = per_rank[0].shape[1:]
    seen = [int(x) for x in np.flatnonzero(sum(a.sum((0, 2)) for a in per_rank) > 0)]
    facts = _facts(opts, num_layers, None, None, seen, str(dumps[0][0]))
    p2l = _p2l(dumps, opts, facts, num_layers)
    if p2l.shape[1] != P:
        raise DataError(f"{dumps[0][0]}: counts over {P} physical experts, the map covers {p2l.shape[1]}")
    L, E = len(facts.moe_layers), facts.num_experts
    if ((p2l < 0) | (p2l >= E)).any():
        raise DataError(f"{dumps[0][0]}: the physical-to-logical map holds ids outside 0..{E - 1}")
    assignments, tokens = np.zeros((L, E), np.int64), np.zeros(L, np.int64)
    for i, a in enumerate(per_rank):
        if dup[i] is not None:
            continue
        for c, layer in enumerate(facts.moe_layers):
            rows = a[:, layer]  # (passes, P)
            tok = check_counts(
                rows,
                facts.top_k,
                report,
                lambda g, i=i, layer=layer: f"{dumps[i][0]}: records[{g}], layer {layer}",
            )
            assignments[c] += np.bincount(p2l[layer], weights=rows.sum(0), minlength=E).astype(np.int64)
            tokens[c] += tok.sum()
            moved = int(rows.sum(0)[p2l[layer] != np.arange(P)].sum())
            report.add("physical_replicas_mapped", moved, f"{dumps[i][0]}: layer {layer}")
    source = {
        "format": NAME,
        "mode": "per_pass",
        "files": [str(p) for p, _ in dumps],
        "slot_order": "set",
        "slot_order_note": "per-expert counts: no token, no slot order",
    }
    counts = counts_section(assignments, tokens, "forward passes of every distinct rank file")
    return Imported(facts, iter(()), report, source, counts=counts)


def _per_token(dumps: list[tuple[Path, Any]], opts: ImportOptions) -> Imported:
    report = ImportReport()
    recs = []  # (path, index, record, topk (layers, n, w))
    for path, obj in dumps:
        for i, r in enumerate(obj["records"]):
            where = f"{path}: records[{i}]"
            t = _np(r["topk_ids_of_layer"], f"{where}.topk_ids_of_layer")
            if t.ndim != 3 or t.dtype.kind not in "iu":
                raise DataError(
                    f"{where}: topk_ids_of_layer has shape {t.shape}; expected (layers, tokens, slots)"
                )
            for key in ("positions", "input_ids"):
                v = r.get(key)
                if not isinstance(v, list | tuple) and not hasattr(v, "__len__"):
                    raise DataError(f"{where}: missing field {key!r}")
                if len(v) != t.shape[1]:
                    raise DataError(
                        f"{where}: {key} has {len(v)} entries, topk_ids_of_layer {t.shape[1]} tokens"
                    )
            if recs and t.shape[0] != recs[0][3].shape[0]:
                raise DataError(
                    f"{where}: ranks disagree: {t.shape[0]} layers, {recs[0][0]} has {recs[0][3].shape[0]}"
                )
            recs.append((path, i, r, t.astype(np.int64)))
    num_layers, w = recs[0][3].shape[0], recs[0][3].shape[2]
    seen = sorted({int(x) for _, _, _, t in recs for x in np.flatnonzero((t >= 0).any((1, 2)))})
    facts = _facts(opts, num_layers, None, None, seen, str(recs[0][0]))
    p2l_all = _p2l(dumps, opts, facts, num_layers)
    P, E, k = p2l_all.shape[1], facts.num_experts, facts.top_k
    p2l = p2l_all[np.asarray(facts.moe_layers)]
    cols = np.asarray(facts.moe_layers)
    mapping: list[dict[str, Any]] = []
    seen_pass: dict[bytes, str] = {}
    docs: list[RoutedDocument] = []
    for path, i, r, t in recs:
        where = f"{path}: records[{i}]"
        n = t.shape[1]
        key = t.tobytes() + str(r.get("forward_pass_id")).encode() + np.asarray(r["input_ids"]).tobytes()
        if key in seen_pass:
            report.add(
                "duplicate_rank",
                1,
                f"{where}: the same pass as {seen_pass[key]} (another rank); counted once",
            )
            continue
        seen_pass[key] = where
        sel = t[cols].transpose(1, 0, 2)  # (n, L, w) physical ids
        if w > k and (sel[..., k:] == -1).all():
            # the recorder's 8-slot buffer beyond this model's top-k: padding, not a sentinel
            sel = sel[..., :k]
        sel = sel.reshape(-1, sel.shape[-1])

        def at(j: int, where: str = where) -> str:
            tok, c = divmod(j, len(cols))
            return f"{where}: token {tok}, layer {cols[c]}"

        ids, valid = clean_rows(
            sel, num_experts=P, top_k=k, n_shared=facts.n_shared_experts, report=report, where=at
        )
        ids, valid = ids.reshape(n, len(cols), k), valid.reshape(n, len(cols))
        logical = to_logical(ids, valid, p2l, num_experts=E, report=report, where=where)
        experts = np.where(valid[..., None], logical, facts.sentinel).astype(facts.id_dtype)
        pos = np.asarray(r["positions"], np.int64)
        tid = np.asarray(r["input_ids"], np.int64).astype(np.int32)
        lens = r.get("extend_seq_lens")
        mode = int(r.get("forward_mode", 0) or 0)
        if lens is not None and sum(int(x) for x in lens) == n:
            cuts = np.cumsum([0, *[int(x) for x in lens]])
        else:
            if lens is not None:
                report.add(
                    "extend_lens_mismatch",
                    1,
                    f"{where}: extend_seq_lens sum to {sum(lens)}, {n} tokens; one token per sequence",
                )
            cuts = np.arange(n + 1)
        for s in range(len(cuts) - 1):
            lo, hi = int(cuts[s]), int(cuts[s + 1])
            if hi == lo:
                continue
            doc_id = len(docs)
            if len(np.unique(pos[lo:hi])) != hi - lo:
                raise DataError(f"{where}: sequence {s} repeats a position")
            order = np.argsort(pos[lo:hi], kind="stable")
            docs.append(
                RoutedDocument(
                    doc_id,
                    default_label(opts, None, path),
                    pos[lo:hi][order],
                    experts[lo:hi][order],
                    token_id=tid[lo:hi][order],
                )
            )
            mapping.append(
                {
                    "doc_id": doc_id,
                    "file": str(path),
                    "record": i,
                    "rank": r.get("rank"),
                    "forward_pass_id": r.get("forward_pass_id"),
                    "sequence": s,
                    "forward_mode": FORWARD_MODES.get(mode, mode),
                }
            )
    source = {
        "format": NAME,
        "mode": "per_token",
        "files": [str(p) for p, _ in dumps],
        "doc_id": "one per (file, record, sequence of the pass); see 'documents'",
        "position": "SGLang's positions (token index in its request)",
        "slot_order": "set",
        "slot_order_note": "topk_ids in SGLang's select_experts order, which fused kernels do not keep sorted: a set",
        "documents": mapping,
        "physical_experts": P,
    }
    return Imported(facts, iter(docs), report, source)
