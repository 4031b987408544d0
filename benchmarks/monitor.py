"""Training-step overhead of the routing monitor on the bundled models, CPU.

One training step = forward with labels, backward, AdamW step (and ``monitor.step()`` when the
monitor is on; a report with every metric and the default alert rules every ``--every`` steps, so
report cost is included, amortised). Steps with and without the monitor alternate (ABBA order,
hooks installed and removed outside the timed region), so both see the same machine load; the
overhead is reported three ways: median step time on vs off, min-of-N on vs off, and the median
of the per-pair ratios. On a loaded machine these wall-clock differences are noisy, so the time
spent inside the monitor's own code (its hooks, counters, aux-loss calls and ``step``/report) is
also timed directly and given as a share of the median step without the monitor. The monitor's
accumulated state is printed too (it does not depend on the number of steps).

Prints a markdown table and one JSON line per model.

``--figure STEM`` instead fine-tunes the bundled model for ``--train-steps`` steps on the bundled
held-out corpus (its own aux loss in the objective) with the monitor writing a CSV every
``--every`` steps, and saves the across-layer summary over training as ``STEM.png`` with
``STEM.csv`` (the plotted numbers), ``STEM.json`` (the run's parameters) and ``STEM-layers.csv``
(every per-layer row).

Run: .venv/bin/python benchmarks/monitor.py [--models tiny-mixtral,tiny-finegrained] [--steps 60]
     [--batch 8] [--seq 128] [--every 10] [--threads 1] [--no-aux]
     .venv/bin/python benchmarks/monitor.py --figure docs/figures/monitor-training --models tiny-mixtral
     [--train-steps 80] [--every 4] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import moescope
from moescope.monitor import RoutingMonitor

MODELS_DIR = Path(moescope.__file__).resolve().parent / "data" / "models"


def load(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODELS_DIR / name, dtype=torch.float32)
    model.config.output_router_logits = False  # the step the user runs; the monitor computes its own aux loss
    return model.train()


class _Timer:
    """Wraps the monitor's hook and step methods to add up the time spent inside them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, obj, name: str) -> None:
        f = getattr(obj, name)

        def timed(*a, **k):
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - t0

        setattr(obj, name, timed)


def run(name: str, steps: int, batch: int, seq: int, every: int, aux: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = load(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    monitor = RoutingMonitor(model, every=every, aux_loss=aux)
    timer = _Timer()
    hooks = monitor.hooks
    for m in ("_model_pre", "_model_post", "_selection"):
        timer.wrap(hooks, m)
    for m in ("add_logits",):
        timer.wrap(monitor.counters, m)
    timer.wrap(monitor, "step")
    g = torch.Generator().manual_seed(seed)

    def one_step(on: bool) -> float:
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on:
            monitor.step()
        return time.perf_counter() - t0

    for on in (False, True):  # warm-up: allocator, kernels, first report
        with monitor if on else _Null():
            for _ in range(max(2, every)):
                one_step(on)
    off_t, on_t = [], []
    timer.seconds = 0.0
    for i in range(steps):
        order = (False, True) if i % 2 == 0 else (True, False)
        pair = {}
        for on in order:
            if on:
                monitor.attach()
            try:
                pair[on] = one_step(on)
            finally:
                if on:
                    monitor.hooks.__exit__(None, None, None)
                    monitor._attached = False
        off_t.append(pair[False])
        on_t.append(pair[True])
    ratios = [b / a for a, b in zip(off_t, on_t, strict=True)]
    return {
        "model": name,
        "layers": monitor.spec.num_moe_layers,
        "experts": monitor.spec.num_experts,
        "top_k": monitor.spec.top_k,
        "batch": batch,
        "seq": seq,
        "every": every,
        "aux_loss": aux,
        "pairs": steps,
        "reports": monitor.reports,
        "step_ms_off_median": 1e3 * statistics.median(off_t),
        "step_ms_on_median": 1e3 * statistics.median(on_t),
        "overhead_median_pct": 100 * (statistics.median(on_t) / statistics.median(off_t) - 1),
        "overhead_min_pct": 100 * (min(on_t) / min(off_t) - 1),
        "overhead_paired_median_pct": 100 * (statistics.median(ratios) - 1),
        "monitor_ms_per_step": 1e3 * timer.seconds / steps,
        "monitor_share_pct": 100 * timer.seconds / steps / statistics.median(off_t),
        "state_bytes": monitor.state_nbytes(),
        "threads": torch.get_num_threads(),
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def corpus_batches(tokenizer, batch: int, seq: int):
    """Endless batches of ``seq``-token windows of the bundled held-out corpus, documents shuffled once."""
    import random

    corpus = MODELS_DIR.parent / "corpus"
    texts = [json.loads(line)["text"] for p in sorted(corpus.glob("heldout-*.jsonl")) for line in open(p)]
    random.Random(0).shuffle(texts)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
    windows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    while True:
        for i in range(0, len(order) - batch + 1, batch):
            yield windows[order[i : i + batch]]


def figure(stem: str, name: str, steps: int, batch: int, seq: int, every: int, lr: float) -> None:
    """Fine-tune ``name`` briefly with the monitor on; save the summary figure and its CSVs."""
    import tempfile

    import polars as pl
    from transformers import AutoTokenizer

    from moescope.core.figures import save_figure, save_table
    from moescope.monitor import CSVSink
    from moescope.monitor.figures import plot_training, summary_table

    torch.manual_seed(0)
    model = load(name)
    model.config.output_router_logits = True  # train with the model's own aux loss
    tok = AutoTokenizer.from_pretrained(MODELS_DIR / name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = corpus_batches(tok, batch, seq)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "layers.csv"
        with RoutingMonitor(model, every=every, sinks=[CSVSink(csv_path)]) as monitor:
            for _ in range(steps):
                ids = next(data)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                monitor.step()
        rows = pl.read_csv(csv_path)
    summary = summary_table(rows)
    spec = monitor.spec
    fig = plot_training(
        summary, f"{name}: routing over {steps} fine-tuning steps (lr {lr:g}, batch {batch}x{seq})"
    )
    params = {
        "model": name,
        "layers": spec.num_moe_layers,
        "experts": spec.num_experts,
        "top_k": spec.top_k,
        "steps": steps,
        "every": every,
        "batch": batch,
        "seq": seq,
        "lr": lr,
        "optimizer": "AdamW",
        "data": "bundled held-out corpus (moescope/data/corpus/heldout-*.jsonl)",
        "dead_share": monitor.dead_share,
        "command": f"benchmarks/monitor.py --figure {stem} --models {name} --train-steps {steps} "
        f"--every {every} --batch {batch} --seq {seq} --lr {lr:g}",
    }
    for p in save_figure(fig, summary, stem, params):
        print(p)
    print(save_table(rows, f"{stem}-layers.csv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny-mixtral,tiny-finegrained")
    ap.add_argument("--steps", type=int, default=60, help="pairs of (off, on) steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-aux", action="store_true", help="monitor without the aux-loss calls")
    ap.add_argument("--figure", default=None, help="save the training-run figure at this stem instead")
    ap.add_argument("--train-steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.figure:
        model = args.models.split(",")[0]
        figure(args.figure, model, args.train_steps, args.batch, args.seq, args.every, args.lr)
        return
    results = [
        run(m, args.steps, args.batch, args.seq, args.every, not args.no_aux) for m in args.models.split(",")
    ]
    print(
        "| model | L x E, k | tokens/step | step off (ms, median) | step on (ms, median) "
        "| overhead median | overhead min-of-N | overhead paired median | time in monitor code "
        "| monitor state |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['layers']} x {r['experts']}, {r['top_k']} | {r['batch'] * r['seq']} "
            f"| {r['step_ms_off_median']:.1f} | {r['step_ms_on_median']:.1f} | {r['overhead_median_pct']:+.2f}% "
            f"| {r['overhead_min_pct']:+.2f}% | {r['overhead_paired_median_pct']:+.2f}% "
            f"| {r['monitor_ms_per_step']:.1f} ms = {r['monitor_share_pct']:.2f}% | {r['state_bytes']} B |"
        )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
