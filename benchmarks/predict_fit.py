"""Fit time and held-out recall of ``best`` on DeepSeek-V2-Lite prompts 1-2000 (the issue-19 protocol).

The test documents are the same 20% of prompts 1-999 that ``benchmarks/predict.py --sections deepseek``
holds out (``split_documents(first_999, 0.2, seed=0)``); training uses the other 80% of those prompts
plus every prompt of 1001-2000 (as ``benchmarks/predict_gpu.py``). Each configuration is ``best`` with
its registered defaults updated by ``--param KEY=JSON`` (for instance ``learned__hidden=256``); the run
reports the fit's wall-clock and CPU seconds, the machine's load average, and next-layer slot recall
(d = 1) with a bootstrap CI over held-out prompts, for ``best`` and (``--learned-part``) for its
fitted learned part alone. One JSON line per run is appended to ``--out``.

    moescope import moe-beyond ../shared/data/deepseek-v2-lite-puffin/*.tar.xz -o TRACE
    nice python benchmarks/predict_fit.py --trace TRACE --out /tmp/predict_fit.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moescope.predict import evaluate, make_predictor, split_documents
from moescope.trace import Trace


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _d1(p: object, test: Trace, top_k: int, n_boot: int) -> tuple[float, list[float]]:
    s = evaluate(p, test, modes=[1], budgets=[top_k], n_boot=n_boot).summary
    d1 = s["modes"]["d1"]["overall"]["slot_recall"]
    return round(float(d1["value"]), 4), [round(float(x), 4) for x in d1["ci"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True, help="trace of prompts 1-2000 (moe-beyond import)")
    ap.add_argument("--first-last", type=int, default=1000, help="document ids <= N are prompts 1-999")
    ap.add_argument("--first-only", action="store_true", help="train on the 80%% of prompts 1-999 only")
    ap.add_argument("--predictor", default="best")
    ap.add_argument("--param", action="append", default=[], help="KEY=JSON, repeatable")
    ap.add_argument("--learned-part", action="store_true", help="also score the fitted learned part alone")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path("/tmp/predict_fit.jsonl"))
    args = ap.parse_args()

    tr = Trace.open(args.trace)
    docs = tr.documents()
    first = docs[docs <= args.first_last]
    train_first, test = split_documents(tr.filter(documents=first), 0.2, seed=0)
    train = train_first if args.first_only else np.union1d(train_first, docs[docs > args.first_last])
    tr_train, tr_test = tr.filter(documents=train), tr.filter(documents=test)
    params = {}
    for kv in args.param:
        key, _, value = kv.partition("=")
        params[key] = json.loads(value)
    p = make_predictor(args.predictor, **params)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    p.fit(tr_train)
    fit_s, cpu_s = time.perf_counter() - t0, _cpu_seconds() - c0
    load = os.getloadavg()
    row = {
        "tag": args.tag,
        "predictor": args.predictor,
        "params": params,
        "train_tokens": tr_train.num_tokens,
        "test_tokens": tr_test.num_tokens,
        "fit_s": round(fit_s, 1),
        "fit_cpu_s": round(cpu_s, 1),
        "load_avg": [round(x, 1) for x in load],
    }
    row["d1"], row["ci"] = _d1(p, tr_test, tr.top_k, args.n_boot)
    part = getattr(p, "learned_", None)
    if args.learned_part and part is not None:
        row["learned_part_d1"], row["learned_part_ci"] = _d1(part, tr_test, tr.top_k, args.n_boot)
        row["learned_loss"] = [round(x, 4) for x in part.train_loss_]
    print(json.dumps(row), flush=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
