"""Capture cost: routing capture vs the same model's plain forward pass on the same batches.

For each model it builds one set of padded batches (the runner's own tokenisation, windowing and
length-sorted batching), then times, alternating over ``--reps`` rounds and keeping the median:

- ``forward``: the model alone, with the arguments the recorder passes (no hooks);
- ``recorder``: :meth:`RoutingRecorder.run` on the same batches (hooks, masking, host copies),
  alternating with ``forward`` batch by batch so both see the same machine load;
- ``capture``: the whole ``moescope capture`` path (read JSONL, tokenise, run, write shards). Its
  wall time over the time spent inside the recorder (both from the same run) is the pipeline's
  own cost; applied to the recorder time it gives the end-to-end cost, immune to load drift.

It prints a markdown table with the overhead of each over ``forward`` (goal: at most 10% on CPU)
and the trace size in bytes per token-layer, with and without router logits.

A second table shows how much host work (reading and tokenising ahead, slicing rows, writing
Parquet shards) now runs beside the model: the whole capture with that work in line
(``runner.OVERLAP = False``) and in its threads (the default), alternating, with chunks of
``--chunk-batches`` batches so that there are several. In each run, the wall time minus the time
spent inside the model is the host work left exposed (each ratio comes from one run, so machine load
drifting between runs does not enter it); ``hidden`` is the share of the in-line run's exposed host
work that the threaded run no longer shows.

Run: .venv/bin/python benchmarks/capture.py [--threads 1] [--reps 3] [--device cpu] [--overlap-only]
GPU: python benchmarks/capture.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moescope.capture import runner as runner_mod
from moescope.capture.engine import RoutingRecorder
from moescope.capture.runner import CaptureOptions, LoadedModel, capture
from moescope.capture.tiny import tiny_model
from moescope.core.windows import make_windows, pad_batch, plan_batches, tokenize
from moescope.models import byte_tokenizer
from moescope.trace import Trace

_COMMON = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 260,  # the byte tokenizer's full vocabulary
    "max_position_embeddings": 1024,
    "experts_implementation": "grouped_mm",  # transformers' fastest CPU path in 5.23
}
MODELS = {
    "mixtral h256 E8 k2": (
        "mixtral",
        {**_COMMON, "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen3_moe h256 E64 k8": (
        "qwen3_moe",
        {
            **_COMMON,
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "head_dim": 32,
        },
    ),
}
WORDS = (
    "the of and to in is was for on that with as by at from his her an which were are this be had "
    "routing expert model token layer mixture sparse dense gate weight capture trace"
).split()


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(40, 160)))) for _ in range(n)]


def batches(
    tokenizer, texts: list[str], seq_len: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = tokenize(tokenizer, texts)
    windows = [w for i, x in enumerate(ids) for w in make_windows(i, x, seq_len)]
    out = []
    for plan in plan_batches(windows, batch_size):
        input_ids, mask = pad_batch([windows[i] for i in plan], tokenizer.pad_token_id)
        out.append((torch.from_numpy(input_ids), torch.from_numpy(mask)))
    return out


def forward_once(model, input_ids: torch.Tensor, mask: torch.Tensor, device: str) -> None:
    """The model alone, called exactly as the recorder calls it."""
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.no_grad():
        model(
            input_ids=input_ids,
            attention_mask=mask,
            use_cache=False,
            logits_to_keep=1,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        )
    _sync(device)


def time_interleaved(model, rec, data, device: str) -> tuple[float, float]:
    """Seconds for forward and recorder over all batches, alternating batch by batch.

    Alternating at batch granularity makes both modes share the same machine load, which matters
    on a shared CPU where the load drifts over seconds.
    """
    t_fwd = t_rec = 0.0
    with rec:
        for input_ids, mask in data:
            t = time.perf_counter()
            forward_once(model, input_ids, mask, device)
            t_fwd += time.perf_counter() - t
            t = time.perf_counter()
            rec.run(input_ids, mask)
            _sync(device)
            t_rec += time.perf_counter() - t
    return t_fwd, t_rec


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scaled(overrides: dict, hidden: int, layers: int) -> dict:
    """The same model family at another width and depth (intermediate sizes scale with the width)."""
    if hidden == _COMMON["hidden_size"] and layers == _COMMON["num_hidden_layers"]:
        return overrides
    out = {**overrides, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 2 * hidden}
    if "moe_intermediate_size" in out:
        out.update(moe_intermediate_size=hidden // 2, head_dim=hidden // out["num_attention_heads"])
    return out


def bench_model(name: str, family: str, overrides: dict, args, work: Path) -> dict:
    overrides = scaled(overrides, args.hidden, args.layers)
    model = tiny_model(family, **overrides).to(args.device, getattr(torch, args.dtype))
    tok = byte_tokenizer(overrides["vocab_size"])
    texts = documents(args.docs, seed=0)
    data_file = work / f"{family}.jsonl"
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = batches(tok, texts, args.seq_len, args.batch_size)
    n_tokens = int(sum(int(m.sum()) for _, m in data))
    loaded = LoadedModel(model, tok, name, "object")
    rec = RoutingRecorder(model)
    opts = CaptureOptions(seq_len=args.seq_len, batch_size=args.batch_size, overwrite=True)
    time_interleaved(model, rec, data[:1], args.device)  # warm-up
    forward, recorder, full = [], [], []
    for _ in range(args.reps):
        f, r = time_interleaved(model, rec, data, args.device)
        forward.append(f)
        recorder.append(r)
        t = time.perf_counter()
        res = capture(loaded, [str(data_file)], work / "trace", opts)
        full.append((time.perf_counter() - t) / res.model_seconds)
    tr = Trace.open(work / "trace")
    assert tr.num_tokens == n_tokens, (tr.num_tokens, n_tokens)
    token_layers = n_tokens * tr.num_layers
    size = sum(s["bytes"] for s in tr.manifest["shards"]) / token_layers
    capture(
        loaded,
        [str(data_file)],
        work / "trace",
        CaptureOptions(seq_len=args.seq_len, batch_size=args.batch_size, overwrite=True, logits=True),
    )
    size_logits = sum(s["bytes"] for s in Trace.open(work / "trace").manifest["shards"]) / token_layers
    f, r, pipeline = (statistics.median(x) for x in (forward, recorder, full))
    c = r * pipeline  # recorder time scaled by the pipeline's wall/model ratio, both taken in one run
    return {
        "model": name,
        "E": tr.num_experts,
        "k": tr.top_k,
        "L": tr.num_layers,
        "tokens": n_tokens,
        "forward_tok_s": n_tokens / f,
        "recorder_tok_s": n_tokens / r,
        "capture_tok_s": n_tokens / c,
        "recorder_overhead": r / f - 1,
        "pipeline_overhead": pipeline - 1,
        "capture_overhead": c / f - 1,
        "bytes_per_token_layer": size,
        "bytes_per_token_layer_logits": size_logits,
    }


def bench_overlap(name: str, family: str, overrides: dict, args, work: Path) -> dict:
    """The whole capture with host work in line vs in threads, alternating; medians of ``--reps``."""
    overrides = scaled(overrides, args.hidden, args.layers)
    model = tiny_model(family, **overrides).to(args.device, getattr(torch, args.dtype))
    tok = byte_tokenizer(overrides["vocab_size"])
    data_file = work / f"{family}-overlap.jsonl"
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(args.docs, seed=0)))
    loaded = LoadedModel(model, tok, name, "object")
    opts = CaptureOptions(seq_len=args.seq_len, batch_size=args.batch_size, overwrite=True, shard_rows=4096)
    runner_mod.CHUNK_BATCHES = args.chunk_batches
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    capture(loaded, [str(data_file)], work / "ov", opts)  # warm-up
    try:
        for _ in range(args.reps):
            for overlap in (False, True):
                runner_mod.OVERLAP = overlap
                t = time.perf_counter()
                res = capture(loaded, [str(data_file)], work / "ov", opts)
                times[overlap].append((time.perf_counter() - t, res.model_seconds))
    finally:
        runner_mod.OVERLAP = True
        runner_mod.CHUNK_BATCHES = 16
    serial, serial_model = (statistics.median(x) for x in zip(*times[False], strict=True))
    threaded, threaded_model = (statistics.median(x) for x in zip(*times[True], strict=True))
    host, exposed = serial - serial_model, threaded - threaded_model
    return {
        "model": name,
        "tokens": res.tokens,
        "chunks": -(-res.windows // (args.batch_size * args.chunk_batches)),
        "shards": res.shards,
        "model_s": serial_model,
        "serial_s": serial,
        "threaded_s": threaded,
        "threaded_model_s": threaded_model,
        "host_s": host,
        "exposed_s": exposed,
        "hidden": 1 - exposed / host if host > 0 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per mode; the median is reported")
    ap.add_argument("--docs", type=int, default=48, help="documents (40-160 words each)")
    ap.add_argument("--seq-len", type=int, default=256, help="window length in tokens")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights' dtype"
    )
    ap.add_argument(
        "--hidden", type=int, default=_COMMON["hidden_size"], help="hidden size (intermediate sizes follow)"
    )
    ap.add_argument("--layers", type=int, default=_COMMON["num_hidden_layers"], help="decoder layers")
    ap.add_argument("--chunk-batches", type=int, default=2, help="batches per chunk in the overlap table")
    ap.add_argument("--overlap-only", action="store_true", help="print only the overlap table")
    ap.add_argument("--only", default=None, help="run only the models whose name contains this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, overlap = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, overrides) in MODELS.items():
            if args.only and args.only not in name:
                continue
            name = name.replace("h256", f"h{args.hidden}")
            if not args.overlap_only:
                rows.append(bench_model(name, family, overrides, args, Path(tmp)))
            overlap.append(bench_overlap(name, family, overrides, args, Path(tmp)))
    print(
        f"device {args.device} ({args.dtype}, hidden {args.hidden}, {args.layers} layers), "
        f"{torch.get_num_threads()} thread(s), seq_len {args.seq_len}, "
        f"batch {args.batch_size}, median of {args.reps}\n"
    )
    print(
        "| model | E | k | L | tokens | forward tok/s | recorder tok/s | capture tok/s | recorder overhead"
        " | pipeline overhead | capture overhead | bytes/token-layer | with logits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['E']} | {r['k']} | {r['L']} | {r['tokens']} | {r['forward_tok_s']:,.0f}"
            f" | {r['recorder_tok_s']:,.0f} | {r['capture_tok_s']:,.0f} | {r['recorder_overhead']:+.1%}"
            f" | {r['pipeline_overhead']:+.1%} | {r['capture_overhead']:+.1%} | {r['bytes_per_token_layer']:.2f}"
            f" | {r['bytes_per_token_layer_logits']:.2f} |"
        )
    print(
        "\n| model | tokens | chunks | in line: wall s | model s | host exposed s | threaded: wall s | model s"
        " | host exposed s | host work hidden |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in overlap:
        print(
            f"| {r['model']} | {r['tokens']} | {r['chunks']} | {r['serial_s']:.2f} | {r['model_s']:.2f}"
            f" | {r['host_s']:.2f} | {r['threaded_s']:.2f} | {r['threaded_model_s']:.2f} | {r['exposed_s']:.2f}"
            f" | {r['hidden']:.0%} |"
        )


if __name__ == "__main__":
    main()
