"""Strategy overhead: scoring under a routing strategy against plain scoring (goal: <= 10% more time).

Plain scoring is one forward pass and a log-softmax gather per batch with no hook installed.
Strategy scoring is :class:`moescope.evaluate.scorer.Scorer` with a strategy applied (hooks, the
strategy's selection, the family's re-weighting, active-expert counting). Both score the same
right-padded batches of bundled-corpus windows in pairs, plain and strategy back to back in ABBA
order, so both halves of a pair see the same machine load; the overhead reported is the median over
every pair (``--batches`` x ``--reps``) of strategy time / plain time - 1, the figure that stays
put on a loaded machine (the medians of the summed times are printed too). The expert compute itself
changes with the strategy (top-p with mean k 2.3 runs more expert rows than top-2), so each pair is
also split: the time inside the experts modules' own ``forward`` (hooks excluded) is clocked in both
halves, and "outside the experts" is the median of (strategy - its expert time) / (plain - its expert
time) - 1: what applying the strategy costs beyond the expert work it asks for. The expert compute
ratio (strategy / plain expert time) shows that work.

Prints a markdown table and one JSON line.

Run: .venv/bin/python benchmarks/evaluate.py [--model tiny-mixtral] [--batches 6] [--seq-len 256]
     [--batch-size 8] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from moescope.capture.runner import load_model
from moescope.data import load_corpus
from moescope.evaluate.calibrate import FREE_PARAMETER, match_k
from moescope.evaluate.scorer import Scorer

STRATEGIES = ("topk", "topk:k=1", "topp:p=0.6", "threshold:w=0.2", "skip:beta=0.5")


def batches(tokenizer, n: int, seq_len: int, batch_size: int) -> list[list[list[int]]]:
    ids = [t for text, _ in load_corpus(max_chars=60_000) for t in tokenizer.encode(text)]
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)][: n * batch_size]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


class ExpertClock:
    """Seconds spent inside the experts modules' own forward (hooks excluded), summed over calls.

    Each experts module's ``forward`` is wrapped on the instance, so pre- and post-hooks (a
    strategy's edit, the compaction and its scatter) stay outside the clock while the expert
    matmuls on whatever rows the call carries are inside it.
    """

    def __init__(self, model) -> None:
        from moescope.core.families import resolve_adapter
        from moescope.core.routing import moe_sites, routing_spec

        spec = routing_spec(model)
        self.seconds = 0.0
        for site in moe_sites(model, spec, resolve_adapter(spec.family)):
            if site.consumer is not None:
                site.consumer.forward = self._timed(site.consumer.forward)

    def _timed(self, forward):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return call

    def lap(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def widened(model, width: str):
    """A seeded random model of ``model``'s config with hidden and intermediate sizes from ``width``."""
    from transformers import AutoModelForCausalLM

    hidden, intermediate = (int(v) for v in width.split(","))
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def matched(model, tokenizer, spec: str, k: float, texts: list[str]) -> str:
    """``spec`` with its free parameter set so that mean experts per token on ``texts`` is ``k``."""
    name = spec.split(":", 1)[0]
    if name not in FREE_PARAMETER:
        return spec
    text, got = match_k(model, tokenizer, spec, k, texts, max_len=256)
    print(f"match-k {k}: {text} gives {got:.3f} experts per token on the calibration documents")
    return text


def plain(model, rows: list[list[int]]) -> float:
    """One forward, no hook: lm-eval's scoring of each row (log-softmax, gather, greedy check)."""
    t = time.perf_counter()
    x = torch.tensor(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits, -1)
        for b in range(x.shape[0]):
            lp, tok = logp[b, :-1], x[b, 1:]
            (float(lp.gather(1, tok[:, None]).sum()), bool((lp.argmax(-1) == tok).all()))
    return time.perf_counter() - t


def scored(scorer: Scorer, rows: list[list[int]]) -> float:
    t = time.perf_counter()
    pairs = [(r[:1], r[1:]) for r in rows]
    scorer.loglikelihood_tokens(pairs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-compaction",
        action="store_true",
        help="compute padded slots as before (zero-weight copies), to measure what compaction saves",
    )
    ap.add_argument("--strategies", default=";".join(STRATEGIES), help="';'-separated specs")
    ap.add_argument(
        "--match-k",
        type=float,
        default=None,
        help="set each calibratable strategy's free parameter so its mean experts per token is K"
        " (moescope.evaluate.calibrate.match_k on other corpus documents than those timed)",
    )
    ap.add_argument(
        "--calibration-docs", type=int, default=40, help="corpus documents --match-k calibrates on"
    )
    ap.add_argument(
        "--width",
        default=None,
        help="HIDDEN,INTERMEDIATE: a seeded random model of the --model config at this width"
        " (same layers, experts and k), to see the strategy's fixed cost on a wider model",
    )
    args = ap.parse_args()
    if args.no_compaction:
        import moescope.strategies.apply as apply_mod

        apply_mod.compaction_ok = lambda *a: False
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu", dtype="float32")
    model = lm.model if args.width is None else widened(lm.model, args.width)
    clock = ExpertClock(model)
    data = batches(lm.tokenizer, args.batches, args.seq_len, args.batch_size)
    specs = args.strategies.split(";")
    if args.match_k is not None:
        texts = [t for t, _ in load_corpus(max_chars=20_000)][
            -args.calibration_docs :
        ]  # not the timed windows
        specs = [matched(model, lm.tokenizer, spec, args.match_k, texts) for spec in specs]
    results = []
    for spec in specs:
        scorer = Scorer(model, lm.tokenizer, spec, batch_size=args.batch_size, max_length=args.seq_len + 1)
        scorer.loglikelihood_tokens([(r[:1], r[1:]) for r in data[0]])  # warm-up
        clock.lap()
        t_plain, t_strat, ratios, outside, expert = [], [], [], [], []
        for rep in range(args.reps):
            a = b = 0.0
            for i, rows in enumerate(data):
                if (rep + i) % 2 == 0:
                    x = plain(model, rows)
                    xe = clock.lap()
                    y = scored(scorer, rows)
                    ye = clock.lap()
                else:
                    y = scored(scorer, rows)
                    ye = clock.lap()
                    x = plain(model, rows)
                    xe = clock.lap()
                a, b = a + x, b + y
                ratios.append(y / x)
                outside.append((y - ye) / (x - xe))  # everything but the experts' own compute
                expert.append(ye / xe)
            t_plain.append(a)
            t_strat.append(b)
        p, s = statistics.median(t_plain), statistics.median(t_strat)
        results.append(
            {
                "strategy": spec,
                "plain_s": round(p, 3),
                "strategy_s": round(s, 3),
                "overhead": round(statistics.median(ratios) - 1, 4),
                "overhead_outside_experts": round(statistics.median(outside) - 1, 4),
                "expert_compute_ratio": round(statistics.median(expert), 4),
                "pairs": len(ratios),
                "mean_active": round(float(scorer.counter.mean().mean()), 3),
            }
        )
    tokens = sum(len(r) for b in data for r in b)
    print(
        f"| strategy | mean k | plain s | strategy s | overhead (paired median) | outside the experts |"
        f" expert compute ratio |  ({tokens} tokens, {args.model})"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['strategy']} | {r['mean_active']} | {r['plain_s']} | {r['strategy_s']} | {100 * r['overhead']:+.1f}% |"
            f" {100 * r['overhead_outside_experts']:+.1f}% | {r['expert_compute_ratio']:.3f} |"
        )
    print(
        json.dumps(
            {
                "benchmark": "evaluate",
                "tokens": tokens,
                "threads": args.threads,
                "compaction": not args.no_compaction,
                "match_k": args.match_k,
                "width": args.width,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
