"""Replay speed: (token, layer) events per second for per-layer LRU with a table prefetcher.

Target: >= 5,000,000 events/s on 2 cores. Also runs moe-policylang's replay (when installed) on a
slice of the same trace and prints both tools' hit rates and the speed ratio.

    .venv/bin/python benchmarks/simulate.py [--tokens 100000] [--peer-tokens 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from moescope.simulate import LRU, Belady, ModelCost, TablePrefetcher, get_preset, prepare, run, step_prefetch
from moescope.simulate import peer as peer_mod
from moescope.trace.synthetic import write_synthetic_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--peer-tokens", type=int, default=2000)
    args = ap.parse_args()
    L, E, k = 26, 64, 6  # DeepSeek-V2-Lite's shape
    tmp = Path(tempfile.mkdtemp())
    tr = write_synthetic_trace(tmp / "t", n_tokens=args.tokens, num_layers=L, num_experts=E, top_k=k,
                               law="markov", noise=0.3, doc_len=512, seed=0)
    cost = ModelCost(expert_params=3 * 2048 * 1408, top_k=k, dense_params_per_layer=4 * 2048 * 2048)
    dep = get_preset("rtx4090-pcie4")
    cap = np.full(L, 16)
    steps = prepare(tr, mode="decode")
    pf = TablePrefetcher(distance=1, budget=k).fit(tr)
    pol = LRU().fit()
    run(steps, pol, cap, dep, cost)  # warm the compiled loop (cached on disk after the first run)
    pf.ranked(tr)
    t0 = time.perf_counter()
    ranked = pf.ranked(tr)
    t1 = time.perf_counter()
    pref = step_prefetch(steps, ranked)
    t2, c2 = time.perf_counter(), time.process_time()
    res = run(steps, pol, cap, dep, cost, prefetch=pref, distance=1)
    t3, c3 = time.perf_counter(), time.process_time()
    events = steps.num_steps * L
    s = res.summary()
    print(f"trace: {args.tokens} tokens x {L} layers = {events:,} events, E={E}, k={k}, 16 slots/layer, m={k}")
    print(f"replay (per-layer LRU + table prefetch): {t3 - t2:.3f} s wall = {events / (t3 - t2) / 1e6:.2f} M events/s; "
          f"{c3 - c2:.3f} s CPU = {events / (c3 - c2) / 1e6:.2f} M events/s per CPU-second")
    print(f"table prediction: {t1 - t0:.3f} s = {events / (t1 - t0) / 1e6:.1f} M events/s")
    print(f"end to end (prediction + replay): {events / (t3 - t0) / 1e6:.1f} M events/s")
    print(f"hit rate {s['hit_rate']:.4f}, prefetch precision {s['prefetch_precision']:.4f}")

    if not peer_mod.available():
        print("moe-policylang not installed: no peer comparison")
        return
    sub = tr.filter(documents=range(int(np.ceil(args.peer_tokens / 512))))
    rec = peer_mod.to_recording(sub)
    sub_steps = prepare(sub, mode="decode")
    n_events = sub_steps.num_steps * L
    for frac in (0.25, 0.5):
        slots = peer_mod.peer_budget(E, k, frac)
        t0 = time.perf_counter()
        peer = peer_mod.peer_hit_rates(rec, k, frac, policies=("topk_lru",))
        t_peer = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = run(sub_steps, LRU().fit(), np.full(L, slots), dep, cost, reset="document")
        t_ours = time.perf_counter() - t0
        peer_b = peer_mod.peer_hit_rates(rec, k, frac, policies=("belady",))
        ours_b = run(sub_steps, Belady().fit(), np.full(L, slots), dep, cost, reset="document")
        print(f"peer check, {n_events:,} events, {slots} slots/layer: LRU hit rate ours "
              f"{ours.summary()['hit_rate']:.4f} vs moe-policylang {peer['topk_lru']:.4f}; Belady ours "
              f"{ours_b.summary()['hit_rate']:.4f} vs {peer_b['belady']:.4f}; LRU replay {t_ours * 1e3:.1f} ms vs "
              f"{t_peer * 1e3:.0f} ms (ratio {t_peer / t_ours:.0f}x)")


if __name__ == "__main__":
    main()
