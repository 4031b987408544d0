"""Queries against a plain reconstruction: previous-token windows, batch boundaries, hashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.predict import evaluate, iter_contexts, make_predictor
from moescope.predict.queries import hash_tokens
from moescope.trace.synthetic import write_synthetic_trace


def test_previous_windows_cross_batches_but_never_documents(tmp_path: Path) -> None:
    tr = write_synthetic_trace(
        tmp_path / "t", n_tokens=300, num_layers=3, num_experts=8, top_k=2, doc_len=50, seed=1
    )
    full = tr.load(["doc_id", "position", "experts", "token_id"])
    W = 3
    seen = 0
    for ctx in iter_contexts(tr, window=W, batch_size=37):  # batches cut documents
        q = ctx.queries(2, 1)
        for r in range(len(ctx)):
            i = seen + r
            for w in range(W):
                j = i - 1 - w
                if j >= 0 and full.doc_id[j] == full.doc_id[i]:
                    np.testing.assert_array_equal(q.prev[r, w], full.experts[j])
                    assert q.prev_token_id[r, w] == full.token_id[j]
                else:
                    assert (q.prev[r, w] == 255).all() and q.prev_token_id[r, w] == -1
            np.testing.assert_array_equal(q.own[r], full.experts[i, :2])
        seen += len(ctx)
    assert seen == 300


def test_batch_size_does_not_change_results(tmp_path: Path) -> None:
    tr = write_synthetic_trace(
        tmp_path / "t", n_tokens=400, num_layers=3, law="markov", noise=0.2, doc_len=40, seed=2
    )
    pred = make_predictor("window").fit(tr)
    a = evaluate(pred, tr, modes=[1, 0], n_boot=10, batch_size=29)
    b = evaluate(pred, tr, modes=[1, 0], n_boot=10)
    for ra, rb in zip(a.table, b.table, strict=True):
        assert ra["value"] == rb["value"] and ra["queries"] == rb["queries"]


def test_token_hash_is_stable() -> None:
    ids = hash_tokens(["Ġthe", "Ġthe", "ĠThe", None])
    assert ids[0] == ids[1] != ids[2] and ids[3] == -1 and (ids[:3] >= 0).all()


def test_same_token_history_matches_a_plain_scan_across_batches(tmp_path: Path) -> None:
    # small vocabulary so tokens repeat; batches of 23 cut the 60-token documents
    tr = write_synthetic_trace(
        tmp_path / "t", n_tokens=300, num_layers=3, num_experts=8, top_k=2, doc_len=60, vocab_size=12, seed=3
    )
    full = tr.load(["doc_id", "position", "experts", "token_id"])
    seen, hits = 0, 0
    for ctx in iter_contexts(tr, window=1, batch_size=23):
        q = ctx.queries(1, 1)
        t = ctx.queries(1, 0)
        assert t.same_token is None  # temporal: the token is hidden
        for r in range(len(ctx)):
            i = seen + r
            earlier = [
                j
                for j in range(i)
                if full.doc_id[j] == full.doc_id[i] and full.token_id[j] == full.token_id[i]
            ]
            if earlier:
                np.testing.assert_array_equal(q.same_token[r], full.experts[earlier[-1]])
                hits += 1
            else:
                assert (q.same_token[r] == tr.missing_id).all()
        seen += len(ctx)
    assert seen == 300 and hits > 100
