"""What the HTML report embeds: a bounded sample of tokens with their routing, and per-expert facts.

Everything here is plain arrays and lists, ready for compact JSON: expert ids and weights are stored
per layer as flat integer lists (``ex[layer][i * k + slot]``, weights in thousandths), so a page of
20,000 tokens of a 6-layer top-2 model carries about a megabyte of routing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.models.tokenizer import bytes_to_unicode
from moescope.trace.reader import Trace

#: Default bound on the tokens the viewer embeds (the page states the sample it holds).
MAX_TOKENS = 20_000
#: Default bound on (tokens x layers x k) routing entries embedded, so deep or wide models stay light.
MAX_ENTRIES = 1_000_000
#: Rows the atlas counts for partners and token tables (a strided sample); load and domains use every row.
ATLAS_TOKENS = 50_000


#: GPT-2's byte-level alphabet, reversed: the byte each printable character stands for.
_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def display_piece(piece: str | None, token_id: int) -> str:
    """A tokenizer piece as it reads in running text.

    Byte-level BPE pieces (GPT-2's ``Ġ`` for a space, ``Ċ`` for a newline, ``Â¶`` for ``¶``) are decoded
    when they form whole UTF-8 characters; SentencePiece's ``▁`` becomes a space; a piece without text
    shows its id.
    """
    if piece is None:
        return f"#{token_id} "
    if piece and all(c in _BYTE_OF for c in piece):
        try:
            return bytes(_BYTE_OF[c] for c in piece).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return piece.replace("▁", " ")


@dataclass
class Sample:
    """The documents the viewer shows, their token texts and routing, in trace order."""

    docs: list[dict[str, Any]]
    doc_ids: np.ndarray  # (n,) per token
    positions: np.ndarray  # (n,)
    token_ids: np.ndarray  # (n,)
    text: list[str]
    experts: np.ndarray  # (n, L, k) int, -1 missing
    weights: np.ndarray | None  # (n, L, k) float
    entropy: np.ndarray  # (n, L) bits
    entropy_source: str
    of_docs: int
    of_tokens: int
    truncated: list[int] = field(default_factory=list)


def _doc_table(trace: Trace) -> tuple[list[int], dict[int, int], dict[int, str]]:
    order: list[int] = []
    length: dict[int, int] = defaultdict(int)
    label: dict[int, str] = {}
    labels = list(trace.labels)
    for b in trace.iter_batches(["doc_id", "label"]):
        ids, first, counts = np.unique(b.doc_id, return_index=True, return_counts=True)
        for i in np.argsort(first, kind="stable").tolist():
            d = int(ids[i])
            if d not in length:
                order.append(d)
                code = int(b.label[first[i]]) if b.label is not None else -1
                label[d] = labels[code] if code >= 0 else ""
            length[d] += int(counts[i])
    return order, dict(length), label


def choose_documents(
    trace: Trace, max_tokens: int
) -> tuple[list[int], dict[int, int], dict[int, str], dict[int, int]]:
    """Documents to show: round-robin over domain labels in trace order, until ``max_tokens``.

    Round-robin keeps every domain in a bounded sample; a document that would pass the bound is cut
    to the tokens left (the page says so), so the first document always shows even when it is huge.
    """
    order, length, label = _doc_table(trace)
    by_label: dict[str, list[int]] = defaultdict(list)
    for d in order:
        by_label[label[d]].append(d)
    queues = [list(v) for v in by_label.values()]
    chosen: list[int] = []
    take: dict[int, int] = {}
    left = max_tokens
    while left > 0 and any(queues):
        for q in queues:
            if not q or left <= 0:
                continue
            d = q.pop(0)
            n = min(length[d], left)
            chosen.append(d)
            take[d] = n
            left -= n
    rank = {d: i for i, d in enumerate(order)}
    chosen.sort(key=rank.__getitem__)
    return chosen, take, label, length


def _entropy_bits(logits: np.ndarray, router_kind: str) -> np.ndarray:
    x = logits.astype(np.float64)
    if router_kind == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-x))
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    else:
        x = x - x.max(-1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(-1)
    return h


def read_sample(trace: Trace, max_tokens: int = MAX_TOKENS) -> Sample:
    """Read the viewer's documents: text pieces, expert ids, weights and routing entropy per layer.

    Entropy is the Shannon entropy (bits) of the router's distribution over all experts when the
    trace holds logits, else of the renormalised top-k weights (the page says which).
    """
    L, k = len(trace.moe_layers), trace.top_k
    max_tokens = max(1, min(max_tokens, MAX_ENTRIES // max(L * k, 1)))
    chosen, take, label, length = choose_documents(trace, max_tokens)
    if not chosen:
        raise ConfigError(f"{trace.path}: the trace holds no tokens to show")
    cols = ["doc_id", "position", "token_id", "experts"]
    if trace.has_weights:
        cols.append("weights")
    if trace.has_logits:
        cols.append("logits")
    if trace.columns.get("token_text"):
        cols.append("token")
    sub = trace.filter(documents=chosen)
    parts: dict[str, list[Any]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    left = sum(take.values())
    # no read-ahead thread: it would go on decoding the rest of the trace (batches the document filter
    # empties) after the last chosen token is read; here the loop stops there
    for rb in sub.iter_arrow(cols, batch_size=16384, read_ahead=0):
        b = sub.to_batch(rb)
        keep = np.zeros(len(b), bool)
        for i, d in enumerate(b.doc_id.tolist()):
            if seen[d] < take[d]:
                keep[i] = True
                seen[d] += 1
        idx = np.nonzero(keep)[0]
        left -= len(idx)
        parts["doc"].append(b.doc_id[idx])
        parts["pos"].append(b.position[idx])
        parts["tok"].append(b.token_id[idx])
        ex = b.experts[idx].astype(np.int32)
        ex[b.experts[idx] == trace.missing_id] = -1
        parts["ex"].append(ex)
        if b.weights is not None:
            parts["w"].append(b.weights[idx].astype(np.float32))
        if b.logits is not None:
            parts["h"].append(_entropy_bits(b.logits[idx], trace.routing.router_kind))
        pieces = b.token if b.token is not None else [None] * len(b)
        parts["text"].extend(display_piece(pieces[i], int(b.token_id[i])) for i in idx.tolist())
        if left <= 0:
            break  # asking for one more batch would decode the rest of the trace
    doc = np.concatenate(parts["doc"])
    ex = np.concatenate(parts["ex"])
    weights = np.concatenate(parts["w"]) if parts["w"] else None
    if parts["h"]:
        entropy, source = np.concatenate(parts["h"]), "router softmax over all experts (logits column)"
    elif weights is not None:
        w = np.where(ex >= 0, np.nan_to_num(weights), 0.0).astype(np.float64)
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(w > 0, w * np.log2(w), 0.0).sum(-1)
        source = "renormalised top-k weights (the trace has no logits)"
    else:
        entropy, source = np.zeros(ex.shape[:2]), "unavailable (no logits, no weights)"
    docs, start = [], 0
    for d in chosen:
        n = int((doc == d).sum())
        docs.append({"id": int(d), "label": label[d], "start": start, "n": n})
        start += n
    truncated = [d for d in chosen if take[d] < length[d]]
    return Sample(
        docs=docs,
        doc_ids=doc,
        positions=np.concatenate(parts["pos"]),
        token_ids=np.concatenate(parts["tok"]),
        text=parts["text"],
        experts=ex,
        weights=weights,
        entropy=entropy,
        entropy_source=source,
        of_docs=len(length),
        of_tokens=trace.num_tokens,
        truncated=truncated,
    )
