"""CLI: ``moescope simulate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moescope.cli_utils import JsonOpt, OverwriteOpt, TraceArg, emit
from moescope.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)


def simulate_cmd(
    trace: TraceArg,
    output: Path = typer.Option(
        ..., "--output", "-o", help="Directory for summary.json, per_layer.csv and sweeps."
    ),
    preset: str = typer.Option(
        "rtx4090-pcie4",
        "--preset",
        help="Deployment preset (rtx4090-pcie4, a100-80gb-pcie4, h100-pcie5, rtx4090-nvme).",
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="Model config for expert sizes: shipped name or config.json (default: the trace's model id).",
    ),
    expert_params: int = typer.Option(
        None, "--expert-params", help="Parameters of one expert, instead of --model."
    ),
    dtype: str = typer.Option(
        "bf16", "--dtype", help="Expert storage width: fp32, bf16, fp16, fp8, int8, int4."
    ),
    cache_experts: int = typer.Option(
        None, "--cache-experts", help="Cache slots per layer (or in total with --shared)."
    ),
    cache_fraction: float = typer.Option(
        None, "--cache-fraction", help="Cache size as a share of all experts."
    ),
    cache_gb: float = typer.Option(None, "--cache-gb", help="GPU memory given to the expert cache, GB."),
    shared: bool = typer.Option(
        False, "--shared", help="One cache shared by all layers instead of one per layer."
    ),
    policy: str = typer.Option(
        "lru",
        "--policy",
        help="Eviction: lru, lfu, lrfu, lru-protect, static, belady, or predictor-guided (fitted on --train): "
        "learned-reuse, learned-reuse-admit, next-use, next-use-evict; oracles: oracle-next-use, "
        "horizon-oracle (knows the next token's routing); auto: the fastest of lru, lfu, lrfu, static, "
        "learned-reuse, learned-reuse-admit on held-out documents of --train under this deployment "
        "(needs --train).",
    ),
    prefetch: str = typer.Option(
        "none", "--prefetch", help="none, table, previous, oracle, or a saved predictor file."
    ),
    distance: int = typer.Option(
        1, "--distance", help="Prefetch distance d: predict layer l+d after layer l."
    ),
    budget: int = typer.Option(None, "--budget", help="Experts prefetched per issue (default: top_k)."),
    mode: str = typer.Option(
        "decode", "--mode", help="decode (one token per step) or prefill (union per batch)."
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Prefill batch in tokens (default: whole document)."
    ),
    reset: str = typer.Option(
        "none", "--reset", help="none, or document (every document starts with a cold cache)."
    ),
    compute_ms: float = typer.Option(
        None, "--compute-ms", help="Fixed compute time per layer, ms (default: derived)."
    ),
    link_efficiency: float = typer.Option(
        1.0, "--link-efficiency", help="Share of the published link bandwidth reached."
    ),
    train: Path = typer.Option(
        None,
        "--train",
        help="Trace to fit the prefetcher and static pinning on, e.g. the train half of `moescope split`.",
    ),
    fit_on_replayed: bool = typer.Option(
        False,
        "--fit-on-replayed",
        help="Fit the prefetcher and static pinning on TRACE itself instead of --train (this flatters them).",
    ),
    do_sweep: bool = typer.Option(
        False, "--sweep", help="Also sweep cache size x policy (and budgets 1..2k when prefetching)."
    ),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Replay a trace through an expert cache, a prefetcher and a timing model.

    Writes summary.json and per_layer.csv (and sweep.csv with figures under --sweep) to -o.

    Example: moescope simulate runs/ds-lite --cache-fraction 0.25 --policy lru --prefetch table --budget 8 -o sim/

    Example: moescope simulate split/test --train split/train --cache-fraction 0.25 --policy auto -o sim/ --json
    """
    from moescope.simulate.auto import AutoPolicy
    from moescope.simulate.fitting import REPLAYED, learns_from_trace
    from moescope.simulate.prefetch import make_prefetcher
    from moescope.simulate.replay import replay_setup
    from moescope.simulate.sweep import SWEEP_POLICIES, plot_sweep, prediction_pays, sweep
    from moescope.trace.outputs import claim

    if train is not None and fit_on_replayed:
        raise ConfigError("--train and --fit-on-replayed exclude each other: choose one")
    if policy == "auto" and train is None:
        raise ConfigError(
            "--policy auto chooses the policy on held-out documents of a training trace: pass --train "
            "TRAIN_TRACE (e.g. the train half of `moescope split`); the replayed trace is never used to choose"
        )
    with claim(output, "simulation", overwrite=overwrite, inputs=[trace, train]):
        r = replay_setup(
            trace,
            fit_trace=train if train is not None else (REPLAYED if fit_on_replayed else None),
            policy=policy,
            prefetch=None if prefetch == "none" else prefetch,
            cache_fraction=cache_fraction,
            cache_experts=cache_experts,
            cache_gb=cache_gb,
            preset=preset,
            compute_ms=compute_ms,
            link_efficiency=link_efficiency,
            model=model,
            expert_params=expert_params,
            dtype=dtype,
            shared=shared,
            distance=distance,
            budget=budget,
        )
        tr, fit_tr, dep, cost = r.trace, r.fit_trace, r.deployment, r.cost
        if fit_tr is None and (do_sweep or learns_from_trace(r.policy) or learns_from_trace(r.prefetcher)):
            raise ConfigError(
                "the prefetcher or cache policy (or the sweep's static pinning) learns from a trace: pass"
                " --train TRAIN_TRACE (e.g. the train half of `moescope split`) or --fit-on-replayed"
            )
        res = r.run(mode=mode, batch_size=batch_size, reset=reset)
        summary = {
            "trace": str(trace),
            "fit_on": str(train) if train is not None else ("replayed trace" if fit_on_replayed else None),
            "deployment": dep.to_dict(),
            "expert_bytes": cost.expert_bytes,
            **res.summary(),
        }
        if isinstance(r.policy, AutoPolicy):
            summary["auto"] = r.policy.selection()
        res.per_layer().write_csv(output / "per_layer.csv")
        if do_sweep:
            pfs = [None]
            if prefetch != "none":
                k = tr.top_k
                pfs += [make_prefetcher(prefetch, distance=distance, budget=m) for m in sorted({k, 2 * k})]
            df = sweep(
                tr,
                dep,
                cost,
                prefetchers=pfs,
                mode=mode,
                batch_size=batch_size,
                shared=shared,
                reset=reset,
                fit_trace=fit_tr,
                policies=SWEEP_POLICIES + (("auto",) if train is not None else ()),
            )
            df.write_csv(output / "sweep.csv")
            plot_sweep(df, output / "sweep", {"trace": str(trace), "preset": preset, "mode": mode})
            summary["sweep"] = str(output / "sweep.csv")
            frac = cache_fraction if cache_fraction is not None else 0.25
            pays = prediction_pays(df, min((0.0625, 0.125, 0.25, 0.5, 0.75), key=lambda f: abs(f - frac)))
            summary["prediction_pays"] = pays["text"]
        (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = (
        f"{res.policy} + {res.prefetcher}: hit rate {summary['hit_rate']:.3f}, "
        f"{summary['bytes_moved'] / 1e9:.2f} GB moved ({summary['wasted_prefetch_bytes'] / 1e9:.2f} GB wasted), "
        f"stall {summary['stall_ms_per_token']:.3f} ms/token, {summary['tokens_per_s']:.1f} tokens/s "
        f"(all in GPU {summary['tokens_per_s_all_in_gpu']:.1f}, no cache {summary['tokens_per_s_no_cache']:.1f})"
    )
    if "auto" in summary:
        sel = summary["auto"]
        scores = ", ".join(f"{k} {v:.4g}" for k, v in sel["heldout_tokens_per_s"].items())
        text += (
            f"\nauto chose {sel['choice']} on {sel['heldout_documents']} held-out documents of --train "
            f"(held-out tokens/s: {scores})"
        )
    if do_sweep:
        text += "\n" + summary["prediction_pays"]
    emit(summary, json_out, text=text)
