"""Small hand-built traces for the analysis tests (known contents, multiple shards, gaps, missing rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns, missing_id


def build_trace(
    path: Path,
    *,
    docs: int = 6,
    doc_len: int = 23,
    L: int = 3,
    E: int = 6,
    k: int = 2,
    labels: tuple[str, ...] = ("x", "y"),
    missing_frac: float = 0.05,
    logits: bool = True,
    weights: bool = True,
    router_kind: str = "softmax",
    slot_order: str | None = None,
    vocab: int = 12,
    seed: int = 0,
) -> tuple[Trace, dict]:
    """A trace whose experts are the top-k of float16 logits (so aux loss can be checked against transformers).

    Returns the trace and the raw arrays it holds (doc, pos, tok, label, experts with the sentinel,
    weights, logits as float32) for brute-force references.
    """
    rng = np.random.default_rng(seed)
    n = docs * doc_len
    # distinct values within each row (no top-k ties), exactly representable in float16
    steps = rng.permuted(np.broadcast_to(np.arange(E), (n, L, E)), axis=-1) * rng.uniform(
        0.25, 1.5, (n, L, 1)
    )
    lg = (steps + rng.integers(-8, 8, (n, L, 1)) / 4).astype(np.float16)
    ex = np.argsort(-lg.astype(np.float32), axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(lg.astype(np.float32), ex, -1)
    w = np.exp(vals - vals[..., :1])
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    sentinel = missing_id(E)
    ex = ex.astype(np.int64)
    miss = rng.random((n, L)) < missing_frac
    ex[miss] = sentinel
    w[miss] = np.nan
    doc = np.repeat(np.arange(docs), doc_len)
    pos = np.tile(np.arange(doc_len), docs)
    keep = np.ones(n, bool)
    keep[2 * doc_len + 7] = False  # a gap inside document 2
    tok = rng.integers(0, vocab, n)
    lab = [labels[d % len(labels)] for d in doc]
    spec = RoutingSpec(
        num_experts=E,
        top_k=k,
        moe_layers=[2 * i + 1 for i in range(L)],
        family="hand",
        router_kind=router_kind,
        num_hidden_layers=2 * L + 1,
        slot_order=slot_order or "rank",
    )
    source: dict = {}
    cols = default_columns(weights=weights, logits=logits)
    with TraceWriter.create(path, spec, columns=cols, source=source, shard_rows=40, overwrite=True) as wr:
        for d in range(docs):
            r = np.flatnonzero((doc == d) & keep)
            wr.append(
                doc_id=doc[r],
                position=pos[r],
                token_id=tok[r],
                label=[lab[i] for i in r],
                experts=ex[r],
                weights=w[r] if weights else None,
                logits=lg[r] if logits else None,
            )
            wr.commit(d)
    r = np.flatnonzero(keep)
    arrays = {
        "doc": doc[r],
        "pos": pos[r],
        "tok": tok[r],
        "label": np.asarray(lab)[r],
        "experts": ex[r],
        "weights": w[r],
        "logits": lg[r].astype(np.float32),
        "sentinel": sentinel,
        "E": E,
        "k": k,
        "L": L,
        "layers": spec.moe_layers,
    }
    return Trace.open(path), arrays
