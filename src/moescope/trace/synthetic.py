"""Synthetic traces with known routing laws, for tests, benchmarks and analytic checks.

``law="uniform"`` draws every router logit i.i.d. normal, so routing is uniform at random (load CV
near 0, repetition at its analytic null, zero mutual information). ``law="token"`` makes the expert
set a fixed function of the token id and layer (a deterministic router). ``law="markov"`` makes
layer ``l+1``'s set a fixed function of layer ``l``'s first choice, with probability ``1 - noise``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moescope.trace.manifest import RoutingSpec
from moescope.trace.reader import Trace
from moescope.trace.schema import default_columns
from moescope.trace.writer import TraceWriter

LAWS = ("uniform", "token", "markov")


def _topk_from_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (descending logit) and their softmax-renormalised weights; ``logits`` is ``(n, L, E)``."""
    part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(logits, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids = np.take_along_axis(part, order, axis=-1)
    vals = np.take_along_axis(vals, order, axis=-1).astype(np.float32)
    w = np.exp(vals - vals[..., :1])
    return ids, (w / w.sum(-1, keepdims=True)).astype(np.float32)


def _chunk_logits(
    rng: np.random.Generator, law: str, token_id: np.ndarray, L: int, E: int, k: int, noise: float
) -> np.ndarray:
    n = len(token_id)
    logits = rng.standard_normal((n, L, E), dtype=np.float32)
    if law == "token":
        # expert j of layer l for token t: (t * k + l + j) % E gets a dominant logit
        base = (token_id[:, None] * k + np.arange(L)[None, :]) % E  # (n, L)
        for j in range(k):
            np.put_along_axis(logits, ((base + j) % E)[..., None], 10.0 - j, axis=-1)
    elif law == "markov":
        perm = np.random.default_rng(12345).permutation(E)
        first = rng.integers(0, E, n)
        for layer in range(L):
            row = logits[:, layer, :]
            np.put_along_axis(row, first[:, None], 10.0, axis=-1)
            follow = rng.random(n) >= noise
            nxt = perm[first]
            first = np.where(follow, nxt, rng.integers(0, E, n))
    return logits


def write_synthetic_trace(
    path: str | Path,
    *,
    n_tokens: int,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    law: str = "uniform",
    noise: float = 0.0,
    logits: bool = False,
    doc_len: int = 256,
    labels: Sequence[str] = ("a", "b"),
    vocab_size: int = 1000,
    seed: int = 0,
    chunk_tokens: int = 65536,
    shard_rows: int = 262144,
) -> Trace:
    """Write a synthetic trace of ``n_tokens`` rows in chunks (memory does not grow with ``n_tokens``).

    Documents are ``doc_len`` tokens long and labelled round-robin from ``labels``.
    """
    if law not in LAWS:
        raise ValueError(f"law must be one of {LAWS}, got {law!r}")
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    spec = RoutingSpec(
        num_experts=E, top_k=k, moe_layers=list(range(L)), family="synthetic", num_hidden_layers=L
    )
    cols = default_columns(weights=True, logits=logits)
    chunk_tokens = max(doc_len, (chunk_tokens // doc_len) * doc_len)  # chunks end on document boundaries
    with TraceWriter.create(
        path,
        spec,
        columns=cols,
        model={"id": f"synthetic-{law}"},
        source={"law": law, "noise": noise, "seed": seed},
        shard_rows=shard_rows,
        overwrite=True,
    ) as w:
        for start in range(0, n_tokens, chunk_tokens):
            n = min(chunk_tokens, n_tokens - start)
            rows = np.arange(start, start + n)
            doc = rows // doc_len
            tok = rng.integers(0, vocab_size, n).astype(np.int32)
            lg = _chunk_logits(rng, law, tok, L, E, k, noise)
            ids, wts = _topk_from_logits(lg, k)
            lab = np.asarray(labels, dtype=object)[doc % len(labels)]
            w.append(
                doc_id=doc,
                position=rows % doc_len,
                token_id=tok,
                label=list(lab),
                experts=ids,
                weights=wts,
                logits=lg.astype(np.float16) if logits else None,
            )
            w.commit(int(doc[-1]))
    return Trace.open(path)
