"""Seed 004's token journeys: one ``p<problem>_token_<i>.jsonl`` file per token, one record per layer.

Layout of ``p0_token_3.jsonl`` (what seed 004's ``extract_tokens.py`` writes and its
``create_rules.py`` / ``evaluate_rules.py`` read)::

    {"layer": 0, "experts": [6, 0], "gating_probs": [0.85, 0.15], "token_idx": 3}
    {"layer": 1, "experts": [6, 3], "gating_probs": [0.61, 0.39], "token_idx": 3}
    ...

The problem id comes from the file name (or a ``problem_id`` field, which must agree); the
token index from ``token_idx`` (which must agree with the file name). ``layer`` is the decoder
layer. A journey without a record for some layer leaves that cell missing; nothing else moves.
Export writes the same layout: ``gating_probs`` only when the trace has weights, and no record
for a (token, layer) whose routing is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    check_ids,
    check_layers,
    expand_paths,
    float_rows,
    id_rows,
    iter_jsonl,
    iter_trace_documents,
    locator,
    require,
    resolve_facts,
    slot_order_of,
)
from moescope.interop.records import Records, assemble

NAME = "token-journeys-jsonl"  # alias: seed004-journeys
DESCRIPTION = "seed 004 token journeys: p<problem>_token_<i>.jsonl, one record per layer"
DEFAULT_MODEL = "mixtral-8x7b"
OPTIONS = ROUTING_OPTIONS
FILE_RE = re.compile(r"p(\d+)_token_(\d+)\.jsonl$")


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Parse journey files (or folders of them) and place every record at its (problem, layer, token)."""
    files = expand_paths(paths, (".jsonl",), "token journey")
    doc, layer, tok, experts, weights, file_idx, lines = [], [], [], [], [], [], []
    has_weights: bool | None = None
    for fi, path in enumerate(files):
        m = FILE_RE.search(path.name)
        n_before = len(doc)
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            if "problem_id" in obj:
                pid = require(obj, "problem_id", int, where)
                if m and int(m.group(1)) != pid:
                    raise DataError(f"{where}: problem_id {pid} but the file name says problem {m.group(1)}")
            elif m:
                pid = int(m.group(1))
            else:
                raise DataError(
                    f"{where}: cannot tell the problem: name the file p<problem>_token_<i>.jsonl or add 'problem_id'"
                )
            t = require(obj, "token_idx", int, where)
            if m and int(m.group(2)) != t:
                raise DataError(f"{where}: token_idx {t} but the file name says token {m.group(2)}")
            lay = require(obj, "layer", int, where)
            for name, v in (("problem_id", pid), ("layer", lay), ("token_idx", t)):
                if v < 0:
                    raise DataError(f"{where}: field {name!r} must be >= 0, got {v}")
            experts.append(require(obj, "experts", list, where))
            w = obj.get("gating_probs")
            if has_weights is None:
                has_weights = w is not None
            elif (w is not None) != has_weights:
                raise DataError(
                    f"{where}: {'has' if w is not None else 'lacks'} field 'gating_probs' but the first record"
                    f" {'does not' if has_weights else 'does'}"
                )
            if w is not None:
                weights.append(w)
            doc.append(pid)
            layer.append(lay)
            tok.append(t)
            file_idx.append(fi)
            lines.append(lineno)
        if len(doc) == n_before:
            raise DataError(f"{path}: no records")
    where = locator(files, file_idx, lines)
    ids = id_rows(experts, None, "experts", where)  # (R, k)
    layer_arr = np.asarray(layer, np.int64)
    facts = resolve_facts(
        opts, DEFAULT_MODEL, top_k=ids.shape[1], seen_layers=np.unique(layer_arr), where=str(files[0])
    )
    col = check_layers(layer_arr, facts, where)
    check_ids(ids, facts.num_experts, where)
    w_arr = float_rows(weights, facts.top_k, "gating_probs", where) if has_weights else None
    label = opts.label or files[0].resolve().parent.name
    report = ImportReport()
    rec = Records(np.asarray(doc, np.int64), col, np.asarray(tok, np.int64), ids, w_arr, where)
    documents = assemble(rec, facts, {d: label for d in set(doc)}, report, counter_index=False)
    all_w = np.concatenate([d.weights for d in documents]) if has_weights else None
    source = {
        "format": NAME,
        "files": len(files),
        "first_file": str(files[0]),
        "doc_id": "problem number from the file name p<problem>_token_<i>.jsonl",
        "position": "token_idx",
        "slot_order": slot_order_of(
            all_w, np.concatenate([d.experts for d in documents]), facts.sentinel, "rank"
        ),
    }
    return Imported(facts, documents, report, source, weights=bool(has_weights))


def export(
    trace: Any,
    out: Path,
    *,
    documents: Sequence[int] | None = None,
    tokens: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``p<doc>_token_<pos>.jsonl`` for every token (of ``documents``, with ``tokens[0] <= pos < tokens[1]``).

    Like seed 004's ``extract_tokens.py --problem P --tokens START END``. Refuses to overwrite
    existing journey files unless ``overwrite``.
    """
    if tokens is not None and (len(tokens) != 2 or tokens[0] > tokens[1]):
        raise ConfigError(f"`tokens`: give START END with START <= END, got {tokens}")
    if documents is not None:
        absent = sorted(set(int(d) for d in documents) - set(trace.documents().tolist()))
        if absent:
            raise ConfigError(f"`documents`: the trace has no document(s) {absent}")
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite and any(out.glob("p*_token_*.jsonl")):
        raise ConfigError(f"{out}: already holds token journey files; pass `overwrite` to replace them")
    view = trace.filter(documents=documents) if documents is not None else trace
    moe = trace.moe_layers
    sentinel = trace.missing_id
    cols = ["position", "experts"] + (["weights"] if trace.has_weights else [])
    files = records = 0
    docs_seen = set()
    for doc_id, b in iter_trace_documents(view, cols):
        keep = np.ones(len(b.position), bool)
        if tokens is not None:
            keep = (b.position >= tokens[0]) & (b.position < tokens[1])
        for i in np.flatnonzero(keep):
            pos = int(b.position[i])
            lines = []
            for col, layer in enumerate(moe):
                ex = b.experts[i, col]
                if (ex == sentinel).any():
                    continue
                rec: dict[str, Any] = {"layer": int(layer), "experts": [int(x) for x in ex]}
                if b.weights is not None:
                    rec["gating_probs"] = [float(x) for x in b.weights[i, col]]
                rec["token_idx"] = pos
                lines.append(json.dumps(rec))
            (out / f"p{doc_id}_token_{pos}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
            files += 1
            records += len(lines)
            docs_seen.add(doc_id)
    return {
        "format": NAME,
        "output": str(out),
        "files": files,
        "records": records,
        "documents": len(docs_seen),
    }
