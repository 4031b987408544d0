"""Throughput of the table predictors: (token, layer) predictions per second, scores alone and scored.

The target is >= 1,000,000 predictions per second on 2 cores, scoring included. A prediction here
is what ``evaluate_many`` times: ``predict_scores`` on one layer's queries, then ``score_metrics``
(the ranks the metrics need). The scores and the scored total are timed in CPU seconds (the
machine may be shared: CPU seconds are the fairer number; scored wall seconds are printed too) on
a 64-expert, top-6, 26-layer synthetic trace (DeepSeek-V2-Lite's shape) split by document, spatial
distance 1 (distance 2 for ``rules-ahead``, seed 004's ``K = 2`` level, fitted for that distance
only). Compiled kernels are loaded or compiled on one untimed pass over the first block's layers.
Accuracy is benchmarks/predict.py.

    nice -n 10 .venv/bin/python benchmarks/predict_speed.py [--tokens 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from moescope.predict import iter_contexts, make_predictor, split_documents
from moescope.predict.metrics import score_metrics
from moescope.trace.synthetic import write_synthetic_trace

TABLES = [
    "popularity",
    "previous",
    "window",
    "same-token",
    "token",
    "rules-level1",
    "rules-level2",
    "rules-level3",
    "rules-level4",
    "rules-ahead",
    "rules-hybrid",
    "cooccurrence",
]
DISTANCE = {"rules-ahead": 2}  # query distance per predictor; 1 otherwise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--tokens", type=int, default=100_000, help="tokens in the synthetic trace (half are scored)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is printed")
    ap.add_argument("--predictors", default=",".join(TABLES), help="comma-separated registry names")
    args = ap.parse_args()
    L, E, k = 26, 64, 6
    tr = write_synthetic_trace(
        Path(tempfile.mkdtemp()) / "t",
        n_tokens=args.tokens,
        num_layers=L,
        num_experts=E,
        top_k=k,
        law="markov",
        noise=0.3,
        doc_len=512,
        vocab_size=5000,
        seed=0,
    )
    train_docs, test_docs = split_documents(tr, 0.5, seed=0)
    train, test = tr.filter(documents=train_docs), tr.filter(documents=test_docs)
    names = args.predictors.split(",")
    window = max(make_predictor(n).history_window() for n in names)
    distances = sorted({DISTANCE.get(n, 1) for n in names})
    batches: dict[int, list] = {d: [] for d in distances}  # (queries, actual, missing) per block and layer
    for ctx in iter_contexts(test, window=window, lookahead=False):
        for layer in range(L):
            actual = ctx.actual[:, layer]
            rows = np.nonzero(~(actual == ctx.missing).any(axis=1))[0]
            for d in distances:
                batches[d].append((ctx.queries(layer, d, rows=rows), actual[rows], ctx.missing))
    n = sum(len(q) for q, _, _ in batches[distances[0]])
    print(
        f"{n:,} predictions per pass (test half of {args.tokens:,} tokens x {L} layers), E={E}, k={k}, "
        f"budgets k and 2k; best of {args.repeat}"
    )
    print(
        f"{'predictor':14s} {'scores CPU':>12s} {'scored CPU':>12s} {'scored wall':>12s}   (M predictions/s)"
    )
    for name in names:
        d = DISTANCE.get(name, 1)
        p = make_predictor(name)
        if "distances" in p.get_params():
            p.set_params(distances=(d,))
        p.fit(train)
        for q, actual, missing in batches[d][:L]:  # warm-up: first-call costs are not throughput
            score_metrics(p.predict_scores(q), actual, E, missing, [k, 2 * k])
        best = [np.inf, np.inf, np.inf]
        for _ in range(args.repeat):
            t_scores = t_cpu = 0.0
            w0 = time.perf_counter()
            for q, actual, missing in batches[d]:
                c0 = time.process_time()
                s = p.predict_scores(q)
                c1 = time.process_time()
                score_metrics(s, actual, E, missing, [k, 2 * k])
                c2 = time.process_time()
                t_scores += c1 - c0
                t_cpu += c2 - c0
            wall = time.perf_counter() - w0
            best = [min(best[0], t_scores), min(best[1], t_cpu), min(best[2], wall)]
        print(f"{name:14s} {n / best[0] / 1e6:12.2f} {n / best[1] / 1e6:12.2f} {n / best[2] / 1e6:12.2f}")


if __name__ == "__main__":
    main()
