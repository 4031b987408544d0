"""Ablation cost: a full layer sweep (every expert of one layer disabled in turn) over a corpus.

Runs ``moescope ablate``'s library path on the bundled Mixtral-style model (or ``--model``) over
the bundled held-out corpus: one baseline pass plus one pass per expert, bootstrap intervals,
tables and figures. It also times a plain forward pass without hooks against an ablated pass
(routing edits, next-token scores, routing bookkeeping) on a few batches, alternating batch by
batch so both see the same machine load, median of ``--reps`` rounds.

Prints a markdown table and one JSON line. ``--max-documents N`` takes the first N documents of
each domain (the full corpus has about 390k tokens; a full sweep is nine passes over it).

Run: .venv/bin/python benchmarks/ablate.py [--model tiny-mixtral] [--layer 3] [--max-documents 12]
     [--threads 2] [--device cpu] [--mode reroute] [--out runs/bench-ablate]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time

import torch

from moescope.ablate.commands import load_model
from moescope.ablate.hooks import ExpertAblator
from moescope.ablate.report import write_outputs
from moescope.ablate.sweep import AblateOptions, Prepared, default_data, prepare, run_ablation, run_pass
from moescope.capture.runner import DEFAULT_MAX_SEQ_LEN
from moescope.core.windows import ensure_pad_token


def plain_pass_seconds(model, prep) -> float:
    """One forward pass over the prepared batches with no hook (the floor a sweep pass can reach)."""
    device = model.get_input_embeddings().weight.device
    positions = "position_ids" in inspect.signature(model.forward).parameters
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask, _ in prep.batches:
            input_ids, attn = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            kw = {"position_ids": (attn.cumsum(-1) - 1).clamp(min=0)} if positions else {}
            model(input_ids=input_ids, attention_mask=attn, use_cache=False, **kw).logits.float()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def overhead(model, prep, layer: int | None, mode: str, reps: int, batches: int) -> tuple[float, float]:
    """Seconds of plain passes and of ablated passes (hooks, scores, routing bookkeeping) over the
    first ``batches`` batches, alternating batch by batch so both see the same machine load;
    the median over ``reps`` rounds."""
    ablator = ExpertAblator(model, mode=mode, record=True)
    layer = ablator.spec.moe_layers[len(ablator.spec.moe_layers) // 2] if layer is None else layer
    subs = [
        Prepared([b], prep.doc_labels, prep.domains, prep.tokens, prep.seq_len)
        for b in prep.batches[:batches]
    ]
    with ablator:
        bases = [run_pass(model, ablator, sub) for sub in subs]
    plain, hooked = [], []
    for _ in range(reps):
        t_plain = t_hooked = 0.0
        for sub, base in zip(subs, bases, strict=True):
            t_plain += plain_pass_seconds(model, sub)
            with ablator:
                t0 = time.perf_counter()
                run_pass(model, ablator, sub, condition=(layer, (0,)), baseline=base)
                t_hooked += time.perf_counter() - t0
        plain.append(t_plain)
        hooked.append(t_hooked)
    return statistics.median(plain), statistics.median(hooked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="tiny-mixtral", help="model to sweep (bundled name, path, tiny:<family>)"
    )
    ap.add_argument(
        "--layer", type=int, default=None, help="decoder layer to sweep (default: the middle MoE layer)"
    )
    ap.add_argument("--max-documents", type=int, default=None, help="documents per domain (default: all)")
    ap.add_argument("--mode", default="reroute", choices=["reroute", "drop"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3, help="rounds of the plain-vs-ablated overhead timing")
    ap.add_argument("--overhead-batches", type=int, default=4, help="batches timed for the overhead")
    ap.add_argument(
        "--out", default=None, help="keep the tables and figures here (default: a temporary folder)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_load = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    t_load = time.perf_counter() - t_load
    data, field = default_data()
    opts = AblateOptions(
        layers=None if args.layer is None else [args.layer],
        mode=args.mode,
        label_field=field,
        max_documents=args.max_documents,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    out = args.out or tempfile.mkdtemp(prefix="bench-ablate-")
    t0 = time.perf_counter()
    result = run_ablation(loaded.model, loaded.tokenizer, data, opts)
    t_sweep = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = write_outputs(result, out, params={"model": args.model})
    t_write = time.perf_counter() - t1

    max_pos = getattr(loaded.model.config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    seq_len = args.seq_len or min(max_pos, DEFAULT_MAX_SEQ_LEN)
    prep = prepare(loaded.tokenizer, data, opts, seq_len, ensure_pad_token(loaded.tokenizer))
    t_plain, t_hooked = overhead(loaded.model, prep, args.layer, args.mode, args.reps, args.overhead_batches)

    info = result.info
    passes = info["conditions"] + 1
    per_pass = (info["seconds_baseline"] + info["seconds_conditions"]) / passes
    row = {
        "model": args.model,
        "family": info["family"],
        "device": args.device,
        "threads": torch.get_num_threads(),
        "layer": summary["layers"][0]["layer"],
        "mode": args.mode,
        "documents": info["documents"],
        "tokens": info["tokens"],
        "passes": passes,
        "sweep_s": round(t_sweep, 2),
        "write_s": round(t_write, 2),
        "load_s": round(t_load, 2),
        "pass_s": round(per_pass, 3),
        "overhead_plain_s": round(t_plain, 3),
        "overhead_ablated_s": round(t_hooked, 3),
        "overhead_vs_plain": round(t_hooked / t_plain - 1, 3),
        "tokens_per_s": round(info["tokens"] * passes / t_sweep),
        "output": out,
    }
    print(
        "| model | tokens | passes | sweep (s) | per pass (s) | token-passes/s | ablated pass vs plain forward |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} L{row['layer']} {args.mode} | {row['tokens']} | {passes} | {row['sweep_s']} |"
        f" {row['pass_s']} | {row['tokens_per_s']} | {row['overhead_vs_plain']:+.1%} |"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
