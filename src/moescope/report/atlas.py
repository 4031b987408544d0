"""The expert atlas: what is known about each (layer, expert), counted in one streaming pass.

Load share, first-choice share, usual partners in the same layer (co-selected for the same token)
and in the next layer (chosen by the same token one layer later), the domains it takes above its
baseline and the tokens it takes most against its baseline (on about ``ATLAS_TOKENS`` tokens).

Counts an ``--analysis`` folder already holds (``load_per_expert.csv``, ``domain_share.csv``,
``coactivation.csv``, written over every token) are read instead of recounted; what is left is
counted batch by batch with one ``bincount`` per quantity over all layers at once (no Python loop
per token or per layer), so memory stays flat whatever the trace length.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from moescope.report.data import ATLAS_TOKENS, display_piece
from moescope.trace.reader import Trace
from moescope.trace.schema import nested_to_numpy

TOP = 5
#: Largest (layer x expert) x token table the token lifts count densely (else a sort groups them).
DENSE_CELLS = 1 << 23


def _table(path: Path, columns: list[str]) -> dict[str, np.ndarray] | None:
    """The named columns of a CSV as arrays (polars' reader: the coactivation table has L * E^2 rows)."""
    import polars as pl

    try:
        df = pl.read_csv(path, columns=columns)
    except (OSError, pl.exceptions.PolarsError):
        return None
    return {c: df[c].to_numpy() for c in columns}


def analysis_counts(folder: Path, trace: Trace) -> dict[str, np.ndarray]:
    """The atlas counts an analysis folder holds for this trace (all tokens); empty where it holds none.

    Keys: ``load``, ``first`` ``(L, E)`` and ``layer_tokens`` ``(L,)`` from ``load_per_expert.csv``;
    ``dom`` ``(D, L, E)`` and ``dom_tokens`` ``(D, L)`` from ``domain_share.csv``; ``same``
    ``(L, E, E)`` and ``same_load`` from ``coactivation.csv``. Used only when the folder's
    ``summary.json`` counted this trace's tokens.
    """
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if summary.get("tokens") != trace.num_tokens:
        return {}  # counted a subset (or another trace): count here instead
    E, layers, labels = trace.num_experts, list(trace.moe_layers), list(trace.labels)
    L, D = len(layers), len(labels)
    lut = np.full(max(layers) + 1, -1, np.int64)
    lut[layers] = np.arange(L)

    def col_of(layer: np.ndarray) -> np.ndarray:
        j = lut[np.clip(layer.astype(np.int64), 0, len(lut) - 1)]
        if (j < 0).any() or (layer >= len(lut)).any():
            raise ValueError("a layer this trace does not have")
        return j

    out: dict[str, np.ndarray] = {}
    try:
        t = _table(
            folder / "load_per_expert.csv", ["layer", "expert", "tokens", "assignments", "first_choice_count"]
        )
        if t is not None and len(t["layer"]) == L * E:
            j, e = col_of(t["layer"]), t["expert"].astype(np.int64)
            load, first = np.zeros((L, E), np.int64), np.zeros((L, E), np.int64)
            ltok = np.zeros(L, np.int64)
            load[j, e], first[j, e], ltok[j] = t["assignments"], t["first_choice_count"], t["tokens"]
            out["load"], out["first"], out["layer_tokens"] = load, first, ltok
        t = _table(folder / "domain_share.csv", ["domain", "layer", "expert", "tokens", "count"])
        if t is not None and D and len(t["layer"]) == D * L * E:
            d = np.array([labels.index(x) for x in t["domain"].tolist()], np.int64)
            j, e = col_of(t["layer"]), t["expert"].astype(np.int64)
            dom, dtok = np.zeros((D, L, E), np.int64), np.zeros((D, L), np.int64)
            dom[d, j, e], dtok[d, j] = t["count"], t["tokens"]
            out["dom"], out["dom_tokens"] = dom, dtok
        t = _table(folder / "coactivation.csv", ["layer", "a", "b", "count_ab", "count_a"])
        if t is not None and len(t["layer"]) == L * E * (E - 1):
            j, a, b = col_of(t["layer"]), t["a"].astype(np.int64), t["b"].astype(np.int64)
            same, single = np.zeros((L, E, E), np.int64), np.zeros((L, E), np.int64)
            same[j, a, b], single[j, a] = t["count_ab"], t["count_a"]
            out["same"], out["same_load"] = same, single
    except (KeyError, ValueError, IndexError, TypeError):
        return {}  # a folder of another layout: count everything here
    return out


def expert_atlas(
    trace: Trace,
    token_rows: int = ATLAS_TOKENS,
    *,
    analysis: Path | None = None,
    batch_size: int = 65536,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer lists (``[layer][expert]``) of the atlas facts, JSON-ready.

    Load, first choice and domains count every token (or come from ``analysis``); partners in the next
    layer and the token tables count every ``stride``-th token, spread over the whole trace (traces
    are often ordered by domain); same-layer partners come from ``analysis`` or that sample.
    ``progress`` is called with the rows of each batch read.
    """
    E, L = trace.num_experts, len(trace.moe_layers)
    labels = list(trace.labels)
    D = len(labels)
    known = analysis_counts(Path(analysis), trace) if analysis is not None else {}
    full = "load" not in known or (D > 0 and "dom" not in known)
    missing = trace.missing_id
    M = missing + 1 if (missing + 1) * L * (D + 1) <= 1 << 22 else E + 1  # bins per layer in full counts
    lay = np.arange(L, dtype=np.int32)[None, :, None]
    load = np.zeros((L, E), np.int64)
    first = np.zeros((L, E), np.int64)
    dom = np.zeros((max(D, 1), L, E), np.int64)
    dom_tokens = np.zeros((max(D, 1), L), np.int64)
    layer_tokens = np.zeros(L, np.int64)
    F = E + 1  # sampled ids with missing -> E, so no boolean masks in the pair counts
    same = np.zeros(L * F * F, np.int64)
    nxt = np.zeros(max(L - 1, 0) * F * F, np.int64)
    sub_load = np.zeros(L * F, np.int64)
    keys: list[np.ndarray] = []
    totals: list[np.ndarray] = []
    pieces: dict[int, str] = {}
    stride = max(1, -(-trace.num_tokens // max(token_rows, 1)))
    tokens = 0
    seen = 0
    has_text = bool(trace.columns.get("token_text"))
    cols = ["token_id", "experts"] + (["label"] if full else []) + (["token"] if has_text else [])
    with threadpool_limits(1, user_api="blas"):  # _pair_counts' products: one thread beats a busy pool
        for rb in trace.iter_arrow(cols, batch_size=batch_size):
            n = rb.num_rows
            sub = np.arange((-tokens) % stride, n, stride)
            tokens += n
            ex = nested_to_numpy(rb.column("experts"))  # (n, L, k) stored ids, zero-copy
            if full:
                lab = trace.label_codes(rb.column("label")) if D else np.full(n, -1, np.int32)
                lab = np.where(lab >= 0, lab, D).astype(np.intp)  # unlabelled rows: an extra bin, dropped
                ids = ex if M == missing + 1 else np.where(ex == missing, E, ex)
                key = np.add(ids, ((lab[:, None] * L + lay[..., 0]) * M)[:, :, None], dtype=np.intp)
                cnt = np.bincount(key.ravel(), minlength=(D + 1) * L * M).reshape(D + 1, L, M)[..., :E]
                load += cnt.sum(0)
                # slot 0 per (domain, layer): first choices, and the tokens with routing recorded there
                c0 = np.bincount(key[..., 0].ravel(), minlength=(D + 1) * L * M).reshape(D + 1, L, M)[..., :E]
                first += c0.sum(0)
                layer_tokens += c0.sum((0, 2))
                if D:
                    dom += cnt[:D]
                    dom_tokens += c0[:D].sum(2)
            if len(sub):
                es = ex[sub].astype(np.int64)
                ok = es != missing
                es[~ok] = E
                sub_load += np.bincount((lay * F + es).ravel(), minlength=L * F)
                _pair_counts(es, F, same if "same" not in known else None, nxt)
                tok = rb.column("token_id").to_numpy()[sub].astype(np.int64) + 1  # -1 (unknown) -> 0
                if has_text:
                    text = rb.column("token").take(sub).to_pylist()
                    for t, piece in zip(tok.tolist(), text, strict=True):
                        pieces.setdefault(t, piece)
                # key = ((layer * E + expert) << 32) | token
                kk = ((lay.astype(np.int64) * E + es) << 32) | tok[:, None, None]
                keys.append(kk[ok])
                totals.append(tok)
                seen += len(sub)
            if progress is not None:
                progress(n)
    if not full:
        load, first, layer_tokens = known["load"], known["first"], known["layer_tokens"]
        if D:
            dom, dom_tokens = known["dom"], known["dom_tokens"]
    sub_counts = sub_load.reshape(L, F)[:, :E]
    same_counts = same.reshape(L, F, F)[:, :E, :E]
    same_load = sub_counts
    if "same" in known:
        same_counts, same_load = known["same"], known["same_load"]
    nxt_counts = nxt.reshape(max(L - 1, 0), F, F)[:, :E, :E]
    # the sampled rows' own loads: next-layer partner shares and token lifts are ratios within that sample
    sub_base = sub_counts / max(seen, 1)
    share = load / np.maximum(load.sum(1, keepdims=True), 1)
    base = load / np.maximum(layer_tokens, 1)[:, None]  # share of the layer's routed tokens taking it
    return {
        "load": np.round(share, 5).tolist(),
        "per_token": np.round(base, 5).tolist(),
        "first": np.round(first / np.maximum(first.sum(1, keepdims=True), 1), 5).tolist(),
        "same": _partners(same_counts, same_load),
        "next": _partners(nxt_counts, sub_counts[:-1]) if L > 1 else [],
        "domains": _domains(dom, dom_tokens, base, labels),
        "tokens": _tokens(keys, totals, pieces, sub_base, L, E),
        "token_rows": seen,
        "stride": stride,
        "reused": ([] if full else ["load_per_expert.csv"] + (["domain_share.csv"] if D else []))
        + (["coactivation.csv"] if "same" in known else []),
    }


def _pair_counts(es: np.ndarray, F: int, same: np.ndarray | None, nxt: np.ndarray, rows: int = 8192) -> None:
    """Add the sampled rows' slot pairs to ``same`` (same layer, slots s != t) and ``nxt`` (layer j slot s,
    layer j + 1 slot t); ``es`` is ``(r, L, k)`` with missing ids set to ``F - 1`` (a bin then dropped).

    With ``X[j]`` the ``(rows, F)`` matrix of how often each token holds each expert at layer ``j``,
    the pairs are ``X[j]^T X[j]`` less its diagonal's own terms and ``X[j]^T X[j+1]``: one BLAS product
    per layer and chunk of ``rows`` rows (float32 holds these integer sums exactly below 2**24).
    """
    r, L, _k = es.shape
    off = (np.arange(L, dtype=np.intp) * F)[None, :, None]
    for i in range(0, r, rows):
        e = es[i : i + rows]
        n = len(e)
        # index (layer, row, expert): X comes out C-contiguous (L, n, F), as BLAS wants it
        flat = np.add(e, off * n + (np.arange(n, dtype=np.intp) * F)[:, None, None], dtype=np.intp)
        X = np.bincount(flat.ravel(), minlength=n * L * F).reshape(L, n, F).astype(np.float32)
        Xt = X.transpose(0, 2, 1)
        if same is not None:
            g = np.rint(Xt @ X).astype(np.int64)  # (L, F, F)
            idx = np.arange(F)
            g[:, idx, idx] -= X.sum(1).astype(np.int64)  # a slot never pairs with itself
            same += g.reshape(-1)
        if L > 1:
            nxt += np.rint(Xt[:-1] @ X[1:]).astype(np.int64).reshape(-1)


def _partners(counts: np.ndarray, load: np.ndarray) -> list[list[list[Any]]]:
    """Top partners of each expert: ``[partner, P(partner | expert)]``."""
    L, E = counts.shape[:2]
    p = counts / np.maximum(load[:, :, None], 1)
    order = np.argsort(-p, axis=2, kind="stable")[:, :, :TOP]
    top_p = np.take_along_axis(p, order, 2).round(4).tolist()
    top_c = np.take_along_axis(counts, order, 2).tolist()
    order = order.tolist()
    return [
        [
            [[o, q] for o, q, c in zip(order[j][e], top_p[j][e], top_c[j][e], strict=True) if c > 0]
            for e in range(E)
        ]
        for j in range(L)
    ]


def _domains(dom: np.ndarray, dom_tokens: np.ndarray, base: np.ndarray, labels: list[str]) -> list[Any]:
    """Per expert, domains by lift ``P(expert | domain) / P(expert)`` (above 1: taken more than baseline)."""
    L, E = base.shape
    if len(labels) < 1:
        return [[[] for _ in range(E)] for _ in range(L)]
    rate = dom / np.maximum(dom_tokens[:, :, None], 1)  # (D, L, E)
    lift = rate / np.maximum(base[None], 1e-12)
    order = np.argsort(-lift, axis=0, kind="stable")[:TOP]  # (<=TOP, L, E)
    top_l = np.take_along_axis(lift, order, 0).round(3)
    top_c = np.take_along_axis(dom, order, 0)
    present = np.take_along_axis(np.broadcast_to(dom_tokens[:, :, None], dom.shape), order, 0) > 0
    return [
        [
            [
                [labels[int(order[i, j, e])], float(top_l[i, j, e]), int(top_c[i, j, e])]
                for i in range(order.shape[0])
                if present[i, j, e]
            ]
            for e in range(E)
        ]
        for j in range(L)
    ]


def _tokens(
    keys: list[np.ndarray], totals: list[np.ndarray], pieces: dict[int, str], base: np.ndarray, L: int, E: int
) -> list[list[list[Any]]]:
    """Per expert, tokens with lift ``P(expert | token) / P(expert)`` above 1 among tokens seen at least
    3 times, ranked by ``count * log(lift)``."""
    empty = [[[] for _ in range(E)] for _ in range(L)]
    if not keys:
        return empty
    tt, tc = np.unique(np.concatenate(totals), return_counts=True)
    tt, tc = tt[tc >= 3], tc[tc >= 3]  # only tokens seen at least 3 times are listed
    if not len(tt):
        return empty
    kk = np.concatenate(keys)
    grp, tok = kk >> 32, kk & 0xFFFFFFFF
    T, G = len(tt), L * E
    if tt[-1] < 1 << 26:  # dense index of each kept token by table look-up (else a binary search)
        lut = np.full(int(tt[-1]) + 1, -1, np.int64)
        lut[tt] = np.arange(T)
        d = lut[np.minimum(tok, len(lut) - 1)]
        d[tok >= len(lut)] = -1
    else:
        d = np.searchsorted(tt, tok)
        d[(d >= T) | (tt[np.minimum(d, T - 1)] != tok)] = -1
    m = d >= 0
    grp, d = grp[m], d[m]
    if G * T <= DENSE_CELLS:  # (group, token) counts as one bincount
        cells = np.bincount(grp * T + d, minlength=G * T)
        nz = np.flatnonzero(cells)
        c, grp, d = cells[nz], nz // T, nz % T
    else:
        u, c = np.unique(grp * T + d, return_counts=True)
        grp, d = u // T, u % T
    tok, nt = tt[d], tc[d]  # in (group, token) order, as the stable sort below expects
    lift = c / nt / np.maximum(base.reshape(-1)[grp], 1e-12)
    keep = lift > 1.0
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
