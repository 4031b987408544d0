"""CLI: ``moescope evaluate`` (tasks under routing strategies) and ``moescope diff`` (two traces)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moescope.cli_utils import JsonOpt, OverwriteOpt, SeedOpt, emit, progress_enabled


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("diff")(diff_cmd)


def evaluate_cmd(
    model: str = typer.Argument(
        ..., help="Model: bundled name (tiny-mixtral, tiny-finegrained), local model directory or hub id."
    ),
    tasks: list[str] = typer.Argument(
        ...,
        help="Tasks: lambada, hellaswag, wikitext (hub presets) or NAME=FILE.jsonl (local file in the hub"
        " schema); corpus (the bundled corpus by domain) or corpus=FILE (text, label); mc=FILE (query,"
        " choices, gold).",
    ),
    strategy: list[str] = typer.Option(
        [],
        "--strategy",
        "-s",
        help="Routing strategy, repeatable: baseline, topk:k=1, topp:p=0.7, threshold:w=0.2,"
        " pvalue:alpha=0.05,correction=bh[,density=FILE], skip:beta=0.5, entropy:low=1,high=4,"
        " mask:LAYER:E+E, random; per layer: 'topk:k=1@0-2;topp:p=0.9'. Default: baseline.",
    ),
    output: Path = typer.Option(Path("evaluation"), "--output", "-o", help="Output directory."),
    match_k: float | None = typer.Option(
        None,
        "--match-k",
        help="Calibrate p, w, alpha or beta on a calibration split so the mean experts per token equals K.",
    ),
    calibration: float = typer.Option(
        0.2, "--calibration", help="Calibration split per task: a fraction (< 1) or a number of samples."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Samples per task (per category for corpus)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU), float32, bfloat16, float16."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the Pareto figure."),
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Score MODEL on TASKs under routing strategies: score with 95% CI, mean active experts, params, FLOPs.

    Examples:
      moescope evaluate tiny-mixtral corpus -s baseline -s topk:k=1 -s topp:p=0.7 -o eval
      moescope evaluate tiny-mixtral lambada=lambada.jsonl hellaswag=hs.jsonl -s topp -s pvalue --match-k 2
    """
    from moescope.evaluate.run import format_table, write_outputs
    from moescope.evaluate.tasks import parse_task
    from moescope.strategies import parse_strategy
    from moescope.trace.outputs import claim

    parsed = [parse_task(t) for t in tasks]
    for s in strategy:
        parse_strategy(s)  # a bad spec fails before the model loads
    # local files only (hub names and presets are not paths): never written into
    inputs = [p for p in [model, *(t.split("=", 1)[1] for t in tasks if "=" in t)] if Path(p).exists()]
    with claim(output, "folder", overwrite=overwrite, inputs=inputs):  # refused before the model loads
        report = _run_evaluation(
            parsed, strategy, model, device, dtype, batch_size, limit, match_k, calibration, bootstrap, seed
        )
        summary = write_outputs(report, output, figures=figures)
    emit(
        {**report.to_dict(), "output": summary["output"], "files": summary["files"]},
        json_out,
        text=format_table(report),
    )


def diff_cmd(
    trace_a: Path = typer.Argument(..., help="Trace A (e.g. the baseline)."),
    trace_b: Path = typer.Argument(..., help="Trace B of the same tokens (e.g. under a strategy)."),
    output: Path = typer.Option(Path("diff"), "--output", "-o", help="Output directory."),
    permutations: int = typer.Option(1000, "--permutations", help="Sign-flip permutations per expert."),
    top: int = typer.Option(10, "--top", help="Experts listed in the text summary."),
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """How routing changed between two traces of the same tokens: per-layer set mismatch, experts, domains.

    Examples:
      moescope capture tiny-mixtral -o base && moescope capture tiny-mixtral --strategy topp:p=0.7 -o topp
      moescope diff base topp -o diff
    """
    from moescope.core.figures import save_figure, save_table
    from moescope.evaluate.diff import diff_figure, diff_traces
    from moescope.trace.outputs import claim
    from moescope.trace.reader import Trace

    with claim(output, "folder", overwrite=overwrite, inputs=[trace_a, trace_b]):
        tables = diff_traces(Trace.open(trace_a), Trace.open(trace_b), n_perm=permutations, seed=seed)
        save_figure(diff_figure(tables), tables["layers"], output / "layers")
        save_table(tables["experts"], output / "experts.csv")
        save_table(tables["domains"], output / "domains.csv")
    result = {k: v.to_dicts() for k, v in tables.items()}
    result["experts"] = result["experts"][:top]
    lines = ["layer  tokens  set mismatch  jaccard  k(A)  k(B)"]
    for r in tables["layers"].iter_rows(named=True):
        lines.append(
            f"{r['layer']:>5} {r['tokens']:>7} {r['set_mismatch_rate']:>13.4f} {r['mean_jaccard']:>8.4f}"
            f" {r['mean_k_a']:>5.2f} {r['mean_k_b']:>5.2f}"
        )
    lines.append("most changed experts (layer, expert, usage A -> B, p):")
    for r in tables["experts"].head(top).iter_rows(named=True):
        lines.append(
            f"  {r['layer']:>3} {r['expert']:>4}  {r['usage_a']:.3f} -> {r['usage_b']:.3f}  p={r['p_value']:.4f}"
        )
    emit({**result, "output": str(output)}, json_out, text="\n".join(lines))


def _run_evaluation(
    parsed, strategy, model, device, dtype, batch_size, limit, match_k, calibration, bootstrap, seed
):
    """Load the model and score every (task, strategy), with progress bars on stderr."""
    from moescope.capture.runner import load_model
    from moescope.evaluate.run import evaluate

    loaded = load_model(model, device=device, dtype=dtype)

    def log(msg: str) -> None:
        typer.echo(msg, err=True)

    bars: list = []

    def progress(desc: str, total: int):
        if not progress_enabled():
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        bars.append(bar)
        return bar.update

    try:
        return evaluate(
            loaded.model,
            loaded.tokenizer,
            parsed,
            strategy or ["baseline"],
            model_name=model,
            batch_size=batch_size,
            limit=limit,
            match=match_k,
            calibration=calibration,
            n_boot=bootstrap,
            seed=seed,
            log=log,
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
