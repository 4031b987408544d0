"""Benchmark: the core analyses (load, entropy, co-occurrence, repetition, specialisation) in one pass.

Generates (untimed, once, in a child process so it does not inflate peak memory) a synthetic trace of
``--tokens`` tokens x 32 layers x top-2 of 8 experts with float16 logits under ``build/``, then times
the analyses and reports peak resident memory (ru_maxrss). ``--naive N`` also times a per-token
Python loop of the seed scripts' kind on the first N tokens and extrapolates it to the whole trace.

    python benchmarks/analyze.py                      # 1,000,000 tokens (goal: < 30 s, < 2 GB)
    python benchmarks/analyze.py --tokens 10000000    # memory must stay flat
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, tokens: int, layers: int) -> None:
    from moescope.trace.synthetic import write_synthetic_trace

    write_synthetic_trace(
        path,
        n_tokens=tokens,
        num_layers=layers,
        num_experts=8,
        top_k=2,
        law="markov",
        noise=0.3,
        logits=True,
        doc_len=512,
        labels=("a", "b", "c"),
        seed=0,
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
        "vocab": specialisation._vocab_frames(accs[5], 10, 10)["summary"],
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
    ap.add_argument("--naive", type=int, default=20_000, help="tokens for the per-token loop (0: skip)")
    ap.add_argument("--dir", type=Path, default=ROOT / "build" / "bench-analyze")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--checksum-cost",
        action="store_true",
        help="time the pass with and without shard SHA-256 verification (alternating, 2 runs each)",
    )
    args = ap.parse_args()
    path = args.dir / f"synthetic-{args.tokens}x{args.layers}"
    if args.generate_only:
        generate(path, args.tokens, args.layers)
        return
    if not (path / "manifest.json").is_file():
        print(f"generating {path} (not timed) ...", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--tokens",
                str(args.tokens),
                "--layers",
                str(args.layers),
                "--dir",
                str(args.dir),
                "--generate-only",
            ],
            check=True,
        )
    if args.checksum_cost:
        times: dict[bool, list[float]] = {True: [], False: []}
        for verify in (False, True, False, True):
            from moescope.trace import integrity

            integrity._VERIFIED.clear()  # a fresh process would hash every shard once
            t0 = time.perf_counter()
            core(path, verify=verify)
            times[verify].append(time.perf_counter() - t0)
        on, off = min(times[True]), min(times[False])
        print(
            f"checksum cost: {off:.2f} s without, {on:.2f} s with verification: {100 * (on - off) / off:+.1f}%"
        )
        return
    t0 = time.perf_counter()
    res = core(path)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"trace: {path} ({args.tokens} tokens x {args.layers} layers, top-2 of 8, float16 logits)")
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
