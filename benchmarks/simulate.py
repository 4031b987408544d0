"""Replay speed: (token, layer) events per second for per-layer LRU with a table prefetcher.

Target: >= 5,000,000 events/s on 2 cores. Also runs moe-policylang's replay (when installed) on a
slice of the same trace and prints both tools' hit rates and the speed ratio.

Prints wall and CPU rates of the table prediction, the replay and both together (the machine may be
shared: CPU seconds are the fairer number).

    .venv/bin/python benchmarks/simulate.py [--tokens 100000] [--peer-tokens 2000] [--repeat 3]
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
    ap.add_argument("--peer-tokens", type=int, default=2000, help="tokens replayed by moe-policylang (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is printed")
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
    run(steps, pol, cap, dep, cost)  # warm the compiled loops (cached on disk after the first run)
    pf.ranked(tr)
    events = steps.num_steps * L
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):  # the machine is shared: keep the best of a few runs of each part
        w0, c0 = time.perf_counter(), time.process_time()
        pref = step_prefetch(steps, pf.ranked(tr))
        w1, c1 = time.perf_counter(), time.process_time()
        res = run(steps, pol, cap, dep, cost, prefetch=pref, distance=1)
        w2, c2 = time.perf_counter(), time.process_time()
        for part, (w, c) in {"predict": (w1 - w0, c1 - c0), "replay": (w2 - w1, c2 - c1),
                             "end-to-end": (w2 - w0, c2 - c0)}.items():
            old = best.get(part, (np.inf, np.inf))
            best[part] = (min(old[0], w), min(old[1], c))
    s = res.summary()
    print(f"trace: {args.tokens} tokens x {L} layers = {events:,} events, E={E}, k={k}, 16 slots/layer, m={k}; "
          f"best of {args.repeat}")
    labels = {"predict": "table prediction (TablePrefetcher.ranked)", "replay": "replay (per-layer LRU + table prefetch)",
              "end-to-end": "end to end (prediction + replay)"}
    for part, (w, c) in best.items():
        print(f"{labels[part]}: {w:.3f} s wall = {events / w / 1e6:.2f} M events/s; "
              f"{c:.3f} s CPU = {events / c / 1e6:.2f} M events/s per CPU-second")
    print(f"hit rate {s['hit_rate']:.4f}, prefetch precision {s['prefetch_precision']:.4f}")

    if args.peer_tokens <= 0:
        return
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
