"""TensorRT-LLM expert statistics (``EXPERT_STATISTIC_ITER_RANGE`` / ``EXPERT_STATISTIC_PATH``): counts only.

Layout (``tensorrt_llm/_torch/expert_statistic.py``, class ``ExpertStatistic``), one folder::

    meta_info.json        {"num_experts": 72, "num_experts_per_token": 8}   (written by rank 0)
    rank0.safetensors     "{iter}_{layer}" -> int64 tensor (num_experts,): torch.bincount of the
    rank1.safetensors     token_selected_slots of that iteration and layer, summed over its calls

``num_experts`` is the MoE module's ``num_slots`` (its ``maybe_add_info(self.num_slots,
token_selected_slots)`` call in ``fused_moe_*.py``): with the MoE load balancer on, counts are per
**physical slot** and need ``--expert-map`` (a ``(layers, slots)`` slot-to-expert map) to become
logical experts; without it ``num_experts`` is the model's expert count. Keys are
``{iteration}_{decoder layer index}``. Other files in the folder (``rank*_raw``,
``cooccurrence_rank*``, ``token_selected_experts_rank*`` of some versions) are not read.

No token is named, so the import is a **counts-only trace** (docs/trace-format.md, "Counts-only
traces"): no rows, the manifest's ``counts`` section holds per-layer expert counts summed over
iterations and ranks; ``moescope analyze --analyses load`` reads it. Checks, reported in
``source.report``: every rank file must hold the same keys and shapes (else an error naming the
file); a rank file identical to an earlier one (tensor or expert parallelism without attention data
parallelism, where every rank routes the same tokens) is counted once (``duplicate_rank``); a
count row whose sum is not a multiple of top-k is counted (``counts_not_multiple_of_top_k``); layers
of one iteration and rank that saw different token counts are counted (``layer_token_mismatch``).
"""

from __future__ import annotations

import json
import re
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
    counts_section,
    natural_key,
    resolve_facts,
)
from moescope.interop.engine_checks import check_counts, load_expert_map, same_as

NAME = "tensorrt-llm-expert-statistic"
DESCRIPTION = (
    "TensorRT-LLM expert statistics: meta_info.json + rank*.safetensors per-expert counts (counts only)"
)
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS | {"expert_map"}
_RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY = re.compile(r"^(\d+)_(\d+)$")


def _folder(paths: Sequence[str | Path]) -> tuple[Path, list[tuple[int, Path]]]:
    """The statistics folder and its ``(rank, file)`` list (a folder, or rank files of one folder)."""
    given = [Path(p) for p in paths]
    if len(given) == 1 and given[0].is_dir():
        folder = given[0]
        files = [q for q in folder.iterdir() if _RANK_FILE.match(q.name)]
    else:
        for p in given:
            if not p.is_file():
                raise DataError(f"{p}: no such file or folder")
            if not _RANK_FILE.match(p.name):
                raise DataError(f"{p}: not a TensorRT-LLM rank<r>.safetensors statistics file")
        folders = {p.parent for p in given}
        if len(folders) > 1:
            raise DataError(f"{given[0]}: rank files must come from one statistics folder")
        folder, files = folders.pop(), given
    if not files:
        raise DataError(f"{folder}: holds no rank<r>.safetensors files")
    ranked = sorted(
        ((int(_RANK_FILE.match(q.name).group(1)), q) for q in files), key=lambda x: natural_key(x[1])
    )
    return folder, ranked


def _read_rank(path: Path) -> dict[tuple[int, int], np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    out = {}
    for key, arr in raw.items():
        m = _KEY.match(key)
        if not m:
            raise DataError(f"{path}: key {key!r} is not '<iteration>_<layer>'")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(
                f"{path}: {key!r} has shape {arr.shape} and dtype {arr.dtype}, expected 1-D integer counts"
            )
        if (arr < 0).any():
            raise DataError(f"{path}: {key!r} holds negative counts")
        out[(int(m.group(1)), int(m.group(2)))] = arr.astype(np.int64)
    if not out:
        raise DataError(f"{path}: holds no counts")
    return out


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Sum the rank files' counts per layer (repeated ranks once), map slots to experts, check the sums."""
    folder, files = _folder(paths)
    meta_path = folder / "meta_info.json"
    try:
        meta = json.loads(meta_path.read_text())
        slots, k = int(meta["num_experts"]), int(meta["num_experts_per_token"])
    except FileNotFoundError:
        raise DataError(f"{meta_path}: missing (rank 0 writes it beside the rank files)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{meta_path}: expected {{'num_experts': int, 'num_experts_per_token': int}} ({exc})"
        ) from None
    report = ImportReport()
    ranks = [(r, p, _read_rank(p)) for r, p in files]
    _, p0, ref = ranks[0]
    for _r, p, rec in ranks:
        if set(rec) != set(ref):
            extra = sorted(set(rec) ^ set(ref))[0]
            raise DataError(
                f"{p}: ranks disagree: key '{extra[0]}_{extra[1]}' is in one of {p.name}, {p0.name} only"
            )
        for key, arr in rec.items():
            if arr.shape != (slots,):
                raise DataError(
                    f"{p}: '{key[0]}_{key[1]}' has {arr.shape[0]} counts, meta_info.json says {slots} slots"
                )
    keys = sorted(ref)
    stacked = [np.stack([rec[key] for key in keys]) for _, _, rec in ranks]  # each (keys, slots)
    dup = same_as(stacked)
    kept = [i for i, d in enumerate(dup) if d is None]
    for i, d in enumerate(dup):
        if d is not None:
            report.add(
                "duplicate_rank",
                1,
                f"{ranks[i][1]}: identical to {ranks[d][1]}: the same tokens routed on both ranks; counted once",
            )
    layers_seen = sorted({layer for _, layer in keys})
    E_log = None if opts.expert_map is not None else slots
    facts = resolve_facts(
        opts,
        None,
        num_experts=E_log if opts.num_experts is None and opts.model is None else None,
        top_k=k,
        seen_layers=layers_seen,
        where=str(meta_path),
    )
    if opts.expert_map is None and facts.num_experts != slots:
        raise DataError(
            f"{meta_path}: {slots} slots counted but the model has {facts.num_experts} experts: the load"
            " balancer's redundant slots need `expert_map` (a (layers, slots) slot-to-expert map)"
        )
    column = facts.column_of()
    missing = [layer for layer in layers_seen if layer not in column]
    if missing:
        raise DataError(
            f"{p0}: layer {missing[0]} is not a MoE layer of this model (moe_layers {facts.moe_layers});"
            " pass `moe_layers` or the right `model`"
        )
    p2l = None
    if opts.expert_map is not None:
        p2l = load_expert_map(opts.expert_map, len(facts.moe_layers))
        if p2l.shape[1] != slots:
            raise DataError(f"{opts.expert_map}: maps {p2l.shape[1]} slots, meta_info.json says {slots}")
        if ((p2l < 0) | (p2l >= facts.num_experts)).any():
            raise DataError(f"{opts.expert_map}: holds expert ids outside 0..{facts.num_experts - 1}")
    L, E = len(facts.moe_layers), facts.num_experts
    assignments = np.zeros((L, E), np.int64)
    tokens = np.zeros(L, np.int64)
    for i in kept:
        r, path = ranks[i][0], ranks[i][1]
        rows = stacked[i]  # (keys, slots)
        tok = check_counts(rows, k, report, lambda g, path=path: f"{path}: '{keys[g][0]}_{keys[g][1]}'")
        by_iter: dict[int, set[int]] = {}
        for g, (it, layer) in enumerate(keys):
            c = column[layer]
            if p2l is not None:
                mapped = np.bincount(p2l[c], weights=rows[g], minlength=E).astype(np.int64)
                moved = int(rows[g][p2l[c] != np.arange(slots)].sum())
                report.add("physical_replicas_mapped", moved, f"{path}: '{it}_{layer}': {moved} slot counts")
            else:
                mapped = rows[g]
            assignments[c] += mapped
            tokens[c] += tok[g]
            by_iter.setdefault(it, set()).add(int(tok[g]))
        for it, seen in by_iter.items():
            if len(seen) > 1:
                report.add(
                    "layer_token_mismatch",
                    1,
                    f"{path}: iteration {it}: layers counted {sorted(seen)} tokens (rank {r})",
                )
    iters = sorted({it for it, _ in keys})
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(meta_path), *(str(p) for _, p in files)],
        "slot_order": "set",
        "slot_order_note": "per-expert counts: no token, no slot order",
        "iterations": [iters[0], iters[-1]] if iters else [],
        "ranks": [r for r, _ in files],
        "ranks_counted": [ranks[i][0] for i in kept],
        "slots": slots,
    }
    counts = counts_section(
        assignments, tokens, f"iterations {iters[0]}..{iters[-1]}, ranks {source['ranks_counted']}"
    )
    return Imported(facts, iter(()), report, source, counts=counts)
