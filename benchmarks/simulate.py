"""Replay speed: (token, layer) events per second for per-layer LRU with a table prefetcher.

Target: >= 5,000,000 events/s end to end on 2 cores. Also runs moe-policylang's replay (when
installed) on a slice of the same trace and prints both tools' hit rates and the speed ratio.

Prints wall and CPU rates (the machine may be shared: CPU seconds do not count time spent waiting
for a core, but add up both threads of a two-core run) of:

- the table prefetcher's ranking alone, on one core (``rank_ids``, what the replay's side thread
  runs) and over every core (``ranked``, reading the trace);
- the replay alone, from a precomputed prediction array;
- end to end as ``moescope simulate`` runs it: ``run(..., prefetcher=pf)`` ranks each block of
  steps on a second core while the previous block replays;
- end to end the old way (rank the whole trace, then replay), for comparison.

Every end-to-end variant must give the same counts (checked).

    .venv/bin/python benchmarks/simulate.py [--tokens 100000] [--peer-tokens 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope.simulate import LRU, Belady, ModelCost, TablePrefetcher, get_preset, prepare, run, step_prefetch
from moescope.simulate import peer as peer_mod
from moescope.trace.synthetic import write_synthetic_trace


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[Any, float, float]:
    """Result of ``fn`` and its best wall and best CPU seconds over ``repeat`` runs."""
    wall = cpu = np.inf
    out = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return out, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument(
        "--peer-tokens", type=int, default=2000, help="tokens replayed by moe-policylang (0: skip)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is printed")
    args = ap.parse_args()
    L, E, k = 26, 64, 6  # DeepSeek-V2-Lite's shape
    tmp = Path(tempfile.mkdtemp())
    tr = write_synthetic_trace(
        tmp / "t",
        n_tokens=args.tokens,
        num_layers=L,
        num_experts=E,
        top_k=k,
        law="markov",
        noise=0.3,
        doc_len=512,
        seed=0,
    )
    cost = ModelCost(expert_params=3 * 2048 * 1408, top_k=k, dense_params_per_layer=4 * 2048 * 2048)
    dep = get_preset("rtx4090-pcie4")
    cap = np.full(L, 16)
    steps = prepare(tr, mode="decode")
    pf = TablePrefetcher(distance=1, budget=k).fit(tr)
    pol = LRU().fit()
    pref = step_prefetch(steps, pf.ranked(tr))
    run(steps, pol, cap, dep, cost, prefetch=pref, distance=1)  # compile (cached on disk after the first run)
    run(steps, pol, cap, dep, cost, prefetcher=pf)
    events = steps.num_steps * L
    parts = {
        "table ranking, one core (rank_ids)": lambda: pf.rank_ids(steps.demand),
        "table ranking, all cores (ranked, reads the trace)": lambda: pf.ranked(tr),
        "replay alone (per-layer LRU + table prefetch array)": lambda: run(
            steps, pol, cap, dep, cost, prefetch=pref, distance=1
        ),
        "end to end, ranked beside the replay (run(prefetcher=pf))": lambda: run(
            steps, pol, cap, dep, cost, prefetcher=pf
        ),
        "end to end, rank all then replay": lambda: run(
            steps, pol, cap, dep, cost, prefetch=step_prefetch(steps, pf.ranked(tr)), distance=1
        ),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"trace: {args.tokens} tokens x {L} layers = {events:,} events, E={E}, k={k}, 16 slots/layer, m={k}; "
        f"best of {args.repeat}; {os.cpu_count()} cores, load average {load:.2f} at start"
    )
    results, timings = {}, {}
    for label, fn in parts.items():
        results[label], w, c = best_of(fn, args.repeat)
        timings[label] = (w, c)
        print(
            f"{label}: {w:.3f} s wall = {events / w / 1e6:.2f} M events/s; "
            f"{c:.3f} s CPU = {events / c / 1e6:.2f} M events/s per CPU-second"
        )
    replays = [r for r in results.values() if hasattr(r, "counts")]
    assert all(
        np.array_equal(r.counts, replays[0].counts) and r.total_s == replays[0].total_s for r in replays
    )
    s = replays[-1].summary()
    print(
        f"hit rate {s['hit_rate']:.4f}, prefetch precision {s['prefetch_precision']:.4f} (identical in all three)"
    )

    if args.peer_tokens <= 0:
        return
    if not peer_mod.available():
        print("moe-policylang not installed: no peer comparison")
        return
    sub = tr.filter(documents=range(int(np.ceil(args.peer_tokens / 512))))
    rec = peer_mod.to_recording(sub)
    sub_steps = prepare(sub, mode="decode")
    n_events = sub_steps.num_steps * L
    peer_rates = []
    for frac in (0.25, 0.5):
        slots = peer_mod.peer_budget(E, k, frac)
        peer, _, t_peer = best_of(
            lambda f=frac: peer_mod.peer_hit_rates(rec, k, f, policies=("topk_lru",)), args.repeat
        )
        ours, _, t_ours = best_of(
            lambda c=slots: run(sub_steps, LRU().fit(), np.full(L, c), dep, cost, reset="document"),
            args.repeat,
        )
        peer_b = peer_mod.peer_hit_rates(rec, k, frac, policies=("belady",))
        ours_b = run(sub_steps, Belady().fit(), np.full(L, slots), dep, cost, reset="document")
        print(
            f"peer check, {n_events:,} events, {slots} slots/layer: LRU hit rate ours "
            f"{ours.summary()['hit_rate']:.4f} vs moe-policylang {peer['topk_lru']:.4f}; Belady ours "
            f"{ours_b.summary()['hit_rate']:.4f} vs {peer_b['belady']:.4f}; LRU replay {t_ours * 1e3:.1f} ms vs "
            f"{t_peer * 1e3:.0f} ms CPU (ratio {t_peer / t_ours:.0f}x)"
        )
        peer_rates.append(n_events / t_peer)
    peer_rate = min(peer_rates)
    w, c = timings["end to end, ranked beside the replay (run(prefetcher=pf))"]
    print(
        f"moe-policylang replays LRU (it has no table prefetcher) at {peer_rate / 1e6:.3f} M events per CPU-second; "
        f"our end-to-end LRU + table prefetch is {events / c / peer_rate:.0f}x that per CPU-second, "
        f"{events / w / peer_rate:.0f}x in wall time"
    )


if __name__ == "__main__":
    main()
