"""Checks every engine importer applies to what it reads, and reports in ``source.report``.

Serving and training engines log routing with habits of their own, each reported by users:

- **sentinel ids**: ``-1`` for a slot without routing (SGLang pads its top-k buffer to 8 slots and
  marks dense layers with ``-1``; vLLM and FLAME pad with it), ``255`` where ids were stored as
  ``uint8`` padding (only when the model has fewer than 255 experts), and **shared experts logged as
  routed** (SGLang's shared-experts fusion gives the shared expert the ids ``E .. E+S-1``);
- **counts that do not add up**: per-expert counts of a layer should sum to ``top_k x tokens``;
- **the same tokens counted once per data-parallel rank**: with tensor or expert parallelism
  (no attention data parallelism) every rank routes the same tokens, so per-rank logs repeat each
  other and summing them multiplies every count by the number of ranks;
- **physical replicas**: engines with redundant experts (SGLang EPLB, TensorRT-LLM's load balancer)
  log physical slot ids; they are mapped back to logical experts through the engine's map.

:func:`clean_rows` turns raw id rows into the trace's ids (sentinels removed, shared slots dropped,
rows without routing masked), :func:`to_logical` applies a physical-to-logical map,
:func:`check_counts` checks count sums and :func:`same_as` finds repeated per-rank logs. Each
reports counts and a first example to an :class:`~moescope.interop.common.ImportReport`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError
from moescope.interop.common import Facts, ImportReport, check_ids

#: Option ``expert_map``: a file with a ``(layers, physical)`` physical-to-logical map.
EXPERT_MAP_SUFFIXES = (".npy", ".json", ".pt")


def clean_rows(
    ids: np.ndarray,
    *,
    num_experts: int,
    top_k: int,
    n_shared: int,
    report: ImportReport,
    where: Callable[[int], str],
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (R, top_k) int64, valid (R,) bool)`` from raw rows ``(R, w)`` as an engine logged them.

    Slots holding ``-1`` (any negative id), ``255`` (when ``num_experts < 255``) or a shared
    expert's id (``num_experts .. num_experts + n_shared - 1``) are removed, keeping the order of
    the others. A row left with exactly ``top_k`` ids is kept; a row left with none has no routing
    (``valid`` False: a padded or dense row); any other count is a partial row, masked and counted.
    Ids outside ``0..num_experts-1`` that are none of these, and ids repeated inside a row, are
    errors naming the row (``where(i)``).
    """
    ids = np.asarray(ids).astype(np.int64, copy=False)
    R, w = ids.shape
    neg = ids < 0
    pad = (ids == 255) & (num_experts < 255)
    shared = (ids >= num_experts) & (ids < num_experts + n_shared) & ~pad
    drop = neg | pad | shared
    for kind, sel in (("sentinel_-1", neg), ("sentinel_255", pad), ("shared_as_routed", shared)):
        if sel.any():
            r = int(np.flatnonzero(sel.any(axis=1))[0])
            report.add(kind, int(sel.sum()), f"{where(r)}: {ids[r].tolist()}")
    over = ~drop & (ids >= num_experts)
    if over.any():
        r, j = np.argwhere(over)[0]
        raise DataError(
            f"{where(int(r))}: expert id {int(ids[r, j])} is out of range 0..{num_experts - 1} ({int(over.sum())}"
            " such ids); is `num_experts` / `model` right, or are shared experts logged as routed"
            " (`n_shared_experts`)?"
        )
    keep_n = w - drop.sum(axis=1)
    out = np.zeros((R, top_k), np.int64)
    valid = keep_n == top_k
    if w == top_k and not drop.any():
        out[:] = ids
    else:
        # Stable compaction: kept slots first, in their logged order.
        order = np.argsort(drop, axis=1, kind="stable")
        compact = np.take_along_axis(ids, order, axis=1)[:, :top_k] if w >= top_k else ids
        out[valid] = compact[valid]
    partial = (keep_n != top_k) & (keep_n != 0)
    if partial.any():
        r = int(np.flatnonzero(partial)[0])
        report.add(
            "partial_row",
            int(partial.sum()),
            f"{where(r)}: {int(keep_n[r])} routed ids where top_k={top_k}: {ids[r].tolist()}; masked",
        )
    if w < top_k and (keep_n == w).any():
        raise DataError(f"{where(0)}: rows have {w} ids, fewer than top_k={top_k}")
    rows = np.flatnonzero(valid)
    check_ids(out[rows], num_experts, lambda i: where(int(rows[i])))
    return out, valid


def clean_layers(arr: np.ndarray, facts: Facts, report: ImportReport, at: str) -> np.ndarray:
    """:func:`clean_rows` over ``arr``, the ``(tokens, MoE layers, width)`` ids of one request: the
    ``(tokens, MoE layers, top_k)`` ids in ``facts.id_dtype``, rows without routing set to
    ``facts.sentinel``; errors name ``"{at} token t, MoE layer l"``."""
    n, L, w = arr.shape

    def where(i: int) -> str:
        t, c = divmod(i, L)
        return f"{at} token {t}, MoE layer {facts.moe_layers[c]}"

    ids, valid = clean_rows(
        arr.reshape(-1, w),
        num_experts=facts.num_experts,
        top_k=facts.top_k,
        n_shared=facts.n_shared_experts,
        report=report,
        where=where,
    )
    return np.where(valid[:, None], ids, facts.sentinel).astype(facts.id_dtype).reshape(n, L, facts.top_k)


def load_expert_map(path: str | Path, num_layers: int) -> np.ndarray:
    """A ``(num_layers, physical)`` int64 physical-to-logical map from ``.npy``, ``.json`` or ``.pt``.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: a tensor, or a dict holding
    ``physical_to_logical_map`` / ``last_physical_to_logical_map`` (SGLang's names). A 1-D map
    applies to every layer.
    """
    path = Path(path)
    try:
        if path.suffix == ".npy":
            m = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            import json

            obj = json.loads(path.read_text())
            if isinstance(obj, dict):
                obj = obj.get("physical_to_logical_map", obj.get("last_physical_to_logical_map"))
            m = np.asarray(obj)
        elif path.suffix == ".pt":
            obj = torch_load(path)
            if isinstance(obj, dict):
                obj = obj.get("physical_to_logical_map", obj.get("last_physical_to_logical_map"))
            m = np.asarray(obj.numpy() if hasattr(obj, "numpy") else obj)
        else:
            raise DataError(f"{path}: expert map must be one of {', '.join(EXPERT_MAP_SUFFIXES)}")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the expert map ({exc})") from None
    if m.dtype.kind not in "iu" or m.ndim not in (1, 2):
        raise DataError(f"{path}: expert map must be integer ids of shape (layers, physical), got {m.shape}")
    if m.ndim == 1:
        m = np.broadcast_to(m, (num_layers, len(m)))
    if m.shape[0] != num_layers:
        raise DataError(f"{path}: expert map has {m.shape[0]} layers, the log {num_layers}")
    return m.astype(np.int64)


def to_logical(
    ids: np.ndarray,
    valid: np.ndarray,
    p2l: np.ndarray,
    *,
    num_experts: int,
    report: ImportReport,
    where: str,
) -> np.ndarray:
    """Map physical ids ``(n, L, k)`` through ``p2l`` ``(L, P)`` to logical ids, per layer.

    Counts the slots that sat on a replica (a physical id ``>= num_experts`` or one whose logical
    expert differs) as ``physical_replicas_mapped``. A map entry outside ``0..num_experts-1``, a
    physical id the map does not cover, or two replicas of one expert in a token's top-k are errors.
    """
    L, P = p2l.shape
    if ((p2l < 0) | (p2l >= num_experts)).any():
        raise DataError(f"{where}: the physical-to-logical map holds ids outside 0..{num_experts - 1}")
    cells = valid
    phys = np.where(cells[..., None], ids, 0)
    if (phys >= P).any():
        t, c, s = np.argwhere(phys >= P)[0]
        raise DataError(
            f"{where}: physical id {int(phys[t, c, s])} at token {t}, layer column {c}; the map has {P}"
        )
    logical = p2l[np.arange(L)[None, :, None], phys]
    moved = cells[..., None] & (logical != phys)
    if moved.any():
        report.add("physical_replicas_mapped", int(moved.sum()), f"{where}: {int(moved.sum())} slots")
    srt = np.sort(logical, axis=-1)
    rep = cells & (srt[..., 1:] == srt[..., :-1]).any(-1) if logical.shape[-1] > 1 else np.zeros_like(cells)
    if rep.any():
        t, c = np.argwhere(rep)[0]
        raise DataError(
            f"{where}: token {t}, layer column {c}: two replicas of logical expert(s) {logical[t, c].tolist()}"
            " in one token's top-k; is the map the one the engine used?"
        )
    return np.where(cells[..., None], logical, 0)


def check_counts(
    counts: np.ndarray, top_k: int, report: ImportReport, where: Callable[[int], str]
) -> np.ndarray:
    """Tokens per group (``counts.sum(-1) / top_k``) of count rows ``(G, E)``; reports sums that are not multiples.

    A sum that is not a multiple of ``top_k`` means slots were dropped or padded (``-1`` slots
    counted, capacity drops): counted as ``counts_not_multiple_of_top_k``; tokens round down.
    """
    s = counts.sum(-1)
    bad = s % top_k != 0
    if bad.any():
        g = int(np.flatnonzero(bad)[0])
        report.add(
            "counts_not_multiple_of_top_k",
            int(bad.sum()),
            f"{where(g)}: counts sum to {int(s[g])}, not a multiple of top_k={top_k}",
        )
    return s // top_k


def same_as(arrays: list[np.ndarray]) -> list[int | None]:
    """For each array, the index of an earlier identical one (``None``: it is the first of its kind)."""
    out: list[int | None] = []
    seen: dict[bytes, int] = {}
    for i, a in enumerate(arrays):
        key = np.ascontiguousarray(a).tobytes() + str(a.shape).encode()
        out.append(seen.get(key))
        seen.setdefault(key, i)
    return out


def torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, lists, dicts and numbers only, never pickled code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable torch .pt file ({first[:200]})") from None
