"""Seed 004's raw routing JSONL (``humaneval_2_routing.jsonl``): one record per problem, layer, token.

Layout, one JSON object per line::

    {"dataset": "humaneval", "problem_id": 0, "layer": 5, "experts": [6, 0],
     "gating_probs": [0.85, 0.15], "token_idx": 0}

``experts`` are in rank order (highest gate first) and ``gating_probs`` are their weights
(renormalised over the top-k). ``token_idx`` is the recorder's running count of decode steps for
that (problem, layer); ``dataset`` is optional and becomes the label.

The recorder behind the published Mixtral log dropped every record whose weights were exactly
``[0.5, 0.5]`` *before* numbering, so a (problem, layer) series with a lost record is shorter
than its problem and every later ``token_idx`` is shifted by one. Which token was lost cannot be
known, so such a series is masked whole (``--short-series mask``, the default); see
:func:`moescope.interop.records.assemble`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.interop.common import (
    ROUTING_OPTIONS,
    Imported,
    ImportOptions,
    ImportReport,
    RoutedDocument,
    check_ids,
    check_layers,
    default_label,
    expand_paths,
    float_rows,
    id_rows,
    iter_jsonl,
    locator,
    require,
    resolve_facts,
    slot_order_of,
)
from moescope.interop.records import Records, assemble

NAME = "routing-records-jsonl"  # alias: seed004-routing
DESCRIPTION = "seed 004 raw routing JSONL: problem_id, layer, token_idx, experts, gating_probs"
DEFAULT_MODEL = "mixtral-8x7b"
OPTIONS = ROUTING_OPTIONS | {"short_series", "text", "tokenizer"}


def read(paths: Sequence[str | Path], opts: ImportOptions) -> Imported:
    """Parse every record, place it by (problem, layer, token_idx) and mask what cannot be trusted."""
    files = expand_paths(paths, (".jsonl",), "routing JSONL")
    if opts.text is not None and len(files) > 1:
        raise ConfigError("`text`: give one routing file with it (problem ids of several files are offset)")
    doc, layer, tok, experts, weights, file_idx, lines = [], [], [], [], [], [], []
    labels: dict[int, str] = {}
    has_weights: bool | None = None
    offset = 0
    for fi, path in enumerate(files):
        top = -1
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            pid = require(obj, "problem_id", int, where)
            lay = require(obj, "layer", int, where)
            t = require(obj, "token_idx", int, where)
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
            d = offset + pid
            doc.append(d)
            layer.append(lay)
            tok.append(t)
            file_idx.append(fi)
            lines.append(lineno)
            top = max(top, d)
            if d not in labels:
                labels[d] = default_label(opts, obj.get("dataset"), path)
        offset = top + 1
    if not doc:
        raise DataError(f"{files[0]}: no routing records")
    where = locator(files, file_idx, lines)
    ids = id_rows(experts, None, "experts", where)  # (R, k)
    layer_arr = np.asarray(layer, np.int64)
    facts = resolve_facts(
        opts, DEFAULT_MODEL, top_k=ids.shape[1], seen_layers=np.unique(layer_arr), where=str(files[0])
    )
    if ids.shape[1] != facts.top_k:
        raise DataError(f"{where(0)}: field 'experts' has {ids.shape[1]} ids, expected top_k={facts.top_k}")
    col = check_layers(layer_arr, facts, where)
    check_ids(ids, facts.num_experts, where)
    w_arr = float_rows(weights, facts.top_k, "gating_probs", where) if has_weights else None
    report = ImportReport()
    rec = Records(np.asarray(doc, np.int64), col, np.asarray(tok, np.int64), ids, w_arr, where)
    documents = assemble(rec, facts, labels, report, counter_index=True, short_series=opts.short_series)
    vocab_info = None
    if opts.text is not None or opts.tokenizer is not None:
        vocab_info = _attach_tokens(documents, opts, report)
    all_w = np.concatenate([d.weights for d in documents]) if has_weights else None
    all_e = np.concatenate([d.experts for d in documents])
    source = {
        "format": NAME,
        "files": [str(f) for f in files],
        "doc_id": "problem_id; each further file adds an offset (the largest doc id so far + 1)",
        "position": "token_idx: decode step, 0 = the first generated token the model routed",
        "slot_order": slot_order_of(all_w, all_e, facts.sentinel, "rank"),
        "short_series": opts.short_series,
    }
    if opts.text is not None:
        source["text"] = str(opts.text)
    return Imported(
        facts,
        documents,
        report,
        source,
        weights=bool(has_weights),
        token_text=vocab_info is not None,
        tokenizer=vocab_info,
    )


def _attach_tokens(documents: list[RoutedDocument], opts: ImportOptions, report: ImportReport) -> dict:
    """Token ids and pieces from the generated text of each problem (``--text`` + ``--tokenizer``).

    Decode step ``i`` routes generated token ``i`` (the prompt's forward pass routes the prompt and
    emits generated token 0; step ``i`` feeds token ``i`` back in), so ``token_id[i] = encode(text)[i]``.
    """
    from moescope.interop.vocab import load_vocab

    if opts.text is None or opts.tokenizer is None:
        missing = "`text`" if opts.text is None else "`tokenizer`"
        raise ConfigError(f"{missing}: rebuilding token ids needs both `text` and `tokenizer`")
    vocab = load_vocab(opts.tokenizer)
    texts: dict[int, str] = {}
    for lineno, obj in iter_jsonl(Path(opts.text)):
        where = f"{opts.text}:{lineno}"
        texts[require(obj, "problem_id", int, where)] = require(obj, "generated", str, where)
    for d in documents:
        if d.doc_id not in texts:
            report.add(
                "no_text", 1, f"doc {d.doc_id}: `text` has no problem_id {d.doc_id}; token ids stay -1"
            )
            d.token_id = np.full(len(d), -1, np.int32)
            d.token = [""] * len(d)
            continue
        ids = np.asarray(vocab.encode(texts[d.doc_id]), np.int64)
        n_routed = int(d.position.max()) + 1
        if len(ids) not in (n_routed, n_routed + 1):
            report.add(
                "text_length_mismatch",
                1,
                f"doc {d.doc_id}: the text has {len(ids)} tokens, the log routes {n_routed} decode steps",
            )
        padded = np.concatenate([ids, [-1]])  # positions past the text get -1
        d.token_id = padded[np.minimum(d.position, len(ids))].astype(np.int32)
        d.token = [vocab.id_to_piece(i) if i >= 0 else "" for i in d.token_id]
    return vocab.describe()
