"""FLAME-MoE-Traces (CMU-FLAME/FLAME-MoE-Traces on the Hugging Face hub): Parquet per layer, rows aligned.

Layout (the data set card)::

    flame-moe-290m/
      samples/000.parquet ...          token_id int32: the tokens fed to the model, one row per token
      actives/iter_5473/layer_02.parquet ... layer_09.parquet
          scores   list<float16>[6]    router softmax probabilities of the top-6 experts, descending
          indices  list<int16>[6]      routed expert ids (0-63) for each score

Row ``i`` of every ``layer_NN.parquet`` of one iteration and row ``i`` of the samples files
(concatenated in name order) are the same token (the maintainers confirm it). Layers are numbered
from 1 (290M: 9 transformer layers, MoE layers 2-9): decoder index = NN - 1. The 2 shared experts
are always active and not logged. Pass the ``actives/iter_NNNN`` folder (or its layer files); the
``samples`` folder two levels up is used for token ids when it is there.

The capture is one stream of tokens: ``--seq-len N`` cuts it into documents of N tokens (training
sequences), else it is one document. Files are read one row group at a time and documents written
as they fill, so a 52M-token capture never sits in memory. ``scores`` are stored as weights (the
router probabilities of the chosen experts, as logged: not renormalised), slot order ``rank``
(checked: a score that rises along k turns it into ``set``). Checks: every layer file and the
samples must hold the same number of rows (else an error naming the file); ``-1``/``255`` padding
and shared experts as for every engine; ids out of range name the file and row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    default_label,
    natural_key,
    resolve_facts,
)
from moescope.interop.engine_checks import clean_rows

NAME = "flame-moe-parquet"
DESCRIPTION = (
    "FLAME-MoE-Traces Parquet: actives/iter_N/layer_NN.parquet (indices, scores) + samples/*.parquet"
)
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS | {"seq_len"}
_LAYER = re.compile(r"^layer_(\d+)\.parquet$")
CHUNK = 65536


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _layer_files(paths: Sequence[str | Path]) -> list[tuple[int, Path]]:
    given = [Path(p) for p in paths]
    files: list[Path] = []
    for p in given:
        if p.is_dir():
            found = [q for q in p.iterdir() if _LAYER.match(q.name)]
            if not found:
                raise DataError(f"{p}: holds no layer_NN.parquet files (pass an actives/iter_NNNN folder)")
            files.extend(found)
        elif p.is_file():
            if not _LAYER.match(p.name):
                raise DataError(f"{p}: not a FLAME-MoE layer_NN.parquet file")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    out = sorted(((int(_LAYER.match(q.name).group(1)), q) for q in files), key=lambda x: x[0])
    nums = [n for n, _ in out]
    if len(set(nums)) != len(nums):
        raise DataError(f"{out[0][1]}: layer {nums[0]} given twice")
    if len({q.parent for _, q in out}) > 1:
        raise DataError(f"{out[0][1]}: layer files must come from one iteration folder")
    return out


def _rows(pf: pq.ParquetFile, columns: list[str], path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from pf.iter_batches(batch_size=CHUNK, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None


def _lists(col: pa.Array, path: Path, name: str, k: int | None) -> np.ndarray:
    """A list column as an ``(n, k)`` array (all lists of one length)."""
    if not (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        raise DataError(f"{path}: column {name!r} has type {col.type}, expected a list per row")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    n = len(col)
    if n == 0:
        return np.zeros((0, k or 0))
    if col.null_count or len(flat) % n or (k is not None and len(flat) != n * k):
        raise DataError(
            f"{path}: column {name!r} rows are not all lists of {k or len(flat) // max(n, 1)} values"
        )
    return flat.reshape(n, -1)


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Open every layer file (and the samples), check the row counts agree, stream documents."""
    layer_files = _layer_files(paths)
    pfs = [(_open(p), p) for _, p in layer_files]
    n_rows = pfs[0][0].metadata.num_rows
    for pf, p in pfs:
        names = set(pf.schema_arrow.names)
        if not {"indices", "scores"} <= names:
            raise DataError(f"{p}: columns {sorted(names)}; expected 'indices' and 'scores'")
        if pf.metadata.num_rows != n_rows:
            raise DataError(
                f"{p}: {pf.metadata.num_rows} rows, {pfs[0][1].name} has {n_rows}: layers of one capture must align"
            )
    first = pfs[0][0].read_row_group(0, columns=["indices"]) if pfs[0][0].num_row_groups else None
    k = len(first.column("indices")[0].as_py()) if first is not None and first.num_rows else None
    layers = [n - 1 for n, _ in layer_files]  # layer_NN is 1-based
    facts = resolve_facts(opts, None, top_k=k, seen_layers=layers, where=str(pfs[0][1]))
    column = facts.column_of()
    for layer, (_, p) in zip(layers, layer_files, strict=True):
        if layer not in column:
            raise DataError(
                f"{p}: decoder layer {layer} is not a MoE layer of this model (moe_layers {facts.moe_layers})"
            )
    cols = [column[layer] for layer in layers]
    samples_dir = pfs[0][1].parent.parent.parent / "samples"
    sample_files = sorted(samples_dir.glob("*.parquet"), key=natural_key) if samples_dir.is_dir() else []
    report = ImportReport()
    if sample_files:
        total = sum(_open(s).metadata.num_rows for s in sample_files)
        if total != n_rows:
            raise DataError(
                f"{samples_dir}: samples hold {total} tokens, {pfs[0][1]} {n_rows} rows: they must align"
            )
    else:
        report.notes.append("no samples/ folder beside actives/: token ids unknown (-1)")
    if opts.seq_len is not None and opts.seq_len < 1:
        raise DataError(f"option `seq_len` must be >= 1, got {opts.seq_len}")
    seq = opts.seq_len or max(n_rows, 1)
    if opts.seq_len is None:
        report.notes.append(
            "one document for the whole token stream: pass `seq_len` to cut training sequences"
        )
    elif n_rows % seq:
        report.add("short_last_sequence", 1, f"{n_rows} tokens are not a multiple of `seq_len` {seq}")
    L, K = len(facts.moe_layers), facts.top_k
    label = default_label(opts, None, pfs[0][1].parent)
    ascending = [False]
    source: dict[str, Any] = {
        "format": NAME,
        "files": [str(p) for _, p in layer_files],
        "samples": [str(s) for s in sample_files],
        "doc_id": f"token stream cut every {seq} tokens (`seq_len`)" if opts.seq_len else "one document",
        "position": "index of the token in its document",
        "weights_note": "FLAME 'scores': router softmax probabilities of the chosen experts, as logged (not renormalised)",
        "slot_order": "rank",
    }

    def token_ids() -> Iterator[np.ndarray]:
        for s in sample_files:
            pf = _open(s)
            if "token_id" not in pf.schema_arrow.names:
                raise DataError(f"{s}: no 'token_id' column")
            for b in _rows(pf, ["token_id"], s):
                yield b.column(0).to_numpy(zero_copy_only=False).astype(np.int32)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(experts (n, L, k), weights (n, L, k), token ids (n,))`` in row order."""
        iters = [_rows(pf, ["indices", "scores"], p) for pf, p in pfs]
        tok_iter, tok_buf = token_ids(), np.zeros(0, np.int32)
        row0 = 0
        while True:
            batches = [next(it, None) for it in iters]
            if batches[0] is None:
                return
            n = batches[0].num_rows
            experts = np.full((n, L, K), facts.sentinel, facts.id_dtype)
            weights = np.full((n, L, K), np.nan, np.float32)
            for (_, p), c, b in zip(pfs, cols, batches, strict=True):
                if b is None or b.num_rows != n:
                    raise DataError(f"{p}: row groups do not align with {pfs[0][1].name}'s (rows {row0}..)")
                raw = _lists(b.column(b.schema.get_field_index("indices")), p, "indices", K)
                sc = _lists(b.column(b.schema.get_field_index("scores")), p, "scores", K).astype(np.float32)
                ids, valid = clean_rows(
                    raw,
                    num_experts=facts.num_experts,
                    top_k=K,
                    n_shared=facts.n_shared_experts,
                    report=report,
                    where=lambda i, p=p, row0=row0: f"{p}: row {row0 + i}",
                )
                experts[valid, c] = ids[valid]
                weights[valid, c] = sc[valid] if raw.shape[1] == K else np.nan
                if not ascending[0] and K > 1 and (np.diff(sc[valid], axis=1) > 1e-6).any():
                    ascending[0] = True
            if sample_files:
                while len(tok_buf) < n:
                    more = next(tok_iter, None)
                    if more is None:
                        break
                    tok_buf = np.concatenate([tok_buf, more])
                tid, tok_buf = tok_buf[:n], tok_buf[n:]
            else:
                tid = np.full(n, -1, np.int32)
            row0 += n
            yield experts, weights, tid

    def documents() -> Iterator[RoutedDocument]:
        buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        have, doc_id = 0, 0
        for part in chunks():
            buf.append(part)
            have += len(part[2])
            while have >= seq:
                ex, w, t = (np.concatenate(x) for x in zip(*buf, strict=True))
                yield RoutedDocument(
                    doc_id, label, np.arange(seq), ex[:seq], weights=w[:seq], token_id=t[:seq]
                )
                doc_id += 1
                buf, have = ([(ex[seq:], w[seq:], t[seq:])] if len(t) > seq else []), len(t) - seq
        if have:
            ex, w, t = (np.concatenate(x) for x in zip(*buf, strict=True))
            yield RoutedDocument(doc_id, label, np.arange(len(t)), ex, weights=w, token_id=t)
        if ascending[0]:
            source["slot_order"] = "set"
            source["slot_order_note"] = "some scores rise along k: not the descending order the card states"
        missing = int(report.counts.get("sentinel_-1", 0))
        if missing:
            report.notes.append(f"{missing} padding slots (-1) left cells missing")

    return Imported(facts, documents(), report, source, weights=True)
