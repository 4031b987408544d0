"""CLI: ``moescope ablate``: disable experts at run time and measure the loss per domain."""

from __future__ import annotations

from pathlib import Path

import typer

from moescope.cli_utils import JsonOpt, OverwriteOpt, SeedOpt, emit


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate)


def parse_layer_choice(text: str | None) -> list[int] | str | None:
    """``--layer``: ``None`` (middle MoE layer), ``all`` or comma-separated decoder-layer indices."""
    from moescope.errors import ConfigError

    if text is None or text.strip() == "":
        return None
    if text.strip() == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layer: expected 'all' or comma-separated layer indices, got {text!r}") from None


def parse_experts(text: str | None) -> list[tuple[int, ...]] | None:
    """``--experts``: comma-separated conditions, each an id or ids joined by '+' (disabled together)."""
    from moescope.errors import ConfigError

    if text is None or text.strip() in ("", "each"):
        return None
    try:
        out = [tuple(int(e) for e in part.split("+")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--experts: expected ids like '3', '1,4,6' (each in turn) or '3+5' (together), got {text!r}"
        ) from None
    if not out:
        raise ConfigError("--experts: no expert given")
    return out


def ablate(
    model: str = typer.Argument(
        "tiny-mixtral",
        help="Model as moescope capture takes it: bundled name (tiny-mixtral, tiny-finegrained), seed"
        " miniature name, hub id, local model directory, or tiny:<family> for a seeded random test model.",
    ),
    data: list[str] | None = typer.Argument(
        None,
        help="Texts, as moescope capture takes them (files, saved data set, preset, hub data set)."
        " Default: the bundled held-out corpus, labelled by domain.",
        show_default=False,
    ),
    output: Path = typer.Option(
        Path("ablation"), "--output", "-o", help="Output directory for tables and figures."
    ),
    layer: str | None = typer.Option(
        None,
        "--layer",
        help="Decoder-layer index of the MoE layer to ablate, several comma-separated, or 'all'"
        " (default: the middle MoE layer).",
    ),
    experts: str | None = typer.Option(
        None,
        "--experts",
        help="Experts to disable: '3', '1,4,6' (each in turn), '3+5' (together);"
        " default: each expert of the layer in turn.",
    ),
    mode: str = typer.Option(
        "reroute",
        "--mode",
        help="reroute: the token's choice goes to the next best expert, reweighted the"
        " family's way; drop: the expert's weight is set to zero, nothing renormalised.",
    ),
    rank_by: str = typer.Option(
        "accuracy", "--rank-by", help="Metric whose harm ranks experts: accuracy, top5, nll or perplexity."
    ),
    text_field: str | None = typer.Option(None, "--text-field", help="Record field holding the text."),
    label_field: str | None = typer.Option(
        None, "--label-field", help="Record field holding each document's domain or category."
    ),
    label: str | None = typer.Option(None, "--label", help="One label for every document."),
    preset: str | None = typer.Option(
        None, "--preset", help="Read local files with a preset's field mapping."
    ),
    split: str | None = typer.Option(None, "--split", help="Split of a hub or saved data set."),
    data_config: str | None = typer.Option(
        None, "--data-config", help="Configuration name of a hub data set."
    ),
    txt_unit: str = typer.Option(
        "paragraph", "--txt-unit", help="How .txt files become documents: paragraph, file or line."
    ),
    max_documents: int | None = typer.Option(
        None, "--max-documents", help="Read at most this many documents per source."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Use at most this many tokens in all; the last document is cut to fit."
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Window length; longer documents are split (default: min(max_position_embeddings, 2048)).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap resamples of documents for the intervals."
    ),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the intervals."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="float32, bfloat16, float16 or auto (float32 on CPU, else the checkpoint's dtype).",
    ),
    no_figures: bool = typer.Option(False, "--no-figures", help="Write the tables only, no PNG figures."),
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Disable experts by editing the routing at run time and measure accuracy, top-5 and perplexity per domain.

    Runs the data once unablated and once per condition on the same tokens, and writes
    ablation.csv (change per expert and domain with bootstrap intervals), heatmap, ranking and
    load_vs_impact figures (PNG beside CSV), baseline.csv, load.csv, routing_change.csv and summary.json.

    Example: moescope ablate tiny-mixtral --layer 3 -o out/ablate-l3

    Example: moescope ablate mistralai/Mixtral-8x7B-v0.1 ag_news --max-documents 200 --layer 15 --mode drop --json
    """
    import sys

    from moescope.ablate.report import summary_text, write_outputs
    from moescope.ablate.sweep import AblateOptions, check_options, run_ablation
    from moescope.capture.runner import load_model
    from moescope.trace.outputs import claim

    opts = AblateOptions(
        layers=parse_layer_choice(layer),
        experts=parse_experts(experts),
        mode=mode,
        text_field=text_field,
        label_field=label_field,
        label=label,
        preset=preset,
        split=split,
        data_config=data_config,
        txt_unit=txt_unit,
        max_documents=max_documents,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        bootstrap=bootstrap,
        confidence=confidence,
        seed=seed,
        rank_by=rank_by,
        figures=not no_figures,
    )
    check_options(opts)
    inputs = [p for p in [model, *(data or [])] if Path(p).exists()]  # local files; hub names are not paths

    def log(msg: str) -> None:
        typer.echo(msg, err=True)

    with claim(output, "ablation", overwrite=overwrite, inputs=inputs):
        loaded = load_model(model, device=device, dtype=dtype)
        log(f"ablating {model} ({mode})")
        result = run_ablation(loaded.model, loaded.tokenizer, data or [], opts, log=log)
        params = {"model": model, "data": list(data) if data else "bundled held-out corpus"}
        summary = write_outputs(result, output, figures=opts.figures, params=params)
    sys.stderr.flush()
    emit(summary, json_out, text=summary_text(summary))
