"""The expert atlas: what is known about each (layer, expert), counted in one pass over the trace.

Load share, first-choice share, usual partners in the same layer (co-selected for the same token)
and in the next layer (chosen by the same token one layer later), the domains it takes above its
baseline and the tokens it takes most against its baseline (on the first ``ATLAS_TOKENS`` tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescope.report.data import ATLAS_TOKENS, display_piece
from moescope.trace.reader import Trace

TOP = 5


def expert_atlas(trace: Trace, token_rows: int = ATLAS_TOKENS) -> dict[str, Any]:
    """Per-layer lists (``[layer][expert]``) of the atlas facts, JSON-ready."""
    E, L = trace.num_experts, len(trace.moe_layers)
    labels = list(trace.labels)
    D = max(len(labels), 1)
    load = np.zeros((L, E), np.int64)
    first = np.zeros((L, E), np.int64)
    same = np.zeros((L, E, E), np.int64)
    nxt = np.zeros((max(L - 1, 0), E, E), np.int64)
    dom = np.zeros((D, L, E), np.int64)
    dom_tokens = np.zeros(D, np.int64)
    keys: list[np.ndarray] = []
    totals: list[np.ndarray] = []
    pieces: dict[int, str] = {}
    # partners and token tables count every ``stride``-th row: spread over the whole trace (traces are
    # often ordered by domain), bounded in cost; load, first choice and domains count every row
    stride = max(1, -(-trace.num_tokens // max(token_rows, 1)))
    seen = 0
    tokens = 0
    cols = ["token_id", "label", "experts"] + (["token"] if trace.columns.get("token_text") else [])
    for b in trace.iter_batches(cols):
        ex = b.experts.astype(np.int64)
        ok = ex != trace.missing_id
        n, _, k = ex.shape
        tokens += n
        lab = b.label if b.label is not None else np.full(n, -1)
        lab = np.where(lab >= 0, lab, 0)
        dom_tokens += np.bincount(lab, minlength=D)[:D]
        eye = ~np.eye(k, dtype=bool)  # slot pairs (s, t) with s != t
        sub = np.arange(tokens - n, tokens) % stride == 0
        exs, oks = ex[sub], ok[sub]
        for j in range(L):
            e, m = ex[:, j], ok[:, j]
            load[j] += np.bincount(e[m], minlength=E)[:E]
            first[j] += np.bincount(e[:, 0][m[:, 0]], minlength=E)[:E]
            dom[:, j] += np.bincount((lab[:, None] * E + e)[m], minlength=D * E).reshape(D, E)
            e, m = exs[:, j], oks[:, j]
            pair = e[:, :, None] * E + e[:, None, :]  # (n, k, k)
            pm = m[:, :, None] & m[:, None, :] & eye
            same[j] += np.bincount(pair[pm], minlength=E * E).reshape(E, E)
            if j + 1 < L:
                e2, m2 = exs[:, j + 1], oks[:, j + 1]
                pair = e[:, :, None] * E + e2[:, None, :]
                pm = m[:, :, None] & m2[:, None, :]
                nxt[j] += np.bincount(pair[pm], minlength=E * E).reshape(E, E)
        r = int(sub.sum())
        if r:
            tok = b.token_id[sub].astype(np.int64) + 1  # -1 (unknown) -> 0
            if b.token is not None:
                for t, i in zip(tok.tolist(), np.flatnonzero(sub).tolist(), strict=True):
                    pieces.setdefault(t, b.token[i])
            # key = ((layer * E + expert) << 32) | token
            lay = np.arange(L, dtype=np.int64)[None, :, None]
            kk = ((lay * E + exs) << 32) | tok[:, None, None]
            keys.append(kk[oks])
            totals.append(tok)
            seen += r
    # the sampled rows' own loads: partner shares and token lifts are ratios within that sample
    sub_load = np.zeros((L, E), np.int64)
    for kk in keys:
        g = (kk >> 32).astype(np.int64)
        sub_load += np.bincount(g, minlength=L * E).reshape(L, E)
    sub_base = sub_load / max(seen, 1)
    share = load / np.maximum(load.sum(1, keepdims=True), 1)
    base = load / max(tokens, 1)  # share of tokens routed to (layer, expert)
    out: dict[str, Any] = {
        "load": np.round(share, 5).tolist(),
        "per_token": np.round(base, 5).tolist(),
        "first": np.round(first / np.maximum(first.sum(1, keepdims=True), 1), 5).tolist(),
        "same": _partners(same, sub_load),
        "next": _partners(nxt, sub_load[:-1]) if L > 1 else [],
        "domains": _domains(dom, dom_tokens, base, labels),
        "tokens": _tokens(keys, totals, pieces, sub_base, L, E),
        "token_rows": seen,
        "stride": stride,
    }
    return out


def _partners(counts: np.ndarray, load: np.ndarray) -> list[list[list[Any]]]:
    """Top partners of each expert: ``[partner, P(partner | expert)]``."""
    out = []
    for j in range(counts.shape[0]):
        p = counts[j] / np.maximum(load[j][:, None], 1)
        row = []
        for e in range(counts.shape[1]):
            order = np.argsort(-p[e], kind="stable")[:TOP]
            row.append([[int(o), round(float(p[e, o]), 4)] for o in order if counts[j, e, o] > 0])
        out.append(row)
    return out


def _domains(dom: np.ndarray, dom_tokens: np.ndarray, base: np.ndarray, labels: list[str]) -> list[Any]:
    """Per expert, domains by lift ``P(expert | domain) / P(expert)`` (above 1: taken more than baseline)."""
    if len(labels) < 1:
        return [[[] for _ in range(base.shape[1])] for _ in range(base.shape[0])]
    rate = dom / np.maximum(dom_tokens[:, None, None], 1)  # (D, L, E)
    lift = rate / np.maximum(base[None], 1e-12)
    out = []
    for j in range(base.shape[0]):
        row = []
        for e in range(base.shape[1]):
            order = np.argsort(-lift[:, j, e], kind="stable")[:TOP]
            row.append(
                [
                    [labels[d], round(float(lift[d, j, e]), 3), int(dom[d, j, e])]
                    for d in order
                    if dom_tokens[d] > 0
                ]
            )
        out.append(row)
    return out


def _tokens(
    keys: list[np.ndarray], totals: list[np.ndarray], pieces: dict[int, str], base: np.ndarray, L: int, E: int
) -> list[list[list[Any]]]:
    """Per expert, tokens with lift ``P(expert | token) / P(expert)`` above 1 among tokens seen at least
    3 times, ranked by ``count * log(lift)``."""
    empty = [[[] for _ in range(E)] for _ in range(L)]
    if not keys:
        return empty
    tt, tc = np.unique(np.concatenate(totals), return_counts=True)
    u, c = np.unique(np.concatenate(keys), return_counts=True)
    grp, tok = u >> 32, u & 0xFFFFFFFF
    nt = tc[np.searchsorted(tt, tok)]  # every key's token is among the totals
    lift = c / nt / np.maximum(base.reshape(-1)[grp], 1e-12)
    keep = (nt >= 3) & (lift > 1.0)
    grp, tok, c, lift = grp[keep], tok[keep], c[keep], lift[keep]
    # most taken against the baseline: count weighted by log-lift (a PMI-weighted count), so a
    # frequent, specific token ranks above a rare one seen once with this expert
    order = np.lexsort((-c, -c * np.log(lift), grp))
    grp, tok, c, lift = grp[order], tok[order], c[order], lift[order]
    starts = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]]) if len(grp) else np.array([], int)
    rank = np.arange(len(grp)) - np.repeat(starts, np.diff(np.r_[starts, len(grp)]))
    out = empty
    for i in np.flatnonzero(rank < TOP).tolist():
        j, e = divmod(int(grp[i]), E)
        t = int(tok[i])
        out[j][e].append([display_piece(pieces.get(t), t - 1), round(float(lift[i]), 2), int(c[i])])
    return out
