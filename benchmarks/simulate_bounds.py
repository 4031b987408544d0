"""What prediction could buy: the horizon-H oracle and per-layer capacity, on one decision-table cell.

Replays TEST (decode, one token per step) at one cache fraction through LRU, LRFU, Belady, a
``learned-reuse`` policy fitted on TRAIN and the horizon-H oracle (``HorizonOracle``: the exact
routing of the next H tokens, LRFU beyond) for every H of ``--horizons``. With ``--allocate`` it
also fits per-layer capacities on TRAIN (LRFU miss curves at ``--min-slots``..``--max-slots`` per
layer, greedy marginal allocation of the same slot total) and replays every policy under both the
uniform and the fitted allocation, Belady included, so the comparison stays fair.

    python benchmarks/simulate_bounds.py TEST TRAIN --model deepseek-v2-lite --fraction 0.25 --allocate
"""

from __future__ import annotations

import argparse
import time

from moescope.simulate import (
    LRFU,
    LRU,
    Belady,
    HorizonOracle,
    LearnedReuse,
    cache_capacity,
    get_preset,
    model_cost,
    prepare,
    run,
)
from moescope.simulate.sweep import allocate_slots, layer_miss_curves
from moescope.trace.reader import Trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("test")
    ap.add_argument("train")
    ap.add_argument("--model", default=None, help="config name for expert sizes (default: the trace's)")
    ap.add_argument("--preset", default="rtx4090-pcie4")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--horizons", default="0,1,2,4,8,16")
    ap.add_argument("--allocate", action="store_true", help="also fit per-layer capacities on TRAIN")
    ap.add_argument("--min-slots", type=int, default=2)
    ap.add_argument("--max-slots", type=int, default=40)
    args = ap.parse_args()
    te, tr = Trace.open(args.test), Trace.open(args.train)
    name = args.model or te.manifest.get("model", {}).get("id")
    dep, cost = get_preset(args.preset), model_cost(name, args.dtype)
    L, E = te.num_layers, te.num_experts
    cap = cache_capacity(dep, cost, L, E, fraction=args.fraction)
    steps = prepare(te)
    t0 = time.perf_counter()
    policies = [LRU().fit(), LRFU().fit(), Belady().fit(), LearnedReuse().fit(tr)]
    policies += [HorizonOracle(horizon=int(h)).fit() for h in args.horizons.split(",")]
    print(f"fitted on {args.train} in {time.perf_counter() - t0:.0f} s")
    allocations = {"uniform": cap}
    if args.allocate:
        t0 = time.perf_counter()
        caps = list(range(args.min_slots, min(E, args.max_slots) + 1))
        curves = layer_miss_curves(prepare(tr), LRFU().fit(), dep, cost, caps)
        allocations["fitted on train"] = allocate_slots(curves, caps, int(cap.sum()))
        print(
            f"miss curves in {time.perf_counter() - t0:.0f} s; slots per layer: {allocations['fitted on train'].tolist()}"
        )
    print(
        f"| allocation | policy | hit rate | tokens/s |  ({args.preset}, {args.dtype}, cache {args.fraction:g})"
    )
    print("|---|---|---|---|")
    for label, slots in allocations.items():
        for pol in policies:
            s = run(steps, pol, slots, dep, cost).summary()
            print(
                f"| {label} | {pol.describe()} | {s['hit_rate']:.4f} | {s['tokens_per_s']:.4g} |", flush=True
            )


if __name__ == "__main__":
    main()
