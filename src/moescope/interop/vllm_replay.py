"""vLLM routed-experts replay arrays (``--enable-return-routed-experts``), saved as ``.npy`` / ``.npz``.

vLLM returns ``CompletionOutput.routed_experts``: an integer array ``[seq_len, num_moe_layers,
top_k]`` of the expert ids each token was routed to (row ``i`` is token ``i`` of prompt plus
completion; the last sampled token is never routed). Layout accepted here:

- ``name.npy``: one such array, one document;
- ``name.npz``: one array per key (e.g. per request id), one document each, in key order.

Negative ids (``-1``, the "unset" slot some trainers pad with) mark a (token, layer) without
routing: it is stored as missing and counted. Ids ``>= num_experts`` or repeated inside a
token's top-k are errors (vLLM kernels that cannot capture return zero rows). The arrays carry
no expert count or layer map: give ``--num-experts`` (or ``--model``) and, when the model has
dense layers, ``--moe-layers`` (default: ``0..num_moe_layers-1``).
"""

from __future__ import annotations

import zipfile
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
    resolve_facts,
)

NAME = "vllm-replay"
DESCRIPTION = "vLLM routed-experts replay arrays (seq_len, moe_layers, top_k) in .npy / .npz files"
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS


def _arrays(files: list[Path]) -> Iterator[tuple[Path, str | None, np.ndarray]]:
    """``(file, key, array)`` for every array, loaded one at a time (pickled objects are refused)."""
    for path in files:
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if not z.files:
                        raise DataError(f"{path}: holds no arrays")
                    for key in z.files:
                        yield path, key, z[key]
            else:
                yield path, None, np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy/.npz array file ({exc})") from None


def _name(path: Path, key: str | None) -> str:
    return f"{path}[{key}]" if key is not None else str(path)


def _check_shape(arr: np.ndarray, name: str, shape: tuple[int, int] | None = None) -> None:
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name}: dtype {arr.dtype}, expected integer expert ids")
    if arr.ndim != 3:
        raise DataError(f"{name}: shape {arr.shape}, expected 3 axes [seq_len, num_moe_layers, top_k]")
    if shape is not None and arr.shape[1:] != shape:
        raise DataError(
            f"{name}: shape {arr.shape}, expected [seq_len, {shape[0]}, {shape[1]}] (num_moe_layers, top_k)"
        )


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Check the first array's shape against the facts, then stream every array as a document."""
    files = expand_paths(paths, (".npy", ".npz"), "vLLM replay array")
    stream = _arrays(files)
    first = next(stream, None)
    if first is None:
        raise DataError(f"{files[0]}: holds no arrays")
    _check_shape(first[2], _name(first[0], first[1]))
    L, k = first[2].shape[1:]
    facts = resolve_facts(opts, None, top_k=int(k), seen_layers=range(L), where=_name(first[0], first[1]))
    if len(facts.moe_layers) != L:
        raise DataError(
            f"{_name(first[0], first[1])}: {L} layers in the array but {len(facts.moe_layers)} MoE layers"
            f" {facts.moe_layers}; pass `moe_layers` with {L} layers"
        )
    report = ImportReport()
    mapping: list[dict[str, Any]] = []
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(f) for f in files],
        "doc_id": "index of the array: files in the order given, keys of an .npz in stored order",
        "position": "row of the array (token index in prompt + completion)",
        "slot_order": "set",
        "slot_order_note": "routed_experts carry no weights: rank order cannot be checked, so ids are a set",
        "documents": mapping,
    }
    if opts.moe_layers is None and opts.model is None:
        report.notes.append(
            f"moe_layers assumed to be 0..{L - 1}: pass `moe_layers` if the model has dense layers"
        )

    def documents() -> Iterator[RoutedDocument]:
        for doc_id, (path, key, arr) in enumerate(_chain(first, stream)):
            name = _name(path, key)
            _check_shape(arr, name, (L, k))
            ids = arr.astype(np.int64)  # (S, L, k)
            unset = (ids < 0).any(axis=-1)  # (S, L)
            rows = ids[~unset]  # (cells, k)
            cells = np.argwhere(~unset)

            def where(r: int, name: str = name, cells: np.ndarray = cells) -> str:
                return f"{name}: token {cells[r][0]}, MoE layer {facts.moe_layers[cells[r][1]]}"

            check_ids(rows, facts.num_experts, where)
            experts = np.where(unset[..., None], facts.sentinel, ids).astype(facts.id_dtype)
            if unset.any():
                t, col = np.argwhere(unset)[0]
                report.add("unset", int(unset.sum()), f"{name}: token {t}, MoE layer {facts.moe_layers[col]}")
                for c in np.flatnonzero(unset.any(axis=0)):
                    n_unset = int(unset[:, c].sum())
                    report.mask(
                        doc_id,
                        facts.moe_layers[c],
                        len(ids),
                        len(ids) - n_unset,
                        "negative (unset) ids",
                        n_unset,
                    )
            mapping.append({"doc_id": doc_id, "file": str(path), "key": key, "tokens": len(ids)})
            yield RoutedDocument(doc_id, default_label(opts, None, path), np.arange(len(ids)), experts)
        if not sum(m["tokens"] for m in mapping):
            raise DataError(
                f"{', '.join(map(str, files))}: every array is empty (0 tokens): nothing to import"
            )

    return Imported(facts, documents(), report, source)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
