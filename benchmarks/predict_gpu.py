"""Learned expert predictor on a GPU: DeepSeek-V2-Lite prompts 1-2000, held out as in BENCHMARKS.md.

The test documents are the same 20% of prompts 1-999 that ``benchmarks/predict.py --sections deepseek``
holds out (``split_documents(first_999, 0.2, seed=0)``); training uses the other 80% of those prompts
plus every prompt of 1001-2000. Each configuration is fitted with ``device="cuda"`` (``auto`` falls
back to the CPU when torch sees no GPU) and scored by next-layer slot recall (d = 1) with a
bootstrap CI over held-out prompts.

    python benchmarks/predict_gpu.py --trace TRACE_OF_PROMPTS_1_2000 --first-last 1000 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moescope.predict import evaluate, make_predictor, split_documents
from moescope.trace import Trace

CONFIGS = {
    "smoke": {"epochs": 1, "max_samples": 20_000},
    "default": {},
    "wide": {"hidden": 512, "depth": 3},
    "wide-long": {"hidden": 512, "depth": 3, "epochs": 12, "window": 8},
    "xl": {"hidden": 1024, "depth": 4, "epochs": 8, "dropout": 0.2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", type=Path, required=True, help="trace of prompts 1-2000 (moe-beyond import)")
    ap.add_argument("--first-last", type=int, default=1000, help="document ids <= N are prompts 1-999")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--configs", default="default,wide,wide-long,xl")
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()

    tr = Trace.open(args.trace)
    docs = tr.documents()
    first = docs[docs <= args.first_last]
    train_first, test = split_documents(tr.filter(documents=first), 0.2, seed=0)
    train = np.union1d(train_first, docs[docs > args.first_last])
    tr_train, tr_test = tr.filter(documents=train), tr.filter(documents=test)
    print(
        f"train {tr_train.num_tokens} tokens / {len(train)} prompts, test {tr_test.num_tokens} / {len(test)}"
    )
    import torch

    report: dict = {"device": str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"}
    report["train_tokens"], report["test_tokens"] = tr_train.num_tokens, tr_test.num_tokens
    for name in args.configs.split(","):
        p = make_predictor("learned", distances=(1,), device=args.device, verbose=True, **CONFIGS[name])
        t0 = time.perf_counter()
        p.fit(tr_train)
        fit_s = time.perf_counter() - t0
        r = evaluate(p, tr_test, modes=[1], budgets=[tr.top_k], n_boot=args.n_boot)
        report[name] = {"params": CONFIGS[name], "fit_seconds": fit_s, "summary": r.summary}
        d1 = r.summary["modes"]["d1"]["overall"]["slot_recall"]
        print(f"{name}: fit {fit_s:.1f}s, d1 slot recall {d1['value']:.4f} {d1['ci']}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "predict_gpu.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
