"""The same token's earlier occurrence in a document: a law where it is the only cue."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.predict import iter_contexts, make_predictor, split_documents
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns

E, K, L, VOCAB, DOC_LEN = 8, 2, 3, 5, 48


@pytest.fixture(scope="module")
def doc_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trace, Trace]:
    """Each document draws a fresh random expert set per (token id, layer): nothing carries across
    documents or layers, but a token repeated in a document is routed exactly like its first occurrence."""
    rng = np.random.default_rng(0)
    spec = RoutingSpec(num_experts=E, top_k=K, moe_layers=list(range(L)), family="synthetic")
    path = tmp_path_factory.mktemp("s") / "t"
    with TraceWriter.create(path, spec, columns=default_columns(weights=False), overwrite=True) as w:
        for doc in range(24):
            table = np.argsort(rng.random((VOCAB, L, E)), axis=-1)[..., :K].astype(np.uint8)  # (V, L, K)
            tok = rng.integers(0, VOCAB, DOC_LEN)
            w.append(
                doc_id=np.full(DOC_LEN, doc),
                position=np.arange(DOC_LEN),
                token_id=tok,
                label="x",
                experts=table[tok],
            )
            w.commit(doc)
    tr = Trace.open(path)
    train, test = split_documents(tr, 0.25, seed=0)
    return tr.filter(documents=train), tr.filter(documents=test)


def _recall_on_repeats(pred, test: Trace) -> tuple[float, float]:
    """Slot recall at distance 1 over queries whose token occurred earlier in its document, and over the rest,
    computed from the ranked ids and a plain scan of each document."""
    full = test.load(["doc_id", "token_id", "experts"])
    seen_before = np.zeros(len(full.doc_id), bool)
    for i in range(len(full.doc_id)):
        same_doc = full.doc_id[:i] == full.doc_id[i]
        seen_before[i] = bool((full.token_id[:i][same_doc] == full.token_id[i]).any())
    hits = {True: [], False: []}
    start = 0
    for ctx in iter_contexts(test, window=pred.history_window()):
        for layer in range(L):
            ids, _ = pred.predict(ctx.queries(layer, 1))
            for r in range(len(ctx)):
                got = len(set(ids[r].tolist()) & set(ctx.actual[r, layer].tolist())) / K
                hits[bool(seen_before[start + r])].append(got)
        start += len(ctx)
    return float(np.mean(hits[True])), float(np.mean(hits[False]))


def test_same_token_baseline_copies_the_earlier_occurrence(doc_token: tuple[Trace, Trace]) -> None:
    train, test = doc_token
    rep, first = _recall_on_repeats(make_predictor("frequency", strategy="same_token").fit(train), test)
    assert rep == 1.0
    assert first < 0.5  # chance is K/E = 0.25: first occurrences carry no information


def test_learned_and_best_use_the_same_token_feature(doc_token: tuple[Trace, Trace]) -> None:
    train, test = doc_token
    kw = dict(distances=(1,), hidden=32, epochs=8, batch_size=64, lr=1e-2, token_buckets=16, random_state=0)
    with_f, _ = _recall_on_repeats(make_predictor("learned", **kw).fit(train), test)
    without, _ = _recall_on_repeats(make_predictor("learned", use_same_token=False, **kw).fit(train), test)
    assert with_f >= 0.95 and without < 0.5, (with_f, without)
    best = make_predictor("best", distances=(1,), learned=None).fit(train)
    assert _recall_on_repeats(best, test)[0] >= 0.95
