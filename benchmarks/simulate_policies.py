"""Decision table: does prediction pay? Every policy, predictor-free and predictor-guided, per cell.

Cells: cache fraction 1/8, 1/4, 1/2 x preset (rtx4090-pcie4 = PCIe 4.0, h100-pcie5 = PCIe 5.0,
rtx4090-nvme = NVMe) x expert width (bf16, int4) x batch (1: decode, one token per step; 8: the union
of 8 consecutive tokens of a document per step, ``prepare(mode="prefill", batch_size=8)``). Every
learned policy is fitted on TRAIN (other documents) and replayed on TEST; the predictor-guided ones
once per batch size, on TRAIN cut into the same steps as the replay (``batch_size``). Prints one
markdown row per cell (best predictor-free policy, best predictor-guided policy, their tokens/s and
the gain, Belady) and writes every row to ``--csv``.

``--guard``: each cell also replays the product's policy ``auto``
(:class:`moescope.simulate.AutoPolicy`, ``moescope simulate --policy auto``): TRAIN is split again
by document (80/20, seed 1), every candidate (the predictor-free and the guided ones) is fitted on
the 80% and replayed on the 20% under the cell's deployment, cache and batch (predictor cost
included), and the fastest, refitted on all of TRAIN, is replayed on TEST. Only TRAIN decides. The
row then also shows auto's choice, its tokens/s on TEST and the gain over the best predictor-free
policy.

    python benchmarks/simulate_policies.py TEST TRAIN --model deepseek-v2-lite --csv out.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl

from moescope.simulate import AutoPolicy, cache_capacity, get_preset, model_cost, prepare, run
from moescope.simulate.deployment import ModelCost
from moescope.simulate.policies import make_policy
from moescope.trace.reader import Trace

FREE = ("lru", "lfu", "lrfu", "static")
GUIDED = ("learned-reuse", "learned-reuse-admit")
PRESETS = {"PCIe 4.0": "rtx4090-pcie4", "PCIe 5.0": "h100-pcie5", "NVMe": "rtx4090-nvme"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("test")
    ap.add_argument("train")
    ap.add_argument("--model", default=None, help="config name for expert sizes (default: the trace's)")
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--fractions", default="0.125,0.25,0.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--guided", default=",".join(GUIDED))
    ap.add_argument("--label", default=None, help="trace name in the table (default: TEST's parent folder)")
    ap.add_argument(
        "--guard",
        action="store_true",
        help="also replay policy auto (chosen per cell on a held-out part of TRAIN)",
    )
    args = ap.parse_args()
    label = args.label or Path(args.test).parent.name
    te, tr = Trace.open(args.test), Trace.open(args.train)
    name = args.model or te.manifest.get("model", {}).get("id")
    guided = [g for g in args.guided.split(",") if g]
    t0 = time.perf_counter()
    free = {n: make_policy(n).fit(tr) for n in FREE}
    free["belady"] = make_policy("belady").fit()
    batches = [int(b) for b in args.batches.split(",")]

    def fit_guided(trace: Trace, b: int) -> dict:
        out = {}
        for n in guided:  # the guided policies learn on the trace cut into the replay's steps
            pol = make_policy(n)
            if "batch_size" in pol.get_params(deep=False):
                pol.set_params(batch_size=None if b == 1 else b)
            out[n] = pol.fit(trace)
        return out

    fitted_of, auto_of = {}, {}
    for b in batches:
        fitted_of[b] = {**free, **fit_guided(tr, b)}
        for n in guided:
            cost_us = fitted_of[b][n].critical_path_s() * 1e6
            print(f"  {n} (batch {b}): predictor cost charged per layer {cost_us:.1f} us")
        if args.guard:  # one per batch: its fits on the held-out split are kept from cell to cell
            mode = ("decode", None) if b == 1 else ("prefill", b)
            auto_of[b] = (AutoPolicy(candidates=FREE + tuple(guided), holdout=0.2, seed=1), mode)
    print(f"fitted the policies on {args.train} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    steps_of = {b: prepare(te) if b == 1 else prepare(te, mode="prefill", batch_size=b) for b in batches}
    head = "| trace | cache | link | dtype | batch | best predictor-free | tok/s | best predictor-guided | tok/s | gain |"
    head += " auto's choice | tok/s | gain |" if args.guard else ""
    print(head + " Belady tok/s |")
    print("|---" * (14 if args.guard else 11) + "|")
    for batch, steps in steps_of.items():
        fitted = fitted_of[batch]
        for dtype in ("bf16", "int4"):
            cost: ModelCost = model_cost(name, dtype)
            for link, preset in PRESETS.items():
                dep = get_preset(preset)
                for frac in map(float, args.fractions.split(",")):
                    cap = cache_capacity(dep, cost, te.num_layers, te.num_experts, fraction=frac)
                    res = {}
                    for n, pol in fitted.items():
                        s = run(steps, pol, cap, dep, cost).summary()
                        res[n] = s
                        rows.append(
                            {
                                "trace": label,
                                "cache_fraction": frac,
                                "link": link,
                                "preset": preset,
                                "dtype": dtype,
                                "batch": batch,
                                "policy": n,
                                "hit_rate": s["hit_rate"],
                                "tokens_per_s": s["tokens_per_s"],
                                "bytes_moved": s["bytes_moved"],
                            }
                        )
                    free_best = max(FREE, key=lambda n: res[n]["tokens_per_s"])
                    best = max(guided, key=lambda n: res[n]["tokens_per_s"])
                    f, g = res[free_best]["tokens_per_s"], res[best]["tokens_per_s"]
                    line = (
                        f"| {label} | {frac:g} | {link} | {dtype} | {batch} | {free_best} | {f:.4g} | "
                        f"{best} | {g:.4g} | {100 * (g / f - 1):+.1f}% |"
                    )
                    if args.guard:
                        auto, (mode, bs) = auto_of[batch]
                        auto.for_replay(deployment=dep, cost=cost, capacity=cap, mode=mode, batch_size=bs)
                        auto.fit(tr)
                        s = run(steps, auto, cap, dep, cost).summary()
                        c = s["tokens_per_s"]
                        line += f" {auto.choice_} | {c:.4g} | {100 * (c / f - 1):+.1f}% |"
                        rows.append(
                            {
                                **rows[-1],
                                "policy": "auto:" + auto.choice_,
                                "hit_rate": s["hit_rate"],
                                "tokens_per_s": c,
                                "bytes_moved": s["bytes_moved"],
                                "heldout_tokens_per_s": json.dumps(auto.scores_),
                            }
                        )
                    print(line + f" {res['belady']['tokens_per_s']:.4g} |", flush=True)
                    pl.DataFrame(rows, infer_schema_length=None).write_csv(args.csv)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
