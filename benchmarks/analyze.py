"""Benchmark: the core analyses (load, entropy, co-occurrence, repetition, specialisation) in one pass.

Generates (untimed, once, in a child process so it does not inflate peak memory) a synthetic trace of
``--tokens`` tokens x 32 layers x top-2 of 8 experts with float16 logits under ``build/``, then times
the analyses and reports peak resident memory (ru_maxrss). ``--naive N`` also times a per-token
Python loop of the seed scripts' kind on the first N tokens and extrapolates it to the whole trace.

    python benchmarks/analyze.py                      # 1,000,000 tokens (goal: < 30 s, < 2 GB)
    python benchmarks/analyze.py --tokens 10000000    # memory must stay flat

``--speedup`` times the streaming pass of ``moescope analyze``'s core analyses with 1 and with 2
worker processes over shard groups, alternating (1, 2, 1, 2, ...) so that the load of a shared machine
falls on both alike, and prints the cost per token and per token-layer that BENCHMARKS.md projects
from. ``--checksum-cost`` alternates runs without and with shard SHA-256 verification the same way.

    python benchmarks/analyze.py --tokens 400000 --shard-rows 50000 --speedup --reps 3
    python benchmarks/analyze.py --tokens 100000 --layers 58 --experts 256 --top-k 8 --no-logits \
        --shard-rows 12500 --speedup --reps 2       # DeepSeek-V3's shape: 58 MoE layers, top-8 of 256
    python benchmarks/analyze.py --tokens 300000 --checksum-cost --reps 4
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, args: argparse.Namespace) -> None:
    from moescope.trace.synthetic import write_synthetic_trace

    write_synthetic_trace(
        path,
        n_tokens=args.tokens,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        law="markov",
        noise=0.3,
        logits=not args.no_logits,
        doc_len=512,
        labels=("a", "b", "c"),
        seed=0,
        chunk_tokens=max(512, (1 << 25) // (args.layers * args.experts * 8)),  # ~32 MiB of float64 logits
        shard_rows=args.shard_rows,
    )


CORE = ["load", "entropy", "cooccurrence", "repetition", "specialisation"]


def timed_pass(path: Path, workers: int) -> tuple[float, float, int]:
    """The streaming pass of ``moescope analyze --analyses <CORE>`` on ``workers`` processes.

    Returns wall seconds, CPU seconds (this process and its reaped workers) and the shard groups used.
    Worker start-up (spawn, imports) is inside the wall time, as in a real run.
    """
    import functools

    from moescope.analysis._stream import make_context
    from moescope.analysis.parallel import fold_shards, shard_groups
    from moescope.analysis.run import AnalyzeOptions, build_accumulators
    from moescope.analysis.suite import ANALYSES
    from moescope.trace import Trace, integrity

    integrity._VERIFIED.clear()  # every run verifies its shards, as a fresh process would
    tr = Trace.open(path)
    names = [n for n in CORE if tr.has_logits or not ANALYSES[n].needs_logits]
    opts = AnalyzeOptions(analyses=names)
    ctx = make_context(tr)
    build = functools.partial(
        build_accumulators, names=names, opts=opts, trace_path=path, target=ctx.layer_ids[0], other=None
    )
    _, accs = build(tr)
    c0 = _cpu()
    t0 = time.perf_counter()
    fold_shards(ctx, build, accs, workers=workers)
    return time.perf_counter() - t0, _cpu() - c0, len(shard_groups(tr, workers))


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _import_analyses(_: int) -> int:
    import moescope.analysis.run  # noqa: F401

    return 0


def startup_cost(workers: int = 2) -> tuple[float, float]:
    """Wall and CPU seconds to spawn ``workers`` processes that import the analyses and return."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    c0, t0 = _cpu(), time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_import_analyses, range(workers)))
    return time.perf_counter() - t0, _cpu() - c0


def speedup(path: Path, args: argparse.Namespace) -> None:
    """Alternate 1 and 2 workers ``--reps`` times; print each pair and the medians."""
    rows = []
    for rep in range(args.reps):
        pair = {}
        for w in (1, 2):
            pair[w] = timed_pass(path, w)
            print(
                f"  rep {rep + 1}, {w} worker(s): {pair[w][0]:.2f} s wall, {pair[w][1]:.2f} s CPU", flush=True
            )
        rows.append((pair[1][0], pair[2][0], pair[1][1], pair[2][1], pair[2][2]))
    sw, sc = startup_cost(2)
    t1, t2, c1, c2 = (float(np.median([r[i] for r in rows])) for i in range(4))
    ratio = float(np.median([r[0] / r[1] for r in rows]))
    tl = args.tokens * args.layers
    print(f"trace: {path.name}, {rows[0][4]} shard group(s) for 2 workers, os.cpu_count()={os.cpu_count()}")
    print(
        f"speed-up on 2 workers: {ratio:.2f}x (median of {args.reps} paired runs; 1 worker {t1:.2f} s, 2 workers {t2:.2f} s wall)"
    )
    print(
        f"cost per token (1 worker): {1e6 * t1 / args.tokens:.2f} us wall, {1e6 * c1 / args.tokens:.2f} us CPU;"
        f" per token-layer: {1e9 * t1 / tl:.1f} ns wall, {1e9 * c1 / tl:.1f} ns CPU"
        f" (2 workers: {1e9 * c2 / tl:.1f} ns CPU per token-layer)"
    )
    print(
        f"parallel efficiency (CPU of 1 worker / CPU of 2): {c1 / c2:.2f}; starting 2 workers alone (spawn +"
        f" imports): {sw:.2f} s wall, {sc:.2f} s CPU; without it: {c1 / (c2 - sc):.2f}"
    )


def checksum_cost(path: Path, reps: int) -> None:
    """Alternate passes without and with shard SHA-256 verification; paired medians of wall and CPU."""
    from moescope.trace import integrity

    walls: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps):
        for verify in (False, True) if rep % 2 == 0 else (True, False):
            integrity._VERIFIED.clear()  # a fresh process would hash every shard once
            c0, t0 = _cpu(), time.perf_counter()
            core(path, verify=verify)
            walls[verify].append(time.perf_counter() - t0)
            cpus[verify].append(_cpu() - c0)
            print(
                f"  rep {rep + 1}, verify={verify}: {walls[verify][-1]:.2f} s wall, {cpus[verify][-1]:.2f} s CPU"
            )
    dw = [100 * (a - b) / b for a, b in zip(walls[True], walls[False], strict=True)]
    dc = [100 * (a - b) / b for a, b in zip(cpus[True], cpus[False], strict=True)]
    size = sum(f.stat().st_size for f in path.glob("*.parquet"))
    t0 = time.thread_time()
    import hashlib

    for f in sorted(path.glob("*.parquet")):
        hashlib.sha256(f.read_bytes()).hexdigest()
    th = time.thread_time() - t0
    print(
        f"checksum cost ({reps} alternating pairs): wall {np.median(walls[False]):.2f} s without,"
        f" {np.median(walls[True]):.2f} s with: median paired {np.median(dw):+.1f}% (pairs: "
        f"{', '.join(f'{x:+.1f}%' for x in dw)}); CPU median paired {np.median(dc):+.1f}% (pairs: "
        f"{', '.join(f'{x:+.1f}%' for x in dc)})"
    )
    print(
        f"  reading and hashing the {size / 2**20:.0f} MiB of shards alone: {th:.2f} s CPU"
        f" ({size / 2**20 / th:.0f} MiB/s), {100 * th / np.median(cpus[False]):.1f}% of the pass's CPU"
    )


def core(path: Path, verify: bool = True) -> dict:
    from moescope.analysis import cooccurrence, entropy, load, locality, specialisation
    from moescope.analysis._stream import make_context, run_pass
    from moescope.trace import Trace

    tr = Trace.open(path, verify=verify)
    ctx = make_context(tr)
    accs = [
        load.LoadAccumulator(ctx),
        entropy.EntropyAccumulator(ctx),
        cooccurrence.TransitionAccumulator(ctx),
        cooccurrence.CoactivationAccumulator(ctx),
        locality.RepetitionAccumulator(ctx),
        specialisation.VocabAccumulator(ctx),
        specialisation.DomainAccumulator(ctx),
    ]
    run_pass(ctx, accs)
    out = {
        "load": load.load_summary(accs[0].result(), ctx.k),
        "entropy": accs[1].result()["by_layer"],
        "mi": accs[2].result()["summary"],
        "coact": accs[3].result(),
        "rep": accs[4].result(),
        "vocab": specialisation.vocab_frames(accs[5], 10, 10)["summary"],
        "domain": accs[6].result(100)["test"],
    }
    return out


def naive(path: Path, n: int) -> float:
    """Seed-style loops: per token, per layer, Python dictionaries and lists."""
    from collections import Counter, defaultdict

    from moescope.trace import Trace

    tr = Trace.open(path)
    b = next(tr.iter_batches(["doc_id", "token_id", "label", "experts", "logits"], batch_size=n))
    ex, lg, doc, tok = (
        b.experts.tolist(),
        b.logits.astype(np.float32).tolist(),
        b.doc_id.tolist(),
        b.token_id.tolist(),
    )
    t0 = time.perf_counter()
    usage = defaultdict(Counter)
    ent = defaultdict(list)
    trans = defaultdict(Counter)
    rep = Counter()
    vocab = defaultdict(Counter)
    import math

    for t in range(len(ex)):
        for layer in range(len(ex[t])):
            e = ex[t][layer]
            for x in e:
                usage[layer][x] += 1
                vocab[(layer, tok[t])][x] += 1
            m = max(lg[t][layer])
            ps = [math.exp(v - m) for v in lg[t][layer]]
            s = sum(ps)
            ent[layer].append(-sum(p / s * math.log2(p / s) for p in ps if p > 0))
            if layer + 1 < len(ex[t]):
                trans[layer][(tuple(sorted(e)), tuple(sorted(ex[t][layer + 1])))] += 1
            if t and doc[t] == doc[t - 1]:
                rep[(layer, "first")] += e[0] == ex[t - 1][layer][0]
                rep[(layer, "any")] += bool(set(e) & set(ex[t - 1][layer]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--no-logits", action="store_true", help="a trace without router logits (no entropy)")
    ap.add_argument("--shard-rows", type=int, default=262144, help="rows per shard of the generated trace")
    ap.add_argument("--naive", type=int, default=20_000, help="tokens for the per-token loop (0: skip)")
    ap.add_argument("--dir", type=Path, default=ROOT / "build" / "bench-analyze")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--checksum-cost",
        action="store_true",
        help="time the pass without and with shard SHA-256 verification (alternating, --reps pairs)",
    )
    ap.add_argument(
        "--speedup", action="store_true", help="time the pass on 1 and 2 worker processes (alternating)"
    )
    ap.add_argument("--reps", type=int, default=2, help="pairs of runs for --speedup and --checksum-cost")
    args = ap.parse_args()
    shape = f"{args.tokens}x{args.layers}"
    if (args.experts, args.top_k, args.no_logits, args.shard_rows) != (8, 2, False, 262144):
        shape += f"-E{args.experts}k{args.top_k}{'-nologits' if args.no_logits else ''}-s{args.shard_rows}"
    path = args.dir / f"synthetic-{shape}"
    if args.generate_only:
        generate(path, args)
        return
    if not (path / "manifest.json").is_file():
        print(f"generating {path} (not timed) ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--generate-only"], check=True)
    if args.speedup:
        speedup(path, args)
        return
    if args.checksum_cost:
        checksum_cost(path, args.reps)
        return
    t0 = time.perf_counter()
    res = core(path)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"trace: {path} ({args.tokens} tokens x {args.layers} layers, top-{args.top_k} of {args.experts})")
    print(
        f"core analyses (load, entropy, co-occurrence, co-activation, repetition, vocab + domain specialisation):"
        f" {dt:.1f} s, {args.tokens / dt / 1e3:.0f}k tokens/s, peak RSS {peak:.0f} MiB"
    )
    print(
        f"  check: mean CV {res['load']['cv'].mean():.4f}, mean entropy "
        f"{res['entropy']['mean_entropy_bits'].mean():.3f} bits, mean MI {res['mi']['mi_bits'].mean():.3f} bits, "
        f"any-shared {res['rep'].filter(res['rep']['domain'] == 'all')['any_shared'].mean():.3f}"
    )
    if args.naive:
        tn = naive(path, args.naive)
        est = tn * args.tokens / args.naive
        print(
            f"per-token Python loop (seed-script style, partial: load, entropy, transitions, repetition, vocab): "
            f"{tn:.1f} s for {args.naive} tokens -> extrapolated {est:.0f} s for {args.tokens} ({est / dt:.0f}x slower)"
        )


if __name__ == "__main__":
    main()
