"""llama.cpp ``llama-moe-trace`` CSV: one row per routed activation, prefill and decode rows marked.

Layout (``examples/moe-trace/moe-trace.cpp``, from llama.cpp PR #28544 and the forks that add the
token and phase columns; ``MOE_TRACE_OUT=routing.csv llama-moe-trace -m model.gguf -f prompt.txt``)::

    phase,token,layer,rank,expert
    prefill,0,0,0,17
    prefill,0,0,1,3
    ...
    decode,412,23,7,101

The tool hooks the scheduler's eval callback and reads each MoE layer's ``ffn_moe_topk-<il>`` i32
tensor (``ggml_argsort_top_k``: **rank order**, slot 0 the router's first choice): ``layer`` is the
decoder layer ``il``, ``token`` the zero-based position in the one sequence the tool runs (prompt
in ubatches, then a greedy continuation), ``rank`` the slot in the top-k, ``expert`` the id.
``phase`` is ``prefill`` for the prompt and ``decode`` for generated tokens: the trace keeps the
count of prefill tokens in ``source.documents[i]["prefill_rows"]`` (positions below it are prefill).

One document per file. Checks: every (token, layer) must have exactly ``top_k`` rows with ranks
``0..k-1`` (``top_k`` = the largest rank + 1 unless given); a repeated (token, layer, rank) with the
same expert is dropped (``duplicate``), with another expert masks that cell (``conflict``); a cell
with missing ranks is masked (``partial_row``); ``-1``/``255`` and shared-expert ids as in every
engine import; a token marked both prefill and decode is an error. Give ``--num-experts`` (or
``--model``): the CSV does not say how many experts the model has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from moescope.errors import DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    check_layers,
    default_label,
    expand_paths,
    resolve_facts,
)
from moescope.interop.engine_checks import clean_rows

NAME = "llama-cpp-moe-trace"
DESCRIPTION = "llama.cpp llama-moe-trace CSV: phase,token,layer,rank,expert (one row per routed activation)"
DEFAULT_MODEL = None
OPTIONS = ROUTING_OPTIONS
COLUMNS = ("phase", "token", "layer", "rank", "expert")


def _table(path: Path) -> dict[str, np.ndarray]:
    try:
        t = pcsv.read_csv(
            str(path),
            convert_options=pcsv.ConvertOptions(
                column_types={"phase": pa.string(), **{c: pa.int64() for c in COLUMNS[1:]}},
                include_columns=list(COLUMNS),
            ),
        )
    except pa.ArrowKeyError:
        raise DataError(f"{path}: missing column(s); the header must be {','.join(COLUMNS)}") from None
    except pa.ArrowInvalid as exc:
        msg = str(exc).splitlines()[0]
        if "include_columns" in msg or "not found" in msg.lower():
            raise DataError(f"{path}: missing column(s); the header must be {','.join(COLUMNS)}") from None
        raise DataError(f"{path}: not a llama-moe-trace CSV ({msg})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if t.num_rows == 0:
        raise DataError(f"{path}: no rows after the header")
    out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS[1:]}
    phase = t.column("phase").to_numpy(zero_copy_only=False)
    bad = ~np.isin(phase, ["prefill", "decode"])
    if bad.any():
        raise DataError(
            f"{path}:{int(np.flatnonzero(bad)[0]) + 2}: phase {phase[bad][0]!r}, expected prefill or decode"
        )
    out["decode"] = phase == "decode"
    for c in ("token", "layer", "rank"):
        if (out[c] < 0).any():
            i = int(np.flatnonzero(out[c] < 0)[0])
            raise DataError(f"{path}:{i + 2}: column {c!r} must be >= 0, got {out[c][i]}")
    return out


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Parse each CSV, place every row at its (token, layer, rank) cell, mask incomplete cells."""
    files = expand_paths(paths, (".csv",), "llama-moe-trace CSV")
    tables = [_table(p) for p in files]
    k_seen = max(int(t["rank"].max()) for t in tables) + 1
    layers_seen = sorted({int(x) for t in tables for x in np.unique(t["layer"])})
    facts = resolve_facts(
        opts, None, top_k=None if opts.top_k else k_seen, seen_layers=layers_seen, where=str(files[0])
    )
    L, k = len(facts.moe_layers), facts.top_k
    report = ImportReport()
    mapping: list[dict[str, Any]] = []
    docs = []
    for doc_id, (path, t) in enumerate(zip(files, tables, strict=True)):
        if (t["rank"] >= k).any():
            i = int(np.flatnonzero(t["rank"] >= k)[0])
            raise DataError(f"{path}:{i + 2}: rank {t['rank'][i]} but top_k={k}")
        col = check_layers(t["layer"], facts, lambda i, path=path: f"{path}:{i + 2}")
        tokens, tok_of_row = np.unique(t["token"], return_inverse=True)
        n = len(tokens)
        dec = np.zeros(n, bool)
        np.logical_or.at(dec, tok_of_row, t["decode"])
        pre = np.zeros(n, bool)
        np.logical_or.at(pre, tok_of_row, ~t["decode"])
        if (dec & pre).any():
            raise DataError(
                f"{path}: token {tokens[np.flatnonzero(dec & pre)[0]]} is marked both prefill and decode"
            )
        cell = (tok_of_row * L + col) * k + t["rank"]
        order = np.argsort(cell, kind="stable")
        cs, ex = cell[order], t["expert"][order]
        first = np.ones(len(cs), bool)
        first[1:] = cs[1:] != cs[:-1]
        grid = np.full(n * L * k, -2, np.int64)  # -2: no row
        grid[cs[first]] = ex[first]
        rep = np.flatnonzero(~first)
        bad_cells = np.zeros(n * L, bool)
        if len(rep):
            same = ex[rep] == grid[cs[rep]]
            for kind, sel in (("duplicate", same), ("conflict", ~same)):
                if sel.any():
                    row = int(order[rep[sel][0]])
                    report.add(
                        kind,
                        int(sel.sum()),
                        f"{path}:{row + 2}: token {t['token'][row]}, layer {t['layer'][row]}, rank {t['rank'][row]}",
                    )
            bad_cells[cs[rep[~same]] // k] = True
        grid = grid.reshape(n * L, k)
        holes = (grid == -2).any(1) & ~(grid == -2).all(1)
        if holes.any():
            c0 = int(np.flatnonzero(holes)[0])
            report.add(
                "partial_row",
                int(holes.sum()),
                f"{path}: token {tokens[c0 // L]}, layer {facts.moe_layers[c0 % L]}: ranks missing",
            )
        absent = (grid == -2).all(1) | holes | bad_cells
        keep = np.flatnonzero(~absent)

        def where(i: int, path: Path = path, tokens: np.ndarray = tokens, keep: np.ndarray = keep) -> str:
            c = int(keep[i])
            return f"{path}: token {tokens[c // L]}, layer {facts.moe_layers[c % L]}"

        ids = np.zeros((n * L, k), np.int64)
        valid = np.zeros(n * L, bool)
        ids[keep], valid[keep] = clean_rows(
            grid[keep],
            num_experts=facts.num_experts,
            top_k=k,
            n_shared=facts.n_shared_experts,
            report=report,
            where=where,
        )
        experts = np.where(valid[:, None], ids, facts.sentinel).astype(facts.id_dtype).reshape(n, L, k)
        miss = ~valid.reshape(n, L)
        for c in np.flatnonzero(miss.any(0)):
            m = int(miss[:, c].sum())
            report.mask(doc_id, facts.moe_layers[c], n, n - m, "no complete set of ranks for some tokens", m)
        docs.append(RoutedDocument(doc_id, default_label(opts, None, path), tokens.astype(np.int64), experts))
        mapping.append(
            {
                "doc_id": doc_id,
                "file": str(path),
                "prefill_rows": int((~dec).sum()),
                "decode_rows": int(dec.sum()),
            }
        )
    source = {
        "format": NAME,
        "files": [str(f) for f in files],
        "position": "the token column (position in the sequence); prefill below documents[i].prefill_rows",
        "slot_order": "rank",
        "slot_order_note": "the rank column: ggml_argsort_top_k order, slot 0 the router's first choice",
        "documents": mapping,
    }
    return Imported(facts, iter(docs), report, source)
